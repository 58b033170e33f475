//! `hashgrid` binary: everything lives in the library's `commands` module.

fn main() -> std::process::ExitCode {
    hashgrid::commands::main()
}

//! Bounds glibc's malloc arenas for the agent's data paths (backup, restore).
//!
//! glibc gives a thread that finds its arena locked an arena of its own, up to eight per core,
//! and memory freed into an arena mostly stays with the process. The agent reads on several
//! blocking threads, compresses on others and frees on the runtime's workers, so every arena
//! ends up holding its own share of chunk buffers: on a 69,000-file tree the heap peaked at
//! 130 MB but the process at 289 MB RSS; with two arenas, 177 MB at the same speed. The count
//! can only be set before the first allocation (`mallopt` is unsafe, which this workspace
//! forbids), so the process re-executes itself once with the `glibc.malloc.arena_max`
//! tunable set. A tunable the user set already is left alone.

use std::ffi::OsString;

/// Arenas for the agent: one per core of the 2-core machines it was measured on; malloc's
/// per-thread caches keep contention low beyond that.
const ARENAS: usize = 2;
const TUNABLE: &str = "glibc.malloc.arena_max";
const TUNABLES_VAR: &str = "GLIBC_TUNABLES";
/// Set on the re-executed process: glibc may drop `GLIBC_TUNABLES` (by version) from the
/// environment of a binary run with raised privileges (an agent given `cap_dac_read_search`
/// to read every file), and without this mark such an agent would re-execute itself forever.
const REEXECUTED_VAR: &str = "HASHGRID_ARENAS_BOUND";

/// The `GLIBC_TUNABLES` value to re-execute with, or `None` when this process is the
/// re-executed one or `current` sets the arena count already (the user's choice).
fn tunables_with_arena_max(current: Option<&str>, reexecuted: bool) -> Option<String> {
    if reexecuted {
        return None;
    }
    match current {
        Some(c) if c.split(':').any(|t| t.starts_with(TUNABLE)) => None,
        Some(c) if !c.is_empty() => Some(format!("{c}:{TUNABLE}={ARENAS}")),
        _ => Some(format!("{TUNABLE}={ARENAS}")),
    }
}

/// Re-executes this process with bounded arenas; returns (and the process goes on as it is)
/// when the tunable is set already or the re-execution fails.
pub fn bound() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let current = std::env::var(TUNABLES_VAR).ok();
    let reexecuted = std::env::var_os(REEXECUTED_VAR).is_some();
    let Some(value) = tunables_with_arena_max(current.as_deref(), reexecuted) else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0: OsString = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    reexec(&exe, arg0, args, &value);
}

fn reexec(
    exe: &std::path::Path,
    arg0: OsString,
    args: impl Iterator<Item = OsString>,
    value: &str,
) {
    use std::os::unix::process::CommandExt;
    // `exec` returns only when it failed; the agent then runs with glibc's default arenas.
    let _failed = std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env(TUNABLES_VAR, value)
        .env(REEXECUTED_VAR, "1")
        .exec();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_count_is_added_once_and_never_overrides_the_users() {
        let with = |c| tunables_with_arena_max(c, false);
        assert_eq!(with(None).as_deref(), Some("glibc.malloc.arena_max=2"));
        assert_eq!(with(Some("")).as_deref(), Some("glibc.malloc.arena_max=2"));
        assert_eq!(
            with(Some("glibc.malloc.tcache_count=0")).as_deref(),
            Some("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=2")
        );
        assert_eq!(with(Some("glibc.malloc.arena_max=8")), None);
        assert_eq!(with(Some("a=1:glibc.malloc.arena_max=2")), None);
    }

    #[test]
    fn a_reexecuted_agent_never_reexecutes_again_even_when_glibc_dropped_the_tunable() {
        assert_eq!(tunables_with_arena_max(None, true), None);
        assert_eq!(tunables_with_arena_max(Some(""), true), None);
    }
}

//! The `hashgrid` binary on its own: usage, and a clear error when no node answers.

use std::process::Command;

fn hashgrid(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hashgrid"))
        .args(args)
        .env_remove("HASHGRID_TOKEN")
        .env_remove("HASHGRID_SERVER")
        .output()
        .unwrap()
}

#[test]
fn help_lists_every_command() {
    let out = hashgrid(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["backup", "restore", "snapshots", "ls", "stats", "demo"] {
        assert!(help.contains(cmd), "{cmd} missing from:\n{help}");
    }
}

#[test]
fn unreachable_node_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "x").unwrap();
    let out = hashgrid(&[
        "--server",
        "http://127.0.0.1:1",
        "--token-file",
        token.to_str().unwrap(),
        "snapshots",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connecting to http://127.0.0.1:1"), "{err}");
}

#[test]
fn missing_token_says_where_to_find_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hashgrid"))
        .arg("snapshots")
        .current_dir(dir.path())
        .env_remove("HASHGRID_TOKEN")
        .env_remove("HASHGRID_TOKEN_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no token") && err.contains("admin.token"),
        "{err}"
    );
}

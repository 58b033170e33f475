//! Full disks: a node whose data directory fills up refuses the backup with a clear error,
//! keeps every snapshot it had, and takes the same backup once space is added; a restore
//! into a full target says so instead of failing with an internal error.

use std::path::Path;

use hashgrid_cluster_tests::{assert_same_tree, data, restored, Node, Tmpfs};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `restore latest` of the tests' dataset into `target`.
fn restore_latest(node: &Node, target: &Path) -> std::process::Output {
    node.cli(&[
        "restore",
        "latest",
        "--dataset",
        "d",
        "--target",
        target.to_str().unwrap(),
    ])
}

fn write_random(dir: &Path, name: &str, seed: u64, len: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), data::random_bytes(seed, len)).unwrap();
}

#[test]
fn a_full_node_refuses_clearly_loses_nothing_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let node_dir = tmp.path().join("node");
    let Some(disk) = Tmpfs::mount(&node_dir.join("data"), 48) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let node = Node::start(&node_dir);
    let src = tmp.path().join("src");
    write_random(&src, "a.bin", 1, 20 << 20);
    let first = node.cli_json(&["backup", src.to_str().unwrap(), "--dataset", "d"]);

    // 40 MiB more of incompressible data cannot fit in what is left of 48 MiB.
    write_random(&src, "b.bin", 2, 40 << 20);
    let out = node.cli(&["backup", src.to_str().unwrap(), "--dataset", "d"]);
    assert!(!out.status.success(), "backup onto a full node succeeded");
    let err = stderr(&out);
    assert!(
        err.contains("out of disk space") && err.contains("ResourceExhausted"),
        "unclear error: {err}"
    );
    assert!(
        node.log().contains("chunk upload refused"),
        "node did not warn:\n{}",
        node.log()
    );

    // Nothing acknowledged was lost: one snapshot, and it restores.
    let list = node.cli_json(&["snapshots"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let target = tmp.path().join("restore-1");
    let id = first["snapshot"].to_string();
    node.cli_json(&["restore", &id, "--target", target.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(restored(&target, &src).join("a.bin")).unwrap(),
        data::random_bytes(1, 20 << 20)
    );

    // With room again the same backup goes through, and restores whole.
    disk.resize(256);
    let second = node.cli_json(&["backup", src.to_str().unwrap(), "--dataset", "d"]);
    assert_eq!(second["parent"], first["snapshot"]);
    let target = tmp.path().join("restore-2");
    let out = restore_latest(&node, &target);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_tree(&src, &restored(&target, &src));
    drop(node);
}

#[test]
fn restore_into_a_full_target_names_the_file_and_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    let Some(_disk) = Tmpfs::mount(&target, 8) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    write_random(&src, "big.bin", 3, 24 << 20);
    node.cli_json(&["backup", src.to_str().unwrap(), "--dataset", "d"]);

    let out = restore_latest(&node, &target);
    assert!(!out.status.success(), "restore into a full disk succeeded");
    let err = stderr(&out);
    assert!(
        err.contains("big.bin") && err.contains("No space left on device"),
        "unclear error: {err}"
    );
    assert!(!err.contains("internal"), "reported as internal: {err}");
}

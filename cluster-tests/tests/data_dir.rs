//! The node's data directory: private whatever the umask the node starts under (chunks are
//! stored unencrypted), and an admin token write cut short by a crash costs neither the
//! token nor anything acknowledged.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hashgrid_cluster_tests::{assert_same_tree, data, restored, Node};

/// Every file and directory under `dir` (and `dir` itself) with its mode.
fn modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = vec![(
        dir.to_path_buf(),
        std::fs::symlink_metadata(dir).unwrap().permissions().mode(),
    )];
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            out.extend(modes(&entry.path()));
        } else {
            let mode = entry.metadata().unwrap().permissions().mode();
            out.push((entry.path(), mode));
        }
    }
    out
}

fn backup_src(node: &Node, src: &Path) -> serde_json::Value {
    node.cli_json(&["backup", src.to_str().unwrap(), "--dataset", "d"])
}

#[test]
fn a_node_started_under_umask_000_keeps_everything_private() {
    let tmp = tempfile::tempdir().unwrap();
    let node_dir = tmp.path().join("node");
    // A data dir someone made world-readable before the first start.
    let data_dir = node_dir.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut node = Node::start_with_umask(&node_dir, 0o000);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("secret.txt"), data::text_bytes(3, 100_000)).unwrap();
    backup_src(&node, &src);
    node.stop();

    let modes = modes(&data_dir);
    assert!(
        modes
            .iter()
            .any(|(p, _)| p.extension().is_some_and(|e| e == "pack")),
        "no pack file among {modes:?}"
    );
    let open: Vec<String> = modes
        .iter()
        .filter(|(_, mode)| mode & 0o077 != 0)
        .map(|(p, mode)| format!("{:o} {}", mode & 0o7777, p.display()))
        .collect();
    assert!(open.is_empty(), "readable by others:\n{}", open.join("\n"));
}

#[test]
fn a_token_rename_lost_to_power_loss_is_completed_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.bin"), data::random_bytes(1, 300_000)).unwrap();
    let first = backup_src(&node, &src);
    let token = node.token();
    node.kill9();
    // What a power cut after the rename, before the directory reached the disk, leaves
    // behind: the complete, synced staging copy and no token file.
    let token_file = node.token_file();
    std::fs::rename(&token_file, token_file.with_file_name("admin.token.tmp")).unwrap();

    node.restart();
    assert_eq!(node.token(), token, "the cluster's token is back in place");
    assert!(!token_file.with_file_name("admin.token.tmp").exists());
    let target = tmp.path().join("restore");
    let id = first["snapshot"].to_string();
    node.cli_json(&["restore", &id, "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
}

#[test]
fn a_first_start_cut_short_after_staging_the_token_starts_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let node_dir = tmp.path().join("node");
    // A crash during the first start, between writing the staged token and committing its
    // hash: a partial staging file and no token.
    let data_dir = node_dir.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("admin.token.tmp"), b"3f2a").unwrap();

    let mut node = Node::start(&node_dir);
    assert_eq!(node.token().len(), 64);
    assert!(!data_dir.join("admin.token.tmp").exists());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"kept").unwrap();
    let first = backup_src(&node, &src);
    node.kill9();
    node.restart();
    let target = tmp.path().join("restore");
    let id = first["snapshot"].to_string();
    node.cli_json(&["restore", &id, "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
}

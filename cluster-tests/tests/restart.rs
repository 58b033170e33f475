//! Node restarts lose nothing: a snapshot acknowledged before kill -9 restores after, and a
//! backup interrupted by a crash completes on the next run without re-sending what landed.

use hashgrid::backup::{backup, BackupOptions};
use hashgrid_cluster_tests::{
    assert_same_tree, backup_opts, cluster_stats, data, restore_all, restored, runtime, Node,
};

fn opts(src: &std::path::Path) -> BackupOptions {
    backup_opts(&[src], false, "db01", "files")
}

/// Starts `hashgrid backup SRC` (with `extra` backup flags) against `node` alone. Without
/// a node to fail over to, the agent would retry for its whole budget: 2 s here.
fn spawn_backup(node: &Node, src: &std::path::Path, extra: &[&str]) -> std::process::Child {
    std::process::Command::new(hashgrid_cluster_tests::bin_dir().join("hashgrid"))
        .args(["--server", &node.server(), "--retry-budget", "2s"])
        .args(["--json", "backup"])
        .args(extra)
        .arg(src)
        .arg("--token-file")
        .arg(node.token_file())
        .env("HASHGRID_CACHE_DIR", node.dir.join("agent-cache"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `node` stores more than `bytes` (the upload is under way).
fn wait_until_stored(rt: &tokio::runtime::Runtime, node: &Node, bytes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stored = rt.block_on(async { cluster_stats(&node.connect().await).await.stored_bytes });
        if stored > bytes {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "upload never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn kill_9_between_backup_and_restore_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    data::edge_case_tree(&src);
    let rt = runtime();
    let first = rt.block_on(async {
        let conn = node.connect().await;
        backup(&conn, &opts(&src)).await.unwrap()
    });
    node.kill9();
    node.restart();
    rt.block_on(async {
        let conn = node.connect().await;
        let target = tmp.path().join("restore");
        restore_all(&conn, first.snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, &src));
        // The catalog and the store agree after the crash: an unchanged backup reads and
        // sends no file (only tree objects of ancestors whose mtime moved may be new).
        let again = backup(&conn, &opts(&src)).await.unwrap();
        assert_eq!(again.parent, Some(first.snapshot));
        assert_eq!(again.stats.reused_files, again.stats.files);
        assert!(
            again.stats.new_chunks <= src.ancestors().count() as u64,
            "{:?}",
            again.stats
        );
        assert!(again.stats.sent_bytes < 4096, "{:?}", again.stats);
    });
    // A clean stop and start keeps it all too.
    node.stop();
    node.restart();
    rt.block_on(async {
        let conn = node.connect().await;
        let stats = cluster_stats(&conn).await;
        assert_eq!(stats.snapshots, 2);
    });
}

#[test]
fn backup_interrupted_by_a_crash_resumes_without_resending() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..40u64 {
        std::fs::write(src.join(format!("f{i}")), data::random_bytes(i, 3 << 20)).unwrap();
    }
    // Run the CLI and kill the node while it uploads.
    let child = spawn_backup(&node, &src, &[]);
    let rt = runtime();
    wait_until_stored(&rt, &node, 20 << 20);
    node.kill9();
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "backup cannot succeed without its node"
    );
    node.restart();
    rt.block_on(async {
        let conn = node.connect().await;
        let landed = cluster_stats(&conn).await;
        assert_eq!(landed.snapshots, 0, "nothing was committed");
        let done = backup(&conn, &opts(&src)).await.unwrap();
        let total = 40 * (3u64 << 20);
        assert!(
            done.stats.sent_bytes <= total - landed.stored_bytes + (1 << 20),
            "re-sent what had landed: sent {} of {}, {} had landed",
            done.stats.sent_bytes,
            total,
            landed.stored_bytes
        );
        let target = tmp.path().join("restore");
        restore_all(&conn, done.snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, &src));
    });
}

/// A backup whose only node stops answering (SIGSTOP) in the middle of its upload fails
/// with an error once its retries are spent, instead of waiting: every call and stream has
/// a deadline on the agent's side, and a failed upload stream is replaced (or the backup
/// fails) at once, not when the walk next hands its slot a batch (with the memory budget
/// spent on the batches the failed streams owed, the walk never would: that wait hung
/// `backup_interrupted_by_a_crash_resumes_without_resending` once). After SIGCONT the
/// next backup completes and restores identical.
#[test]
fn a_backup_whose_node_hangs_fails_instead_of_waiting_forever() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..24u64 {
        std::fs::write(
            src.join(format!("f{i}")),
            data::random_bytes(100 + i, 4 << 20),
        )
        .unwrap();
    }
    let child = spawn_backup(&node, &src, &["--memory-budget", "32M"]);
    let rt = runtime();
    wait_until_stored(&rt, &node, 8 << 20);
    node.pause();
    // Keepalive (10 s) + failover probe + retry budget: well under two minutes. A hang is
    // what this guards against, so the bound is generous and the process is killed after.
    let hang_guard = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut child = child;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > hang_guard {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    node.resume();
    let status = status.expect("the backup hung after its node stopped answering");
    assert!(
        !status.success(),
        "a backup cannot succeed while its node is stopped"
    );
    rt.block_on(async {
        let conn = node.connect().await;
        let done = backup(&conn, &opts(&src)).await.unwrap();
        let target = tmp.path().join("restore");
        restore_all(&conn, done.snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, &src));
    });
}

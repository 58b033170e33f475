//! Node restarts lose nothing: a snapshot acknowledged before kill -9 restores after, and a
//! backup interrupted by a crash completes on the next run without re-sending what landed.

use hashgrid::backup::{backup, BackupOptions};
use hashgrid_cluster_tests::{
    assert_same_tree, backup_opts, cluster_stats, data, restore_all, restored, runtime, Node,
};

fn opts(src: &std::path::Path) -> BackupOptions {
    backup_opts(&[src], false, "db01", "files")
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
    let src_s = src.to_str().unwrap().to_string();
    // Run the CLI and kill the node while it uploads.
    let child = std::process::Command::new(hashgrid_cluster_tests::bin_dir().join("hashgrid"))
        // Without a node to fail over to, the agent would retry for its whole budget.
        .args(["--server", &node.server(), "--retry-budget", "2s"])
        .args(["--json", "backup", &src_s])
        .arg("--token-file")
        .arg(node.token_file())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rt = runtime();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stored = rt.block_on(async {
            let conn = node.connect().await;
            cluster_stats(&conn).await.stored_bytes
        });
        if stored > 20 << 20 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "upload never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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

//! Verify end to end: a byte flipped in a pack is found by `hashgrid verify`, the snapshot
//! that references the chunk is marked damaged (and stays marked across a restart), a damaged
//! parent is neither the agent's parent nor the node's commit base, the next backup of the
//! same data heals the copy, and the next verify is clean and clears the mark.

use std::path::Path;
use std::process::Output;

use hashgrid::backup::backup;
use hashgrid::chunker::Chunker;
use hashgrid_cluster_tests::damage::{damage_one_of, open_index};
use hashgrid_cluster_tests::{
    assert_same_tree, backup_opts, data, restore_all, restored, runtime, Node, NodeOpts,
};
use hashgrid_proto::pb::{self, CommitSnapshotRequest};
use hashgrid_proto::ChunkId;
use tonic::Code;

fn json_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("some output")).unwrap_or_else(|e| {
        panic!(
            "not json ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Runs `hashgrid --json verify [args]`; returns the exit code and the report.
fn verify(node: &Node, args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["--json", "verify"];
    all.extend_from_slice(args);
    let out = node.cli(&all);
    (out.status.code().expect("exit code"), json_of(&out))
}

/// `damaged` flag of each snapshot, by id.
fn damaged_flags(node: &Node) -> Vec<(u64, bool)> {
    node.cli_json(&["snapshots"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_u64().unwrap(), s["damaged"].as_bool().unwrap()))
        .collect()
}

fn chunk_ids(params: hashgrid_proto::chunker::ChunkerParams, content: &[u8]) -> Vec<ChunkId> {
    let mut cuts = Vec::new();
    Chunker::new(params).cut_all(content, true, &mut cuts);
    cuts.iter()
        .map(|&(at, len)| ChunkId::of(&content[at..at + len]))
        .collect()
}

#[test]
fn verify_marks_damage_and_a_new_backup_heals_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let content = data::random_bytes(21, 1 << 20);
    std::fs::write(src.join("data.bin"), &content).unwrap();
    std::fs::write(src.join("notes.txt"), data::text_bytes(22, 30_000)).unwrap();
    let rt = runtime();
    let opts = || backup_opts(&[src.as_path()], false, "db01", "files");
    let (first, ids) = rt.block_on(async {
        let conn = node.connect().await;
        let first = backup(&conn, &opts()).await.unwrap();
        (first, chunk_ids(conn.chunker, &content))
    });

    // A clean store verifies clean.
    let (code, report) = verify(&node, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["ok"], true);

    node.stop();
    let (victim, _) = damage_one_of(&node.dir.join("data/chunks/packs"), &ids);
    node.restart();

    // A dry run reports and marks nothing.
    let (code, report) = verify(&node, &["--dry-run"]);
    assert_eq!(code, 4, "{report}");
    assert_eq!(report["bad_chunks"], 1, "{report}");
    assert_eq!(damaged_flags(&node), vec![(first.snapshot.0, false)]);

    // The real run: the bad copy left the index on the dry run's read; now the snapshot
    // referencing it is found and marked.
    let (code, report) = verify(&node, &[]);
    assert_eq!(code, 4, "{report}");
    assert_eq!(report["missing_chunks"], 1, "{report}");
    assert_eq!(report["missing_ids"][0], victim.to_string(), "{report}");
    assert_eq!(report["damaged"][0]["id"], first.snapshot.0, "{report}");
    assert_eq!(damaged_flags(&node), vec![(first.snapshot.0, true)]);
    let text = node.cli(&["snapshots"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("DAMAGED"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // The mark is catalog state: it survives a restart.
    node.stop();
    node.restart();
    assert_eq!(damaged_flags(&node), vec![(first.snapshot.0, true)]);

    rt.block_on(async {
        let conn = node.connect().await;
        // The node does not take a damaged parent as the base: the same root committed as
        // its child is checked in full and refused.
        let record = hashgrid::catalog::get(&conn, first.snapshot).await.unwrap();
        let mut child = pb::Snapshot::from(&record);
        child.parent = first.snapshot.0;
        child.damage = None;
        let e = conn
            .catalog
            .clone()
            .commit_snapshot(CommitSnapshotRequest {
                snapshot: Some(child),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.message().contains(&victim.to_string()), "{e}");

        // The agent does not take it as the parent either: the next backup reads the files
        // again and sends the lost chunk, which heals the old snapshot too.
        let healed = backup(&conn, &opts()).await.unwrap();
        assert_eq!(healed.parent, None);
        assert!(healed.stats.new_chunks >= 1, "{:?}", healed.stats);
        let target = tmp.path().join("restore-first");
        restore_all(&conn, first.snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, Path::new(&src)));
    });

    let (code, report) = verify(&node, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["healed_snapshots"], 1, "{report}");
    assert!(damaged_flags(&node).iter().all(|(_, d)| !d));
}

/// Every `chunk_meta` entry's version byte and length.
fn entry_shapes(db: &rocksdb::DB) -> Vec<(u8, usize)> {
    let cf = db.cf_handle("chunk_meta").unwrap();
    db.iterator_cf(cf, rocksdb::IteratorMode::Start)
        .map(|kv| {
            let (_, v) = kv.unwrap();
            (v[0], v.len())
        })
        .collect()
}

/// Waits (up to 20 s) until the node's `hashgrid_store_entries_upgraded_total` satisfies
/// `done`, and returns it: the store's writer thread upgrades entries just after the read
/// that found them.
fn await_upgraded(node: &Node, done: impl Fn(usize) -> bool, what: &str) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = node
            .metric("hashgrid_store_entries_upgraded_total")
            .unwrap_or(0.0) as usize;
        if done(now) {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "entries upgraded: {now}, expected {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A store written before the index kept a checksum of each copy (every entry rewritten here,
/// the node stopped, as the first version wrote it: 30 bytes, version 1). Its snapshots
/// restore identical; each read that decodes and hashes an old copy gives its entry the
/// checksum (a restore upgrades what it read, verify the rest, nothing twice), after which
/// the index holds only version 2 entries and restores still come back identical.
#[test]
fn entries_from_before_checksums_are_upgraded_by_the_reads_that_check_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start_with(
        &tmp.path().join("node"),
        NodeOpts {
            metrics_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            ..Default::default()
        },
    );
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    for (dir, seed) in [(&one, 31), (&two, 32)] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("data.bin"), data::random_bytes(seed, 3 << 20)).unwrap();
        std::fs::write(dir.join("notes.txt"), data::text_bytes(seed, 400_000)).unwrap();
    }
    let rt = runtime();
    let snaps = rt.block_on(async {
        let conn = node.connect().await;
        let mut snaps = Vec::new();
        for (src, dataset) in [(&one, "one"), (&two, "two")] {
            let opts = backup_opts(&[src.as_path()], false, "db01", dataset);
            snaps.push(backup(&conn, &opts).await.unwrap().snapshot);
        }
        (snaps[0], snaps[1])
    });

    node.stop();
    let total = {
        let db = open_index(&node);
        let cf = db.cf_handle("chunk_meta").unwrap();
        let entries: Vec<_> = db
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .map(|kv| kv.unwrap())
            .collect();
        for (key, value) in &entries {
            assert_eq!(
                (value[0], value.len()),
                (2, 38),
                "a new node writes version 2"
            );
            let mut old = value[..30].to_vec();
            old[0] = 1;
            db.put_cf(cf, key, old).unwrap();
        }
        entries.len()
    };
    assert!(total > 50, "{total} entries");
    node.restart();

    // Restoring the first snapshot reads (and upgrades) its chunks and trees, not the
    // second's.
    rt.block_on(async {
        let conn = node.connect().await;
        let target = tmp.path().join("restore-one");
        restore_all(&conn, snaps.0, &target).await;
        assert_same_tree(&one, &restored(&target, &one));
    });
    let after_restore = await_upgraded(&node, |n| n > 0, "some");
    assert!(after_restore < total, "{after_restore} of {total}");

    // Verify reads every copy: the rest are upgraded, and those already done are not again.
    let (code, report) = verify(&node, &[]);
    assert_eq!(code, 0, "{report}");
    await_upgraded(&node, |n| n >= total, &format!("{total}"));
    let (code, report) = verify(&node, &[]);
    assert_eq!(code, 0, "{report}");
    // A backup's new chunks queue behind any upgrade the verify's reads asked for: once it
    // is done, the count is final.
    let three = tmp.path().join("three");
    std::fs::create_dir_all(&three).unwrap();
    std::fs::write(three.join("new.bin"), data::random_bytes(33, 1 << 20)).unwrap();
    rt.block_on(async {
        let conn = node.connect().await;
        let opts = backup_opts(&[three.as_path()], false, "db01", "three");
        assert!(backup(&conn, &opts).await.unwrap().stats.new_chunks > 0);
    });
    let upgraded = await_upgraded(&node, |n| n >= total, &format!("{total}"));
    assert_eq!(upgraded, total, "an entry was upgraded twice");

    node.stop();
    let shapes = entry_shapes(&open_index(&node));
    assert!(shapes.len() > total, "{} entries", shapes.len());
    assert!(shapes.iter().all(|&s| s == (2, 38)), "{shapes:?}");
    node.restart();
    rt.block_on(async {
        let conn = node.connect().await;
        for (snap, src) in [(snaps.0, &one), (snaps.1, &two)] {
            let target = tmp.path().join(format!("again-{}", snap.0));
            restore_all(&conn, snap, &target).await;
            assert_same_tree(src, &restored(&target, src));
        }
    });
}

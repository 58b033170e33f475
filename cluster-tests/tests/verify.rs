//! Verify end to end: a byte flipped in a pack is found by `hashgrid verify`, the snapshot
//! that references the chunk is marked damaged (and stays marked across a restart), a damaged
//! parent is neither the agent's parent nor the node's commit base, the next backup of the
//! same data heals the copy, and the next verify is clean and clears the mark.

use std::path::Path;
use std::process::Output;

use hashgrid::backup::backup;
use hashgrid::chunker::Chunker;
use hashgrid_cluster_tests::damage::damage_one_of;
use hashgrid_cluster_tests::{
    assert_same_tree, backup_opts, data, restore_all, restored, runtime, Node,
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

//! Fault test 2 of the cluster issue: 3 nodes, R = 3, W = 2. Each cycle starts a backup
//! through the `hashgrid` CLI (all three nodes as seeds, a different coordinator first each
//! time) and kills -9 one node while the backup uploads: the catalog leader every third
//! cycle, the agent's coordinator every other, a follower otherwise. The backup completes,
//! by the agent failing over and retrying or on a rerun; the killed node restarts. At the
//! end, after repair: every acknowledged snapshot restores byte-identical, there is exactly
//! one snapshot per backup, and every chunk of every backup is in each node's own store.
//! What a cycle re-sends (after a failover, or on a rerun) is at most what the cluster did
//! not hold when the node died plus 4 MiB.
//!
//! `HASHGRID_CYCLES` sets the number of cycles (10 by default; 100 for a soak run).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hashgrid::chunker::Chunker;
use hashgrid_cluster_tests::cluster::{Cluster, FAST_REPAIR};
use hashgrid_cluster_tests::{
    assert_same_tree, bin_dir, cluster_stats, data, has_chunks, restore_all, restored, runtime,
};
use hashgrid_proto::chunker::ChunkerParams;
use hashgrid_proto::{ChunkId, SnapshotId};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(120);
/// What a cycle may re-send beyond the bytes the cluster lacked when the node died: chunks
/// that were on one live owner and the dead one (not present until repaired) and batches
/// whose lookup raced the kill.
const RESEND_SLACK: u64 = 4 << 20;

fn cycles() -> usize {
    std::env::var("HASHGRID_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

/// A fresh source of ~30 MiB: random (incompressible) files and some text. Large enough
/// that the kill, once 20 chunks landed, finds most cycles still uploading on a fast
/// machine (with 10 MiB half the cycles had uploaded everything and were committing).
fn make_source(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..5 {
        std::fs::write(
            dir.join(format!("blob{i}.bin")),
            data::random_bytes(seed * 100 + i, 6 << 20),
        )
        .unwrap();
    }
    std::fs::write(dir.join("notes.txt"), data::text_bytes(seed, 100_000)).unwrap();
}

/// Every chunk of the files in `src`, cut as the agent cuts them, with its length.
fn chunks_of(params: ChunkerParams, src: &Path) -> Vec<(ChunkId, u64)> {
    let chunker = Chunker::new(params);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let content = std::fs::read(entry.unwrap().path()).unwrap();
        let mut cuts = Vec::new();
        chunker.cut_all(&content, true, &mut cuts);
        out.extend(
            cuts.iter()
                .map(|&(at, len)| (ChunkId::of(&content[at..at + len]), len as u64)),
        );
    }
    out
}

/// The bytes of `chunks` the cluster does not hold, as node `via` answers (the agent's own
/// lookup): what a failover may have to send again.
fn missing_bytes(
    rt: &tokio::runtime::Runtime,
    cluster: &Cluster,
    chunks: &[(ChunkId, u64)],
    via: usize,
) -> u64 {
    let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
    let present = rt.block_on(async {
        let conn = cluster.connect(via).await;
        has_chunks(&conn, &ids)
            .await
            .expect("look up the cycle's chunks")
    });
    chunks
        .iter()
        .zip(present)
        .filter(|(_, held)| !held)
        .map(|((_, len), _)| len)
        .sum()
}

/// Starts `hashgrid backup` of `src` with `seeds` (the first is the coordinator).
fn spawn_backup(
    cluster: &Cluster,
    seeds: &[usize],
    src: &Path,
    dataset: &str,
) -> std::process::Child {
    let servers: Vec<String> = seeds.iter().map(|&i| cluster.nodes[i].server()).collect();
    Command::new(bin_dir().join("hashgrid"))
        .args(["--server", &servers.join(",")])
        .arg("--token-file")
        .arg(cluster.nodes[0].token_file())
        .args(["--json", "backup", "--client", "kc", "--dataset", dataset])
        .arg(src)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hashgrid backup")
}

/// The snapshot id a finished `hashgrid --json backup` printed and the bytes it sent
/// twice (after a failed coordinator), or its error output if it failed.
fn finished(child: std::process::Child) -> Result<(SnapshotId, u64, u64), String> {
    let out = child.wait_with_output().expect("wait for hashgrid");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value =
        serde_json::from_str(stdout.lines().last().expect("backup output")).expect("json");
    Ok((
        SnapshotId(summary["snapshot"].as_u64().expect("snapshot id")),
        summary["upload"]["resent_bytes"]
            .as_u64()
            .expect("resent bytes"),
        summary["upload"]["sent_bytes"]
            .as_u64()
            .expect("sent bytes"),
    ))
}

/// Chunks stored on the running node `via`, or `None` if it does not answer (or another
/// node answered for it).
fn chunks_on(
    rt: &tokio::runtime::Runtime,
    cluster: &Cluster,
    ids: &[u64],
    via: usize,
) -> Option<u64> {
    rt.block_on(async {
        let conn = tokio::time::timeout(Duration::from_secs(3), cluster.connect_quick(via))
            .await
            .ok()??;
        let stats = cluster_stats(&conn).await;
        (stats.node_id == ids[via]).then_some(stats.chunks)
    })
}

#[test]
fn kill_cycles_lose_nothing_and_commit_each_backup_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_with(&tmp.path().join("cluster"), 3, 3, 2, &FAST_REPAIR);
    let rt = runtime();
    let ids = rt.block_on(cluster.node_ids());
    let params = rt.block_on(cluster.connect(0)).chunker;
    let n = cycles();
    let mut acknowledged: Vec<(SnapshotId, PathBuf)> = Vec::new();
    let mut reruns = 0;
    let mut total_resent = 0u64;
    // Cycles whose kill found some of the backup's data not yet stored.
    let mut mid_upload = 0;
    for cycle in 0..n {
        let src = tmp.path().join(format!("src{cycle}"));
        make_source(&src, cycle as u64 + 1);
        let coordinator = cycle % 3;
        let leader = rt.block_on(cluster.leader()).expect("a catalog leader");
        let victim = if cycle % 3 == 0 {
            leader
        } else if cycle % 2 == 0 {
            coordinator
        } else {
            (0..3)
                .find(|&i| i != leader && i != coordinator)
                .expect("a follower that does not coordinate")
        };
        let seeds: Vec<usize> = (0..3).map(|k| (coordinator + k) % 3).collect();
        let watcher = seeds.iter().copied().find(|&i| i != victim).unwrap();
        let baseline = chunks_on(&rt, &cluster, &ids, watcher).unwrap_or(0);
        let dataset = format!("cycle{cycle}");
        let mut child = spawn_backup(&cluster, &seeds, &src, &dataset);
        // Kill while the upload is under way: once some of this backup's chunks landed.
        let deadline = Instant::now() + SETTLE;
        while chunks_on(&rt, &cluster, &ids, watcher).unwrap_or(0) < baseline + 20 {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: the upload never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        cluster.nodes[victim].kill9();
        assert!(
            child.try_wait().expect("backup process").is_none(),
            "cycle {cycle}: the backup had ended before the kill"
        );
        let missing = missing_bytes(&rt, &cluster, &chunks_of(params, &src), watcher);
        mid_upload += usize::from(missing > 0);
        let (snap, resent, sent) = match finished(child) {
            Ok(s) => s,
            Err(e) => {
                println!("cycle {cycle}: backup failed ({}); rerunning", e.trim());
                reruns += 1;
                // A rerun sends again whatever it finds missing: all of it counts as re-sent.
                let (snap, _, sent) = finished(spawn_backup(&cluster, &seeds, &src, &dataset))
                    .unwrap_or_else(|e| panic!("cycle {cycle}: the rerun failed too: {e}"));
                (snap, sent, sent)
            }
        };
        assert!(
            resent <= missing + RESEND_SLACK,
            "cycle {cycle}: re-sent {resent} bytes, but only {missing} were missing when the \
             node died"
        );
        total_resent += resent;
        println!(
            "cycle {cycle}: killed node {} ({}), snapshot {}, sent {} KiB, missing at the kill \
             {} KiB, re-sent {} KiB",
            victim + 1,
            if victim == leader {
                "leader"
            } else if victim == coordinator {
                "coordinator"
            } else {
                "follower"
            },
            snap.0,
            sent >> 10,
            missing >> 10,
            resent >> 10,
        );
        acknowledged.push((snap, src));
        cluster.nodes[victim].restart();
    }

    // Repair brings every node to every chunk (R = 3 on 3 nodes): the same count everywhere,
    // stable.
    let deadline = Instant::now() + SETTLE;
    let mut last = Vec::new();
    loop {
        let counts: Vec<u64> = (0..3)
            .filter_map(|i| chunks_on(&rt, &cluster, &ids, i))
            .collect();
        if counts.len() == 3 && counts.iter().all(|&c| c == counts[0] && c > 0) && counts == last {
            break;
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!("the nodes never converged: chunks per node {counts:?}");
        }
        last = counts;
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every chunk of every acknowledged backup is in each node's own store, asked of each
    // node alone (R = 3 on 3 nodes: every node owns every chunk).
    let wanted: Vec<ChunkId> = acknowledged
        .iter()
        .flat_map(|(_, src)| chunks_of(params, src))
        .map(|(id, _)| id)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let secret = cluster.nodes[0].secret();
    rt.block_on(async {
        for (i, node) in cluster.nodes.iter().enumerate() {
            let held = node
                .owner_has(&wanted, Some(&secret), None)
                .await
                .unwrap_or_else(|e| panic!("node {}: {e}", i + 1));
            let lacking = held.iter().filter(|&&h| !h).count();
            assert_eq!(
                lacking,
                0,
                "node {} lacks {lacking} of the {} chunks backed up",
                i + 1,
                wanted.len()
            );
        }
    });

    // Any snapshot lost or restored different panics here.
    let duplicates = rt.block_on(async {
        let conn = cluster.connect(0).await;
        for (snap, src) in &acknowledged {
            let target = tmp.path().join(format!("restore-{}", snap.0));
            restore_all(&conn, *snap, &target).await;
            assert_same_tree(src, &restored(&target, src));
        }
        cluster_stats(&conn).await.snapshots as usize - acknowledged.len()
    });
    println!(
        "cycles={n} reruns={reruns} lost=0 duplicates={duplicates} resent_kib={} \
         killed_mid_upload={mid_upload}",
        total_resent >> 10
    );
    assert_eq!(duplicates, 0, "a backup committed more than one snapshot");
    assert!(
        mid_upload > 0,
        "every kill landed after the upload: the data path's failover went untested"
    );
}

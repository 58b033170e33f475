//! Benchmark, one node against three (R = 3, W = 2) and against a wider cluster (eight
//! nodes, R = 3, W = 2: every partition's owners differ, so one lookup's ids spread over
//! hundreds of owner sets), in the same run: ingest of new data through one coordinator,
//! lookups through it (present and absent ids), restore through it, and the bytes the agent
//! sent against what the nodes stored, with peak resident memory beside the times (each
//! node's and the benchmark process's, which is the agent), and the owner calls the nodes
//! served each other during the ingest (`put calls`) and the lookups (`has calls`), and the
//! CPU time the ingest cost per MB in the coordinator, the other nodes and the agent. Prints
//! figures; asserts only correctness (timings depend on the machine).
//!
//! `cargo test --release --workspace --test bench_replication -- --ignored --nocapture`;
//! `HASHGRID_BENCH_MIB` sets the data size (default 256), `HASHGRID_BENCH_WIDE` the wide
//! cluster's size (default 8; 0 leaves it out), `HASHGRID_BENCH_MEMORY` the agent's memory
//! budget (default the agent's own, 64M; it sizes the `Put` batches).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use hashgrid::backup::backup;
use hashgrid::Connection;
use hashgrid_cluster_tests::cluster::{members_in, Cluster};
use hashgrid_cluster_tests::damage::stored_ids;
use hashgrid_cluster_tests::{
    assert_same_tree, backup_opts, cluster_stats, cpu_seconds, data, peak_rss, restore_all,
    restored, runtime,
};
use hashgrid_proto::id::pack_ids;
use hashgrid_proto::pb::{self, HasRequest};
use hashgrid_proto::ChunkId;

/// Ids per lookup and lookups in flight, as the agent sends them.
const HAS_BATCH: usize = 4096;
const HAS_IN_FLIGHT: usize = 4;
/// How long each lookup measurement runs.
const LOOKUP_TIME: Duration = Duration::from_secs(3);

fn make_source(dir: &Path, mib: usize) {
    std::fs::create_dir_all(dir).unwrap();
    // Files of 4 MiB: half random, half text-like (compressible).
    for i in 0..mib.div_ceil(4) {
        let bytes = if i % 2 == 0 {
            data::random_bytes(1000 + i as u64, 4 << 20)
        } else {
            data::text_bytes(1000 + i as u64, 4 << 20)
        };
        std::fs::write(dir.join(format!("f{i:04}")), bytes).unwrap();
    }
}

/// Looks up `ids` over and over for [`LOOKUP_TIME`]; returns ids per second and checks
/// every answer is `expect`.
async fn lookups_per_sec(conn: &Connection, ids: &[ChunkId], expect: bool) -> f64 {
    let batches: Vec<Arc<Vec<u8>>> = ids
        .chunks(HAS_BATCH)
        .map(|b| Arc::new(pack_ids(b)))
        .collect();
    let sizes: Vec<usize> = ids.chunks(HAS_BATCH).map(<[ChunkId]>::len).collect();
    let start = Instant::now();
    let mut done = 0usize;
    while start.elapsed() < LOOKUP_TIME {
        let answers = stream::iter(batches.iter().cloned().zip(sizes.iter().copied()))
            .map(|(packed, n)| {
                let mut chunks = conn.chunks.clone();
                let epoch = conn.epoch();
                async move {
                    let present = chunks
                        .has(HasRequest {
                            epoch,
                            ids: packed.to_vec(),
                        })
                        .await
                        .expect("lookup")
                        .into_inner()
                        .present;
                    (present, n)
                }
            })
            .buffer_unordered(HAS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await;
        for (present, n) in answers {
            let hits = (0..n)
                .filter(|i| present[i / 8] & (1 << (i % 8)) != 0)
                .count();
            assert_eq!(hits, if expect { n } else { 0 });
            done += n;
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}

struct Figures {
    ingest_mbs: f64,
    absent_per_s: f64,
    present_per_s: f64,
    restore_mbs: f64,
    logical: u64,
    sent: u64,
    stored_new: u64,
    stored_all_nodes: u64,
    /// Owner calls the nodes served other nodes' coordinators during the ingest (`OwnerPut`)
    /// and the lookups (`OwnerHas`).
    put_calls: f64,
    has_calls: f64,
    /// CPU milliseconds per MB ingested: the coordinator's, the other nodes' together, and
    /// the benchmark process's (the agent's).
    coordinator_ms_mb: f64,
    others_ms_mb: f64,
    agent_ms_mb: f64,
    /// The largest node's peak resident memory over the whole run.
    node_peak_rss: u64,
    /// The benchmark process's (the agent's) peak so far: the one-node run's agent work
    /// comes before the three-node run's, so the later figure covers both.
    agent_peak_rss: u64,
}

fn run(root: &Path, src: &Path, nodes: usize, r: u8, w: u8) -> Figures {
    let cluster = Cluster::start(root, nodes, r, w);
    let rt = runtime();
    rt.block_on(async {
        cluster
            .wait_for("every member active", Duration::from_secs(60), |all| {
                all.len() == nodes
                    && all.iter().all(|s| {
                        s.raft_leader != 0 && members_in(s, pb::MemberState::Active).len() == nodes
                    })
            })
            .await;
        let conn = cluster.connect(0).await;
        let owner_calls = |call: &str| -> f64 {
            let name = format!("hashgrid_owner_calls_total{{call=\"{call}\"}}");
            cluster.nodes.iter().filter_map(|n| n.metric(&name)).sum()
        };
        let puts_before = owner_calls("put");
        let cpu = || -> Vec<f64> {
            let nodes = cluster.nodes.iter().map(|n| n.pid() as u32);
            nodes
                .chain([std::process::id()])
                .map(|pid| cpu_seconds(pid).expect("a process's CPU time"))
                .collect()
        };
        let cpu_before = cpu();
        let start = Instant::now();
        let mut opts = backup_opts(&[src], false, "bench", "data");
        if let Ok(budget) = std::env::var("HASHGRID_BENCH_MEMORY") {
            opts.memory = budget
                .parse()
                .expect("HASHGRID_BENCH_MEMORY: a size such as 256M");
        }
        let summary = backup(&conn, &opts).await.expect("backup");
        let ingest = start.elapsed().as_secs_f64();
        let logical = summary.stats.logical_bytes;
        let put_calls = owner_calls("put") - puts_before;
        let cpu_used: Vec<f64> = cpu().iter().zip(&cpu_before).map(|(a, b)| a - b).collect();

        let present = stored_ids(&cluster.nodes[0].dir.join("data/chunks/packs"));
        let absent: Vec<ChunkId> = (0..65_536u64)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        let has_before = owner_calls("has");
        let absent_per_s = lookups_per_sec(&conn, &absent, false).await;
        let present_per_s = lookups_per_sec(&conn, &present, true).await;
        let has_calls = owner_calls("has") - has_before;

        let target = root.join("restore");
        let start = Instant::now();
        restore_all(&conn, summary.snapshot, &target).await;
        let restore = start.elapsed().as_secs_f64();
        assert_same_tree(src, &restored(&target, src));
        std::fs::remove_dir_all(&target).unwrap();

        let mut stored_all_nodes = 0;
        for i in 0..nodes {
            stored_all_nodes += cluster_stats(&cluster.connect(i).await).await.stored_bytes;
        }
        let node_peak_rss = cluster
            .nodes
            .iter()
            .filter_map(|n| peak_rss(n.pid() as u32))
            .max()
            .expect("the nodes' memory");
        let agent_peak_rss = peak_rss(std::process::id()).expect("the agent's memory");
        let mb = logical as f64 / 1e6;
        let ms_mb = |s: f64| s * 1e3 / mb;
        Figures {
            ingest_mbs: mb / ingest,
            absent_per_s,
            present_per_s,
            restore_mbs: mb / restore,
            logical,
            sent: summary.upload.sent_bytes,
            stored_new: summary.upload.stored_bytes,
            stored_all_nodes,
            put_calls,
            has_calls,
            coordinator_ms_mb: ms_mb(cpu_used[0]),
            // (`0.0 +`: an empty sum of floats is -0.0.)
            others_ms_mb: ms_mb(0.0 + cpu_used[1..nodes].iter().sum::<f64>()),
            agent_ms_mb: ms_mb(cpu_used[nodes]),
            node_peak_rss,
            agent_peak_rss,
        }
    })
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_one_node_against_three() {
    let mib: usize = std::env::var("HASHGRID_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src, mib);
    let one = run(&tmp.path().join("one"), &src, 1, 1, 1);
    let three = run(&tmp.path().join("three"), &src, 3, 3, 2);
    let wide_nodes: usize = std::env::var("HASHGRID_BENCH_WIDE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let wide = (wide_nodes > 0).then(|| {
        let f = run(&tmp.path().join("wide"), &src, wide_nodes, 3, 2);
        (format!("{wide_nodes} nodes, R=3 W=2"), f)
    });
    println!("replication benchmark, {mib} MiB of new data (half random, half text)");
    println!(
        "{:<22} {:>12} {:>14} {:>14} {:>12} {:>12} {:>12} {:>12} {:>14} {:>10} {:>10} {:>24} {:>13} {:>14}",
        "cluster",
        "ingest MB/s",
        "absent ids/s",
        "present ids/s",
        "restore MB/s",
        "logical B",
        "sent B",
        "new B",
        "stored B (all)",
        "put calls",
        "has calls",
        "ingest CPU ms/MB c/o/a",
        "node RSS MiB",
        "agent RSS MiB"
    );
    let mut rows = vec![
        ("1 node, R=1 W=1".to_string(), &one),
        ("3 nodes, R=3 W=2".to_string(), &three),
    ];
    if let Some((name, f)) = &wide {
        rows.push((name.clone(), f));
    }
    for (name, f) in rows {
        println!(
            "{:<22} {:>12.1} {:>14.0} {:>14.0} {:>12.1} {:>12} {:>12} {:>12} {:>14} {:>10} {:>10} {:>24} {:>13} {:>14}",
            name,
            f.ingest_mbs,
            f.absent_per_s,
            f.present_per_s,
            f.restore_mbs,
            f.logical,
            f.sent,
            f.stored_new,
            f.stored_all_nodes,
            f.put_calls,
            f.has_calls,
            format!(
                "{:.1} / {:.1} / {:.1}",
                f.coordinator_ms_mb, f.others_ms_mb, f.agent_ms_mb
            ),
            f.node_peak_rss >> 20,
            f.agent_peak_rss >> 20
        );
    }
    println!(
        "3-node ingest / 1-node ingest = {:.2}; 3-node sent / new = {:.3}",
        three.ingest_mbs / one.ingest_mbs,
        three.sent as f64 / three.stored_new.max(1) as f64
    );
}

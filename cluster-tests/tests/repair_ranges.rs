//! Anti-entropy lists only what differs: a node that was down while a few chunks were
//! written catches up when it restarts, and the ids its fellow owners list to it are those
//! of the 16-bit sub-ranges whose digests differ, not those of the whole partitions (which
//! hold ~16 times as many).

use std::time::{Duration, Instant};

use hashgrid_cluster_tests::cluster::Cluster;
use hashgrid_cluster_tests::{put_chunks, runtime};
use hashgrid_proto::codec::encode_chunk;
use hashgrid_proto::pb;
use hashgrid_proto::ChunkId;
use serde_json::Value;

/// Chunks every node holds before one goes down: ~12 per partition (4096 of them), under
/// one per 16-bit sub-range (65,536).
const STORED: u32 = 50_000;
/// Chunks written while it is down (each in a partition of its own, most likely).
const MISSED: u32 = 20;
const PER_PUT: u32 = 1000;
const SETTLE: Duration = Duration::from_secs(120);

fn chunk(i: u32) -> pb::Chunk {
    let plain = format!("repair ranges test chunk {i:08}").into_bytes();
    encode_chunk(ChunkId::of(&plain), &plain.into(), 0)
}

/// Writes chunks `from..to` through node 0.
fn put(rt: &tokio::runtime::Runtime, cluster: &Cluster, from: u32, to: u32) {
    rt.block_on(async {
        let conn = cluster.connect(0).await;
        let ids: Vec<u32> = (from..to).collect();
        for batch in ids.chunks(PER_PUT as usize) {
            let chunks = batch.iter().map(|&i| chunk(i)).collect();
            put_chunks(&conn, chunks).await.expect("put");
        }
    });
}

/// `cluster status --json` through node `via`: member `id`'s entry.
fn member(cluster: &Cluster, via: usize, id: u64) -> Value {
    let s = cluster.cli_json(via, &["cluster", "status"]);
    s["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["id"].as_u64() == Some(id))
        .cloned()
        .unwrap_or_else(|| panic!("member {id} not listed: {s:#}"))
}

/// Member `m`'s workers' figure `field`, added up. Its rebalance worker (which pulls every
/// partition from the other owners when the node starts, as it would after a map change)
/// or its repair worker catches it up, whichever runs first; both pull the same way.
fn workers_total(m: &Value, field: &str) -> u64 {
    m["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w[field].as_u64().expect("a worker figure"))
        .sum()
}

/// Whether every worker of member `m` has finished a pass since it started.
fn workers_done(m: &Value) -> bool {
    m["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .all(|w| w["passes"].as_u64() >= Some(1) && w["state"] == "idle")
}

/// Waits until member `id` (asked through node `via`) holds `chunks` chunks and, when
/// `after_repair`, each of its workers has finished a pass since it started; returns the
/// member's entry.
fn wait_for_chunks(
    cluster: &Cluster,
    via: usize,
    id: u64,
    chunks: u64,
    after_repair: bool,
) -> Value {
    let deadline = Instant::now() + SETTLE;
    loop {
        let m = member(cluster, via, id);
        if m["chunks"].as_u64() == Some(chunks) && (!after_repair || workers_done(&m)) {
            return m;
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!("member {id} never reached {chunks} chunks: {m:#}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_restarted_node_is_listed_only_the_sub_ranges_it_missed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&tmp.path().join("cluster"), 3, 3, 2);
    let rt = runtime();
    let late = rt.block_on(cluster.node_id(2));
    put(&rt, &cluster, 0, STORED);
    wait_for_chunks(&cluster, 0, late, u64::from(STORED), false);

    cluster.nodes[2].kill9();
    put(&rt, &cluster, STORED, STORED + MISSED);
    cluster.nodes[2].restart();
    let caught_up = wait_for_chunks(&cluster, 0, late, u64::from(STORED + MISSED), true);
    let listed = workers_total(&caught_up, "ids_listed");
    let copied = workers_total(&caught_up, "chunks_copied");
    println!(
        "restarted node copied {copied} chunks; its two fellow owners listed {listed} ids \
         (whole partitions would be ~{} ids)",
        2 * MISSED * STORED / 4096
    );
    assert_eq!(
        copied,
        u64::from(MISSED),
        "the restarted node pulled what it missed: {caught_up:#}"
    );
    // Each missed chunk's sub-range holds it and, on average, under one other id; both
    // fellow owners list it. A whole partition would be ~12 ids per source.
    assert!(
        listed <= u64::from(2 * MISSED * 4),
        "listed {listed} ids for {MISSED} missed chunks: whole partitions, not sub-ranges? \
         {caught_up:#}"
    );
}

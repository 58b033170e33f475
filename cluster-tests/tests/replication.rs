//! Replication through a coordinator: 3 nodes, R = 3, W = 2. A backup sent to one node
//! lands on all three owners; a restore through another node is byte-identical; with one
//! node killed (-9) backups and restores go on; with two killed, a backup fails UNAVAILABLE
//! saying how many owners answered; a copy damaged on one owner is read from another; a
//! lookup that finds fewer than W copies copies the chunk to the owners lacking it. In a
//! cluster wider than R (6 nodes), a lookup and a write batch each ask each owner once,
//! whatever the ids' spread over owner sets.

use std::path::Path;
use std::time::{Duration, Instant};

use hashgrid::backup::backup;
use hashgrid::ClientError;
use hashgrid_cluster_tests::cluster::{members_in, Cluster};
use hashgrid_cluster_tests::damage::{damage_one_of, stored_ids};
use hashgrid_cluster_tests::{
    assert_same_tree, backup_opts, cluster_stats, data, has_chunks, put_chunks, restore_all,
    restored, runtime,
};
use hashgrid_proto::id::pack_ids;
use hashgrid_proto::{pb, ChunkId};

const SETTLE: Duration = Duration::from_secs(60);

/// A source tree of a few MiB: random (incompressible) files and a text file.
fn make_source(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..3 {
        std::fs::write(
            dir.join(format!("blob{i}.bin")),
            data::random_bytes(seed * 10 + i, 1 << 20),
        )
        .unwrap();
    }
    std::fs::write(dir.join("notes.txt"), data::text_bytes(seed, 200_000)).unwrap();
}

async fn settled(cluster: &Cluster) {
    cluster
        .wait_for("3 active members and a leader", SETTLE, |all| {
            all.len() == cluster.nodes.len()
                && all.iter().all(|s| {
                    members_in(s, pb::MemberState::Active).len() == 3 && s.raft_leader != 0
                })
        })
        .await;
}

/// Chunks held by each running node (its own store's count).
async fn chunks_per_node(cluster: &Cluster, nodes: &[usize]) -> Vec<u64> {
    let mut out = Vec::new();
    for &i in nodes {
        out.push(cluster_stats(&cluster.connect(i).await).await.chunks);
    }
    out
}

/// Waits until the nodes in `nodes` hold the same number of chunks (the owners beyond the
/// write quorum get their copy just after the acknowledgement); returns it.
async fn same_chunks_everywhere(cluster: &Cluster, nodes: &[usize]) -> u64 {
    let deadline = Instant::now() + SETTLE;
    loop {
        let counts = chunks_per_node(cluster, nodes).await;
        if counts.iter().all(|&c| c == counts[0] && c > 0) {
            return counts[0];
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!("owners never converged: chunks per node {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn every_chunk_reaches_all_owners_and_backups_survive_one_lost_node_but_not_two() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&tmp.path().join("cluster"), 3, 3, 2);
    let rt = runtime();
    let src1 = tmp.path().join("src1");
    make_source(&src1, 1);

    // A backup through node 1 is stored on all three; a restore through node 2 matches.
    let first = rt.block_on(async {
        settled(&cluster).await;
        let conn = cluster.connect(0).await;
        let first = backup(&conn, &backup_opts(&[&src1], false, "c", "one"))
            .await
            .expect("backup through node 1");
        let held = same_chunks_everywhere(&cluster, &[0, 1, 2]).await;
        assert!(
            held >= first.upload.stored_chunks && first.upload.stored_chunks > 40,
            "each node holds {held} chunks; the backup stored {:?}",
            first.upload
        );
        let target = tmp.path().join("restore-first");
        restore_all(&cluster.connect(1).await, first.snapshot, &target).await;
        assert_same_tree(&src1, &restored(&target, &src1));
        first
    });

    // Kill -9 one node that neither coordinates nor leads the catalog: backups (W = 2 of
    // the 2 left) and restores go on.
    let victim = rt.block_on(async {
        let leader = cluster.leader().await.expect("a leader");
        (1..3).find(|&i| i != leader).unwrap()
    });
    cluster.nodes[victim].kill9();
    let alive: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let src2 = tmp.path().join("src2");
    make_source(&src2, 2);
    rt.block_on(async {
        let conn = cluster.connect(0).await;
        let second = backup(&conn, &backup_opts(&[&src2], false, "c", "two"))
            .await
            .expect("backup with one node down");
        assert!(second.upload.stored_chunks > 40, "{:?}", second.upload);
        same_chunks_everywhere(&cluster, &alive).await;
        let other = alive[1];
        for (snap, src, name) in [(first.snapshot, &src1, "a"), (second.snapshot, &src2, "b")] {
            let target = tmp.path().join(format!("restore-degraded-{name}"));
            restore_all(&cluster.connect(other).await, snap, &target).await;
            assert_same_tree(src, &restored(&target, src));
        }
    });

    // With a second node gone, no chunk can reach W owners: the backup fails UNAVAILABLE.
    cluster.nodes[alive[1]].kill9();
    let src3 = tmp.path().join("src3");
    make_source(&src3, 3);
    rt.block_on(async {
        // The agent would retry this retryable answer for its whole budget (60 s); the
        // answer itself is what is checked here.
        let mut opts = cluster.nodes[0].connect_options_with(cluster.token());
        opts.retry.budget = Duration::ZERO;
        let conn = hashgrid::Connection::connect(&opts).await.expect("connect");
        let err = backup(&conn, &backup_opts(&[&src3], false, "c", "three"))
            .await
            .expect_err("a backup with 1 of 3 owners up");
        match &err {
            ClientError::Rpc { status, .. } => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{err}");
                // The message names the quorum that could not be reached (how many owners
                // had answered when it became impossible depends on timing).
                assert!(
                    status
                        .message()
                        .contains("of 3 owner(s) answered, 2 needed"),
                    "{err}"
                );
            }
            other => panic!("expected UNAVAILABLE, got {other}"),
        }
    });
}

#[test]
fn a_copy_damaged_on_the_coordinator_is_read_from_another_owner_and_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&tmp.path().join("cluster"), 3, 3, 2);
    let rt = runtime();
    let src = tmp.path().join("src");
    make_source(&src, 4);
    let (snapshot, held) = rt.block_on(async {
        settled(&cluster).await;
        let conn = cluster.connect(0).await;
        let snap = backup(&conn, &backup_opts(&[&src], false, "c", "d"))
            .await
            .expect("backup");
        (
            snap.snapshot,
            same_chunks_everywhere(&cluster, &[0, 1, 2]).await,
        )
    });

    // Flip a byte in one of node 1's copies while it is down.
    cluster.nodes[0].stop();
    let packs = cluster.nodes[0].dir.join("data/chunks/packs");
    let (victim, _) = damage_one_of(&packs, &stored_ids(&packs));
    cluster.nodes[0].restart();

    rt.block_on(async {
        settled(&cluster).await;
        // Node 1 reads its own copy first, finds it damaged, and serves the chunk from
        // another owner: the restore through it is whole.
        let target = tmp.path().join("restore");
        restore_all(&cluster.connect(0).await, snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, &src));
        // The damaged copy left node 1's index and was rewritten from the good one.
        same_chunks_everywhere(&cluster, &[0, 1, 2]).await;
        assert_eq!(chunks_per_node(&cluster, &[0]).await, [held]);
    });
    let log = cluster.nodes[0].log();
    assert!(
        log.contains("stored chunk failed verification") && log.contains(&victim.to_string()),
        "node 1 never found the damaged copy of {victim}"
    );
    assert!(
        log.contains("rewrote damaged copies from a good replica"),
        "node 1 never rewrote its copy"
    );
}

#[test]
fn a_lookup_copies_a_chunk_found_on_fewer_than_w_owners_to_the_owners_lacking_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Repair off: the restarted node must still lack the chunks when the lookups come.
    let mut cluster = Cluster::start_with(
        &tmp.path().join("cluster"),
        3,
        3,
        2,
        &["--repair-interval-secs", "0"],
    );
    let rt = runtime();
    let src = tmp.path().join("src");
    make_source(&src, 5);
    // Node `late` misses the backup (two copies, on nodes 1 and `other`) ...
    let (late, other) = rt.block_on(async {
        settled(&cluster).await;
        let leader = cluster.leader().await.expect("a leader");
        let late = (1..3).find(|&i| i != leader).unwrap();
        (late, 3 - late)
    });
    cluster.nodes[late].kill9();
    rt.block_on(async {
        let conn = cluster.connect(0).await;
        backup(&conn, &backup_opts(&[&src], false, "c", "d"))
            .await
            .expect("backup with one node down");
    });
    cluster.nodes[late].restart();
    // ... and then `other` is lost: every chunk has one reachable copy, on node 1.
    cluster.nodes[other].kill9();
    let ids = stored_ids(&cluster.nodes[0].dir.join("data/chunks/packs"));
    rt.block_on(async {
        let before = chunks_per_node(&cluster, &[0, late]).await;
        assert!(
            before[1] < before[0],
            "node {late} already held the chunks: {before:?}"
        );
        // Each lookup finds one copy of W = 2, copies it to `late`, and answers present.
        let conn = cluster.connect(0).await;
        for batch in ids.chunks(4096) {
            let present = conn
                .chunks
                .clone()
                .has(pb::HasRequest {
                    epoch: conn.epoch(),
                    ids: hashgrid_proto::id::pack_ids(batch),
                })
                .await
                .expect("lookup with one owner down")
                .into_inner()
                .present;
            let hits = (0..batch.len())
                .filter(|i| present[i / 8] & (1 << (i % 8)) != 0)
                .count();
            assert_eq!(hits, batch.len(), "under-replicated chunks answered absent");
        }
        let after = chunks_per_node(&cluster, &[0, late]).await;
        assert_eq!(after[1], after[0], "node {late} did not get the copies");
    });
}

/// The owner calls of kind `call` (`has`, `put`, `get`) every node served so far.
fn owner_calls(cluster: &Cluster, call: &str) -> f64 {
    let name = format!("hashgrid_owner_calls_total{{call=\"{call}\"}}");
    cluster.nodes.iter().filter_map(|n| n.metric(&name)).sum()
}

/// Every chunk id in the packs of the cluster's nodes, once per copy.
fn all_copies(cluster: &Cluster) -> Vec<ChunkId> {
    cluster
        .nodes
        .iter()
        .flat_map(|n| stored_ids(&n.dir.join("data/chunks/packs")))
        .collect()
}

/// A cluster of `nodes` (R = 3, W = 2), every member active and no partition still moving
/// after the joins (a moving partition's old owners are asked too, in later rounds, about
/// the ids its new owners lack).
fn wide_cluster(dir: &Path, nodes: usize, rt: &tokio::runtime::Runtime) -> Cluster {
    let cluster = Cluster::start(dir, nodes, 3, 2);
    rt.block_on(async {
        cluster
            .wait_for("every member active and a leader", SETTLE, |all| {
                all.len() == nodes
                    && all.iter().all(|s| {
                        members_in(s, pb::MemberState::Active).len() == nodes && s.raft_leader != 0
                    })
            })
            .await;
    });
    let deadline = Instant::now() + SETTLE;
    while cluster.cli_json(0, &["cluster", "status"])["moving"] != 0 {
        assert!(Instant::now() < deadline, "partitions still moving");
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster
}

#[test]
fn a_lookup_and_a_write_in_a_cluster_wider_than_r_ask_each_owner_once() {
    const NODES: usize = 6;
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime();
    let cluster = wide_cluster(&tmp.path().join("cluster"), NODES, &rt);
    let src = tmp.path().join("src");
    make_source(&src, 7);
    rt.block_on(async {
        let conn = cluster.connect(0).await;
        backup(&conn, &backup_opts(&[&src], false, "c", "d"))
            .await
            .expect("backup");
        // Every chunk on its three owners (the third copy lands just after the reply).
        let deadline = Instant::now() + SETTLE;
        let present: Vec<ChunkId> = loop {
            let mut all = all_copies(&cluster);
            let copies = all.len();
            all.sort_unstable();
            all.dedup();
            if copies == 3 * all.len() {
                break all;
            }
            assert!(
                Instant::now() < deadline,
                "copies never reached 3 per chunk"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Ids spread over as many owner sets as there are, present ones among them.
        let mut ids: Vec<ChunkId> = (0..4096 - present.len() as u64)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        ids.extend(&present);
        let before = owner_calls(&cluster, "has");
        let answer = conn
            .chunks
            .clone()
            .has(pb::HasRequest {
                epoch: conn.epoch(),
                ids: pack_ids(&ids),
            })
            .await
            .expect("lookup")
            .into_inner()
            .present;
        let calls = owner_calls(&cluster, "has") - before;
        for (i, id) in ids.iter().enumerate() {
            let found = answer[i / 8] & (1 << (i % 8)) != 0;
            assert_eq!(found, present.contains(id), "id {i} answered wrong");
        }
        // One round (W = 2 owners per id: both answer the same) asks each other node once.
        assert!(
            calls <= (NODES - 1) as f64,
            "a lookup of 4096 ids made {calls} owner calls to {} other nodes",
            NODES - 1
        );
        println!(
            "lookup of {} ids ({} present) through one of {NODES} nodes: {calls} owner calls",
            ids.len(),
            present.len()
        );

        // One write batch of new chunks, spread over every owner set: one owner call to
        // each other node (each gets all its chunks of every group at once), counted once
        // every copy has landed (the third copies after the reply).
        const CHUNKS: u64 = 512;
        let copies_before = all_copies(&cluster).len();
        let before = owner_calls(&cluster, "put");
        let chunks: Vec<pb::Chunk> = (0..CHUNKS)
            .map(|i| {
                let plain = data::random_bytes(1_000_000 + i, 2048);
                pb::Chunk {
                    id: ChunkId::of(&plain).as_bytes().to_vec(),
                    plain_len: plain.len() as u32,
                    codec: pb::Codec::Raw as i32,
                    data: plain.into(),
                    ..Default::default()
                }
            })
            .collect();
        let reply = put_chunks(&conn, chunks).await.expect("write batch");
        assert_eq!(reply.stored as u64, CHUNKS, "{reply:?}");
        let deadline = Instant::now() + SETTLE;
        while all_copies(&cluster).len() < copies_before + 3 * CHUNKS as usize {
            assert!(
                Instant::now() < deadline,
                "the batch's copies never reached 3 per chunk"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let calls = owner_calls(&cluster, "put") - before;
        assert!(
            calls <= (NODES - 1) as f64,
            "a write batch of {CHUNKS} chunks made {calls} owner calls to {} other nodes",
            NODES - 1
        );
        println!(
            "write batch of {CHUNKS} chunks through one of {NODES} nodes: {calls} owner calls"
        );
    });
}

/// A coordinator verifies only the chunks it stores; the ones it forwards are verified by
/// their owners. A chunk that fails there (here: bytes that do not hash to the id sent)
/// fails the write as INVALID_ARGUMENT naming the chunk, at once (no fallback asked, no
/// retry), and no copy of it is stored anywhere.
#[test]
fn a_bad_chunk_the_coordinator_only_forwards_is_refused_by_its_owners() {
    const NODES: usize = 5;
    const BAD: u64 = 24;
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime();
    let cluster = wide_cluster(&tmp.path().join("cluster"), NODES, &rt);
    let verify_refusals = |node: usize| {
        cluster.nodes[node]
            .metric("hashgrid_chunk_rejected_total{reason=\"verify\"}")
            .unwrap_or(0.0)
    };
    let before: Vec<f64> = (0..NODES).map(verify_refusals).collect();
    let copies_before = all_copies(&cluster).len();
    rt.block_on(async {
        let conn = cluster.connect(0).await;
        for i in 0..BAD {
            let plain = data::random_bytes(2_000_000 + i, 4096);
            let claimed = ChunkId::of(&data::random_bytes(3_000_000 + i, 4096));
            let bad = pb::Chunk {
                id: claimed.as_bytes().to_vec(),
                plain_len: plain.len() as u32,
                codec: pb::Codec::Raw as i32,
                data: plain.into(),
                ..Default::default()
            };
            let started = Instant::now();
            let e = put_chunks(&conn, vec![bad]).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "chunk {i}: {e}");
            assert!(
                e.message().contains(&claimed.to_string()) && e.message().contains("hashes to"),
                "chunk {i}: {e}"
            );
            // Refused, not retried as an owner down (that would take the peer deadline).
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "chunk {i} refused after {:?}",
                started.elapsed()
            );
            let found = has_chunks(&conn, &[claimed]).await.expect("lookup");
            assert_eq!(found, [false], "chunk {i} is present after its refusal");
        }
    });
    // The coordinator refused the ones it owns; the other nodes refused the rest.
    let refused: Vec<f64> = (0..NODES).map(|n| verify_refusals(n) - before[n]).collect();
    let by_owners: f64 = refused[1..].iter().sum();
    assert!(
        by_owners > 0.0 && refused[0] < BAD as f64,
        "refusals per node {refused:?}: the owners were never the ones to verify"
    );
    assert_eq!(
        all_copies(&cluster).len(),
        copies_before,
        "a bad chunk was stored"
    );
    println!("{BAD} bad chunks through node 0 of {NODES}: refusals per node {refused:?}");
}

//! The agent survives coordinator failures (issue 10, fault test 3, the agent's side).
//!
//! - Several seeds: a backup given a dead first seed goes through the next one, from
//!   `--server` and from `HASHGRID_SERVER`.
//! - 3 nodes, R = 3, W = 2: a backup during which a follower, then the catalog leader, then
//!   the agent's own coordinator is SIGSTOPped (each in its own run) completes within the
//!   undisturbed backup's time plus two peer timeouts; the agent leaves its stopped
//!   coordinator within two peer timeouts; `cluster status` through a live node answers
//!   within 3 s meanwhile; after SIGCONT repair brings every chunk back to all three nodes
//!   (nothing under-replicated) and every snapshot restores byte-identical.
//! - A backup routed by a map an epoch behind refreshes it and goes on.
//! - 4 nodes, R = 3, W = 2: a restore while an owner is SIGSTOPped reads around it after a
//!   hedge, not after the peer deadline.
//! - 5 nodes, R = 3, W = 2: a backup with one node killed and another SIGSTOPped writes the
//!   copies the two cannot take to fallbacks after a hedge, not after the peer deadline.
//! - 6 nodes, R = 3, W = 2: with two nodes killed and the first fallback of some of their
//!   partitions SIGSTOPped, a backup writes those copies to the next fallback, not after
//!   the peer deadline; and a chunk whose owners are the two dead nodes and the stopped one
//!   is written to fallbacks after a hedge, before anything marked the stopped one hung,
//!   and one stored before it stopped is read from a fallback after a hedge.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hashgrid::backup::{backup, BackupSummary};
use hashgrid::{ConnectOptions, Connection};
use hashgrid_cluster_tests::cluster::{members_in, status_members, test_peer_timeout, Cluster};
use hashgrid_cluster_tests::damage::stored_ids;
use hashgrid_cluster_tests::{
    assert_same_tree, assert_success, backup_opts, bin_dir, cluster_stats, data, get_chunks,
    has_chunks, peak_rss, put_chunks, restore_all, restored, runtime, Node,
};
use hashgrid_proto::codec::{encode_chunk, DEFAULT_ZSTD_LEVEL};
use hashgrid_proto::placement::Placement;
use hashgrid_proto::{pb, ChunkId};

/// An address nothing listens on: a port the kernel handed out and took back, on a loopback
/// address no node, proxy or connection of the tests uses (they are on 127.0.0.x), so no
/// other socket can take the port meanwhile.
fn dead_addr() -> String {
    let listener = TcpListener::bind("127.0.2.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

/// Runs the `hashgrid` CLI with the token of `node` and no `--server` of its own, killed
/// (exit 124, a failure the caller reports) if it runs for more than two minutes.
fn hashgrid(node: &Node, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=5", "120"])
        .arg(bin_dir().join("hashgrid"))
        .arg("--token-file")
        .arg(node.token_file())
        .args(args)
        .env_remove("HASHGRID_TOKEN")
        .env_remove("HASHGRID_SERVER");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run hashgrid")
}

#[test]
fn a_backup_given_a_dead_first_seed_goes_through_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.bin"), data::random_bytes(1, 300_000)).unwrap();
    std::fs::write(src.join("b.txt"), data::text_bytes(2, 50_000)).unwrap();
    let seeds = format!("{},{}", dead_addr(), node.server());

    let out = hashgrid(
        &node,
        &[
            "--server",
            &seeds,
            "backup",
            "--client",
            "c",
            "--dataset",
            "d",
            src.to_str().unwrap(),
        ],
        &[],
    );
    assert_success(&out, "backup with a dead first seed");

    // The same list from the environment.
    let out = hashgrid(
        &node,
        &["--json", "snapshots"],
        &[("HASHGRID_SERVER", seeds.as_str())],
    );
    assert_success(&out, "snapshots with HASHGRID_SERVER");
    let listed: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).expect("json snapshots");
    let ids: Vec<u64> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids.len(), 1, "{listed}");

    // Only dead seeds: the error says what was tried, at once (no hang).
    let started = Instant::now();
    let out = hashgrid(
        &node,
        &[
            "--server",
            &format!("{},{}", dead_addr(), dead_addr()),
            "snapshots",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    runtime().block_on(async {
        let conn = Connection::connect(&ConnectOptions::new(seeds.clone(), node.token()))
            .await
            .expect("connect through the second seed");
        assert_eq!(conn.server, node.server());
        let target = tmp.path().join("restore");
        restore_all(&conn, hashgrid_proto::SnapshotId(ids[0]), &target).await;
        assert_same_tree(&src, &restored(&target, &src));
    });
}

/// Which node is SIGSTOPped in the middle of a backup.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Follower,
    Leader,
    Coordinator,
}

/// A source of `mib` MiB of incompressible files, different for every `seed`.
fn make_source(dir: &Path, seed: u64, mib: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..mib {
        std::fs::write(
            dir.join(format!("f{i:03}.bin")),
            data::random_bytes(seed * 1000 + i as u64, 1 << 20),
        )
        .unwrap();
    }
}

/// Size of each backup: a few seconds of work on this machine, so the pause lands inside.
const SOURCE_MIB: usize = 48;
/// Longer than any backup here may take (the test's bound on a run is far below it).
const BACKUP_HANGS_AFTER: Duration = Duration::from_secs(300);
/// Stored chunks on the observer node that show a backup is under way.
const UNDER_WAY_CHUNKS: u64 = 40;
/// How long repair may take to restore every copy after the last pause.
const REPAIRED_WITHIN: Duration = Duration::from_secs(120);

struct Run {
    victim: Option<Victim>,
    src: PathBuf,
    summary: BackupSummary,
    took: Duration,
    status_took: Option<Duration>,
    /// How long after the pause the agent moved to another coordinator, when it did.
    switched_after: Option<Duration>,
    /// Peak RSS so far of the largest node and of this process (the agent runs in it).
    nodes_rss: u64,
    agent_rss: u64,
}

/// Waits until every node sees every node active and a leader.
async fn settled(cluster: &Cluster) {
    let n = cluster.nodes.len();
    cluster
        .wait_for(
            &format!("{n} active members and a leader"),
            Duration::from_secs(60),
            |all| {
                all.len() == n
                    && all.iter().all(|s| {
                        members_in(s, pb::MemberState::Active).len() == n && s.raft_leader != 0
                    })
            },
        )
        .await;
}

/// Roles for one run: the agent's coordinator, the node to pause, and a node that stays up
/// (to watch progress and ask for the cluster's status).
async fn roles(cluster: &Cluster, victim: Option<Victim>) -> (usize, Option<usize>, usize) {
    settled(cluster).await;
    let leader = cluster.leader().await.expect("a leader");
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    match victim {
        // The agent talks to a follower; the other follower stops.
        None | Some(Victim::Follower) => (others[0], victim.map(|_| others[1]), leader),
        // The agent talks to a follower; the leader stops.
        Some(Victim::Leader) => (others[0], Some(leader), others[1]),
        // The agent's own coordinator (a follower) stops.
        Some(Victim::Coordinator) => (others[0], Some(others[0]), others[1]),
    }
}

/// One backup through `coordinator` (with the others as seeds behind it), pausing
/// `victim` once the backup is under way and resuming it after the backup ended.
fn run_backup(
    cluster: &Cluster,
    rt: &tokio::runtime::Runtime,
    root: &Path,
    seed: u64,
    victim: Option<Victim>,
) -> Run {
    let src = root.join(format!("src{seed}"));
    make_source(&src, seed, SOURCE_MIB);
    let (coordinator, paused, observer) = rt.block_on(roles(cluster, victim));
    let seeds: Vec<String> = std::iter::once(coordinator)
        .chain((0..3).filter(|&i| i != coordinator))
        .map(|i| cluster.nodes[i].server())
        .collect();
    let opts = ConnectOptions::new(seeds.join(","), cluster.token());
    let started = Instant::now();
    let ((summary, took), status_took, switched_after) = rt.block_on(async {
        let conn = Connection::connect(&opts).await.expect("connect");
        let before = cluster_stats(&cluster.connect(observer).await).await.chunks;
        let job = tokio::spawn({
            let src = src.clone();
            let conn = conn.clone();
            // The backup's own time (the test's status call meanwhile is not part of it).
            async move {
                let result = backup(&conn, &backup_opts(&[&src], false, "c", "fault")).await;
                (result, started.elapsed())
            }
        });
        let mut status_took = None;
        let mut switched = None;
        if let Some(p) = paused {
            let watch = cluster.connect(observer).await;
            let deadline = Instant::now() + Duration::from_secs(120);
            while cluster_stats(&watch).await.chunks < before + UNDER_WAY_CHUNKS {
                assert!(!job.is_finished(), "the backup ended before the pause");
                assert!(Instant::now() < deadline, "the backup never got under way");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(!job.is_finished(), "the backup ended before the pause");
            cluster.nodes[p].pause();
            let paused_at = Instant::now();
            switched = Some(tokio::spawn({
                let conn = conn.clone();
                let first = conn.coordinator();
                async move {
                    while conn.coordinator() == first {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    paused_at.elapsed()
                }
            }));
            eprintln!(
                "{victim:?}: paused node {} at {:?}",
                p + 1,
                started.elapsed()
            );
            // The cluster's status through a live node, while the victim is stopped.
            // (Joiners keep no admin token: the first node's file serves, paused or not.)
            let server = cluster.nodes[observer].server();
            let asked = Instant::now();
            let out = tokio::task::block_in_place(|| {
                hashgrid(
                    &cluster.nodes[0],
                    &["--server", &server, "--json", "cluster", "status"],
                    &[],
                )
            });
            let took = asked.elapsed();
            assert_success(&out, "cluster status during the pause");
            status_took = Some(took);
        }
        // Bounded: a backup that hangs fails the test with the nodes' logs (the victim
        // resumed first, so what it says about the hang is in them too).
        let result = match tokio::time::timeout(BACKUP_HANGS_AFTER, job).await {
            Ok(joined) => joined.expect("backup task"),
            Err(_) => {
                if let Some(p) = paused {
                    cluster.nodes[p].resume();
                }
                cluster.dump_logs();
                panic!(
                    "backup with {victim:?} paused still running after {BACKUP_HANGS_AFTER:?} \
                     (agent coordinator now {})",
                    conn.coordinator()
                );
            }
        };
        let switched_after = match switched {
            Some(watcher) if watcher.is_finished() => watcher.await.ok(),
            Some(watcher) => {
                watcher.abort();
                None
            }
            None => None,
        };
        if let Some(p) = paused {
            cluster.nodes[p].resume();
        }
        let now = conn.coordinator();
        if paused == Some(coordinator) {
            assert_ne!(now, cluster.nodes[coordinator].server(), "no failover");
        } else {
            assert_eq!(
                now,
                cluster.nodes[coordinator].server(),
                "needless failover"
            );
        }
        (result, status_took, switched_after)
    });
    let summary = summary.unwrap_or_else(|e| {
        cluster.dump_logs();
        panic!("backup with {victim:?} paused failed: {e}")
    });
    Run {
        victim,
        src,
        summary,
        took,
        status_took,
        switched_after,
        nodes_rss: (0..3)
            .filter_map(|i| peak_rss(cluster.nodes[i].pid() as u32))
            .max()
            .unwrap_or(0),
        agent_rss: peak_rss(std::process::id()).unwrap_or(0),
    }
}

#[test]
fn backups_complete_while_a_follower_the_leader_or_the_coordinator_is_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&tmp.path().join("cluster"), 3, 3, 2);
    let rt = runtime();
    let mut runs = Vec::new();
    for (seed, victim) in [
        None,
        Some(Victim::Follower),
        Some(Victim::Leader),
        Some(Victim::Coordinator),
    ]
    .into_iter()
    .enumerate()
    {
        runs.push(run_backup(
            &cluster,
            &rt,
            tmp.path(),
            seed as u64 + 1,
            victim,
        ));
    }
    let normal = runs[0].took;
    let peer_timeout = test_peer_timeout();
    for r in &runs {
        eprintln!(
            "fault-3 {:<12} backup {:>6.1} s (undisturbed {:.1} s), cluster status {}, \
             coordinator switched after {}, sent {} MiB, re-sent {} KiB; peak RSS so far: \
             largest node {} MiB, agent (test process) {} MiB",
            format!("{:?}", r.victim),
            r.took.as_secs_f64(),
            normal.as_secs_f64(),
            r.status_took
                .map_or("-".into(), |t| format!("{:.2} s", t.as_secs_f64())),
            r.switched_after
                .map_or("-".into(), |t| format!("{:.2} s", t.as_secs_f64())),
            r.summary.upload.sent_bytes >> 20,
            r.summary.upload.resent_bytes >> 10,
            r.nodes_rss >> 20,
            r.agent_rss >> 20,
        );
        if let Some(t) = r.status_took {
            assert!(t < Duration::from_secs(3), "cluster status took {t:?}");
        }
        // The bound: the undisturbed time plus two peer timeouts.
        assert!(
            r.took <= normal + 2 * peer_timeout,
            "{:?} took {:?}, undisturbed {normal:?}",
            r.victim,
            r.took
        );
    }
    // A stopped coordinator is left within seconds (the agent pings every second and
    // gives a ping 3 s): within two of the harness's peer timeouts.
    let coordinator = runs
        .iter()
        .find(|r| matches!(r.victim, Some(Victim::Coordinator)));
    let switched = coordinator.and_then(|r| r.switched_after);
    assert!(
        switched.is_some_and(|t| t <= 2 * peer_timeout),
        "the agent left its stopped coordinator after {switched:?}"
    );
    // After SIGCONT, repair brings every chunk back to R = 3 copies: nothing under-replicated
    // and the same chunks on every node (each owns all of them).
    cluster.wait_quiet(0, "repair after the pauses", REPAIRED_WITHIN, |s| {
        let counts: Vec<u64> = status_members(s)
            .iter()
            .filter_map(|m| m["chunks"].as_u64())
            .collect();
        counts.len() == 3 && counts.iter().all(|&c| c == counts[0])
    });
    rt.block_on(async {
        settled(&cluster).await;
        for (i, r) in runs.iter().enumerate() {
            // Restore through a different node each time.
            let conn = cluster.connect(i % 3).await;
            // A node that was paused reads the catalog locally: wait until it caught up.
            let deadline = Instant::now() + Duration::from_secs(60);
            while hashgrid::catalog::get(&conn, r.summary.snapshot)
                .await
                .is_err()
            {
                assert!(
                    Instant::now() < deadline,
                    "node {} never learned snapshot {}",
                    i % 3 + 1,
                    r.summary.snapshot
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let target = tmp.path().join(format!("restore{i}"));
            restore_all(&conn, r.summary.snapshot, &target).await;
            assert_same_tree(&r.src, &restored(&target, &r.src));
        }
        let listed = hashgrid::catalog::list(&cluster.connect(0).await, "c", "fault")
            .await
            .expect("list");
        assert_eq!(listed.len(), runs.len(), "one snapshot per backup");
    });
}

#[test]
fn a_backup_routed_by_a_stale_map_refreshes_it_and_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&tmp.path().join("cluster"), 1, 1, 1);
    let src = tmp.path().join("src");
    make_source(&src, 99, 2);
    let rt = runtime();
    let conn = rt.block_on(cluster.connect(0));
    let old = conn.epoch();
    // A member joins: the map's epoch moves on, and the agent does not know yet.
    cluster.add_node();
    rt.block_on(async {
        cluster
            .wait_for("a newer map everywhere", Duration::from_secs(60), |all| {
                all.len() == 2
                    && all
                        .iter()
                        .all(|s| s.map.as_ref().is_some_and(|m| m.epoch > old))
            })
            .await;
        assert_eq!(conn.epoch(), old);
        let summary = backup(&conn, &backup_opts(&[&src], false, "c", "stale"))
            .await
            .expect("backup through a stale map");
        assert!(conn.epoch() > old, "the map was not refreshed");
        let target = tmp.path().join("restore");
        restore_all(&conn, summary.snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, &src));
    });
}

/// Reads go around an owner that stopped answering before any call found it out: 4 nodes,
/// R = 3, W = 2 (the coordinator owns 3 in 4 partitions and reads the rest from the other
/// owners), a peer deadline of 8 s. A restore through one node while another (neither the
/// catalog leader nor the coordinator) is SIGSTOPped takes the undisturbed restore's time
/// plus about a hedge (a quarter of the deadline), not a whole deadline; the coordinator's
/// `hashgrid_peer_calls_hedged_total{call="read"}` shows it asked beside the stopped node.
#[test]
fn a_restore_reads_around_an_owner_that_stopped_answering() {
    const PEER_TIMEOUT: Duration = Duration::from_secs(8);
    const HEDGED: &str = "hashgrid_peer_calls_hedged_total{call=\"read\"}";
    let tmp = tempfile::tempdir().unwrap();
    let timeout_ms = PEER_TIMEOUT.as_millis().to_string();
    let cluster = Cluster::start_with(
        &tmp.path().join("cluster"),
        4,
        3,
        2,
        &["--peer-timeout-ms", &timeout_ms],
    );
    let src = tmp.path().join("src");
    const MIB: usize = 32;
    make_source(&src, 9, MIB);
    let rt = runtime();
    rt.block_on(async {
        settled(&cluster).await;
        let leader = cluster.leader().await.expect("a leader");
        let coordinator = (0..4).find(|&i| i != leader).unwrap();
        let victim = (0..4).find(|&i| i != leader && i != coordinator).unwrap();
        let conn = cluster.connect(coordinator).await;
        let summary = backup(&conn, &backup_opts(&[&src], false, "c", "reads"))
            .await
            .expect("backup");
        let restore = |name: &str| {
            let target = tmp.path().join(name);
            let conn = conn.clone();
            let src = src.clone();
            async move {
                let started = Instant::now();
                restore_all(&conn, summary.snapshot, &target).await;
                let took = started.elapsed();
                assert_same_tree(&src, &restored(&target, &src));
                took
            }
        };
        let normal = restore("undisturbed").await;
        let hedged_before = cluster.nodes[coordinator].metric(HEDGED).unwrap_or(0.0);
        cluster.nodes[victim].pause();
        let took = restore("paused").await;
        cluster.nodes[victim].resume();
        let hedged = cluster.nodes[coordinator].metric(HEDGED).unwrap_or(0.0) - hedged_before;
        eprintln!(
            "restore of {MIB} MiB through node {} with node {} stopped: {:.2} s (undisturbed \
             {:.2} s, peer deadline {PEER_TIMEOUT:?}); {hedged} read call(s) hedged",
            coordinator + 1,
            victim + 1,
            took.as_secs_f64(),
            normal.as_secs_f64(),
        );
        assert!(
            hedged > 0.0,
            "no read was hedged: the stopped node was never asked first"
        );
        assert!(
            took < normal + PEER_TIMEOUT / 2,
            "the restore took {took:?} with a node stopped (undisturbed {normal:?}): it waited \
             for the stopped node instead of reading around it"
        );
    });
}

/// Backs up a new source of `mib` MiB (made under `root` as `name`) through `conn`;
/// returns the source, the summary and how long the backup took.
async fn timed_backup(
    conn: &Connection,
    root: &Path,
    name: &str,
    seed: u64,
    mib: usize,
) -> (PathBuf, BackupSummary, Duration) {
    let src = root.join(name);
    make_source(&src, seed, mib);
    let started = Instant::now();
    let summary = backup(conn, &backup_opts(&[&src], false, "c", name))
        .await
        .expect("backup");
    (src, summary, started.elapsed())
}

#[test]
fn a_backup_writes_around_a_dead_owner_and_one_that_stopped_answering() {
    const PEER_TIMEOUT: Duration = Duration::from_secs(8);
    const HEDGED: [&str; 2] = [
        "hashgrid_peer_calls_hedged_total{call=\"lookup\"}",
        "hashgrid_peer_calls_hedged_total{call=\"write\"}",
    ];
    const FALLBACK_COPIES: &str = "hashgrid_chunk_fallback_copies_total";
    const MIB: usize = 32;
    let tmp = tempfile::tempdir().unwrap();
    let timeout_ms = PEER_TIMEOUT.as_millis().to_string();
    let mut cluster = Cluster::start_with(
        &tmp.path().join("cluster"),
        5,
        3,
        2,
        &["--peer-timeout-ms", &timeout_ms],
    );
    let rt = runtime();
    let (coordinator, dead, hung) = rt.block_on(async {
        settled(&cluster).await;
        let leader = cluster.leader().await.expect("a leader");
        let others: Vec<usize> = (0..5).filter(|&i| i != leader).collect();
        (others[0], others[1], others[2])
    });
    // Writes whose owners include the dead node get its copy from a fallback at once
    // (refused connections); the baseline is taken with it dead, so the figure below is
    // what the stopped one costs.
    cluster.nodes[dead].kill9();
    rt.block_on(async {
        let conn = cluster.connect(coordinator).await;
        let run = |name, seed| timed_backup(&conn, tmp.path(), name, seed, MIB);
        let (_, _, normal) = run("one-dead", 21).await;
        let counters = || {
            let node = &cluster.nodes[coordinator];
            let hedged: f64 = HEDGED.iter().filter_map(|m| node.metric(m)).sum();
            (hedged, node.metric(FALLBACK_COPIES).unwrap_or(0.0))
        };
        let before = counters();
        cluster.nodes[hung].pause();
        let (src, summary, took) = run("one-dead-one-stopped", 22).await;
        let after = counters();
        let (hedged, fallback_copies) = (after.0 - before.0, after.1 - before.1);
        let coordinator_rss = peak_rss(cluster.nodes[coordinator].pid() as u32).unwrap_or(0);
        eprintln!(
            "backup of {MIB} MiB through node {} with node {} dead and node {} stopped: {:.2} s \
             (with only the dead one {:.2} s, peer deadline {PEER_TIMEOUT:?}); {hedged} lookup \
             or write call(s) hedged, {fallback_copies} cop(ies) written to fallbacks; the \
             coordinator's peak RSS {} MiB",
            coordinator + 1,
            dead + 1,
            hung + 1,
            took.as_secs_f64(),
            normal.as_secs_f64(),
            coordinator_rss >> 20,
        );
        assert!(
            hedged > 0.0,
            "no call waited on the stopped node: it owned none of the chunks written?"
        );
        assert!(
            fallback_copies > 0.0,
            "no copy went to a fallback with two of five nodes out"
        );
        assert!(
            took < normal + PEER_TIMEOUT / 2,
            "the backup took {took:?} with a node dead and one stopped ({normal:?} with only \
             the dead one): its writes waited for the stopped owner's deadline"
        );
        // Restored byte-identical, read around the stopped node, then once it is back.
        let target = tmp.path().join("restored-while-stopped");
        restore_all(&conn, summary.snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, &src));
        cluster.nodes[hung].resume();
        let target = tmp.path().join("restored");
        restore_all(&conn, summary.snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, &src));
    });
}

/// Six nodes, R = 3, W = 2, with an 8 s peer deadline, and roles for losing three of
/// them: two to kill (the catalog group's learner and a voter) and two candidates to stop
/// (voters): killing the two and stopping one leaves three of the five voters, so commits
/// go on. Neither the catalog leader nor the agent's coordinator is among them.
struct SixNodes {
    cluster: Cluster,
    coordinator: usize,
    dead: [usize; 2],
    candidates: [usize; 2],
    placement: Placement,
    ids: Vec<hashgrid_proto::NodeId>,
}

const SIX_PEER_TIMEOUT: Duration = Duration::from_secs(8);

fn six_nodes(root: &Path, rt: &tokio::runtime::Runtime) -> SixNodes {
    const NODES: usize = 6;
    let timeout_ms = SIX_PEER_TIMEOUT.as_millis().to_string();
    let cluster = Cluster::start_with(root, NODES, 3, 2, &["--peer-timeout-ms", &timeout_ms]);
    rt.block_on(async {
        settled(&cluster).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster.cli_json(0, &["cluster", "status"])["moving"] != 0 {
            assert!(Instant::now() < deadline, "partitions still moving");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let leader = cluster.leader().await.expect("a leader");
        let status = cluster.status(leader).await.expect("the leader's status");
        assert_eq!(status.raft_voters.len(), 5, "{status:?}");
        let mut ids = Vec::new();
        for i in 0..NODES {
            ids.push(cluster.node_id(i).await);
        }
        let learner = (0..NODES)
            .find(|&i| !status.raft_voters.contains(&ids[i]))
            .expect("a learner");
        let others: Vec<usize> = (0..NODES)
            .filter(|&i| i != leader && i != learner)
            .collect();
        let map = cluster.connect(others[0]).await.map.clone();
        let placement = Placement::new(&map).expect("cluster map");
        SixNodes {
            coordinator: others[0],
            dead: [learner, others[1]],
            candidates: [others[2], others[3]],
            placement,
            ids,
            cluster,
        }
    })
}

#[test]
fn a_backup_writes_past_a_fallback_that_stopped_answering() {
    const NODES: usize = 6;
    const PEER_TIMEOUT: Duration = SIX_PEER_TIMEOUT;
    const MIB: usize = 32;
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime();
    let SixNodes {
        mut cluster,
        coordinator,
        dead,
        candidates,
        placement,
        ids,
    } = six_nodes(&tmp.path().join("cluster"), &rt);
    // The stopped node is the candidate that is the first fallback of more of the
    // partitions whose owners include both dead nodes: their chunks' copies go to the first
    // fallback that answers.
    let stranded_behind = |hung: usize| {
        (0..placement.partitions())
            .map(hashgrid_proto::placement::Partition)
            .filter(|&p| {
                let owners = placement.owners(p);
                owners.contains(&ids[dead[0]])
                    && owners.contains(&ids[dead[1]])
                    && placement.fallbacks(p).first() == Some(&ids[hung])
            })
            .count()
    };
    let hung = candidates
        .into_iter()
        .max_by_key(|&c| stranded_behind(c))
        .unwrap();
    println!(
        "{} of {} partitions have both dead nodes among their owners and the stopped one as \
         their first fallback",
        stranded_behind(hung),
        placement.partitions()
    );
    let stranded = |id: &ChunkId| {
        let p = placement.partition_of(id);
        let owners = placement.owners(p);
        owners.contains(&ids[dead[0]])
            && owners.contains(&ids[dead[1]])
            && placement.fallbacks(p).first() == Some(&ids[hung])
    };
    for &d in &dead {
        cluster.nodes[d].kill9();
    }
    rt.block_on(async {
        let conn = cluster.connect(coordinator).await;
        // The baseline: the dead nodes' copies go to fallbacks at once (refused
        // connections).
        let run = |name, seed| timed_backup(&conn, tmp.path(), name, seed, MIB);
        let (_, _, normal) = run("two-dead", 31).await;
        let held_before: std::collections::HashSet<ChunkId> = (0..NODES)
            .flat_map(|i| stored_ids(&cluster.nodes[i].dir.join("data/chunks/packs")))
            .collect();
        cluster.nodes[hung].pause();
        let (src, summary, took) = run("two-dead-one-stopped", 32).await;
        let mib = |rss: Option<u64>| rss.unwrap_or(0) >> 20;
        println!(
            "backup of {MIB} MiB through node {} with nodes {} and {} dead and node {} \
             stopped: {:.2} s (with only the dead ones {:.2} s, peer deadline {PEER_TIMEOUT:?}); \
             peak RSS coordinator {} MiB, agent {} MiB",
            coordinator + 1,
            dead[0] + 1,
            dead[1] + 1,
            hung + 1,
            took.as_secs_f64(),
            normal.as_secs_f64(),
            mib(peak_rss(cluster.nodes[coordinator].pid() as u32)),
            mib(peak_rss(std::process::id())),
        );
        // The chunks placed behind the stopped fallback have W copies on nodes that answer:
        // their one live owner and a later fallback.
        let live: Vec<usize> = (0..NODES)
            .filter(|i| !dead.contains(i) && *i != hung)
            .collect();
        let mut copies: std::collections::HashMap<ChunkId, usize> = Default::default();
        for &i in &live {
            for id in stored_ids(&cluster.nodes[i].dir.join("data/chunks/packs")) {
                *copies.entry(id).or_default() += 1;
            }
        }
        let behind: Vec<ChunkId> = copies
            .keys()
            .filter(|id| stranded(id) && !held_before.contains(id))
            .copied()
            .collect();
        assert!(
            behind.len() > 5,
            "only {} new chunks placed behind the stopped fallback: the data does not \
             exercise it",
            behind.len()
        );
        for id in &behind {
            assert!(
                copies[id] >= 2,
                "chunk {id} has {} copies on the nodes that answer",
                copies[id]
            );
        }
        println!(
            "{} new chunks behind the stopped fallback, each on 2 nodes that answer",
            behind.len()
        );
        // One hedge of 2 s (the first call to the stopped node), never the stopped node's
        // whole 8 s deadline, nor a hedge for each read of the commit check (4.2 – 6.2 s in
        // about one run of four, before reads asked hanging nodes after the fallbacks).
        assert!(
            took < normal + PEER_TIMEOUT * 3 / 8,
            "the backup took {took:?} with two nodes dead and a fallback stopped ({normal:?} \
             with only the dead ones): its writes waited for the stopped fallback's deadline"
        );
        let target = tmp.path().join("restored-while-stopped");
        restore_all(&conn, summary.snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, &src));
        cluster.nodes[hung].resume();
    });
}

#[test]
fn writes_and_reads_around_dead_owners_do_not_wait_for_a_third_that_stopped_answering() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut six = six_nodes(&tmp.path().join("cluster"), &rt);
    let (dead, hung, reader) = (six.dead, six.candidates[0], six.candidates[1]);
    for &d in &dead {
        six.cluster.nodes[d].kill9();
    }
    let (cluster, placement, ids) = (&six.cluster, &six.placement, &six.ids);
    // Chunks whose owners are the two dead nodes and the one that stops.
    let mut placed = (0u64..).filter_map(|k| {
        let plain = format!("owned by the dead and the stopped, #{k}").into_bytes();
        let id = ChunkId::of(&plain);
        let owners = placement.owners_of(&id);
        [ids[dead[0]], ids[dead[1]], ids[hung]]
            .iter()
            .all(|n| owners.contains(n))
            .then(|| encode_chunk(id, &plain.into(), DEFAULT_ZSTD_LEVEL))
    });
    let (before, after) = (placed.next().unwrap(), placed.next().unwrap());
    let id_of = |c: &pb::Chunk| ChunkId::from_slice(&c.id).expect("a chunk id");
    rt.block_on(async {
        let conn = cluster.connect(six.coordinator).await;
        let reader_conn = cluster.connect(reader).await;
        // Both nodes learn that the killed ones are down (a lookup over every partition:
        // their connections are refused), so they ask them last and write around them.
        let spread: Vec<ChunkId> = (0..4096u64)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        for c in [&conn, &reader_conn] {
            has_chunks(c, &spread)
                .await
                .expect("lookup with two nodes dead");
        }
        // One chunk stored while the third owner still answers: on it and a fallback.
        put_chunks(&conn, vec![before.clone()])
            .await
            .expect("a write with two owners dead");
        cluster.nodes[hung].pause();

        // A write before any call has waited on the stopped owner (so nothing marks it hung
        // yet) goes around the dead owners and must not wait out the stopped one's
        // deadline either (it did, 8 s, when a backup's first writes met such a chunk).
        let started = Instant::now();
        put_chunks(&conn, vec![after.clone()])
            .await
            .expect("a write whose owners are two dead nodes and a stopped one");
        let took = started.elapsed();
        println!("a chunk owned by two dead nodes and a stopped one written in {took:?}");
        assert!(
            took < SIX_PEER_TIMEOUT / 2,
            "writing a chunk owned by two dead nodes and a stopped one took {took:?}"
        );
        let present = has_chunks(&conn, &[id_of(&after)]).await.expect("lookup");
        assert_eq!(present, [true], "the fallbacks' two copies count toward W");

        // A read through a node that has not called the stopped owner since it stopped asks
        // it first (the dead ones are known down), asks the next beside it after a hedge,
        // and on through the candidates as those fail at once, to the fallback holding a
        // copy: it must not wait out the stopped owner's deadline after the dead ones
        // failed (a commit check's reads took 8 s so).
        let started = Instant::now();
        let got = get_chunks(&reader_conn, &[id_of(&before)])
            .await
            .expect("read with two owners dead and one stopped");
        let took = started.elapsed();
        println!("a chunk owned by two dead nodes and a stopped one read in {took:?}");
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].fault,
            pb::ChunkFault::None as i32,
            "{:?}",
            got[0].fault
        );
        assert_eq!(got[0].data, before.data);
        assert!(
            took < SIX_PEER_TIMEOUT / 2,
            "reading a chunk owned by two dead nodes and a stopped one took {took:?}"
        );
    });
    six.cluster.nodes[hung].resume();
}

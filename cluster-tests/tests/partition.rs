//! A minority partition (issue 10, test 6): five nodes (R=3, W=2, five catalog voters)
//! behind fault proxies are split 2|3. A commit through the minority fails UNAVAILABLE
//! within 5 s; a backup and a commit through the majority succeed within 10 s; after
//! healing, every node lists the same snapshots, every copy the cut put on a fallback is
//! handed to its owners, and the snapshots restore byte-identical through a node that was
//! in the minority with two of the majority's nodes killed. Both kinds of cut run: one that
//! refuses connections (peers look stopped) and a silent one (peers hang, so the peer
//! timeout, 3 s here, decides).
//!
//! With 5 nodes and R=3 about 3 partitions in 10 have two owners in the minority, so the
//! majority reaches W copies of their chunks only with the sloppy quorum: the missing copy
//! goes to a fallback (the next member on the ring) and is handed off after healing. The
//! majority's backup is checked to hold such chunks, and one is written on its own.

use std::time::{Duration, Instant};

use hashgrid::catalog::{for_each_page, ListQuery};
use hashgrid::error::ClientError;
use hashgrid::Connection;
use hashgrid_cluster_tests::cluster::{members_in, Cluster, TEST_NODE_ARGS};
use hashgrid_cluster_tests::data::{files_under, many_files};
use hashgrid_cluster_tests::fault_proxy::Fault;
use hashgrid_cluster_tests::manifests::{file, meta, try_commit, upload_chunk, upload_tree};
use hashgrid_cluster_tests::{
    assert_same_tree, backup_opts, has_chunks, put_chunks, restore_all, restored, runtime,
};
use hashgrid_proto::codec::{encode_chunk, DEFAULT_ZSTD_LEVEL};
use hashgrid_proto::placement::{MemberState, Placement};
use hashgrid_proto::{pb, ChunkId, NodeId, SnapshotId};

const SETTLE: Duration = Duration::from_secs(60);
/// The bounds.
const MINORITY_FAILS_WITHIN: Duration = Duration::from_secs(5);
const MAJORITY_COMMITS_WITHIN: Duration = Duration::from_secs(10);

/// The peer timeout the test nodes run with.
fn peer_timeout() -> Duration {
    let at = TEST_NODE_ARGS
        .iter()
        .position(|a| *a == "--peer-timeout-ms")
        .expect("test nodes set a peer timeout");
    Duration::from_millis(TEST_NODE_ARGS[at + 1].parse().expect("milliseconds"))
}

/// How long one lookup may take behind a silent cut, with R=3 owners per partition and no
/// partition moving (the test waits for that). A lookup asks W owners, then the next owner
/// and then the partition's fallbacks, each when nothing has answered for a quarter of the
/// peer timeout (`PeerPool::hedge_after`) rather than after a hung one's deadline; the last
/// call it starts (R - W + 1 hedges in) ends by its deadline. Measured 4.5 s at a 3 s peer
/// timeout; without the hedges each wave that met a hung owner cost a whole timeout, and
/// the fallbacks one more (6.0-6.8 s measured, up to 5 timeouts).
fn silent_lookup_bound() -> Duration {
    let hedge = peer_timeout() / 4;
    peer_timeout() + (3 - W as u32 + 1) * hedge
}

/// How long the minority may take to refuse a commit (its first lookup fails it), and the
/// majority to back up a small tree (the data's and the trees' lookups and uploads, then
/// the commit check's lookups: about four rounds), each with scheduling slack.
fn bounds(fault: Fault) -> (Duration, Duration) {
    let slack = Duration::from_millis(1500);
    match fault {
        Fault::Refuse => (MINORITY_FAILS_WITHIN, MAJORITY_COMMITS_WITHIN),
        Fault::Silence => (
            silent_lookup_bound() + slack,
            4 * silent_lookup_bound() + slack,
        ),
        Fault::Slow(_) => unreachable!("a slow link is not a partition"),
    }
}

const MINORITY: [usize; 2] = [3, 4];
const MAJORITY: [usize; 3] = [0, 1, 2];
const W: usize = 2;

/// Every snapshot id the node behind `conn` lists, in order; `None` when it does not answer.
async fn snapshot_ids(conn: &Connection) -> Option<Vec<SnapshotId>> {
    let mut ids = Vec::new();
    let everything = ListQuery::default();
    let listed = for_each_page(conn, &everything, |page| {
        ids.extend(page.into_iter().map(|s| s.id));
        Ok(())
    });
    match tokio::time::timeout(Duration::from_secs(3), listed).await {
        Ok(Ok(())) => Some(ids),
        _ => None,
    }
}

fn is_unavailable(e: &ClientError) -> bool {
    matches!(e, ClientError::Rpc { status, .. } if status.code() == tonic::Code::Unavailable)
}

/// How many of the chunk's current owners are among `side`.
fn owners_among(placement: &Placement, id: &ChunkId, side: &[NodeId]) -> usize {
    placement
        .owners_of(id)
        .iter()
        .filter(|o| side.contains(o))
        .count()
}

/// The first of `candidates` (0, 1, 2, ...) whose chunk id satisfies `wanted`.
fn first_placed<T>(make: impl Fn(u64) -> (T, ChunkId), wanted: impl Fn(&ChunkId) -> bool) -> T {
    (0..10_000)
        .map(make)
        .find(|(_, id)| wanted(id))
        .map(|(t, _)| t)
        .expect("some candidate lands in a suitable partition")
}

#[test]
fn refused_connections_minority_fails_majority_commits_healing_converges() {
    split_two_three(Fault::Refuse);
}

#[test]
fn silent_cut_minority_fails_majority_commits_healing_converges() {
    split_two_three(Fault::Silence);
}

fn split_two_three(fault: Fault) {
    println!("cut: {fault:?}");
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_proxied(tmp.path(), 5, 3, 2);
    let net = cluster.net.as_ref().expect("proxied cluster");
    let minority_src = tmp.path().join("minority");
    many_files(&minority_src, 2, 10, 1);
    let majority_src = tmp.path().join("majority");
    many_files(&majority_src, 4, 50, 2);

    let (snapshot, stranded_id) = runtime().block_on(async {
        cluster
            .wait_for("5 active members, 5 voters, a leader", SETTLE, |all| {
                all.len() == 5
                    && all.iter().all(|s| {
                        s.raft_voters.len() == 5
                            && s.raft_leader != 0
                            && members_in(s, pb::MemberState::Active).len() == 5
                    })
            })
            .await;
        // A quiet cluster (no partition still moving after the joins): what the cut misses
        // is then caught up by repair and hand-off alone.
        settled(&cluster, 0, 3);
        let leader = cluster.leader().await.expect("a leader");
        println!("catalog leader before the cut: node {}", leader + 1);
        let conns: Vec<Connection> =
            futures::future::join_all((0..5).map(|i| cluster.connect(i))).await;
        let (minority, majority) = (&conns[MINORITY[0]], &conns[MAJORITY[0]]);
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(cluster.node_id(i).await);
        }
        let majority_ids: Vec<NodeId> = MAJORITY.iter().map(|&i| ids[i]).collect();
        let placement = Placement::new(&majority.map).expect("cluster map");
        let active = majority
            .map
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active);
        assert_eq!(active.count(), 5, "the map places on every node");

        // A root whose chunk is stored before the cut, so that committing it afterwards
        // measures the commit alone.
        let before = b"stored before the cut".to_vec();
        let id = upload_chunk(minority, before.clone()).await;
        let root = upload_tree(minority, vec![file(b"before", meta(0o644), id, 21)]).await;

        // The majority's data: small files, one chunk each, about 3 in 10 of them placed
        // with two owners in the minority (so W copies need a fallback during the cut).
        let mostly_minority = |id: &ChunkId| owners_among(&placement, id, &majority_ids) < W;
        let stranded_files = files_under(&majority_src)
            .iter()
            .filter(|f| mostly_minority(&ChunkId::of(&std::fs::read(f).unwrap())))
            .count();
        println!("{stranded_files} of the majority's files have two owners in the minority");
        assert!(stranded_files > 10, "the data exercises the fallbacks");
        let stranded = first_placed(
            |k| {
                let b = format!("placed mostly in the minority, #{k}").into_bytes();
                let id = ChunkId::of(&b);
                (b, id)
            },
            mostly_minority,
        );

        net.cut(&MINORITY, &MAJORITY, fault);

        let started = Instant::now();
        let refused = try_commit(minority, &root).await;
        let commit_elapsed = started.elapsed();
        println!("minority commit: {refused:?} after {commit_elapsed:?}");
        let status = refused.expect_err("a commit through the minority must fail");
        if status.code() != tonic::Code::Unavailable {
            cluster.dump_logs();
            panic!("the minority refused a commit with {status:?}, not UNAVAILABLE");
        }
        assert!(
            commit_elapsed <= bounds(fault).0,
            "the minority took {commit_elapsed:?} to refuse a commit"
        );

        // An agent keeps retrying a retryable UNAVAILABLE for its retry budget (60 s by
        // default: partitions heal); this one retries nothing, so the test sees the answer the
        // minority gives rather than the agent's patience.
        let mut opts = cluster.nodes[MINORITY[0]].connect_options_with(cluster.token());
        opts.retry.budget = Duration::ZERO;
        let impatient = Connection::connect(&opts)
            .await
            .expect("connect to the minority");
        let started = Instant::now();
        let failed = hashgrid::backup::backup(
            &impatient,
            &backup_opts(&[&minority_src], false, "agent", "minority"),
        )
        .await;
        let backup_elapsed = started.elapsed();
        let err = failed.expect_err("a backup through the minority must fail");
        println!("minority backup: {err} after {backup_elapsed:?}");
        assert!(is_unavailable(&err), "{err:?}");
        // The minority may store the chunks (on the owners and fallbacks on its side) before
        // the commit fails, so a backup there takes as long as one in the majority.
        assert!(
            backup_elapsed <= bounds(fault).1,
            "the minority took {backup_elapsed:?} to fail a backup"
        );

        let started = Instant::now();
        let backed_up = hashgrid::backup::backup(
            majority,
            &backup_opts(&[&majority_src], false, "agent", "majority"),
        )
        .await;
        let majority_elapsed = started.elapsed();
        let backed_up = match backed_up {
            Ok(b) => b,
            Err(e) => {
                cluster.dump_logs();
                panic!("a backup through the majority failed after {majority_elapsed:?}: {e}");
            }
        };
        println!(
            "majority backup: {} chunks sent, in {majority_elapsed:?}",
            backed_up.upload.sent_chunks
        );
        assert!(
            majority_elapsed <= bounds(fault).1,
            "the majority took {majority_elapsed:?} to back up {} files",
            files_under(&majority_src).len()
        );

        let stranded_id = ChunkId::of(&stranded);
        let chunk = encode_chunk(stranded_id, &stranded.clone().into(), DEFAULT_ZSTD_LEVEL);
        let put = put_chunks(majority, vec![chunk]).await;
        put.expect("a chunk with one owner on the majority side gets W copies with a fallback");
        let present = has_chunks(majority, &[stranded_id]).await.expect("lookup");
        assert_eq!(present, [true], "a copy on a fallback counts toward W");
        println!(
            "proxies: {} connections refused, {} held, {} severed by the cut",
            net.refused(),
            net.held(),
            net.severed()
        );

        // What an operator sees during the cut: the majority's coordinator lost contact
        // with the minority (its repair worker is due, and says with whom), and copies wait
        // on fallbacks for hand-off, in `cluster status` and in Prometheus. The loss is
        // learned when a call to the minority runs out of time: lookups and writes that no
        // longer needed one left it running in its task, so it may end a peer timeout after
        // the backup.
        let deadline = Instant::now() + 2 * peer_timeout() + Duration::from_secs(5);
        let (s, repair) = loop {
            let s = cluster.cli_json(MAJORITY[0], &["cluster", "status"]);
            let repair = repair_worker(&s, ids[MAJORITY[0]]);
            if repair["state"] == "due" || Instant::now() > deadline {
                break (s, repair);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let minority_addrs: Vec<String> = MINORITY
            .iter()
            .map(|&i| cluster.nodes[i].addr.clone())
            .collect();
        let waiting: Vec<String> = repair["waiting_for"]
            .as_array()
            .expect("waiting_for")
            .iter()
            .map(|a| a.as_str().expect("an address").to_string())
            .collect();
        assert_eq!(repair["state"], "due", "{repair:#}");
        assert!(
            !waiting.is_empty() && waiting.iter().all(|a| minority_addrs.contains(a)),
            "the coordinator waits for the minority's members {minority_addrs:?}: {repair:#}"
        );
        assert!(s["hand_off_pending"].as_u64() > Some(0), "{s:#}");
        wait_metric(&cluster, &MAJORITY, HAND_OFF_GAUGE, |v| v > 0.0);
        wait_metric(&cluster, &[MAJORITY[0]], OUT_OF_CONTACT_GAUGE, |v| v > 0.0);

        net.heal();
        let healed = Instant::now();
        let deadline = healed + SETTLE;
        let lists = loop {
            let lists = futures::future::join_all(conns.iter().map(snapshot_ids)).await;
            let same = lists.iter().all(|l| l.is_some() && *l == lists[0]);
            if same
                && lists[0]
                    .as_ref()
                    .is_some_and(|ids| ids.contains(&backed_up.snapshot))
            {
                break lists;
            }
            if Instant::now() > deadline {
                cluster.dump_logs();
                panic!("nodes list different snapshots {SETTLE:?} after healing: {lists:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!(
            "converged {:?} after healing: every node lists {:?}",
            healed.elapsed(),
            lists[0].as_ref().unwrap()
        );
        assert_eq!(
            lists[0].as_deref(),
            Some(&[backed_up.snapshot][..]),
            "only the majority's snapshot may exist"
        );

        (backed_up.snapshot, stranded_id)
    });

    // The copies the fallbacks took reach their owners: nothing under-replicated, and each
    // chunk on exactly R members (the fallbacks released theirs).
    let handing = Instant::now();
    let chunks = settled(&cluster, MINORITY[0], 3);
    println!(
        "handed off {:?} later: {chunks} chunks, each on 3 members",
        handing.elapsed()
    );
    wait_metric(&cluster, &[0, 1, 2, 3, 4], HAND_OFF_GAUGE, |v| v == 0.0);
    wait_metric(&cluster, &[0, 1, 2, 3, 4], OUT_OF_CONTACT_GAUGE, |v| {
        v == 0.0
    });

    // Two of the majority's nodes killed: every chunk written during the cut has a copy on
    // its owners in the minority, not only on the majority's fallbacks.
    for k in [MAJORITY[0], MAJORITY[1]] {
        cluster.nodes[k].kill9();
    }
    runtime().block_on(async {
        let minority = cluster.connect(MINORITY[0]).await;
        let target = tmp.path().join("restore");
        restore_all(&minority, snapshot, &target).await;
        assert_same_tree(&majority_src, &restored(&target, &majority_src));
        let present = has_chunks(&minority, &[stranded_id]).await.expect("lookup");
        assert_eq!(present, [true], "the stranded chunk reached its owners");
    });
}

const HAND_OFF_GAUGE: &str = "hashgrid_hand_off_pending_chunks";
const OUT_OF_CONTACT_GAUGE: &str = "hashgrid_peers_out_of_contact";

/// Waits until the Prometheus gauge `name`, summed over the nodes in `which`, satisfies
/// `wanted` (gauges are refreshed every 0.5 s, the out-of-contact one every 2 s).
fn wait_metric(cluster: &Cluster, which: &[usize], name: &str, wanted: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sum: f64 = which
            .iter()
            .map(|&i| cluster.nodes[i].metric(name).unwrap_or(0.0))
            .sum();
        if wanted(sum) {
            return;
        }
        if Instant::now() > deadline {
            panic!("{name} over nodes {which:?} is still {sum}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Member `id`'s repair worker in a `cluster status --json`.
fn repair_worker(s: &serde_json::Value, id: NodeId) -> serde_json::Value {
    let member = s["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("member {id} listed: {s:#}"));
    member["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["name"] == "repair")
        .expect("a repair worker")
        .clone()
}

/// Waits until `cluster status` through node `via` shows nothing under-replicated, awaiting
/// hand-off or moving, every member's workers idle after a pass (a repair worker that lost
/// contact with a member, or regained it and has not run its pass since, shows `due`), and
/// each member's chunk count stable with a total that is a multiple of `r`; returns that
/// total over `r`.
fn settled(cluster: &Cluster, via: usize, r: u64) -> u64 {
    let deadline = Instant::now() + SETTLE;
    let mut last: Option<Vec<u64>> = None;
    loop {
        let s = cluster.cli_json(via, &["cluster", "status"]);
        let members = s["members"].as_array().expect("members");
        let counts: Vec<u64> = members
            .iter()
            .map(|m| m["chunks"].as_u64().unwrap_or(u64::MAX))
            .collect();
        let idle = members.iter().all(|m| {
            m["state"] == "active"
                && m["workers"].as_array().is_some_and(|w| {
                    w.iter()
                        .all(|w| w["state"] == "idle" && w["passes"].as_u64() > Some(0))
                })
        });
        let total: u64 = counts.iter().sum();
        if s["under_replicated"] == 0
            && s["hand_off_pending"] == 0
            && s["moving"] == 0
            && idle
            && last.as_ref() == Some(&counts)
            && total.is_multiple_of(r)
        {
            return total / r;
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!("not settled within {SETTLE:?}; last status:\n{s:#}");
        }
        last = Some(counts);
        std::thread::sleep(Duration::from_millis(500));
    }
}

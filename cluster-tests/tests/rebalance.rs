//! Rebalance and repair with real node processes (R = 3, W = 2), driven by the admin CLI:
//!
//! - a sixth node joins five, and a backup and a restore run while its partitions move
//!   (the nodes' `--move-mib-per-sec` keeps the move going for seconds, and the test checks
//!   it is still going when both have finished); about 1/6 of the replicas move to it,
//!   every partition ends on exactly R owners, and the old owners release what they handed
//!   off (reclaimable); then a node is drained and removed the same way;
//! - a node whose chunk store is lost refills to its share; a dead node replaced by a new
//!   one (new id, old one removed) loses nothing; a byte flipped in one replica is read
//!   from another and the bad copy rewritten by repair.
//!
//! "Every chunk on R owners" is checked the hard way at the end of each test: with any two
//! nodes killed, every snapshot still restores byte-identical.
//!
//! `HASHGRID_REBALANCE_MIB` sets the first backup's size (default 40 MiB; the soak
//! figure is 1024).

use std::path::Path;
use std::time::Duration;

use hashgrid::backup::backup;
use hashgrid_cluster_tests::cluster::{status_members as members, Cluster, FAST_REPAIR};
use hashgrid_cluster_tests::damage::{damage_one_of, stored_ids};
use hashgrid_cluster_tests::{
    assert_same_tree, assert_success, backup_opts, data, restore_all, restored, runtime,
};
use hashgrid_proto::SnapshotId;
use serde_json::Value;

/// Repair passes every 2 s, so the tests see it act without waiting minutes.
const SETTLE: Duration = Duration::from_secs(180);

fn make_source(dir: &Path, seed: u64, mib: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..mib.div_ceil(4) {
        std::fs::write(
            dir.join(format!("blob{i}.bin")),
            data::random_bytes(seed * 1000 + i, 4 << 20),
        )
        .unwrap();
    }
    std::fs::write(dir.join("notes.txt"), data::text_bytes(seed, 300_000)).unwrap();
}

fn mib_from_env() -> u64 {
    std::env::var("HASHGRID_REBALANCE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

/// The status entry of member `id`.
fn member(s: &Value, id: u64) -> &Value {
    members(s)
        .iter()
        .find(|m| m["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("member {id} not listed: {s:#}"))
}

/// Chunks member `id` holds (0 when it did not answer).
fn chunks_of(s: &Value, id: u64) -> u64 {
    member(s, id)["chunks"].as_u64().unwrap_or(0)
}

/// Chunks held per member that answered (removed members left out).
fn chunks_by_member(s: &Value) -> Vec<(u64, u64)> {
    members(s)
        .iter()
        .filter(|m| m["map_state"] != "removed")
        .filter_map(|m| Some((m["id"].as_u64()?, m["chunks"].as_u64()?)))
        .collect()
}

/// [`Cluster::wait_quiet`] within [`SETTLE`].
fn wait_quiet(
    cluster: &Cluster,
    via: usize,
    what: &str,
    cond: impl FnMut(&Value) -> bool,
) -> Value {
    cluster.wait_quiet(via, what, SETTLE, cond)
}

/// Waits until every member holds a stable count of chunks whose total is a multiple of R
/// (each chunk on R owners); returns the distinct chunk count.
fn settled_chunks(cluster: &Cluster, via: usize, r: u64, what: &str) -> u64 {
    let mut last = None;
    let s = wait_quiet(cluster, via, what, |s| {
        let counts = chunks_by_member(s);
        let total: u64 = counts.iter().map(|c| c.1).sum();
        let stable = last.as_ref() == Some(&counts);
        last = Some(counts);
        stable && total > 0 && total.is_multiple_of(r)
    });
    chunks_by_member(&s).iter().map(|c| c.1).sum::<u64>() / r
}

/// Bytes the workers of every member copied so far.
fn bytes_copied(s: &Value) -> u64 {
    members(s)
        .iter()
        .flat_map(|m| m["workers"].as_array().into_iter().flatten())
        .filter_map(|w| w["bytes_copied"].as_u64())
        .sum()
}

fn cli_ok(cluster: &Cluster, via: usize, args: &[&str]) {
    let out = cluster.cli(via, args);
    assert!(
        out.status.success(),
        "hashgrid {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With the nodes in `kill` killed (-9), every snapshot restores byte-identical through
/// node `via`: each chunk had a copy outside `kill`.
fn restores_without(
    cluster: &mut Cluster,
    kill: &[usize],
    via: usize,
    snaps: &[(SnapshotId, &Path)],
    scratch: &Path,
) {
    for &k in kill {
        cluster.nodes[k].kill9();
    }
    let rt = runtime();
    rt.block_on(async {
        let conn = cluster.connect(via).await;
        for (i, (snap, src)) in snaps.iter().enumerate() {
            let target = scratch.join(format!("restore-without-{i}"));
            restore_all(&conn, *snap, &target).await;
            assert_same_tree(src, &restored(&target, src));
        }
    });
}

/// The move limit for a first backup of `mib` MiB: the sixth node pulls about R x mib / 6
/// (half of `mib`) at it in about 4 s, long enough for the backup and restore that run
/// meanwhile to finish inside the move on any machine these tests run on.
fn move_limit(mib: u64) -> String {
    format!("{}", (mib as f64 / 8.0).max(1.0))
}

#[test]
fn a_sixth_node_takes_its_share_during_backup_and_restore_then_one_is_drained_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let mib = mib_from_env();
    let limit = move_limit(mib);
    let mut extra = FAST_REPAIR.to_vec();
    extra.extend(["--move-mib-per-sec", &limit]);
    let mut cluster = Cluster::start_with(&tmp.path().join("cluster"), 5, 3, 2, &extra);
    let rt = runtime();
    let src1 = tmp.path().join("src1");
    make_source(&src1, 1, mib);
    let first = rt.block_on(async {
        let conn = cluster.connect(0).await;
        backup(&conn, &backup_opts(&[&src1], false, "c", "one"))
            .await
            .expect("first backup")
    });
    let before = settled_chunks(&cluster, 0, 3, "first backup on 3 owners each");
    let copied_before = bytes_copied(&cluster.status_json(0));

    // A sixth node joins; while its partitions move (it pulls at --move-mib-per-sec), a
    // backup (through node 2) and a restore (through node 3) run.
    let src2 = tmp.path().join("src2");
    make_source(&src2, 2, 16);
    let sixth = cluster.spawn_node();
    cluster.nodes[sixth].wait_ready();
    let joined = std::time::Instant::now();
    cluster.wait_status(0, "the sixth node's partitions moving", SETTLE, |s| {
        s["moving"].as_u64() > Some(0)
    });
    let (second, ()) = rt.block_on(async {
        let b = async {
            let conn = cluster.connect(1).await;
            backup(&conn, &backup_opts(&[&src2], false, "c", "two"))
                .await
                .expect("backup while a node joins")
        };
        let r = async {
            let conn = cluster.connect(2).await;
            let target = tmp.path().join("restore-during-join");
            restore_all(&conn, first.snapshot, &target).await;
            assert_same_tree(&src1, &restored(&target, &src1));
        };
        tokio::join!(b, r)
    });
    // Both ran inside the move: it had started before them and is still going.
    let s = cluster.status_json(0);
    let limit_bytes = (limit.parse::<f64>().unwrap() * 1048576.0) as u64;
    for m in members(&s) {
        assert_eq!(
            m["move_limit_bytes_per_sec"].as_u64(),
            Some(limit_bytes),
            "each member shows its move limit: {m:#}"
        );
    }
    // And so does the table an admin reads, once per member.
    let out = cluster.cli(0, &["cluster", "status"]);
    assert_success(&out, "cluster status");
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        table.matches("moving at most ").count(),
        members(&s).len(),
        "each member's move limit in the table:\n{table}"
    );
    let overlap = joined.elapsed();
    println!(
        "backup and restore done {overlap:.1?} after the join, {} partitions still moving, \
         the new node pulled {} bytes so far (limit {limit} MiB/s)",
        s["moving"],
        bytes_copied(&s) - copied_before
    );
    assert!(
        s["moving"].as_u64() > Some(0),
        "the move ended before the backup and restore did ({overlap:?} after the join): \
         they did not run during it; lower the limit"
    );
    let after = settled_chunks(&cluster, 0, 3, "six nodes, every chunk on 3 owners");
    assert!(
        after > before,
        "the second backup added chunks ({before} -> {after})"
    );
    let s = cluster.status_json(0);
    let on_new = chunks_of(&s, rt.block_on(cluster.node_id(sixth)));
    // Replicas moved: R x unique / 6 ideally; at most 1.5x that (bytes), and the new node
    // holds about its share (of replicas).
    let moved = bytes_copied(&s) - copied_before;
    let stored: u64 = members(&s)
        .iter()
        .filter_map(|m| m["stored_bytes"].as_u64())
        .sum();
    let ideal = stored / 6;
    println!(
        "rebalance 5 -> 6: moved {moved} bytes, ideal {ideal} (R x unique / 6), new node \
         holds {on_new} of {} replicas",
        after * 3
    );
    assert!(moved > 0, "nothing moved to the new node");
    assert!(
        moved as f64 <= 1.5 * ideal as f64,
        "moved {moved} bytes, more than 1.5x the ideal {ideal}"
    );
    assert!(
        (on_new as f64) > 0.5 * (after * 3) as f64 / 6.0,
        "the new node holds {on_new} of {} replicas",
        after * 3
    );
    let reclaimable = s["reclaimable_bytes"].as_u64().unwrap();
    assert!(
        reclaimable > 0,
        "old owners released what they handed off: {s:#}"
    );

    // Drain node 2 (a founding member): its data moves to the others, its index empties.
    let drained = rt.block_on(cluster.node_id(1));
    cli_ok(&cluster, 0, &["node", "drain", &drained.to_string()]);
    let s = wait_quiet(&cluster, 0, "node 2 drained", |s| {
        chunks_of(s, drained) == 0
            && chunks_by_member(s).iter().map(|c| c.1).sum::<u64>() == after * 3
    });
    assert_eq!(
        member(&s, drained)["state"],
        "draining",
        "a drained node stays a member until removed"
    );
    cli_ok(&cluster, 0, &["node", "remove", &drained.to_string()]);
    wait_quiet(&cluster, 0, "node 2 removed", |s| {
        member(s, drained)["state"] == "removed"
    });
    cluster.nodes[1].stop();

    // Every chunk on 3 of the 5 left: any two of them can die.
    restores_without(
        &mut cluster,
        &[2, sixth],
        0,
        &[(first.snapshot, &src1), (second.snapshot, &src2)],
        tmp.path(),
    );
}

#[test]
fn a_lost_store_refills_a_replaced_node_loses_nothing_and_a_damaged_copy_is_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_with(&tmp.path().join("cluster"), 4, 3, 2, &FAST_REPAIR);
    let rt = runtime();
    let src = tmp.path().join("src");
    make_source(&src, 3, 24);
    let snap = rt.block_on(async {
        let conn = cluster.connect(0).await;
        backup(&conn, &backup_opts(&[&src], false, "c", "d"))
            .await
            .expect("backup")
            .snapshot
    });
    let distinct = settled_chunks(&cluster, 0, 3, "backup on 3 owners each");
    let ids = rt.block_on(cluster.node_ids());
    let held4 = chunks_of(&cluster.status_json(0), ids[3]);

    // Node 4 loses its chunk store (the disk was replaced); it refills to its share.
    cluster.nodes[3].stop();
    std::fs::remove_dir_all(cluster.nodes[3].dir.join("data/chunks")).unwrap();
    cluster.nodes[3].restart();
    wait_quiet(&cluster, 0, "node 4 refilled", |s| {
        chunks_of(s, ids[3]) == held4
    });

    // A byte flipped in one of node 1's copies: verify on node 1 finds it and drops it from
    // the index (the other owners' copies keep every snapshot whole); repair rewrites it
    // from another owner; a restore through node 1 is byte-identical.
    cluster.nodes[0].stop();
    let packs = cluster.nodes[0].dir.join("data/chunks/packs");
    let (victim, _) = damage_one_of(&packs, &stored_ids(&packs));
    cluster.nodes[0].restart();
    let held1 = chunks_of(&cluster.status_json(1), ids[0]);
    let out = cluster.cli(0, &["--json", "verify"]);
    let report: Value = serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap(),
    )
    .expect("verify --json");
    assert_eq!(report["bad_chunks"], 1, "{report:#}");
    assert_eq!(
        report["missing_chunks"], 0,
        "other owners hold good copies: {report:#}"
    );
    let s = wait_quiet(&cluster, 1, "node 1's bad copy rewritten by repair", |s| {
        chunks_of(s, ids[0]) == held1 && member(s, ids[0])["reclaimable_bytes"].as_u64() > Some(0)
    });
    let repair = member(&s, ids[0])["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "repair")
        .unwrap()
        .clone();
    assert!(repair["chunks_copied"].as_u64() >= Some(1), "{repair:#}");
    println!("damaged copy of {victim} rewritten by repair: {repair:#}");
    rt.block_on(async {
        let conn = cluster.connect(0).await;
        let target = tmp.path().join("restore-after-repair");
        restore_all(&conn, snap, &target).await;
        assert_same_tree(&src, &restored(&target, &src));
    });

    // Node 3 dies for good; a new node joins (a new id) and the dead one is removed: every
    // chunk returns to 3 copies.
    cluster.nodes[2].kill9();
    let dead = ids[2].to_string();
    let fresh = cluster.add_node();
    cli_ok(&cluster, 0, &["node", "remove", &dead]);
    let s = wait_quiet(&cluster, 0, "dead node replaced", |s| {
        chunks_by_member(s).iter().map(|c| c.1).sum::<u64>() == distinct * 3
    });
    println!("after replacement: {:?}", chunks_by_member(&s));
    restores_without(&mut cluster, &[1, fresh], 0, &[(snap, &src)], tmp.path());
}

/// `cluster set` is a map change that re-replicates, a write quorum the active members
/// cannot make is refused with a message that says so, and a standby owns nothing until
/// `node add`: 3 nodes at R = W = 1 hold one copy of a backup; raised to R = W = 3, every
/// node holds every chunk; a fourth node joins as a standby and is given nothing; with one
/// node drained (2 active, W = 3) a backup fails UNAVAILABLE naming the cause; the standby
/// activated (`node add`), it goes through, and every snapshot restores through one node
/// with the other three killed.
#[test]
fn cluster_set_re_replicates_too_few_active_for_w_is_refused_and_a_standby_is_added() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_with(&tmp.path().join("cluster"), 3, 1, 1, &FAST_REPAIR);
    let rt = runtime();
    let mut ids = rt.block_on(cluster.node_ids());
    let src1 = tmp.path().join("src1");
    make_source(&src1, 11, 8);
    let first = rt.block_on(async {
        let conn = cluster.connect(0).await;
        backup(&conn, &backup_opts(&[&src1], false, "c", "one"))
            .await
            .expect("backup at R = 1")
    });
    let distinct = settled_chunks(&cluster, 0, 1, "one copy of each chunk");

    cli_ok(
        &cluster,
        1,
        &["cluster", "set", "--replicas", "3", "--write-quorum", "3"],
    );
    wait_quiet(&cluster, 0, "every chunk on all 3 nodes", |s| {
        ids.iter().all(|&id| chunks_of(s, id) == distinct)
    });

    let standby = cluster.add_node_with(&["--standby"]);
    ids.push(rt.block_on(cluster.node_id(standby)));
    let s = wait_quiet(&cluster, 0, "a standby member", |s| {
        members(s).len() == 4 && member(s, ids[3])["map_state"] == "joining"
    });
    assert_eq!(
        chunks_of(&s, ids[3]),
        0,
        "a standby was given chunks: {s:#}"
    );

    cli_ok(&cluster, 0, &["node", "drain", &ids[2].to_string()]);
    let src2 = tmp.path().join("src2");
    make_source(&src2, 12, 4);
    let src2_arg = src2.to_str().unwrap();
    let out = cluster.cli(
        0,
        &[
            "--retry-budget",
            "3s",
            "backup",
            src2_arg,
            "--client",
            "c",
            "--dataset",
            "two",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a backup with 2 active members and W = 3 went through"
    );
    assert!(
        stderr.contains("fewer than the 3 needed (the write quorum W)")
            && stderr.contains("too few active members"),
        "the refusal does not name its cause: {stderr}"
    );

    cli_ok(&cluster, 0, &["node", "add", &ids[3].to_string()]);
    let second = rt.block_on(async {
        let conn = cluster.connect(0).await;
        backup(&conn, &backup_opts(&[&src2], false, "c", "two"))
            .await
            .expect("backup with the standby activated")
    });
    let s = wait_quiet(&cluster, 0, "node 3 drained, node 4 active", |s| {
        let held = chunks_of(s, ids[0]);
        held > distinct
            && member(s, ids[3])["map_state"] == "active"
            && [ids[1], ids[3]].iter().all(|&id| chunks_of(s, id) == held)
    });
    println!(
        "cluster set: {distinct} chunks at R = 1, then on all 3; after the second backup          {} on each of the 3 active members; status {}",
        chunks_of(&s, ids[0]),
        s["members"]
    );
    restores_without(
        &mut cluster,
        &[1, 2, 3],
        0,
        &[(first.snapshot, &src1), (second.snapshot, &src2)],
        tmp.path(),
    );
}

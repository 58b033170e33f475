//! Catalog reads see every acknowledged write, whichever node answers: a follower that
//! learns of commits late (its links slowed by the fault proxy) still lists a snapshot
//! committed through the leader a moment before, so `restore latest` and a backup's parent
//! choice through one node agree with a backup just made through another. The follower
//! asks the leader for its read point and waits until it has applied that far.

use std::time::{Duration, Instant};

use hashgrid::backup::backup;
use hashgrid::catalog;
use hashgrid_cluster_tests::cluster::Cluster;
use hashgrid_cluster_tests::data::many_files;
use hashgrid_cluster_tests::fault_proxy::Fault;
use hashgrid_cluster_tests::{backup_opts, runtime};

/// Each byte between the slow follower and the other nodes is this late, each way: more
/// than the time from a commit's acknowledgement to a listing, so without the read point
/// the follower would list the snapshot before. With it a listing takes about seven delays
/// (measured): two to ask the leader, five until the follower has applied the commit (Raft
/// sends a follower one message at a time: the one in flight, the entries, then the commit
/// index), well within the node's 2 s catch-up bound.
const LATE: Duration = Duration::from_millis(150);

#[test]
fn a_follower_that_learns_of_commits_late_lists_every_acknowledged_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::start_proxied(&tmp.path().join("cluster"), 3, 3, 2);
    let src = tmp.path().join("src");
    many_files(&src, 20, 4, 3);
    let opts = backup_opts(&[&src], false, "reads", "files");
    let rt = runtime();
    rt.block_on(async {
        let leader = cluster.leader().await.expect("a leader");
        let slow = (leader + 1) % 3;
        let others: Vec<usize> = (0..3).filter(|&i| i != slow).collect();
        let net = cluster.net.as_ref().unwrap();
        net.cut(&[slow], &others, Fault::Slow(LATE));
        let through_leader = cluster.connect(leader).await;
        let through_slow = cluster.connect(slow).await;

        // The slow follower's connections are made again across the slow links; the first
        // listing through it shows the first snapshot once they are.
        let first = backup(&through_leader, &opts).await.expect("backup");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let latest = catalog::latest(&through_slow, "reads", "files", None).await;
            if latest.ok().flatten().map(|s| s.id) == Some(first.snapshot) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the slow follower never listed snapshot {}",
                first.snapshot
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        for round in 0..5 {
            let made = backup(&through_leader, &opts).await.expect("backup");
            let asked = Instant::now();
            let latest = catalog::latest(&through_slow, "reads", "files", None)
                .await
                .expect("listing through the slow follower")
                .expect("a snapshot");
            println!(
                "round {round}: snapshot {} committed through the leader, listed through the \
                 slow follower in {:?}",
                made.snapshot,
                asked.elapsed()
            );
            if latest.id != made.snapshot {
                cluster.dump_logs();
            }
            assert_eq!(
                latest.id, made.snapshot,
                "the follower listed an older snapshot as the latest"
            );
            let got = catalog::get(&through_slow, made.snapshot).await;
            assert_eq!(
                got.expect("get through the slow follower").id,
                made.snapshot
            );
        }
    });
}

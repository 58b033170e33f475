//! A large catalog: 100,000 snapshots committed through the real RPC (concurrently), then
//! listed page by page and `latest` resolved, with the times printed (the requirement is
//! within 2 s each; timings are printed, not asserted, as the machine is shared).

use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use hashgrid::catalog::{for_each_page, latest, ListQuery};
use hashgrid::upload::Uploader;
use hashgrid_cluster_tests::{runtime, Node};
use hashgrid_proto::manifest::{Tree, FORMAT_VERSION};
use hashgrid_proto::pb::{self, CommitSnapshotRequest};
use hashgrid_proto::ChunkId;

const SNAPSHOTS: usize = 100_000;
const IN_FLIGHT: usize = 64;
/// Committed one at a time first, for the rate of commits that cannot be grouped.
const SERIAL: usize = 300;

#[test]
fn a_catalog_of_100k_snapshots_lists_and_resolves_latest() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    runtime().block_on(async {
        let conn = node.connect().await;
        let root = Tree::default().encode();
        let root_id = ChunkId::of(&root);
        let uploader = Uploader::start(&conn, 0);
        let uploader = tokio::task::spawn_blocking(move || {
            uploader.submit_blocking(root_id, root.into()).unwrap();
            uploader
        })
        .await
        .unwrap();
        uploader.finish().await.unwrap();

        let record = |i: usize| pb::Snapshot {
            client: format!("client-{}", i % 50),
            dataset: format!("ds-{}", i % 7),
            kind: i32::from(i.is_multiple_of(3)),
            time_unix_ms: i as i64,
            root: vec![root_id.as_bytes().to_vec()],
            manifest_version: u32::from(FORMAT_VERSION),
            hostname: "bench".into(),
            paths: vec![format!("/data/{i}").into_bytes()],
            ..Default::default()
        };
        let started = Instant::now();
        for i in 0..SERIAL {
            conn.catalog
                .clone()
                .commit_snapshot(CommitSnapshotRequest {
                    snapshot: Some(record(SNAPSHOTS + i)),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let serial = started.elapsed();
        println!(
            "committed {SERIAL} snapshots one at a time: {serial:?} ({:.0}/s)",
            SERIAL as f64 / serial.as_secs_f64()
        );

        let started = Instant::now();
        let ids: Vec<u64> = futures::stream::iter(0..SNAPSHOTS)
            .map(|i| {
                let mut c = conn.catalog.clone();
                let s = record(i);
                async move {
                    c.commit_snapshot(CommitSnapshotRequest {
                        snapshot: Some(s),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().id)
                }
            })
            .buffered(IN_FLIGHT)
            .try_collect()
            .await
            .unwrap();
        let commit_time = started.elapsed();
        println!(
            "committed {SNAPSHOTS} snapshots, {IN_FLIGHT} in flight: {commit_time:?} ({:.0}/s)",
            SNAPSHOTS as f64 / commit_time.as_secs_f64()
        );
        let newest = *ids.iter().max().unwrap();

        let t = Instant::now();
        let mut listed = 0usize;
        let mut last = 0u64;
        for_each_page(&conn, &ListQuery::default(), |page| {
            for s in page {
                assert!(s.id.0 > last, "out of order");
                last = s.id.0;
                listed += 1;
            }
            Ok(())
        })
        .await
        .unwrap();
        println!("listed {listed} snapshots in pages: {:?}", t.elapsed());
        assert_eq!(listed, SNAPSHOTS + SERIAL);

        let t = Instant::now();
        let latest_any = latest(&conn, "", "", None).await.unwrap().unwrap();
        println!("resolved latest of all: {:?}", t.elapsed());
        assert_eq!(latest_any.id.0, newest);

        // The newest snapshot of one client and dataset (`ids` is in commit order of i).
        let t = Instant::now();
        let one = latest(&conn, "client-3", "ds-4", None)
            .await
            .unwrap()
            .unwrap();
        println!(
            "resolved latest of one client and dataset: {:?}",
            t.elapsed()
        );
        assert_eq!(
            (one.client.as_str(), one.dataset.as_str()),
            ("client-3", "ds-4")
        );
        let expected = (0..SNAPSHOTS)
            .filter(|i| i % 50 == 3 && i % 7 == 4)
            .map(|i| ids[i])
            .max()
            .unwrap();
        assert_eq!(one.id.0, expected);

        let t = Instant::now();
        let none = latest(&conn, "no-such-client", "", None).await.unwrap();
        println!(
            "resolved latest of a client without snapshots: {:?}",
            t.elapsed()
        );
        assert!(none.is_none());
    });

    // The CLI lists them all too.
    let t = std::time::Instant::now();
    let out = node.cli(&["snapshots"]);
    assert!(out.status.success());
    let lines = out.stdout.iter().filter(|&&b| b == b'\n').count();
    println!(
        "`hashgrid snapshots` printed {lines} lines: {:?}",
        t.elapsed()
    );
    assert_eq!(lines, SNAPSHOTS + SERIAL + 2);
}

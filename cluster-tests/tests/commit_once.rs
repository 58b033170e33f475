//! Commits are idempotent: a commit retried with the same commit key (the agent did not
//! learn the outcome of the first attempt) returns the snapshot the first attempt made, also
//! after the node restarted; another key makes another snapshot.

use hashgrid::backup::backup;
use hashgrid_cluster_tests::{backup_opts, runtime, Node};
use hashgrid_proto::pb::{CommitSnapshotRequest, ListSnapshotsRequest};

#[test]
fn a_commit_retried_with_its_key_returns_the_same_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"committed once").unwrap();
    let rt = runtime();
    let key = vec![42u8; 16];
    let (snapshot, first) = rt.block_on(async {
        let conn = node.connect().await;
        let summary = backup(&conn, &backup_opts(&[&src], false, "c", "d"))
            .await
            .unwrap();
        let snapshot = hashgrid::catalog::get(&conn, summary.snapshot)
            .await
            .unwrap();
        let mut catalog = conn.catalog.clone();
        let commit = |key: Vec<u8>| CommitSnapshotRequest {
            snapshot: Some((&snapshot).into()),
            commit_key: key,
        };
        let first = catalog.commit_snapshot(commit(key.clone())).await.unwrap();
        let retry = catalog.commit_snapshot(commit(key.clone())).await.unwrap();
        assert_eq!(first.get_ref().id, retry.get_ref().id);
        let other = catalog.commit_snapshot(commit(vec![7; 16])).await.unwrap();
        assert_ne!(other.get_ref().id, first.get_ref().id);
        let bad = catalog
            .commit_snapshot(commit(vec![1; 3]))
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        (snapshot, first.into_inner().id)
    });
    node.stop();
    node.restart();
    rt.block_on(async {
        let conn = node.connect().await;
        let mut catalog = conn.catalog.clone();
        let again = catalog
            .commit_snapshot(CommitSnapshotRequest {
                snapshot: Some((&snapshot).into()),
                commit_key: key,
            })
            .await
            .unwrap();
        assert_eq!(
            again.into_inner().id,
            first,
            "the key was forgotten on restart"
        );
        let listed = catalog
            .list_snapshots(ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .snapshots;
        // The backup's own commit, the keyed one, and the one with another key.
        assert_eq!(listed.len(), 3, "{listed:?}");
    });
}

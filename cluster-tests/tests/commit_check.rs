//! The commit invariant: a snapshot never commits while it references a chunk that is not
//! stored. The node walks what is new in the snapshot (tree objects, chunk lists, data
//! chunks) against its parent; what the parent already holds is not checked again, so an
//! unchanged re-backup commits at the cost of its root, not of its files.

use std::time::Instant;

use hashgrid::backup::{backup, ParentChoice};
use hashgrid::upload::Uploader;
use hashgrid::Connection;
use hashgrid_cluster_tests::cluster::{test_peer_timeout, Cluster};
use hashgrid_cluster_tests::{backup_opts, cluster_stats, data, peak_rss, runtime, Node};
use hashgrid_proto::manifest::{
    Content, Entry, EntryKind, Extent, Metadata, ObjectRef, Tree, FORMAT_VERSION,
};
use hashgrid_proto::pb::{self, CommitSnapshotRequest};
use hashgrid_proto::snapshot::SnapshotRecord;
use hashgrid_proto::{ChunkId, SnapshotId};
use tonic::Code;

/// Uploads `pieces` as chunks (each one chunk) and waits until they are stored.
async fn upload(conn: &Connection, pieces: Vec<Vec<u8>>) -> Vec<ChunkId> {
    let uploader = Uploader::start(conn, 3);
    let (uploader, ids) = tokio::task::spawn_blocking(move || {
        let ids: Vec<ChunkId> = pieces
            .into_iter()
            .map(|p| {
                let id = ChunkId::of(&p);
                uploader.submit_blocking(id, p.into()).unwrap();
                id
            })
            .collect();
        (uploader, ids)
    })
    .await
    .unwrap();
    uploader.finish().await.unwrap();
    ids
}

/// Uploads a tree object (as one chunk) and returns its reference.
async fn upload_tree(conn: &Connection, mut tree: Tree) -> ObjectRef {
    tree.sort();
    ObjectRef(upload(conn, vec![tree.encode()]).await)
}

fn file(name: &str, chunks: &[(ChunkId, u32)]) -> Entry {
    Entry {
        name: name.into(),
        meta: Metadata {
            mode: 0o644,
            size: chunks.iter().map(|c| u64::from(c.1)).sum(),
            ..Default::default()
        },
        kind: EntryKind::File {
            content: Content::Inline(
                chunks
                    .iter()
                    .map(|&(id, len)| Extent::Chunk { id, len })
                    .collect(),
            ),
            link_key: None,
        },
    }
}

fn listed_file(name: &str, list: ObjectRef) -> Entry {
    Entry {
        name: name.into(),
        meta: Metadata {
            mode: 0o644,
            size: 100,
            ..Default::default()
        },
        kind: EntryKind::File {
            content: Content::List {
                list,
                extents: 1,
                chunks: 1,
            },
            link_key: None,
        },
    }
}

fn dir(name: &str, subtree: ObjectRef) -> Entry {
    Entry {
        name: name.into(),
        meta: Metadata {
            mode: 0o755,
            ..Default::default()
        },
        kind: EntryKind::Dir { subtree },
    }
}

fn record(root: &ObjectRef, parent: Option<SnapshotId>) -> pb::Snapshot {
    pb::Snapshot {
        client: "c".into(),
        dataset: "d".into(),
        root: root.0.iter().map(|i| i.as_bytes().to_vec()).collect(),
        manifest_version: u32::from(FORMAT_VERSION),
        parent: parent.map_or(0, |p| p.0),
        ..Default::default()
    }
}

async fn commit(conn: &Connection, snapshot: pb::Snapshot) -> Result<SnapshotId, tonic::Status> {
    Ok(SnapshotId(
        conn.catalog
            .clone()
            .commit_snapshot(CommitSnapshotRequest {
                snapshot: Some(snapshot),
                ..Default::default()
            })
            .await?
            .into_inner()
            .id,
    ))
}

/// Asserts a commit was refused for a missing chunk, naming `id`, with `count` missing.
fn assert_missing(result: Result<SnapshotId, tonic::Status>, id: ChunkId, count: u64) {
    let e = result.expect_err("a commit referencing an absent chunk must be refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains(&id.to_string()), "{e}");
    assert!(
        e.message().contains(&format!("{count} chunk(s)")),
        "{count}: {e}"
    );
}

#[test]
fn a_commit_is_refused_while_a_chunk_it_references_is_not_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    runtime().block_on(async {
        let conn = node.connect().await;
        let stored = data::random_bytes(1, 5000);
        let lost = data::random_bytes(2, 6000);
        let lost_too = data::random_bytes(3, 7000);
        let stored_id = upload(&conn, vec![stored]).await[0];
        let (lost_id, lost_too_id) = (ChunkId::of(&lost), ChunkId::of(&lost_too));

        // The root is stored, two data chunks it references are not.
        let root = upload_tree(
            &conn,
            Tree {
                entries: vec![
                    file("a", &[(stored_id, 5000)]),
                    file("b", &[(lost_id, 6000), (lost_too_id, 7000)]),
                ],
            },
        )
        .await;
        assert_missing(commit(&conn, record(&root, None)).await, lost_id, 2);

        // The root is stored, a subdirectory's tree object is not.
        let absent_tree = ObjectRef(vec![ChunkId::of(b"a tree never uploaded")]);
        let with_dir = upload_tree(
            &conn,
            Tree {
                entries: vec![
                    file("a", &[(stored_id, 5000)]),
                    dir("sub", absent_tree.clone()),
                ],
            },
        )
        .await;
        assert_missing(
            commit(&conn, record(&with_dir, None)).await,
            absent_tree.0[0],
            1,
        );

        // A file's chunk-list object is not stored.
        let absent_list = ObjectRef(vec![ChunkId::of(b"a chunk list never uploaded")]);
        let with_list = upload_tree(
            &conn,
            Tree {
                entries: vec![listed_file("big", absent_list.clone())],
            },
        )
        .await;
        assert_missing(
            commit(&conn, record(&with_list, None)).await,
            absent_list.0[0],
            1,
        );
        assert_eq!(cluster_stats(&conn).await.snapshots, 0);

        // Once the data is uploaded the same snapshot commits; a child that adds a file with
        // an absent chunk is refused even though its parent holds everything else.
        upload(&conn, vec![lost, lost_too]).await;
        let parent = commit(&conn, record(&root, None)).await.unwrap();
        let orphan = ChunkId::of(b"orphan data never uploaded");
        let child = upload_tree(
            &conn,
            Tree {
                entries: vec![
                    file("a", &[(stored_id, 5000)]),
                    file("b", &[(lost_id, 6000), (lost_too_id, 7000)]),
                    file("c", &[(orphan, 26)]),
                ],
            },
        )
        .await;
        assert_missing(commit(&conn, record(&child, Some(parent))).await, orphan, 1);
        assert_eq!(cluster_stats(&conn).await.snapshots, 1);
    });
}

#[test]
fn a_backup_reusing_its_parent_commits_at_the_cost_of_the_change() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    let (dirs, per_dir) = (200, 100);
    data::many_files(&src, dirs, per_dir, 11);
    runtime().block_on(async {
        let conn = node.connect().await;
        let opts = |parent| hashgrid::backup::BackupOptions {
            parent,
            ..backup_opts(&[src.as_path()], false, "c", "big")
        };
        let first = backup(&conn, &opts(ParentChoice::None)).await.unwrap();
        let again = backup(&conn, &opts(ParentChoice::Latest)).await.unwrap();
        assert_eq!(again.parent, Some(first.snapshot));
        assert_eq!(again.stats.reused_files, (dirs * per_dir) as u64);

        // The same record committed as a first backup (every chunk checked) and as a child
        // of the first snapshot (its unchanged root stands on the parent).
        let rec: SnapshotRecord = hashgrid::catalog::get(&conn, again.snapshot)
            .await
            .unwrap();
        let mut timings = Vec::new();
        for parent in [None, Some(first.snapshot)] {
            let mut s = pb::Snapshot::from(&rec);
            s.parent = parent.map_or(0, |p| p.0);
            let t = Instant::now();
            commit(&conn, s).await.unwrap();
            timings.push(t.elapsed());
        }
        println!(
            "commit of a snapshot of {} files: {:?} checked in full (first backup), {:?} on an unchanged parent",
            dirs * per_dir,
            timings[0],
            timings[1]
        );
        // A child whose one directory changed: only that directory's new file is checked.
        std::fs::write(src.join("dir-0007/added"), data::random_bytes(99, 3000)).unwrap();
        let t = Instant::now();
        let changed = backup(&conn, &opts(ParentChoice::Latest)).await.unwrap();
        println!(
            "backup with one new file: {:?} in all, {} new chunks",
            t.elapsed(),
            changed.stats.new_chunks
        );
    });
}

/// A chunk acknowledged on W owners, one of which then stops answering, has one copy that
/// answers: the commit check copies it to an owner that lacks it and the snapshot commits,
/// rather than the commit failing `UNAVAILABLE` while the stopped owner is asked. 3 nodes, R = 3,
/// W = 2, repair off: chunks stored while a node (`c`) was down are on the other two; `c`
/// restarts without them; one of the two (`b`) is SIGSTOPped (a hung owner is asked on
/// every check, and its copies may exist; a dead one is soon skipped); a commit through the
/// last (`a`) referencing them succeeds, and `c` then holds them.
#[test]
fn a_commit_check_repairs_a_chunk_whose_other_copy_stopped_answering() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_with(
        &tmp.path().join("cluster"),
        3,
        3,
        2,
        &["--repair-interval-secs", "0"],
    );
    let rt = runtime();
    // The coordinator (`a`) is the catalog leader, and the node stopped later (`b`) is
    // not, so the commit does not wait for an election.
    let leader = rt.block_on(cluster.leader()).expect("a leader");
    let (a, b, c) = match leader {
        0 => (0, 1, 2),
        1 => (1, 0, 2),
        _ => (2, 0, 1),
    };
    cluster.nodes[c].kill9();
    let pieces: Vec<Vec<u8>> = (0..8).map(|i| data::random_bytes(40 + i, 20_000)).collect();
    let (ids, root) = rt.block_on(async {
        let conn = cluster.connect(a).await;
        let ids = upload(&conn, pieces).await;
        let entries = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| file(&format!("f{i}"), &[(id, 20_000)]))
            .collect();
        let root = upload_tree(&conn, Tree { entries }).await;
        (ids, root)
    });
    cluster.nodes[c].restart();
    let secret = cluster.nodes[a].secret();
    let held = rt.block_on(cluster.nodes[c].owner_has(&ids, Some(&secret), None));
    assert!(
        held.expect("the restarted node answers").iter().all(|h| !h),
        "the restarted node already holds chunks written while it was down"
    );
    cluster.nodes[b].pause();

    rt.block_on(async {
        let conn = cluster.connect(a).await;
        // At the first attempt: the check copies the chunks to `c` before it counts.
        let started = Instant::now();
        let committed = commit(&conn, record(&root, None))
            .await
            .expect("a commit with one owner of every chunk stopped and one lacking them");
        eprintln!(
            "commit with one holder stopped: {:.2} s; coordinator peak RSS {} MiB",
            started.elapsed().as_secs_f64(),
            peak_rss(cluster.nodes[a].pid() as u32).unwrap_or(0) >> 20
        );
        assert!(committed.0 > 0);
        // The stopped owner was met for the first time by the check: its call is slow
        // after the hedge (a quarter of the deadline), and the copy that answered is made
        // W again then, not after the stopped owner's whole deadline.
        let took = started.elapsed();
        assert!(
            took < test_peer_timeout(),
            "the commit check waited out the stopped owner's deadline: {took:?}"
        );
        let held = cluster.nodes[c]
            .owner_has(&ids, Some(&secret), None)
            .await
            .expect("the restarted node answers");
        assert!(
            held.iter().all(|&h| h),
            "the commit check did not copy the chunks to the restarted node: {held:?}"
        );
    });
    cluster.nodes[b].resume();
}

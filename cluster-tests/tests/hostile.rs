//! Bad input gets a clear error and loses nothing: hostile manifests cannot write outside the
//! restore target, and nodes refuse malformed, corrupt or unauthenticated requests.

use std::path::Path;

use hashgrid::restore::{restore, RestoreOptions};
use hashgrid::Connection;
use hashgrid_cluster_tests::manifests::{self, upload_chunk};
use hashgrid_cluster_tests::{put_chunks, restore_all, runtime, Node};
use hashgrid_proto::id::pack_ids;
use hashgrid_proto::manifest::ObjectRef;
use hashgrid_proto::pb::manifest as mpb;
use hashgrid_proto::pb::{self, chunks_client::ChunksClient, CommitSnapshotRequest, HasRequest};
use hashgrid_proto::snapshot::SnapshotRecord;
use hashgrid_proto::ChunkId;
use prost::Message;
use tonic::Code;

/// Uploads raw object bytes as one chunk and returns its reference.
async fn upload_object(conn: &Connection, bytes: Vec<u8>) -> ObjectRef {
    ObjectRef(vec![upload_chunk(conn, bytes).await])
}

fn tree_bytes(entries: Vec<mpb::Entry>) -> Vec<u8> {
    let mut out = b"HGMT\x01".to_vec();
    mpb::Tree { entries }.encode(&mut out).unwrap();
    out
}

fn file_entry(name: &[u8], data_id: ChunkId, len: u64) -> mpb::Entry {
    mpb::Entry {
        name: name.to_vec(),
        kind: mpb::EntryKind::File as i32,
        mode: 0o644,
        size: len,
        content: Some(mpb::Content {
            extents: vec![mpb::Extent {
                id: data_id.as_bytes().to_vec(),
                len,
            }],
            list: vec![],
            extent_count: 1,
            chunk_count: 1,
        }),
        ..Default::default()
    }
}

fn dir_entry(name: &[u8], subtree: &ObjectRef) -> mpb::Entry {
    mpb::Entry {
        name: name.to_vec(),
        kind: mpb::EntryKind::Dir as i32,
        mode: 0o755,
        subtree: subtree.0.iter().map(|i| i.as_bytes().to_vec()).collect(),
        ..Default::default()
    }
}

async fn try_commit(conn: &Connection, root: ObjectRef) -> Result<SnapshotRecord, tonic::Status> {
    manifests::try_commit(conn, &root).await
}

async fn commit(conn: &Connection, root: ObjectRef) -> SnapshotRecord {
    manifests::commit(conn, &root).await
}

/// The node decodes what it is asked to commit: an invalid manifest never becomes a snapshot.
async fn refused(conn: &Connection, root: ObjectRef, expect: &str) {
    let e = try_commit(conn, root)
        .await
        .expect_err("an invalid manifest must not commit");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains(expect), "{expect}: {e}");
}

async fn try_restore(conn: &Connection, snap: &SnapshotRecord, target: &Path) -> String {
    restore(
        conn,
        snap,
        &RestoreOptions {
            target: target.to_path_buf(),
            paths: vec![],
            progress: false,
            ..Default::default()
        },
    )
    .await
    .expect_err("hostile manifest must not restore")
    .to_string()
}

#[test]
fn hostile_manifests_cannot_write_outside_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let sandbox = tmp.path().join("sandbox");
    let target = sandbox.join("target");
    let outside = sandbox.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    runtime().block_on(async {
        let conn = node.connect().await;
        let payload = b"pwned".to_vec();
        let data = upload_object(&conn, payload.clone()).await.0[0];

        for (name, expect) in [
            (&b".."[..], "invalid entry name"),
            (b"../outside/pwned", "invalid entry name"),
            (b"/tmp/pwned-absolute", "invalid entry name"),
            (b"a\0b", "invalid entry name"),
            (b".", "invalid entry name"),
        ] {
            let root = upload_object(&conn, tree_bytes(vec![file_entry(name, data, 5)])).await;
            refused(&conn, root, expect).await;
        }

        // Duplicate names: a symlink and a directory both called "evil", which would let the
        // directory's contents land wherever the link points.
        let link = mpb::Entry {
            name: b"evil".to_vec(),
            kind: mpb::EntryKind::Symlink as i32,
            symlink_target: outside.as_os_str().as_encoded_bytes().to_vec(),
            ..Default::default()
        };
        let inner = upload_object(&conn, tree_bytes(vec![file_entry(b"pwned", data, 5)])).await;
        let root = upload_object(&conn, tree_bytes(vec![dir_entry(b"evil", &inner), link])).await;
        refused(&conn, root, "not strictly sorted").await;

        // A symlink already in the target where the snapshot has a directory: it is replaced,
        // never followed.
        std::fs::create_dir_all(&target).unwrap();
        std::os::unix::fs::symlink(&outside, target.join("evil")).unwrap();
        let root = upload_object(&conn, tree_bytes(vec![dir_entry(b"evil", &inner)])).await;
        let snap = commit(&conn, root).await;
        restore_all(&conn, snap.id, &target).await;
        assert!(target.join("evil").symlink_metadata().unwrap().is_dir());
        assert_eq!(std::fs::read(target.join("evil/pwned")).unwrap(), payload);

        // A file whose extents do not add up to its size.
        let mut lying = file_entry(b"liar", data, 5);
        lying.size = 1 << 30;
        let root = upload_object(&conn, tree_bytes(vec![lying])).await;
        refused(&conn, root, "add up").await;

        // An extent whose length disagrees with the chunk it names.
        let root = upload_object(&conn, tree_bytes(vec![file_entry(b"short", data, 4)])).await;
        let snap = commit(&conn, root).await;
        let err = try_restore(&conn, &snap, &target).await;
        assert!(err.contains("has 5 bytes, the manifest says 4"), "{err}");
    });
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "something escaped the target"
    );
    assert!(!Path::new("/tmp/pwned-absolute").exists());
    let escaped: Vec<_> = std::fs::read_dir(&sandbox)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "target" && n != "outside")
        .collect();
    assert!(escaped.is_empty(), "written beside the target: {escaped:?}");
}

fn chunk(plain: &[u8]) -> pb::Chunk {
    pb::Chunk {
        id: ChunkId::of(plain).as_bytes().to_vec(),
        plain_len: plain.len() as u32,
        codec: pb::Codec::Raw as i32,
        data: plain.to_vec().into(),
        ..Default::default()
    }
}

async fn put_one(conn: &Connection, c: pb::Chunk) -> Result<pb::PutResponse, tonic::Status> {
    put_chunks(conn, vec![c]).await
}

#[test]
fn nodes_refuse_bad_requests_and_keep_nothing_of_them() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    runtime().block_on(async {
        let conn = node.connect().await;

        let mut wrong_hash = chunk(b"some data");
        wrong_hash.id = ChunkId::of(b"other data").as_bytes().to_vec();
        let e = put_one(&conn, wrong_hash).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("hashes to"), "{e}");

        let e = put_one(&conn, chunk(&[0u8; 4096])).await.unwrap_err();
        assert!(e.message().contains("all zeros"), "{e}");

        let e = put_one(&conn, chunk(&vec![1u8; 300 * 1024]))
            .await
            .unwrap_err();
        assert!(e.message().contains("exceeds the limit"), "{e}");

        let mut bomb = chunk(b"x");
        bomb.codec = pb::Codec::Zstd as i32;
        bomb.data = zstd_bytes(&vec![7u8; 1 << 20]).into();
        bomb.plain_len = 1;
        let e = put_one(&conn, bomb).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");

        let mut client = conn.chunks.clone();
        let e = client
            .has(HasRequest {
                epoch: 0,
                ids: vec![1; 33],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let too_many = vec![ChunkId::of(b"x"); 20_000];
        let e = client
            .has(HasRequest {
                epoch: 0,
                ids: pack_ids(&too_many),
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("too many"), "{e}");

        let e = client
            .has(HasRequest {
                epoch: 0,
                ids: pack_ids(&[ChunkId::of(b"x")]),
            })
            .await
            .map(|r| r.into_inner().present)
            .unwrap();
        assert_eq!(e, vec![0]);

        let mut get = client
            .get(pb::GetRequest {
                epoch: 0,
                ids: pack_ids(&[ChunkId::of(b"absent")]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let reply = get.message().await.unwrap().unwrap();
        assert_eq!(reply.chunks.len(), 1);
        assert_eq!(reply.chunks[0].fault, pb::ChunkFault::Missing as i32);

        // A commit whose root was never uploaded is refused.
        let e = conn
            .catalog
            .clone()
            .commit_snapshot(CommitSnapshotRequest {
                snapshot: Some(pb::Snapshot {
                    client: "c".into(),
                    dataset: "d".into(),
                    root: vec![ChunkId::of(b"never uploaded").as_bytes().to_vec()],
                    manifest_version: 1,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

        // Labels that could not be typed or used in a file name are refused.
        let e = conn
            .catalog
            .clone()
            .commit_snapshot(CommitSnapshotRequest {
                snapshot: Some(pb::Snapshot {
                    client: "../etc".into(),
                    dataset: "d".into(),
                    root: vec![ChunkId::of(b"r").as_bytes().to_vec()],
                    manifest_version: 1,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");

        let stats = conn
            .admin
            .clone()
            .stats(pb::StatsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (stats.chunks, stats.snapshots),
            (0, 0),
            "refused input left traces"
        );

        // No token, a wrong token: refused before any service runs.
        let channel = tonic::transport::Endpoint::from_shared(node.server())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let e = ChunksClient::new(channel.clone())
            .has(HasRequest {
                epoch: 0,
                ids: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let wrong = hashgrid::ConnectOptions::new(node.server(), "not-the-token");
        let e = Connection::connect(&wrong)
            .await
            .err()
            .expect("wrong token refused");
        assert!(e.to_string().contains("unknown token"), "{e}");
    });
}

fn zstd_bytes(plain: &[u8]) -> Vec<u8> {
    hashgrid_proto::codec::encode(&plain.to_vec().into(), 3)
        .1
        .to_vec()
}

//! Snapshots built from manifest objects directly, for what a backup of a real tree cannot
//! (or should not) produce: hostile trees, depths past PATH_MAX, entries with chosen owners,
//! device numbers or xattrs. Objects go through the agent's uploader and are cut by its
//! chunker, so they are stored exactly as a backup would store them.

use hashgrid::chunker::Chunker;
use hashgrid::objects::ObjectWriter;
use hashgrid::upload::Uploader;
use hashgrid::Connection;
use hashgrid_proto::manifest::{Content, Entry, EntryKind, Extent, Metadata, ObjectRef, Tree};
use hashgrid_proto::pb::{self, CommitSnapshotRequest};
use hashgrid_proto::snapshot::SnapshotRecord;
use hashgrid_proto::ChunkId;

/// Uploads `bytes` as one object (cut by the cluster's chunker) and returns its reference.
pub async fn upload_object(conn: &Connection, bytes: Vec<u8>) -> ObjectRef {
    let uploader = Uploader::start(conn, 3);
    let chunker = Chunker::new(conn.chunker);
    let (uploader, r) = tokio::task::spawn_blocking(move || {
        let r = ObjectWriter::write_all(&chunker, &uploader, &bytes).expect("cut object");
        (uploader, r)
    })
    .await
    .expect("upload task");
    uploader.finish().await.expect("upload");
    r
}

/// Uploads `bytes` as exactly one chunk (whatever its size) and returns its id.
pub async fn upload_chunk(conn: &Connection, bytes: Vec<u8>) -> ChunkId {
    let uploader = Uploader::start(conn, 3);
    let id = ChunkId::of(&bytes);
    let uploader = tokio::task::spawn_blocking(move || {
        uploader.submit_blocking(id, bytes.into()).expect("submit");
        uploader
    })
    .await
    .expect("upload task");
    uploader.finish().await.expect("upload");
    id
}

/// Sorts and uploads a tree.
pub async fn upload_tree(conn: &Connection, mut entries: Vec<Entry>) -> ObjectRef {
    let mut tree = Tree {
        entries: std::mem::take(&mut entries),
    };
    tree.sort();
    upload_object(conn, tree.encode()).await
}

/// Commits a snapshot of client "mallory", dataset "built", whose root tree is `root`.
pub async fn commit(conn: &Connection, root: &ObjectRef) -> SnapshotRecord {
    try_commit(conn, root).await.expect("commit")
}

/// [`commit`], returning the node's refusal instead of panicking on it.
pub async fn try_commit(
    conn: &Connection,
    root: &ObjectRef,
) -> Result<SnapshotRecord, tonic::Status> {
    let record = pb::Snapshot {
        client: "mallory".into(),
        dataset: "built".into(),
        root: root.0.iter().map(|i| i.as_bytes().to_vec()).collect(),
        manifest_version: 1,
        ..Default::default()
    };
    let id = conn
        .catalog
        .clone()
        .commit_snapshot(CommitSnapshotRequest {
            snapshot: Some(record),
            ..Default::default()
        })
        .await?
        .into_inner()
        .id;
    Ok(hashgrid::catalog::get(conn, hashgrid_proto::SnapshotId(id))
        .await
        .expect("committed snapshot"))
}

/// Metadata with `mode` and fixed times, owned by root.
pub fn meta(mode: u32) -> Metadata {
    Metadata {
        mode,
        mtime: hashgrid_proto::manifest::Timestamp {
            sec: 1_600_000_000,
            nsec: 0,
        },
        ..Default::default()
    }
}

pub fn entry(name: &[u8], meta: Metadata, kind: EntryKind) -> Entry {
    Entry {
        name: name.to_vec(),
        meta,
        kind,
    }
}

pub fn dir(name: &[u8], subtree: ObjectRef) -> Entry {
    entry(name, meta(0o755), EntryKind::Dir { subtree })
}

/// A file whose content is the one chunk `id` of `len` bytes.
pub fn file(name: &[u8], mut meta: Metadata, id: ChunkId, len: u32) -> Entry {
    meta.size = u64::from(len);
    entry(
        name,
        meta,
        EntryKind::File {
            content: Content::Inline(vec![Extent::Chunk { id, len }]),
            link_key: None,
        },
    )
}

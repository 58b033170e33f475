//! Backups: file level (a tree of paths) and image level (one file or block device).
//!
//! The pipeline (design §3): walk/read -> cut -> hash -> batched lookups -> compress ->
//! upload missing -> write manifest objects -> wait for every acknowledgement -> commit the
//! snapshot through the catalog. Nothing is committed unless every chunk it references is
//! durable.

pub mod content;
pub mod dir_handle;
pub mod source;
pub mod walk;
pub mod xattrs;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hashgrid_proto::limits::MAX_TREE_BYTES;
use hashgrid_proto::manifest::{Entry, EntryKind, ObjectRef, Tree, FORMAT_VERSION};
use hashgrid_proto::pb::{CommitSnapshotRequest, Snapshot};
use hashgrid_proto::snapshot::{validate_label, SnapshotKind, SnapshotRecord, SnapshotStats};
use hashgrid_proto::SnapshotId;
use serde::Serialize;

use self::source::{SourceError, SourceStat};
use self::walk::{reuse, Selection, Walker};
use crate::catalog;
use crate::chunker::Chunker;
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::memory::{cores, MemoryBudget};
use crate::objects::{ObjectReader, ObjectWriter};
use crate::progress::Progress;
use crate::tree_cache::{TreeCache, TreeCacheStats};
use crate::upload::{UploadStats, Uploader};

/// Which earlier snapshot to compare with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParentChoice {
    /// The latest snapshot of the same client, dataset and kind that is not marked damaged.
    Latest,
    /// Read every file (still deduplicated against the cluster).
    None,
    Id(SnapshotId),
}

#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub paths: Vec<PathBuf>,
    pub image: bool,
    pub client: String,
    pub dataset: String,
    pub tags: Vec<String>,
    pub parent: ParentChoice,
    pub hostname: String,
    /// zstd level; 0 stores chunks uncompressed.
    pub zstd_level: i32,
    pub progress: bool,
    /// Largest tree object written; a directory whose encoding exceeds it is split over
    /// parts under a tree index. [`hashgrid_proto::limits::TREE_PART_BYTES`] unless a
    /// test lowers it.
    pub tree_part_bytes: usize,
    /// Sizes every buffer and queue of the backup ([`crate::memory`]).
    pub memory: MemoryBudget,
    /// Where the local copy of the dataset's trees lives ([`crate::tree_cache`]); `None`
    /// fetches the parent's trees from the cluster.
    pub tree_cache: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackupSummary {
    pub snapshot: SnapshotId,
    pub parent: Option<SnapshotId>,
    pub stats: SnapshotStats,
    pub upload: UploadStats,
    /// How the parent's trees were read (`None`: no tree cache).
    pub tree_cache: Option<TreeCacheStats>,
    /// Entries left out because they were replaced (another file, kind or a symlink in their
    /// place) between the listing and their reading; each is also among `warnings`.
    pub replaced: u64,
    pub warnings: Vec<String>,
}

/// Runs one backup and commits its snapshot.
pub async fn backup(conn: &Connection, opts: &BackupOptions) -> Result<BackupSummary> {
    let started = Instant::now();
    validate_label("client name", &opts.client)?;
    validate_label("dataset", &opts.dataset)?;
    for t in &opts.tags {
        validate_label("tag", t)?;
    }
    if opts.paths.is_empty() {
        return Err(ClientError::Config(
            "nothing to back up: give at least one path".into(),
        ));
    }
    if opts.image && opts.paths.len() != 1 {
        return Err(ClientError::Config(
            "--image takes exactly one file or device".into(),
        ));
    }
    // Parts must hold at least one entry and stay readable (one part's header included).
    if opts.tree_part_bytes == 0 || opts.tree_part_bytes as u64 > MAX_TREE_BYTES - 64 {
        return Err(ClientError::Config(format!(
            "tree part size {} is outside 1..{}",
            opts.tree_part_bytes,
            MAX_TREE_BYTES - 64
        )));
    }
    let paths = opts
        .paths
        .iter()
        .map(|p| std::path::absolute(p).map_err(|e| ClientError::io(p, e)))
        .collect::<Result<Vec<_>>>()?;
    for p in &paths {
        std::fs::symlink_metadata(p).map_err(|e| ClientError::io(p, e))?;
    }

    let kind = if opts.image {
        SnapshotKind::Image
    } else {
        SnapshotKind::Files
    };
    let parent = match &opts.parent {
        ParentChoice::None => None,
        ParentChoice::Id(id) => Some(catalog::get(conn, *id).await?),
        ParentChoice::Latest => {
            catalog::backup_parent(conn, &opts.client, &opts.dataset, kind).await?
        }
    };
    tracing::debug!(elapsed = ?started.elapsed(), parent = ?parent.as_ref().map(|p| p.id), "parent chosen");
    let sizing = opts.memory.sizing(cores());
    tracing::debug!(budget = %opts.memory, ?sizing, "memory sizing");
    let trees = opts.tree_cache.as_ref().map(|dir| {
        // Named by where the cluster is, whose dataset, of which kind; used only for the
        // parent's own root (see crate::tree_cache).
        let key = format!(
            "{}\0{}\0{}\0{kind:?}",
            conn.server, opts.client, opts.dataset
        );
        Arc::new(TreeCache::open(
            dir,
            &key,
            parent.as_ref().map(|p| &p.root),
            sizing.tree_cache_bytes,
        ))
    });
    let reader = ObjectReader::new(conn.clone()).with_tree_cache(trees.clone());
    let parent_root = match &parent {
        Some(p) => Some((reader.load_tree(&p.root).await?, p.root.clone())),
        None => None,
    };

    let total = if opts.image {
        Some(image_size(&paths[0])?)
    } else {
        None
    };
    let progress = Progress::new(opts.progress, total, "backup");
    let walker = Arc::new(Walker::new(
        Chunker::new(conn.chunker),
        Uploader::start_sized(conn, opts.zstd_level, &sizing),
        reader,
        progress,
        opts.tree_part_bytes,
        &sizing,
    ));
    let root = if opts.image {
        backup_image(&walker, &paths[0], parent_root.map(|(tree, _)| tree)).await
    } else {
        backup_tree(&walker, parent_root, Selection::of_paths(&paths)).await
    };
    walker.progress.finish();
    tracing::debug!(elapsed = ?started.elapsed(), "walk done");
    let walker = Arc::try_unwrap(walker)
        .map_err(|_| ClientError::Internal("walker still shared after the walk".into()))?;
    // Finish uploads even when the walk failed, so the pipeline stops cleanly.
    let uploaded = walker.uploader.finish().await;
    // When both failed, the walk most likely stopped because the pipeline did (it then says
    // only that); the pipeline's own error is the cause the user needs (a full node, say).
    let upload = match (&root, uploaded) {
        (Err(_), Err(cause)) => return Err(cause),
        (_, uploaded) => uploaded?,
    };
    let root = root?;
    tracing::debug!(elapsed = ?started.elapsed(), "uploads acknowledged");

    let c = &walker.counters;
    let stats = SnapshotStats {
        logical_bytes: c.logical_bytes.load(Ordering::Relaxed),
        new_bytes: upload.stored_bytes,
        sent_bytes: upload.sent_bytes,
        files: c.files.load(Ordering::Relaxed),
        dirs: c.dirs.load(Ordering::Relaxed),
        chunks: c.chunks.load(Ordering::Relaxed),
        new_chunks: upload.stored_chunks,
        reused_files: c.reused_files.load(Ordering::Relaxed),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let record = SnapshotRecord {
        id: SnapshotId(0),
        client: opts.client.clone(),
        dataset: opts.dataset.clone(),
        kind,
        time_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        root,
        stats,
        tags: opts.tags.clone(),
        parent: parent.as_ref().map(|p| p.id),
        hostname: opts.hostname.clone(),
        paths: paths
            .iter()
            .map(|p| p.as_os_str().as_encoded_bytes().to_vec())
            .collect(),
        manifest_version: u32::from(FORMAT_VERSION),
        damage: None,
    };
    let id = commit(conn, &record).await?;
    tracing::debug!(elapsed = ?started.elapsed(), "snapshot committed");
    let tree_cache = trees.map(|cache| {
        if let Err(e) = cache.save(&record.root) {
            // The next backup fetches its parent's trees instead; nothing else is lost.
            tracing::warn!(error = %e, "could not write the tree cache");
        }
        cache.stats()
    });
    Ok(BackupSummary {
        snapshot: SnapshotId(id),
        parent: parent.map(|p| p.id),
        stats,
        upload,
        tree_cache,
        replaced: walker.counters.replaced.load(Ordering::Relaxed),
        warnings: walker
            .warnings
            .into_inner()
            .unwrap_or_else(|p| p.into_inner()),
    })
}

/// Commits `record` under a commit key made for this backup, retrying as the connection's
/// policy says (another coordinator, a new catalog leader): a retry whose first attempt did
/// commit gets that snapshot back, not a second.
async fn commit(conn: &Connection, record: &SnapshotRecord) -> Result<u64> {
    let request = CommitSnapshotRequest {
        snapshot: Some(Snapshot::from(record)),
        commit_key: rand::random::<[u8; 16]>().to_vec(),
    };
    conn.call("committing the snapshot", || {
        let mut catalog = conn.catalog.clone();
        let request = request.clone();
        async move { Ok(catalog.commit_snapshot(request).await?.into_inner().id) }
    })
    .await
}

/// A file-level snapshot's root is the tree of `/`, restricted to the selected paths.
async fn backup_tree(
    walker: &Arc<Walker>,
    parent: Option<(Tree, ObjectRef)>,
    selection: Selection,
) -> Result<ObjectRef> {
    let root = walker
        .descriptors
        .root(Path::new("/"))
        .map_err(source_error)?;
    walker
        .clone()
        .backup_dir(root, parent, selection)
        .await?
        .map(|done| done.subtree)
        .ok_or_else(|| ClientError::Internal("the root directory was left out".into()))
}

fn source_error(e: SourceError) -> ClientError {
    match e {
        SourceError::Io { path, error } => ClientError::Io { path, error },
        e @ SourceError::Replaced { .. } => ClientError::Config(e.to_string()),
    }
}

/// An image snapshot's root tree holds one file entry, named after the image.
async fn backup_image(
    walker: &Arc<Walker>,
    path: &Path,
    parent: Option<Tree>,
) -> Result<ObjectRef> {
    let st =
        SourceStat::from(&rustix::fs::stat(path).map_err(|e| ClientError::io(path, e.into()))?);
    if !(st.is_file() || st.kind() == rustix::fs::FileType::BlockDevice) {
        return Err(ClientError::Config(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        )));
    }
    let name = path
        .file_name()
        .ok_or_else(|| ClientError::Config(format!("{} has no file name", path.display())))?
        .as_encoded_bytes()
        .to_vec();
    let mut meta = st.metadata();
    let parent_entry = parent.and_then(|t| t.entries.into_iter().find(|e| e.name == name));
    // A device's mtime says nothing about its content: always read it.
    let reusable = if st.is_file() {
        parent_entry
            .and_then(|p| reuse(p, &st, &meta, None))
            .map(|r| r.content)
    } else {
        None
    };
    walker.counters.files.fetch_add(1, Ordering::Relaxed);
    let content = match reusable {
        Some(content) => {
            walker.counters.reused_files.fetch_add(1, Ordering::Relaxed);
            walker
                .counters
                .chunks
                .fetch_add(content.chunk_count(), Ordering::Relaxed);
            meta.size = st.size;
            content
        }
        None => {
            let w = walker.clone();
            let p = path.to_path_buf();
            let read = tokio::task::spawn_blocking(move || {
                let file = content::open_for_read(&p)?;
                content::read_content(&file, &p, &w.chunker, &w.uploader, &w.progress, w.read_buf)
            })
            .await??;
            walker
                .counters
                .chunks
                .fetch_add(read.chunks, Ordering::Relaxed);
            meta.size = read.size;
            read.content
        }
    };
    walker
        .counters
        .logical_bytes
        .fetch_add(meta.size, Ordering::Relaxed);
    let tree = Tree {
        entries: vec![Entry {
            name,
            meta,
            kind: EntryKind::File {
                content,
                link_key: None,
            },
        }],
    };
    let w = walker.clone();
    tokio::task::spawn_blocking(move || {
        let cache = w.reader.tree_cache().map(|c| &**c);
        ObjectWriter::write_tree(&w.chunker, &w.uploader, cache, &tree.encode())
    })
    .await?
}

fn image_size(path: &Path) -> Result<u64> {
    let f = std::fs::File::open(path).map_err(|e| ClientError::io(path, e))?;
    rustix::fs::seek(&f, rustix::fs::SeekFrom::End(0)).map_err(|e| ClientError::io(path, e.into()))
}

//! Restore: a snapshot, or chosen paths of it, into a target directory.
//!
//! A planner thread walks the manifest depth-first, creating directories, links and files
//! (pre-sized, so holes stay unallocated) through [`fs`], and queues one write job per data
//! chunk. A fetch stage batches those jobs into `Get` requests, verifies every chunk against
//! its id and the extent's length, and writes it at its offset. A file's owner, mode and
//! mtime are set when its last chunk lands; a directory's once everything inside it exists.

pub mod fs;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::num::NonZeroU64;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use hashgrid_proto::codec::decode_verified;
use hashgrid_proto::id::pack_ids;
use hashgrid_proto::manifest::{Content, Entry, EntryKind, Extent, Metadata, Tree};
use hashgrid_proto::pb::GetRequest;
use hashgrid_proto::snapshot::SnapshotRecord;
use hashgrid_proto::ChunkId;
use rustix::fs::FileType;
use rustix::io::Errno;
use serde::Serialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use self::fs::Dir;
use crate::backup::walk::Selection;
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::objects::{check_fault, ObjectReader};
use crate::progress::Progress;

/// Chunks per `Get` request.
const FETCH_BATCH: usize = 256;
/// `Get` requests in flight.
const FETCH_IN_FLIGHT: usize = 3;
/// Files open for writing at once.
const OPEN_FILES: usize = 256;

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub target: PathBuf,
    /// Paths inside the snapshot to restore (all when empty).
    pub paths: Vec<PathBuf>,
    pub progress: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    pub warnings: Vec<String>,
}

/// A file being written; finished (metadata applied, closed) when the last holder drops it.
struct FileTarget {
    file: File,
    meta: Metadata,
    path: PathBuf,
    as_root: bool,
    failed: Arc<Mutex<Option<String>>>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for FileTarget {
    fn drop(&mut self) {
        if let Err(e) = fs::set_meta_fd(&self.file, &self.meta, self.as_root) {
            let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            f.get_or_insert_with(|| format!("{}: setting metadata: {e}", self.path.display()));
        }
    }
}

struct WriteJob {
    target: Arc<FileTarget>,
    offset: u64,
    id: ChunkId,
    len: u32,
}

/// Restores `snapshot` per `opts`.
pub async fn restore(
    conn: &Connection,
    snapshot: &SnapshotRecord,
    opts: &RestoreOptions,
) -> Result<RestoreSummary> {
    let reader = ObjectReader::new(conn.clone());
    let root = reader.load_tree(&snapshot.root).await?;
    let total: u64 = snapshot.stats.logical_bytes;
    let progress = Arc::new(Progress::new(opts.progress, Some(total), "restore"));
    let target_dir = fs::open_target(&opts.target).map_err(|e| ClientError::io(&opts.target, e))?;

    let (jobs_tx, jobs_rx) = mpsc::channel::<WriteJob>(8 * FETCH_BATCH);
    let fetched = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let writer = tokio::spawn(write_stage(
        conn.clone(),
        jobs_rx,
        progress.clone(),
        fetched.clone(),
    ));

    let failed = Arc::new(Mutex::new(None));
    let selection = if opts.paths.is_empty() {
        Selection::All
    } else {
        Selection::of_paths(
            &opts
                .paths
                .iter()
                .map(|p| Path::new("/").join(p))
                .collect::<Vec<_>>(),
        )
    };
    let mut planner = Planner {
        reader,
        rt: tokio::runtime::Handle::current(),
        jobs: jobs_tx,
        as_root: rustix::process::geteuid().is_root(),
        links: HashMap::new(),
        open_files: Arc::new(Semaphore::new(OPEN_FILES)),
        failed: failed.clone(),
        summary: RestoreSummary::default(),
        matched: Vec::new(),
        progress: progress.clone(),
    };
    let target_path = opts.target.clone();
    let planned = tokio::task::spawn_blocking(move || {
        let result =
            planner.restore_dir(&target_dir, &target_path, Path::new("/"), &root, &selection);
        (planner.summary, planner.matched, result)
    })
    .await?;
    let (mut summary, matched, planned) = planned;
    // The planner dropped its sender; the writer drains what was queued. A writer that failed
    // (a full disk, say) stops the planner with a closed queue, so its error is the cause
    // and is reported first.
    let written = writer.await?;
    written?;
    planned?;
    progress.finish();
    if let Some(e) = failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(ClientError::Internal(e));
    }
    for p in &opts.paths {
        let wanted = Path::new("/").join(p);
        if !matched.iter().any(|m| m == &wanted) {
            return Err(ClientError::NotFound(format!(
                "{} is not in snapshot {}",
                p.display(),
                snapshot.id
            )));
        }
    }
    summary.chunks_fetched = fetched.0.load(Ordering::Relaxed);
    summary.bytes_fetched = fetched.1.load(Ordering::Relaxed);
    Ok(summary)
}

struct Planner {
    reader: ObjectReader,
    rt: tokio::runtime::Handle,
    jobs: mpsc::Sender<WriteJob>,
    as_root: bool,
    /// First restored name of each hard-link group: its directory and name.
    links: HashMap<NonZeroU64, (Arc<Dir>, Vec<u8>)>,
    open_files: Arc<Semaphore>,
    failed: Arc<Mutex<Option<String>>>,
    summary: RestoreSummary,
    /// Snapshot paths (absolute) where a selection ended, to report unmatched ones.
    matched: Vec<PathBuf>,
    progress: Arc<Progress>,
}

fn errno_at(path: &Path, what: &str, e: Errno) -> ClientError {
    ClientError::io(
        path,
        std::io::Error::other(format!("{what}: {}", std::io::Error::from(e))),
    )
}

impl Planner {
    /// Restores `tree` into `dir` (at `path` on disk, `snap` in the snapshot).
    fn restore_dir(
        &mut self,
        dir: &Dir,
        path: &Path,
        snap: &Path,
        tree: &Tree,
        selection: &Selection,
    ) -> Result<()> {
        let dir = Arc::new(dir.try_clone().map_err(|e| ClientError::io(path, e))?);
        let selected: Vec<(&Entry, Selection)> = match selection {
            Selection::All => tree.entries.iter().map(|e| (e, Selection::All)).collect(),
            Selection::Only(names) => names
                .iter()
                .filter_map(|(n, s)| tree.get(n).map(|e| (e, s.clone())))
                .collect(),
        };
        for (entry, sel) in selected {
            let name = OsStr::from_bytes(&entry.name);
            let child_snap = snap.join(name);
            if sel == Selection::All && selection != &Selection::All {
                self.matched.push(child_snap.clone());
            }
            self.restore_entry(&dir, &path.join(name), &child_snap, entry, &sel)?;
        }
        Ok(())
    }

    fn restore_entry(
        &mut self,
        dir: &Arc<Dir>,
        path: &Path,
        snap: &Path,
        entry: &Entry,
        sel: &Selection,
    ) -> Result<()> {
        let name = &entry.name;
        match &entry.kind {
            EntryKind::Dir { subtree } => {
                let child =
                    fs::make_dir(dir, name).map_err(|e| errno_at(path, "creating directory", e))?;
                let tree = self.rt.block_on(self.reader.load_tree(subtree))?;
                self.restore_dir(&child, path, snap, &tree, sel)?;
                fs::set_meta_fd(&child, &entry.meta, self.as_root)
                    .map_err(|e| errno_at(path, "setting directory metadata", e))?;
                self.summary.dirs += 1;
            }
            EntryKind::File { content, link_key } => {
                if let Some(key) = link_key {
                    if let Some((first_dir, first_name)) = self.links.get(key) {
                        fs::hard_link(first_dir, first_name, dir, name)
                            .map_err(|e| errno_at(path, "creating hard link", e))?;
                        self.summary.links += 1;
                        return Ok(());
                    }
                }
                self.restore_file(dir, path, entry, content)?;
                if let Some(key) = link_key {
                    self.links.insert(*key, (dir.clone(), name.clone()));
                }
                self.summary.files += 1;
            }
            EntryKind::Symlink { target } => {
                fs::symlink(dir, name, target)
                    .map_err(|e| errno_at(path, "creating symlink", e))?;
                fs::set_meta_at(dir, name, &entry.meta, self.as_root, true)
                    .map_err(|e| errno_at(path, "setting symlink metadata", e))?;
            }
            EntryKind::Fifo => self.restore_node(dir, path, entry, FileType::Fifo, 0)?,
            EntryKind::Socket => self.restore_node(dir, path, entry, FileType::Socket, 0)?,
            EntryKind::CharDevice { rdev } => {
                self.restore_node(dir, path, entry, FileType::CharacterDevice, *rdev)?
            }
            EntryKind::BlockDevice { rdev } => {
                self.restore_node(dir, path, entry, FileType::BlockDevice, *rdev)?
            }
        }
        Ok(())
    }

    fn restore_node(
        &mut self,
        dir: &Dir,
        path: &Path,
        entry: &Entry,
        kind: FileType,
        rdev: u64,
    ) -> Result<()> {
        match fs::make_node(dir, &entry.name, kind, rdev) {
            Ok(()) => fs::set_meta_at(dir, &entry.name, &entry.meta, self.as_root, false)
                .map_err(|e| errno_at(path, "setting metadata", e)),
            Err(Errno::PERM) => {
                self.summary.warnings.push(format!(
                    "skipped {}: creating device nodes needs root",
                    path.display()
                ));
                Ok(())
            }
            Err(e) => Err(errno_at(path, "creating special file", e)),
        }
    }

    fn restore_file(
        &mut self,
        dir: &Dir,
        path: &Path,
        entry: &Entry,
        content: &Content,
    ) -> Result<()> {
        let permit = self
            .rt
            .block_on(self.open_files.clone().acquire_owned())
            .map_err(|_| ClientError::Internal("file limiter closed".into()))?;
        let file =
            fs::create_file(dir, &entry.name).map_err(|e| errno_at(path, "creating file", e))?;
        file.set_len(entry.meta.size)
            .map_err(|e| ClientError::io(path, e))?;
        let target = Arc::new(FileTarget {
            file,
            meta: entry.meta.clone(),
            path: path.to_path_buf(),
            as_root: self.as_root,
            failed: self.failed.clone(),
            _permit: permit,
        });
        let mut offset = 0u64;
        let progress = &self.progress;
        let mut emit = |e: Extent, jobs: &mpsc::Sender<WriteJob>| -> Result<()> {
            if let Extent::Hole { len } = e {
                progress.add_bytes(len);
            }
            if let Extent::Chunk { id, len } = e {
                jobs.blocking_send(WriteJob {
                    target: target.clone(),
                    offset,
                    id,
                    len,
                })
                .map_err(|_| ClientError::Internal("restore writer stopped".into()))?;
            }
            offset += e.len();
            Ok(())
        };
        match content {
            Content::Inline(extents) => {
                for e in extents {
                    emit(*e, &self.jobs)?;
                }
            }
            Content::List { list, .. } => {
                let mut extents = self.reader.chunk_list(list);
                while let Some(e) = self.rt.block_on(extents.next())? {
                    emit(e, &self.jobs)?;
                }
            }
        }
        if offset != entry.meta.size {
            return Err(ClientError::Manifest(format!(
                "{}: extents add up to {offset} bytes, the entry says {}",
                path.display(),
                entry.meta.size
            )));
        }
        self.summary.bytes += offset;
        Ok(())
    }
}

/// Fetches queued chunks in batches and writes them where they belong.
async fn write_stage(
    conn: Connection,
    jobs: mpsc::Receiver<WriteJob>,
    progress: Arc<Progress>,
    fetched: Arc<(AtomicU64, AtomicU64)>,
) -> Result<()> {
    ReceiverStream::new(jobs)
        .ready_chunks(FETCH_BATCH)
        .map(|batch| fetch_and_write(conn.clone(), batch, progress.clone(), fetched.clone()))
        .buffer_unordered(FETCH_IN_FLIGHT)
        .try_collect::<()>()
        .await
}

async fn fetch_and_write(
    conn: Connection,
    batch: Vec<WriteJob>,
    progress: Arc<Progress>,
    fetched: Arc<(AtomicU64, AtomicU64)>,
) -> Result<()> {
    // Each distinct chunk is fetched once and written to every place that needs it.
    let mut wanted: BTreeMap<ChunkId, Vec<WriteJob>> = BTreeMap::new();
    let mut order = Vec::new();
    for job in batch {
        let e = wanted.entry(job.id).or_default();
        if e.is_empty() {
            order.push(job.id);
        }
        e.push(job);
    }
    let mut client = conn.chunks.clone();
    let mut stream = client
        .get(GetRequest {
            epoch: conn.epoch(),
            ids: pack_ids(&order),
        })
        .await
        .map_err(|s| ClientError::rpc("fetching chunks", s))?
        .into_inner();
    let max_len = conn.chunker.max_size;
    let mut writes = Vec::new();
    let mut got = 0usize;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| ClientError::rpc("fetching chunks", s))?
    {
        let mut group = Vec::with_capacity(msg.chunks.len());
        for chunk in msg.chunks {
            let expected = order.get(got).ok_or_else(|| {
                ClientError::Manifest("node sent more chunks than asked for".into())
            })?;
            check_fault(&chunk, *expected)?;
            got += 1;
            fetched.0.fetch_add(1, Ordering::Relaxed);
            fetched
                .1
                .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
            let jobs = wanted.remove(expected).unwrap_or_default();
            group.push((*expected, chunk, jobs));
        }
        let progress = progress.clone();
        writes.push(tokio::task::spawn_blocking(move || -> Result<()> {
            for (expected, chunk, jobs) in group {
                let (id, plain) = decode_verified(&chunk, max_len)?;
                if id != expected {
                    return Err(ClientError::Manifest(format!(
                        "node sent chunk {id} where {expected} was asked for"
                    )));
                }
                for job in jobs {
                    if plain.len() != job.len as usize {
                        return Err(ClientError::Manifest(format!(
                            "{}: chunk {id} has {} bytes, the manifest says {}",
                            job.target.path.display(),
                            plain.len(),
                            job.len
                        )));
                    }
                    job.target
                        .file
                        .write_all_at(&plain, job.offset)
                        .map_err(|e| ClientError::io(&job.target.path, e))?;
                    progress.add_bytes(plain.len() as u64);
                }
            }
            Ok(())
        }));
    }
    if got != order.len() {
        return Err(ClientError::Manifest(format!(
            "node sent {got} of {} chunks",
            order.len()
        )));
    }
    for w in writes {
        w.await??;
    }
    Ok(())
}

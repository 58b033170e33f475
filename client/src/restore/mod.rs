//! Restore: a snapshot, or chosen paths of it, into a target directory.
//!
//! A planner thread ([`planner`]) walks the manifest with an explicit stack (any depth, a
//! bounded number of descriptors), creating directories, links and files (pre-sized, so
//! holes stay unallocated) through [`fs`], and queues one write job per data chunk. The
//! fetch stage ([`write`]) batches those jobs into `Get` requests, verifies every chunk
//! against its id and the extent's length, and writes it at its offset. A file's owner,
//! mode, xattrs and mtime are set when its last chunk lands ([`meta`]); a directory's once
//! everything inside it exists. What is applied is the [`RestorePolicy`].
//!
//! A chunk the cluster cannot serve costs the files (or directory listings) that need it,
//! not the restore: everything else is restored, and the restore ends with
//! [`ClientError::RestoreIncomplete`] naming each damaged path and chunk.

pub mod fs;
mod meta;
mod planner;
pub mod policy;
mod report;
mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hashgrid_proto::snapshot::SnapshotRecord;
use rustix::process::Resource;
use serde::Serialize;
use tokio::sync::mpsc;

use self::planner::Planner;
pub use self::planner::MAX_HELD_TREE_BYTES;
pub use self::policy::RestorePolicy;
use self::report::{DamageLog, Warnings};
pub use self::report::{DamagedChunk, DamagedPath};
use self::write::{write_stage, WriteJob, FETCH_BATCH};
use crate::backup::walk::Selection;
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::objects::ObjectReader;
use crate::progress::Progress;

/// Descriptors left to the runtime, the connection and standard streams.
const RESERVED_FDS: u64 = 64;
/// Most files open for writing at once, and most directories the walk holds open.
const MAX_OPEN_FILES: u64 = 256;
const MAX_DIR_FDS: u64 = 64;

#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub target: PathBuf,
    /// Paths inside the snapshot to restore (all when empty).
    pub paths: Vec<PathBuf>,
    pub progress: bool,
    pub policy: RestorePolicy,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    /// The descriptor budget the restore kept to: files open for writing, directories held.
    pub max_open_files: u64,
    pub max_open_dirs: u64,
    pub warnings: Vec<String>,
}

/// State the planner and the writer threads share.
pub(crate) struct Shared {
    policy: RestorePolicy,
    warnings: Warnings,
    damage: DamageLog,
    /// The first error found where it cannot be returned (a file finished on a writer
    /// thread).
    failed: Mutex<Option<ClientError>>,
}

impl Shared {
    fn fail(&self, e: ClientError) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    }
}

/// How many files and directories a restore may hold open under this process's
/// `RLIMIT_NOFILE`.
fn descriptor_budget() -> Result<(u64, u64)> {
    let limit = rustix::process::getrlimit(Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let budget = limit.saturating_sub(RESERVED_FDS);
    if budget < 16 {
        return Err(ClientError::Config(format!(
            "the open-file limit ({limit}) is too low to restore: raise `ulimit -n` to {} or more",
            RESERVED_FDS + 16
        )));
    }
    let dirs = (budget / 4).min(MAX_DIR_FDS);
    // One more descriptor at a time for a hard link's source directory or a new node.
    let files = (budget - dirs - 4).min(MAX_OPEN_FILES);
    Ok((files, dirs))
}

/// Restores `snapshot` per `opts`.
pub async fn restore(
    conn: &Connection,
    snapshot: &SnapshotRecord,
    opts: &RestoreOptions,
) -> Result<RestoreSummary> {
    let (max_files, max_dirs) = descriptor_budget()?;
    let reader = ObjectReader::new(conn.clone());
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

    let shared = Arc::new(Shared {
        policy: opts.policy.for_this_process(),
        warnings: Warnings::default(),
        damage: DamageLog::default(),
        failed: Mutex::new(None),
    });
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
    let mut planner = Planner::new(
        reader,
        tokio::runtime::Handle::current(),
        jobs_tx,
        shared.clone(),
        max_files as usize,
        max_dirs as usize,
        progress.clone(),
    );
    let target_path = opts.target.clone();
    let root = snapshot.root.clone();
    let planned = tokio::task::spawn_blocking(move || {
        let result = planner.run(target_dir, &target_path, &root, selection);
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
    if let Some(e) = shared
        .failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(e);
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
    summary.max_open_files = max_files;
    summary.max_open_dirs = max_dirs;
    summary.warnings = shared.warnings.lines();
    let (damaged, unnamed) = shared.damage.take();
    if !damaged.is_empty() || unnamed > 0 {
        return Err(ClientError::RestoreIncomplete {
            damaged,
            unnamed,
            summary: Box::new(summary),
        });
    }
    Ok(summary)
}

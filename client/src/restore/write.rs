//! The fetch stage: batches write jobs into `Get` requests, verifies every chunk against its
//! id and the extent's length, and writes it at its offset in every file that needs it.
//!
//! Writes to one file are taken in turn, by the agent rather than the kernel: several
//! groups decode at once, and when two of them wrote into the same file (an image) the
//! second spun on the file's inode lock while the first copied (`rwsem_spin_on_owner`, 7.5 %
//! of all CPU in a profile of a 3 GiB image restore). A group whose file is busy keeps its
//! decoded chunk and goes on decoding, and writes what it kept once its own decoding is done
//! (or once it keeps [`PENDING_WRITE_BYTES`]).
//!
//! A chunk whose bytes fail verification is asked for once more with `full_check`: its
//! owners decode and hash each copy before serving it, so a copy that went bad before its
//! owner took its checksum (which the owner's cheap check would pass) is found and dropped
//! there, and another owner's copy is read. A chunk the cluster cannot serve (missing, or
//! every copy damaged) costs only the files that use it: they are named in the damage log,
//! their range stays a hole, and the restore goes on.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hashgrid_proto::codec::decode_verified;
use hashgrid_proto::id::pack_ids;
use hashgrid_proto::manifest::Metadata;
use hashgrid_proto::pb::{self, ChunkFault, GetRequest};
use hashgrid_proto::ChunkId;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;

use super::{meta, Shared};
use crate::connection::{within, Connection};
use crate::error::{ClientError, Result};
use crate::objects::check_fault;
use crate::progress::Progress;

/// Chunks per `Get` request.
pub(super) const FETCH_BATCH: usize = 256;
/// `Get` requests in flight.
const FETCH_IN_FLIGHT: usize = 3;
/// Decoded bytes one group keeps for files that another group is writing to, before it
/// waits for them instead of decoding on.
const PENDING_WRITE_BYTES: usize = 4 << 20;

/// A file being written; finished (metadata applied, closed) when the last holder drops it.
pub(super) struct FileTarget {
    pub file: File,
    pub meta: Metadata,
    pub path: PathBuf,
    pub shared: Arc<Shared>,
    /// Held while a chunk is written to the file (see the module doc).
    pub write_lock: Mutex<()>,
    pub _permit: OwnedSemaphorePermit,
}

impl FileTarget {
    /// Writes `plain` at `offset`, waiting for the file when another group writes to it.
    fn write_at(&self, plain: &[u8], offset: u64) -> Result<()> {
        let _turn = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.write_unlocked(plain, offset)
    }

    /// Writes `plain` at `offset` if no other group is writing to the file; `false` if one is.
    fn try_write_at(&self, plain: &[u8], offset: u64) -> Result<bool> {
        let _turn = match self.write_lock.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(false),
        };
        self.write_unlocked(plain, offset).map(|()| true)
    }

    fn write_unlocked(&self, plain: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(plain, offset)
            .map_err(|e| ClientError::io(&self.path, e))
    }
}

impl Drop for FileTarget {
    fn drop(&mut self) {
        let s = &self.shared;
        if let Err(e) = meta::apply_fd(&self.file, &self.meta, &self.path, &s.policy, &s.warnings) {
            s.fail(ClientError::io(
                &self.path,
                std::io::Error::other(format!("setting metadata: {}", std::io::Error::from(e))),
            ));
        }
    }
}

pub(super) struct WriteJob {
    pub target: Arc<FileTarget>,
    pub offset: u64,
    pub id: ChunkId,
    pub len: u32,
}

/// Fetches queued chunks in batches and writes them where they belong.
pub(super) async fn write_stage(
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

/// Names every file of `jobs` as damaged by chunk `id`; their range stays a hole. A file
/// whose lost range is its tail is given its length here (the planner extends only files
/// whose chunks stop short of their end; the others get it from their writes).
fn lost(jobs: Vec<WriteJob>, id: ChunkId, fault: ChunkFault, progress: &Progress) {
    for job in jobs {
        let t = &job.target;
        t.shared.damage.record(&t.path, id, fault);
        if job.offset + u64::from(job.len) == t.meta.size {
            if let Err(e) = t.file.set_len(t.meta.size) {
                t.shared.fail(ClientError::io(&t.path, e));
            }
        }
        progress.add_bytes(u64::from(job.len));
    }
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
    let failed = fetch_round(&conn, &order, wanted, false, &progress, &fetched).await?;
    if failed.is_empty() {
        return Ok(());
    }
    // Bytes that do not hash to their id: asked again, each copy read in full by its owner,
    // so that one gone bad before its owner took its checksum is found there, dropped, and
    // read from another owner. What fails again is as lost as a damaged copy.
    tracing::warn!(
        chunks = failed.len(),
        "node sent chunks that fail verification; asking again with copies read in full"
    );
    let order: Vec<ChunkId> = failed.iter().map(|(id, _)| *id).collect();
    let wanted: BTreeMap<ChunkId, Vec<WriteJob>> = failed.into_iter().collect();
    for (id, jobs) in fetch_round(&conn, &order, wanted, true, &progress, &fetched).await? {
        lost(jobs, id, ChunkFault::Damaged, &progress);
    }
    Ok(())
}

/// Chunks whose bytes failed verification, with the places they were to be written.
type Failed = Vec<(ChunkId, Vec<WriteJob>)>;

/// Fetches the chunks of `order` (`full_check`: each copy read in full by its owner) and
/// writes each where `wanted` says; returns those whose bytes failed verification.
async fn fetch_round(
    conn: &Connection,
    order: &[ChunkId],
    mut wanted: BTreeMap<ChunkId, Vec<WriteJob>>,
    full_check: bool,
    progress: &Arc<Progress>,
    fetched: &Arc<(AtomicU64, AtomicU64)>,
) -> Result<Failed> {
    let max_len = conn.chunker.max_size;
    let mut writes = Vec::new();
    let mut got = 0usize;
    // A stream that fails is asked again for the chunks it had not sent yet.
    let mut backoff = None;
    while got < order.len() {
        let generation = conn.generation();
        let mut client = conn.chunks.clone();
        let request = GetRequest {
            epoch: conn.epoch(),
            ids: pack_ids(&order[got..]),
            full_check,
        };
        let deadline = conn.timeouts().transfer;
        let failed = match within(deadline, "fetching chunks", client.get(request)).await {
            Err(s) => Some(s),
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match within(deadline, "fetching chunks", stream.message()).await {
                        Ok(Some(msg)) => writes.push(write_group(
                            msg.chunks,
                            order,
                            &mut got,
                            &mut wanted,
                            progress,
                            fetched,
                            max_len,
                        )?),
                        Ok(None) => break None,
                        Err(s) => break Some(s),
                    }
                }
            }
        };
        match failed {
            Some(status) => {
                let b = backoff.get_or_insert_with(|| conn.backoff());
                conn.recover("fetching chunks", status, generation, b)
                    .await?;
            }
            None => break,
        }
    }
    if got != order.len() {
        return Err(ClientError::Manifest(format!(
            "node sent {got} of {} chunks",
            order.len()
        )));
    }
    let mut failed = Vec::new();
    for w in writes {
        failed.extend(w.await??);
    }
    Ok(failed)
}

/// Decoded chunks one group keeps for files another group was writing to (see the module
/// doc), with the places still to write them.
#[derive(Default)]
struct Deferred {
    chunks: Vec<(Bytes, Vec<WriteJob>)>,
    bytes: usize,
}

impl Deferred {
    /// Writes `plain` at each of `jobs` whose file no other group is writing to; keeps the
    /// others.
    fn write_or_keep(
        &mut self,
        plain: Bytes,
        jobs: Vec<WriteJob>,
        progress: &Progress,
    ) -> Result<()> {
        let mut busy = Vec::new();
        for job in jobs {
            if job.target.try_write_at(&plain, job.offset)? {
                progress.add_bytes(plain.len() as u64);
            } else {
                busy.push(job);
            }
        }
        if !busy.is_empty() {
            self.bytes += plain.len();
            self.chunks.push((plain, busy));
        }
        Ok(())
    }

    /// Writes everything kept, waiting for each file's turn.
    fn write_all(&mut self, progress: &Progress) -> Result<()> {
        for (plain, jobs) in self.chunks.drain(..) {
            for job in jobs {
                job.target.write_at(&plain, job.offset)?;
                progress.add_bytes(plain.len() as u64);
            }
        }
        self.bytes = 0;
        Ok(())
    }
}

/// Checks one `Get` reply's chunks against the ids asked for (from `order[*got]` on) and
/// writes them on a blocking thread; returns that thread, which returns the chunks whose
/// bytes failed verification.
fn write_group(
    chunks: Vec<pb::Chunk>,
    order: &[ChunkId],
    got: &mut usize,
    wanted: &mut BTreeMap<ChunkId, Vec<WriteJob>>,
    progress: &Arc<Progress>,
    fetched: &Arc<(AtomicU64, AtomicU64)>,
    max_len: u32,
) -> Result<tokio::task::JoinHandle<Result<Failed>>> {
    let mut group = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let expected = *order
            .get(*got)
            .ok_or_else(|| ClientError::Manifest("node sent more chunks than asked for".into()))?;
        *got += 1;
        let jobs = wanted.remove(&expected).unwrap_or_default();
        match check_fault(&chunk, expected) {
            Ok(()) => {}
            Err(ClientError::ChunkFault { id, fault }) => {
                lost(jobs, id, fault, progress);
                continue;
            }
            Err(e) => return Err(e),
        }
        fetched.0.fetch_add(1, Ordering::Relaxed);
        fetched
            .1
            .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
        group.push((expected, chunk, jobs));
    }
    let progress = progress.clone();
    Ok(tokio::task::spawn_blocking(move || -> Result<Failed> {
        let mut kept = Deferred::default();
        let mut failed = Vec::new();
        for (expected, chunk, jobs) in group {
            let (id, plain) = match decode_verified(&chunk, max_len) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(chunk = %expected, error = %e, "node sent a chunk that fails verification");
                    failed.push((expected, jobs));
                    continue;
                }
            };
            if id != expected {
                return Err(ClientError::Manifest(format!(
                    "node sent chunk {id} where {expected} was asked for"
                )));
            }
            if let Some(job) = jobs.iter().find(|j| plain.len() != j.len as usize) {
                return Err(ClientError::Manifest(format!(
                    "{}: chunk {id} has {} bytes, the manifest says {}",
                    job.target.path.display(),
                    plain.len(),
                    job.len
                )));
            }
            kept.write_or_keep(plain, jobs, &progress)?;
            if kept.bytes >= PENDING_WRITE_BYTES {
                kept.write_all(&progress)?;
            }
        }
        kept.write_all(&progress)?;
        Ok(failed)
    }))
}

#[cfg(test)]
mod tests {
    use tokio::sync::Semaphore;

    use super::*;
    use crate::restore::policy::RestorePolicy;
    use crate::restore::report::{DamageLog, Warnings};

    fn target(path: &std::path::Path, size: u64) -> Arc<FileTarget> {
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        file.set_len(size).unwrap();
        let shared = Arc::new(Shared {
            policy: RestorePolicy::default(),
            warnings: Warnings::default(),
            damage: DamageLog::default(),
            failed: Mutex::new(None),
        });
        Arc::new(FileTarget {
            file,
            meta: Metadata {
                mode: 0o644,
                size,
                ..Default::default()
            },
            path: path.to_path_buf(),
            shared,
            write_lock: Mutex::new(()),
            _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
        })
    }

    fn job(target: &Arc<FileTarget>, offset: u64, plain: &[u8]) -> WriteJob {
        WriteJob {
            target: target.clone(),
            offset,
            id: ChunkId::of(plain),
            len: plain.len() as u32,
        }
    }

    #[test]
    fn a_chunk_for_a_busy_file_is_kept_until_the_file_is_free_and_others_are_written_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (busy_path, free_path) = (dir.path().join("image"), dir.path().join("other"));
        let busy = target(&busy_path, 8);
        let free = target(&free_path, 4);
        let progress = Progress::new(false, None, "restored");
        let mut kept = Deferred::default();

        let turn = busy.write_lock.lock().unwrap(); // another group is writing the image
        let a = Bytes::from_static(b"AAAA");
        kept.write_or_keep(
            a.clone(),
            vec![job(&busy, 0, &a), job(&free, 0, &a)],
            &progress,
        )
        .unwrap();
        let b = Bytes::from_static(b"BBBB");
        kept.write_or_keep(b.clone(), vec![job(&busy, 4, &b)], &progress)
            .unwrap();
        assert_eq!(kept.bytes, 8, "both chunks kept for the busy file");
        assert_eq!(
            std::fs::read(&free_path).unwrap(),
            b"AAAA",
            "the free file is written at once"
        );
        assert_eq!(
            std::fs::read(&busy_path).unwrap(),
            [0; 8],
            "nothing written past the lock"
        );
        drop(turn);

        kept.write_all(&progress).unwrap();
        assert_eq!(kept.bytes, 0);
        assert!(kept.chunks.is_empty());
        assert_eq!(std::fs::read(&busy_path).unwrap(), b"AAAABBBB");
        let free_now = kept.write_or_keep(b.clone(), vec![job(&busy, 0, &b)], &progress);
        assert!(
            free_now.is_ok() && kept.chunks.is_empty(),
            "a free file is written at once"
        );
        assert_eq!(std::fs::read(&busy_path).unwrap(), b"BBBBBBBB");
    }
}

//! The fetch stage: batches write jobs into `Get` requests, verifies every chunk against its
//! id and the extent's length, and writes it at its offset in every file that needs it.
//!
//! A chunk the cluster cannot serve (missing, or every copy damaged) costs only the files
//! that use it: they are named in the damage log, their range stays a hole, and the restore
//! goes on.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

/// A file being written; finished (metadata applied, closed) when the last holder drops it.
pub(super) struct FileTarget {
    pub file: File,
    pub meta: Metadata,
    pub path: PathBuf,
    pub shared: Arc<Shared>,
    pub _permit: OwnedSemaphorePermit,
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

/// Names every file of `jobs` as damaged by chunk `id`; their range stays a hole.
fn lost(jobs: Vec<WriteJob>, id: ChunkId, fault: ChunkFault, progress: &Progress) {
    for job in jobs {
        job.target.shared.damage.record(&job.target.path, id, fault);
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
                            &order,
                            &mut got,
                            &mut wanted,
                            &progress,
                            &fetched,
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
    for w in writes {
        w.await??;
    }
    Ok(())
}

/// Checks one `Get` reply's chunks against the ids asked for (from `order[*got]` on) and
/// writes them on a blocking thread; returns that thread.
fn write_group(
    chunks: Vec<pb::Chunk>,
    order: &[ChunkId],
    got: &mut usize,
    wanted: &mut BTreeMap<ChunkId, Vec<WriteJob>>,
    progress: &Arc<Progress>,
    fetched: &Arc<(AtomicU64, AtomicU64)>,
    max_len: u32,
) -> Result<tokio::task::JoinHandle<Result<()>>> {
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
    Ok(tokio::task::spawn_blocking(move || -> Result<()> {
        for (expected, chunk, jobs) in group {
            let (id, plain) = match decode_verified(&chunk, max_len) {
                Ok(v) => v,
                // Bytes that do not hash to their id are as lost as a damaged copy.
                Err(e) => {
                    tracing::warn!(chunk = %expected, error = %e, "node sent a chunk that fails verification");
                    lost(jobs, expected, ChunkFault::Damaged, &progress);
                    continue;
                }
            };
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
    }))
}

//! The upload pipeline: every chunk a backup produces passes through here.
//!
//! submit -> batched `Has` lookups (thousands of ids per request, several in flight) -> zstd
//! on the CPU pool for the chunks the cluster lacks -> `Put` on parallel streams, batched to
//! 1-4 MiB -> acknowledgements. A chunk offered recently in this session is not looked up or
//! sent again ([`seen`]: a bounded set, so a 2 TiB image cannot grow it). Memory is bounded:
//! a chunk's bytes hold a share of the upload bytes from submit until the cluster says it has
//! them (present, or stored and acknowledged). Those bytes, the batch size and the seen set's
//! size come from the agent's memory budget ([`crate::memory::Sizing`]).
//!
//! [`Uploader::finish`] returns only after every upload was acknowledged as durable, which is
//! what lets the caller commit the snapshot (the commit invariant, design §3).

mod seen;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hashgrid_proto::codec::encode;
use hashgrid_proto::id::{bit_set, pack_ids};
use hashgrid_proto::limits::{MAX_CHUNKS_PER_PUT, MAX_IDS_PER_REQUEST};
use hashgrid_proto::pb::{self, HasRequest, PutRequest};
use hashgrid_proto::ChunkId;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::connection::{within, Connection};
use crate::error::{ClientError, Result};
use crate::memory::Sizing;
use crate::retry::Backoff;
use seen::SeenIds;

/// Ids per `Has` request when producers are fast enough to fill it.
const HAS_BATCH: usize = 4096;
/// `Has` requests in flight.
const HAS_IN_FLIGHT: usize = 4;
/// Parallel `Put` streams: the node verifies and writes each stream's batches in turn.
const PUT_STREAMS: usize = 3;
/// Longest a lookup or upload batch waits to fill: long enough that files of a few KiB do
/// not each become a request, short against any transfer.
const BATCH_WAIT: Duration = Duration::from_millis(2);
/// Compression batches running at once (each on its own blocking thread).
const COMPRESS_IN_FLIGHT: usize = 3;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UploadStats {
    /// Chunks offered in this session (data and reference checks), each counted once while
    /// the session remembers it (see [`seen`]).
    pub unique_chunks: u64,
    /// Of those, chunks the cluster already held.
    pub present_chunks: u64,
    /// Chunks uploaded and their encoded bytes.
    pub sent_chunks: u64,
    pub sent_bytes: u64,
    /// Encoded bytes sent again because the stream that carried them failed before they
    /// were acknowledged (re-sent to another coordinator; included in `sent_bytes`).
    pub resent_bytes: u64,
    /// Chunks and encoded bytes the cluster newly stored (a chunk another backup uploaded at
    /// the same moment counts as sent but not stored).
    pub stored_chunks: u64,
    pub stored_bytes: u64,
    /// Round trips: lookups and upload batches.
    pub has_requests: u64,
    pub put_requests: u64,
}

#[derive(Default)]
struct Counters {
    unique: AtomicU64,
    present: AtomicU64,
    sent_chunks: AtomicU64,
    sent_bytes: AtomicU64,
    resent_bytes: AtomicU64,
    stored_chunks: AtomicU64,
    stored_bytes: AtomicU64,
    has_requests: AtomicU64,
    put_requests: AtomicU64,
    /// `Put` batches acknowledged (a retry's budget restarts after progress).
    acked_batches: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> UploadStats {
        UploadStats {
            unique_chunks: self.unique.load(Ordering::Relaxed),
            present_chunks: self.present.load(Ordering::Relaxed),
            sent_chunks: self.sent_chunks.load(Ordering::Relaxed),
            sent_bytes: self.sent_bytes.load(Ordering::Relaxed),
            resent_bytes: self.resent_bytes.load(Ordering::Relaxed),
            stored_chunks: self.stored_chunks.load(Ordering::Relaxed),
            stored_bytes: self.stored_bytes.load(Ordering::Relaxed),
            has_requests: self.has_requests.load(Ordering::Relaxed),
            put_requests: self.put_requests.load(Ordering::Relaxed),
        }
    }
}

/// A chunk with its plaintext: uploaded if the cluster lacks it.
struct Item {
    id: ChunkId,
    plain: Bytes,
    permit: OwnedSemaphorePermit,
}

struct Encoded {
    chunk: pb::Chunk,
    permit: OwnedSemaphorePermit,
}

pub struct Uploader {
    tx: mpsc::Sender<Item>,
    seen: Mutex<SeenIds>,
    memory: Arc<Semaphore>,
    counters: Arc<Counters>,
    pipeline: JoinHandle<Result<()>>,
    runtime: tokio::runtime::Handle,
}

fn permits_for(len: usize) -> u32 {
    (len.div_ceil(1024)).max(1) as u32
}

impl Uploader {
    /// Starts the pipeline on the current Tokio runtime with the default memory budget's
    /// sizes. `level` is the zstd level.
    pub fn start(conn: &Connection, level: i32) -> Self {
        Self::start_sized(conn, level, &Sizing::default())
    }

    /// Starts the pipeline with the chunk bytes in flight and the seen set sized by
    /// `sizing` (see [`crate::memory`]).
    pub fn start_sized(conn: &Connection, level: i32, sizing: &Sizing) -> Self {
        let (tx, rx) = mpsc::channel(HAS_BATCH * 2);
        let counters = Arc::new(Counters::default());
        let pipeline = tokio::spawn(run_pipeline(
            rx,
            conn.clone(),
            level,
            sizing.put_batch_bytes,
            counters.clone(),
        ));
        Uploader {
            tx,
            seen: Mutex::new(SeenIds::new(sizing.seen_per_generation)),
            memory: Arc::new(Semaphore::new(sizing.upload_bytes / 1024)),
            counters,
            pipeline,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn first_time(&self, id: &ChunkId) -> bool {
        let fresh = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*id);
        if fresh {
            self.counters.unique.fetch_add(1, Ordering::Relaxed);
        }
        fresh
    }

    fn closed() -> ClientError {
        ClientError::Internal("upload pipeline stopped; see the error from finish()".into())
    }

    /// Offers a chunk from a blocking (non-async) thread; waits while the memory budget is
    /// spent.
    pub fn submit_blocking(&self, id: ChunkId, plain: Bytes) -> Result<()> {
        if !self.first_time(&id) {
            return Ok(());
        }
        let permit = self
            .runtime
            .block_on(
                self.memory
                    .clone()
                    .acquire_many_owned(permits_for(plain.len())),
            )
            .map_err(|_| Self::closed())?;
        self.tx
            .blocking_send(Item { id, plain, permit })
            .map_err(|_| Self::closed())
    }

    /// Figures so far (for progress display).
    pub fn stats(&self) -> UploadStats {
        self.counters.snapshot()
    }

    /// Waits until everything offered is known present or acknowledged durable.
    pub async fn finish(self) -> Result<UploadStats> {
        let Uploader {
            tx,
            pipeline,
            counters,
            memory,
            seen,
            runtime,
        } = self;
        drop((tx, seen, runtime, memory));
        pipeline.await??;
        Ok(counters.snapshot())
    }
}

async fn run_pipeline(
    rx: mpsc::Receiver<Item>,
    conn: Connection,
    level: i32,
    batch_bytes: usize,
    counters: Arc<Counters>,
) -> Result<()> {
    let (enc_tx, enc_rx) = mpsc::channel::<Encoded>(1024);
    let lookups = {
        let conn = conn.clone();
        let counters = counters.clone();
        async move {
            tokio_stream::StreamExt::chunks_timeout(
                ReceiverStream::new(rx),
                HAS_BATCH.min(MAX_IDS_PER_REQUEST),
                BATCH_WAIT,
            )
            .map(|items| lookup(conn.clone(), items, counters.clone()))
            .buffer_unordered(HAS_IN_FLIGHT)
            .map_ok(|missing| compress(missing, level))
            .try_buffer_unordered(COMPRESS_IN_FLIGHT)
            .try_for_each(|encoded| {
                let enc_tx = enc_tx.clone();
                async move {
                    for e in encoded {
                        enc_tx.send(e).await.map_err(|_| Uploader::closed())?;
                    }
                    Ok(())
                }
            })
            .await
        }
    };
    let puts = put_all(enc_rx, conn, batch_bytes, counters);
    tokio::try_join!(lookups, puts)?;
    Ok(())
}

/// Asks the cluster which of `ids` are present (one `Has` call, retried under the
/// connection's policy): a bitmap, bit `i` for `ids[i]`.
async fn has(
    conn: &Connection,
    what: &str,
    ids: &[ChunkId],
    counters: &Counters,
) -> Result<Vec<u8>> {
    let packed = pack_ids(ids);
    let deadline = conn.timeouts().lookup;
    let resp = conn
        .call_within(what, deadline, || {
            counters.has_requests.fetch_add(1, Ordering::Relaxed);
            let mut client = conn.chunks.clone();
            let mut request = tonic::Request::new(HasRequest {
                epoch: conn.epoch(),
                ids: packed.clone(),
            });
            request.set_timeout(deadline);
            async move { Ok(client.has(request).await?.into_inner()) }
        })
        .await?;
    Ok(resp.present)
}

/// One `Has` round trip: returns the data chunks the cluster lacks.
async fn lookup(
    conn: Connection,
    items: Vec<Item>,
    counters: Arc<Counters>,
) -> Result<Vec<(ChunkId, Bytes, OwnedSemaphorePermit)>> {
    let ids: Vec<ChunkId> = items.iter().map(|i| i.id).collect();
    let present = has(&conn, "looking up chunks", &ids, &counters).await?;
    let mut missing = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        if bit_set(&present, i) {
            counters.present.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        missing.push((item.id, item.plain, item.permit));
    }
    Ok(missing)
}

/// Compresses a batch on a blocking thread; batches run side by side.
async fn compress(
    missing: Vec<(ChunkId, Bytes, OwnedSemaphorePermit)>,
    level: i32,
) -> Result<Vec<Encoded>> {
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    Ok(tokio::task::spawn_blocking(move || {
        missing
            .into_iter()
            .map(|(id, plain, permit)| {
                let (codec, data) = encode(&plain, level);
                Encoded {
                    chunk: pb::Chunk {
                        id: id.as_bytes().to_vec(),
                        plain_len: plain.len() as u32,
                        codec: pb::Codec::from(codec) as i32,
                        data,
                        ..Default::default()
                    },
                    permit,
                }
            })
            .collect()
    })
    .await?)
}

enum Next {
    Item(Encoded),
    Idle,
    Closed,
    /// A stream ended: its slot may owe batches nobody will otherwise re-send.
    StreamEnded,
}

/// Wakes the batcher when a `Put` stream's reader ends, however it ends (aborted too).
struct NotifyOnDrop(Arc<Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// One `Put` batch, kept until acknowledged so it can be re-sent through another stream
/// (chunk data is reference-counted: keeping it costs no copy).
struct Batch {
    chunks: Vec<pb::Chunk>,
    /// One per chunk, in the same order: a chunk dropped from the batch frees its bytes.
    permits: Vec<OwnedSemaphorePermit>,
}

/// Before a new stream re-sends what a failed one owed: asks the cluster which of those
/// chunks landed anyway (the failed coordinator may have stored them on W owners and died
/// before it acknowledged) and drops them, so a failover re-sends only what is missing. A
/// batch left empty is complete: it leaves the queue (its memory freed) and is not sent. The
/// newest batch when `fresh_last` was never sent and is not asked about. When the lookup
/// fails, everything is re-sent (the put path's own retries deal with the cluster).
async fn drop_landed(conn: &Connection, counters: &Counters, unacked: &Unacked, fresh_last: bool) {
    let asked: Vec<ChunkId> = {
        let queue = locked(unacked);
        let owed = queue.len() - usize::from(fresh_last && !queue.is_empty());
        queue
            .iter()
            .take(owed)
            .flat_map(|b| b.chunks.iter())
            .filter_map(|c| ChunkId::from_slice(&c.id).ok())
            .collect()
    };
    if asked.is_empty() {
        return;
    }
    let mut landed = std::collections::HashSet::new();
    for group in asked.chunks(MAX_IDS_PER_REQUEST) {
        let answer = has(
            conn,
            "checking which re-sent chunks landed",
            group,
            counters,
        )
        .await;
        let present = match answer {
            Ok(present) => present,
            Err(e) => {
                tracing::info!(error = %e, "could not ask what landed; re-sending all");
                return;
            }
        };
        landed.extend(
            group
                .iter()
                .enumerate()
                .filter(|(i, _)| bit_set(&present, *i))
                .map(|(_, id)| *id),
        );
    }
    if landed.is_empty() {
        return;
    }
    let mut queue = locked(unacked);
    let owed = queue.len() - usize::from(fresh_last && !queue.is_empty());
    let fresh = queue.split_off(owed);
    let owed = std::mem::take(&mut *queue);
    for batch in owed {
        let (chunks, permits): (Vec<_>, Vec<_>) = batch
            .chunks
            .into_iter()
            .zip(batch.permits)
            .filter(|(c, _)| !ChunkId::from_slice(&c.id).is_ok_and(|id| landed.contains(&id)))
            .unzip();
        if !chunks.is_empty() {
            queue.push_back(Batch { chunks, permits });
        }
    }
    queue.extend(fresh);
    tracing::info!(
        landed = landed.len(),
        "chunks of a failed upload stream had landed; not re-sent"
    );
}

type Unacked = Arc<Mutex<VecDeque<Batch>>>;

fn locked(unacked: &Unacked) -> std::sync::MutexGuard<'_, VecDeque<Batch>> {
    unacked.lock().unwrap_or_else(|p| p.into_inner())
}

/// One open `Put` stream. Its unacknowledged batches live in a queue that outlives the
/// stream: when the stream fails, [`PutSlot::reopen`] re-sends them on a new one.
struct PutStream {
    tx: mpsc::Sender<PutRequest>,
    /// Ends (its sender dropped) when the reader task does: the stream is finished.
    done: watch::Receiver<()>,
    reader: JoinHandle<Result<(), Status>>,
    /// The coordinator generation the stream was opened under.
    generation: u64,
    /// Longest wait for the next acknowledgement (or, at the end, for the stream to close).
    ack_deadline: Duration,
    /// The batches the stream owes acknowledgements for (shared with its slot).
    pending: Unacked,
}

impl PutStream {
    /// Opens a stream and sends every batch of `unacked` on it: all of them re-sent, but
    /// the last when `fresh_last` (a batch no stream carried yet).
    async fn open(
        conn: &Connection,
        counters: Arc<Counters>,
        unacked: Unacked,
        fresh_last: bool,
        ended: Arc<Notify>,
    ) -> Result<PutStream, Status> {
        drop_landed(conn, &counters, &unacked, fresh_last).await;
        let generation = conn.generation();
        let stream_counters = counters.clone();
        let (tx, rx) = mpsc::channel::<PutRequest>(4);
        let mut client = conn.chunks.clone();
        let ack_deadline = conn.timeouts().transfer;
        let mut replies = within(
            ack_deadline,
            "opening an upload stream",
            client.put(ReceiverStream::new(rx)),
        )
        .await?
        .into_inner();
        let (done_tx, done) = watch::channel(());
        let pending = unacked.clone();
        let reader = tokio::spawn(async move {
            let _done = done_tx;
            let _ended = NotifyOnDrop(ended);
            loop {
                let reply = match tokio::time::timeout(ack_deadline, replies.message()).await {
                    Ok(reply) => reply?,
                    Err(_) if locked(&pending).is_empty() => continue,
                    Err(_) => {
                        return Err(Status::deadline_exceeded(format!(
                            "no upload batch acknowledged within {ack_deadline:?}"
                        )))
                    }
                };
                let Some(reply) = reply else { break };
                counters
                    .stored_chunks
                    .fetch_add(u64::from(reply.stored), Ordering::Relaxed);
                counters
                    .stored_bytes
                    .fetch_add(reply.stored_bytes, Ordering::Relaxed);
                counters.acked_batches.fetch_add(1, Ordering::Relaxed);
                locked(&pending).pop_front();
            }
            if !locked(&pending).is_empty() {
                // No retry key: as if the coordinator had gone (re-send elsewhere).
                return Err(Status::unavailable(
                    "upload stream closed before every batch was acknowledged",
                ));
            }
            Ok(())
        });
        let stream = PutStream {
            tx,
            done,
            reader,
            generation,
            ack_deadline,
            pending: unacked.clone(),
        };
        let resend: Vec<Vec<pb::Chunk>> =
            locked(&unacked).iter().map(|b| b.chunks.clone()).collect();
        let first_fresh = resend.len() - usize::from(fresh_last && !resend.is_empty());
        for (i, chunks) in resend.into_iter().enumerate() {
            if i < first_fresh {
                let bytes = chunks.iter().map(|c| c.data.len()).sum::<usize>() as u64;
                stream_counters
                    .resent_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
                stream_counters
                    .sent_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
            }
            if !stream.send(conn, chunks).await {
                return Err(stream.finish().await);
            }
        }
        Ok(stream)
    }

    /// Whether the stream's reader has ended (failed, or closed after every batch).
    fn ended(&self) -> bool {
        self.done.has_changed().is_err()
    }

    /// Sends one request; `false` when the stream has ended (see [`Self::finish`]).
    async fn send(&self, conn: &Connection, chunks: Vec<pb::Chunk>) -> bool {
        let mut done = self.done.clone();
        let request = PutRequest {
            epoch: conn.epoch(),
            chunks,
        };
        tokio::select! {
            sent = self.tx.send(request) => sent.is_ok(),
            _ = done.changed() => false,
        }
    }

    /// Ends the stream (no more requests) and returns why it failed; a stream that ended
    /// well with every batch acknowledged returns `OK`.
    ///
    /// Bounded: a coordinator that acknowledged everything but never closes its side costs
    /// one ack deadline, not the backup (every batch is acknowledged, so nothing is owed);
    /// one that also owes batches fails the stream and they are re-sent.
    async fn finish(self) -> Status {
        let PutStream {
            tx,
            mut reader,
            ack_deadline,
            pending,
            ..
        } = self;
        drop(tx);
        match tokio::time::timeout(ack_deadline, &mut reader).await {
            Ok(Ok(Ok(()))) => Status::ok(""),
            Ok(Ok(Err(s))) => s,
            Ok(Err(e)) => Status::internal(format!("upload stream reader: {e}")),
            Err(_) => {
                reader.abort();
                if locked(&pending).is_empty() {
                    tracing::warn!("the coordinator never closed a finished upload stream");
                    Status::ok("")
                } else {
                    Status::deadline_exceeded(format!(
                        "upload stream not closed within {ack_deadline:?}"
                    ))
                }
            }
        }
    }
}

/// One of the parallel upload streams, with the batches it owes acknowledgements for and
/// the retries of its current trouble.
struct PutSlot {
    stream: Option<PutStream>,
    /// Notified when any stream of the batcher ends.
    ended: Arc<Notify>,
    unacked: Unacked,
    backoff: Option<(Backoff, u64)>,
    /// The newest batch of `unacked` was never sent (not a re-send when a stream opens).
    fresh: bool,
}

impl PutSlot {
    fn new(ended: Arc<Notify>) -> Self {
        PutSlot {
            stream: None,
            ended,
            unacked: Arc::default(),
            backoff: None,
            fresh: false,
        }
    }

    /// Sends a batch, replacing the stream (and re-sending what it owed) while it fails.
    async fn send(
        &mut self,
        conn: &Connection,
        counters: &Arc<Counters>,
        chunks: Vec<pb::Chunk>,
        permits: Vec<OwnedSemaphorePermit>,
    ) -> Result<()> {
        locked(&self.unacked).push_back(Batch {
            chunks: chunks.clone(),
            permits,
        });
        self.fresh = true;
        if let Some(stream) = &self.stream {
            if stream.send(conn, chunks).await {
                self.fresh = false;
                return Ok(());
            }
        }
        // No stream yet, or it ended: the new one sends every unacknowledged batch,
        // this one included.
        self.reopen(conn, counters).await
    }

    /// Replaces a stream that ended while it owed batches (re-sending them), so a failure
    /// is dealt with when it happens, not when this slot is next given a batch: the
    /// batches it owes hold memory the walk may be waiting for, and no next batch comes
    /// while it waits. A stream that ended with nothing owed is only dropped.
    async fn heal(&mut self, conn: &Connection, counters: &Arc<Counters>) -> Result<()> {
        if !self.stream.as_ref().is_some_and(PutStream::ended) {
            return Ok(());
        }
        let stream = self.stream.take().expect("checked above");
        let generation = stream.generation;
        let status = stream.finish().await;
        if locked(&self.unacked).is_empty() {
            return Ok(());
        }
        self.retry(conn, counters, status, generation).await
    }

    /// Closes the stream once every batch is acknowledged, re-sending while it fails.
    async fn close(mut self, conn: &Connection, counters: &Arc<Counters>) -> Result<()> {
        loop {
            let Some(stream) = self.stream.take() else {
                return Ok(());
            };
            let generation = stream.generation;
            let status = stream.finish().await;
            if status.code() == tonic::Code::Ok {
                return Ok(());
            }
            self.retry(conn, counters, status, generation).await?;
        }
    }

    /// Opens a new stream after the current one (if any) ended.
    async fn reopen(&mut self, conn: &Connection, counters: &Arc<Counters>) -> Result<()> {
        let failed = match self.stream.take() {
            Some(stream) => {
                let generation = stream.generation;
                Some((stream.finish().await, generation))
            }
            None => None,
        };
        match failed {
            Some((status, generation)) if status.code() != tonic::Code::Ok => {
                self.retry(conn, counters, status, generation).await
            }
            _ => self.open(conn, counters).await,
        }
    }

    async fn open(&mut self, conn: &Connection, counters: &Arc<Counters>) -> Result<()> {
        let generation = conn.generation();
        match self.open_stream(conn, counters).await {
            Ok(()) => Ok(()),
            Err(status) => self.retry(conn, counters, status, generation).await,
        }
    }

    /// One try at a new stream that sends every batch this slot owes.
    async fn open_stream(
        &mut self,
        conn: &Connection,
        counters: &Arc<Counters>,
    ) -> Result<(), Status> {
        let fresh = std::mem::take(&mut self.fresh);
        let stream = PutStream::open(
            conn,
            counters.clone(),
            self.unacked.clone(),
            fresh,
            self.ended.clone(),
        )
        .await?;
        self.stream = Some(stream);
        Ok(())
    }

    /// Handles a failed stream under the connection's retry policy, then opens a new one.
    /// The budget restarts once a batch was acknowledged since the trouble began, so a
    /// long upload survives several separate failures but not one that never ends.
    async fn retry(
        &mut self,
        conn: &Connection,
        counters: &Arc<Counters>,
        mut status: Status,
        mut generation: u64,
    ) -> Result<()> {
        loop {
            let acked = counters.acked_batches.load(Ordering::Relaxed);
            if self.backoff.as_ref().is_some_and(|(_, at)| *at != acked) {
                self.backoff = None;
            }
            let (backoff, _) = self.backoff.get_or_insert_with(|| (conn.backoff(), acked));
            conn.recover("uploading chunks", status, generation, backoff)
                .await?;
            generation = conn.generation();
            match self.open_stream(conn, counters).await {
                Ok(()) => return Ok(()),
                Err(s) => status = s,
            }
        }
    }
}

/// Batches encoded chunks into `Put` requests of about `batch_bytes` spread over parallel
/// streams.
async fn put_all(
    mut rx: mpsc::Receiver<Encoded>,
    conn: Connection,
    batch_bytes: usize,
    counters: Arc<Counters>,
) -> Result<()> {
    let mut slots: Vec<PutSlot> = Vec::new();
    let ended = Arc::new(Notify::new());
    let mut rotation = 0usize;
    let mut chunks = Vec::new();
    let mut permits = Vec::new();
    let mut bytes = 0usize;
    loop {
        // Wait briefly for more once a batch has started, so a stream of small files does
        // not become one request per chunk.
        // A stream that ends meanwhile is replaced at once (see `PutSlot::heal`).
        let next = if chunks.is_empty() {
            tokio::select! {
                biased;
                _ = ended.notified() => Next::StreamEnded,
                e = rx.recv() => e.map_or(Next::Closed, Next::Item),
            }
        } else {
            tokio::select! {
                biased;
                _ = ended.notified() => Next::StreamEnded,
                e = tokio::time::timeout(BATCH_WAIT, rx.recv()) => match e {
                    Ok(Some(e)) => Next::Item(e),
                    Ok(None) => Next::Closed,
                    Err(_) => Next::Idle,
                },
            }
        };
        let closed = matches!(next, Next::Closed);
        let flush = match next {
            Next::StreamEnded => {
                for slot in &mut slots {
                    slot.heal(&conn, &counters).await?;
                }
                continue;
            }
            Next::Item(e) => {
                bytes += e.chunk.data.len();
                chunks.push(e.chunk);
                permits.push(e.permit);
                bytes >= batch_bytes || chunks.len() >= MAX_CHUNKS_PER_PUT
            }
            Next::Idle | Next::Closed => true,
        };
        if !flush || chunks.is_empty() {
            if closed {
                break;
            }
            continue;
        }
        if slots.len() < PUT_STREAMS {
            slots.push(PutSlot::new(ended.clone()));
        }
        let idx = rotation % slots.len();
        rotation += 1;
        counters.put_requests.fetch_add(1, Ordering::Relaxed);
        counters
            .sent_chunks
            .fetch_add(chunks.len() as u64, Ordering::Relaxed);
        counters
            .sent_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        slots[idx]
            .send(
                &conn,
                &counters,
                std::mem::take(&mut chunks),
                std::mem::take(&mut permits),
            )
            .await?;
        bytes = 0;
        if closed {
            break;
        }
    }
    for slot in slots {
        slot.close(&conn, &counters).await?;
    }
    Ok(())
}

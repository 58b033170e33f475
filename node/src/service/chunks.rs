//! The `Chunks` service: batched lookups, verified uploads, streamed downloads.
//!
//! Every chunk is checked before it is stored: its encoded form must decode to exactly
//! `plain_len` bytes (bounded by the cluster's maximum chunk size) that hash to its id, and it
//! must not be all zeros (zero runs are holes). A bad chunk fails the whole batch with
//! `INVALID_ARGUMENT` naming the chunk; nothing of that batch is stored.
//!
//! `Get` answers every id it is asked for, in order: the chunk, verified as it is read, or
//! a fault (missing, or damaged: the stored copy failed verification and left the index).
//! One bad chunk never ends the stream, so a restore loses only the files that use it.

use std::pin::Pin;
use std::sync::Arc;

use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use hashgrid_proto::codec::{decode_verified, is_zero, ChunkError};
use hashgrid_proto::id::unpack_ids;
use hashgrid_proto::limits::{MAX_CHUNKS_PER_PUT, MAX_IDS_PER_REQUEST, TARGET_BATCH_BYTES};
use hashgrid_proto::pb::chunks_server::Chunks;
use hashgrid_proto::pb::{
    self, GetRequest, GetResponse, HasRequest, HasResponse, PutRequest, PutResponse,
};
use hashgrid_proto::ChunkId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::principal;
use super::blocking;
use crate::chunk_store::{ChunkRead, ChunkStore, VerifiedChunk};
use crate::context::NodeContext;
use crate::error::NodeError;
use crate::metrics as m;

/// `Put` batches of one stream in flight on the node at once.
const PUT_PIPELINE: usize = 8;

pub struct ChunksService {
    ctx: Arc<NodeContext>,
}

impl ChunksService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        ChunksService { ctx }
    }
}

fn ids_of(packed: &[u8]) -> Result<Vec<ChunkId>, NodeError> {
    let ids = unpack_ids(packed)?;
    if ids.len() > MAX_IDS_PER_REQUEST {
        return Err(NodeError::TooMany {
            what: "ids",
            count: ids.len(),
            limit: MAX_IDS_PER_REQUEST,
        });
    }
    Ok(ids)
}

/// Verifies and stores one `Put` batch.
async fn put_batch(ctx: Arc<NodeContext>, req: PutRequest) -> Result<PutResponse, NodeError> {
    ctx.check_epoch(req.epoch)?;
    if req.chunks.len() > MAX_CHUNKS_PER_PUT {
        return Err(NodeError::TooMany {
            what: "chunks",
            count: req.chunks.len(),
            limit: MAX_CHUNKS_PER_PUT,
        });
    }
    let max_len = ctx.chunker()?.max_size;
    let store = ctx.store.clone();
    let outcome = blocking(move || {
        let verified = req
            .chunks
            .into_iter()
            .map(|c| {
                let (id, plain) = decode_verified(&c, max_len)?;
                if is_zero(&plain) {
                    return Err(ChunkError::AllZero { id });
                }
                Ok(VerifiedChunk {
                    id,
                    plain_len: c.plain_len,
                    codec: c.codec,
                    data: c.data,
                })
            })
            .collect::<Result<Vec<_>, ChunkError>>()
            .inspect_err(|e| {
                tracing::warn!(error = %e, "refused a chunk batch");
                metrics::counter!(m::REJECTED, "reason" => "verify").increment(1);
            })?;
        Ok(store.put(verified)?)
    })
    .await?;
    metrics::counter!(m::PUT_CHUNKS, "result" => "stored").increment(u64::from(outcome.stored));
    metrics::counter!(m::PUT_CHUNKS, "result" => "existing").increment(u64::from(outcome.existing));
    metrics::counter!(m::PUT_BYTES).increment(outcome.stored_bytes);
    publish_store_gauges(&ctx.store);
    Ok(PutResponse {
        stored: outcome.stored,
        existing: outcome.existing,
        stored_bytes: outcome.stored_bytes,
    })
}

fn publish_store_gauges(store: &ChunkStore) {
    let counters = store.counters();
    metrics::gauge!(m::STORE_CHUNKS).set(counters.chunks as f64);
    metrics::gauge!(m::STORE_BYTES).set(counters.stored_bytes as f64);
}

/// The reply for one requested id.
fn reply_chunk(id: ChunkId, read: ChunkRead) -> pb::Chunk {
    let fault = |fault: pb::ChunkFault| pb::Chunk {
        id: id.as_bytes().to_vec(),
        fault: fault as i32,
        ..Default::default()
    };
    match read {
        ChunkRead::Found(c) => pb::Chunk {
            id: id.as_bytes().to_vec(),
            plain_len: c.plain_len,
            codec: c.codec,
            data: c.data,
            fault: pb::ChunkFault::None as i32,
        },
        ChunkRead::Missing => fault(pb::ChunkFault::Missing),
        ChunkRead::Damaged => fault(pb::ChunkFault::Damaged),
    }
}

/// Streams one reply per id of `ids`, in order, in messages of about `TARGET_BATCH_BYTES`.
async fn stream_chunks(
    ctx: Arc<NodeContext>,
    ids: Vec<ChunkId>,
    tx: mpsc::Sender<Result<GetResponse, Status>>,
) {
    const READ_GROUP: usize = 64;
    let max_len = match ctx.chunker() {
        Ok(c) => c.max_size,
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    let mut pending = GetResponse::default();
    let mut pending_bytes = 0usize;
    for group in ids.chunks(READ_GROUP) {
        let store = ctx.store.clone();
        let group = group.to_vec();
        let read = blocking(move || {
            let reads = store.get(&group, max_len)?;
            Ok(group.into_iter().zip(reads).collect::<Vec<_>>())
        })
        .await;
        let chunks = match read {
            Ok(chunks) => chunks,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let count = |what: fn(&ChunkRead) -> bool| chunks.iter().filter(|(_, r)| what(r)).count();
        let missing = count(|r| matches!(r, ChunkRead::Missing));
        let damaged = count(|r| matches!(r, ChunkRead::Damaged));
        let served = chunks.len() - missing - damaged;
        metrics::counter!(m::GET_CHUNKS, "result" => "served").increment(served as u64);
        metrics::counter!(m::GET_CHUNKS, "result" => "missing").increment(missing as u64);
        metrics::counter!(m::GET_CHUNKS, "result" => "damaged").increment(damaged as u64);
        if damaged > 0 {
            publish_store_gauges(&ctx.store);
        }
        for (id, read) in chunks {
            let c = reply_chunk(id, read);
            pending_bytes += c.data.len();
            metrics::counter!(m::GET_BYTES).increment(c.data.len() as u64);
            pending.chunks.push(c);
            if pending_bytes >= TARGET_BATCH_BYTES {
                if tx.send(Ok(std::mem::take(&mut pending))).await.is_err() {
                    return;
                }
                pending_bytes = 0;
            }
        }
    }
    if !pending.chunks.is_empty() {
        let _ = tx.send(Ok(pending)).await;
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Chunks for ChunksService {
    async fn has(&self, req: Request<HasRequest>) -> Result<Response<HasResponse>, Status> {
        principal(&req)?;
        let req = req.into_inner();
        self.ctx.check_epoch(req.epoch)?;
        let ids = ids_of(&req.ids)?;
        let store = self.ctx.store.clone();
        let found = blocking(move || Ok(store.has(&ids)?)).await?;
        let mut present = vec![0u8; found.len().div_ceil(8)];
        let mut hits = 0u64;
        for (i, &f) in found.iter().enumerate() {
            if f {
                present[i / 8] |= 1 << (i % 8);
                hits += 1;
            }
        }
        metrics::counter!(m::HAS_IDS, "result" => "present").increment(hits);
        metrics::counter!(m::HAS_IDS, "result" => "absent").increment(found.len() as u64 - hits);
        Ok(Response::new(HasResponse { present }))
    }

    type PutStream = BoxStream<PutResponse>;

    async fn put(
        &self,
        req: Request<Streaming<PutRequest>>,
    ) -> Result<Response<Self::PutStream>, Status> {
        principal(&req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(PUT_PIPELINE);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            // Batches of one stream are verified and queued for the writer concurrently (up
            // to PUT_PIPELINE at once), so the writer's group commits can gather several of
            // them; replies still go out in request order.
            let mut pending = FuturesOrdered::new();
            let mut inbound_open = true;
            loop {
                tokio::select! {
                    msg = inbound.message(), if inbound_open && pending.len() < PUT_PIPELINE => {
                        match msg {
                            Ok(Some(msg)) => pending.push_back(tokio::spawn(put_batch(ctx.clone(), msg))),
                            Ok(None) => inbound_open = false,
                            Err(status) => {
                                tracing::debug!(%status, "put stream ended by the client");
                                break;
                            }
                        }
                    }
                    Some(joined) = pending.next() => {
                        let reply = match joined {
                            Ok(r) => r.map_err(Status::from),
                            Err(e) => Err(Status::internal(format!("put task: {e}"))),
                        };
                        let failed = reply.is_err();
                        if tx.send(reply).await.is_err() || failed {
                            break;
                        }
                    }
                    else => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type GetStream = BoxStream<GetResponse>;

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        principal(&req)?;
        let req = req.into_inner();
        self.ctx.check_epoch(req.epoch)?;
        let ids = ids_of(&req.ids)?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(stream_chunks(self.ctx.clone(), ids, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

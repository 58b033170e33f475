//! The `Chunks` service: batched lookups, verified uploads, streamed downloads, as the
//! coordinator of the cluster ([`crate::coordinator`]): every call is routed to the owners of
//! its chunks, and this node serves its own share from its store.
//!
//! Every chunk is checked before it is stored or forwarded: its encoded form must decode to
//! exactly `plain_len` bytes (bounded by the cluster's maximum chunk size) that hash to its
//! id, and it must not be all zeros (zero runs are holes). A bad chunk fails the whole batch
//! with `INVALID_ARGUMENT` naming the chunk; nothing of that batch is stored.
//!
//! `Has` answers present only for chunks on W owners. `Put` acknowledges a batch once it is
//! durable on W owners. `Get` answers every id it is asked for, in order: the chunk, verified
//! as it is read, from the first owner that has a good copy, or a fault (missing, or damaged:
//! every copy failed verification). One bad chunk never ends the stream, so a restore loses
//! only the files that use it.

use std::pin::Pin;
use std::sync::Arc;

use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use hashgrid_proto::pb::chunks_server::Chunks;
use hashgrid_proto::pb::{
    GetRequest, GetResponse, HasRequest, HasResponse, PutRequest, PutResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::principal;
use crate::context::NodeContext;
use crate::coordinator::{lookup, read, write, Route};
use crate::error::NodeError;
use crate::metrics as m;
use crate::owner;

/// `Put` batches of one stream in flight on the node at once.
const PUT_PIPELINE: usize = 8;

pub struct ChunksService {
    ctx: Arc<NodeContext>,
}

impl ChunksService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        ChunksService { ctx }
    }

    /// The routing of a request made with the map of epoch `sent`.
    fn route(&self, sent: u64) -> Result<Route, NodeError> {
        self.ctx.check_epoch(sent)?;
        Route::new(&self.ctx)
    }
}

/// Verifies and stores one `Put` batch on its owners.
async fn put_batch(ctx: Arc<NodeContext>, req: PutRequest) -> Result<PutResponse, NodeError> {
    ctx.check_epoch(req.epoch)?;
    let route = Route::new(&ctx)?;
    write::write(&route, req).await
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Chunks for ChunksService {
    async fn has(&self, req: Request<HasRequest>) -> Result<Response<HasResponse>, Status> {
        principal(&req)?;
        let req = req.into_inner();
        let route = self.route(req.epoch)?;
        let ids = owner::ids_of(&req.ids)?;
        let found = lookup::lookup(&route, ids, lookup::Presence::Upload).await?;
        let hits = found.iter().filter(|&&f| f).count() as u64;
        metrics::counter!(m::HAS_IDS, "result" => "present").increment(hits);
        metrics::counter!(m::HAS_IDS, "result" => "absent").increment(found.len() as u64 - hits);
        let present = owner::to_bitmap(&found);
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
        let route = self.route(req.epoch)?;
        let ids = owner::ids_of(&req.ids)?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(read::read(
            route,
            ids,
            owner::check_asked(req.full_check),
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

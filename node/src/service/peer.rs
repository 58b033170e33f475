//! The internal `Peer` service: Raft traffic, catalog writes forwarded to the leader, joins,
//! and the owner side of the chunk service (served by [`crate::owner`], with the same bounds
//! and verification as the agent-facing `Chunks` service). Only callers holding the cluster secret get here ([`interceptor`]); unlike the
//! client-facing services it answers before the node is ready, because a joining node
//! becomes ready only through the Raft traffic it receives here.

use std::sync::Arc;

use std::pin::Pin;

use futures::Stream;
use hashgrid_proto::pb::peer::peer_server::Peer;
use hashgrid_proto::pb::peer::{
    DigestRequest, DigestResponse, JoinRequest, JoinResponse, ListIdsRequest, ListIdsResponse,
    RaftMessage, ReadIndexRequest, ReadIndexResponse, RepairSoonRequest, RepairSoonResponse,
};
use hashgrid_proto::pb::{
    GetRequest, GetResponse, HasRequest, HasResponse, PutRequest, PutResponse,
};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::anti_entropy;
use crate::catalog::Command;
use crate::context::{ForwardError, NodeContext, WriteAttempt};
use crate::membership;
use crate::metrics as m;
use crate::owner;
use crate::peer::secret::METADATA_KEY;
use crate::raft::codec::{decode, encode};
use crate::raft::{NodeId, TypeConfig};

/// Admits a call only with the cluster secret.
pub fn interceptor(
    ctx: Arc<NodeContext>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |req: Request<()>| {
        let presented = req
            .metadata()
            .get(METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::unauthenticated("node-to-node call without the cluster secret")
            })?;
        if !ctx.secret.matches(presented) {
            return Err(Status::unauthenticated("wrong cluster secret"));
        }
        Ok(req)
    }
}

pub struct PeerService {
    ctx: Arc<NodeContext>,
}

impl PeerService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        PeerService { ctx }
    }
}

fn decode_msg<T: DeserializeOwned>(msg: &RaftMessage) -> Result<T, Status> {
    decode(&msg.data).map_err(|e| Status::invalid_argument(format!("undecodable message: {e}")))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    encode(value)
        .map(|data| Response::new(RaftMessage { data }))
        .map_err(|e| Status::internal(format!("encoding a reply: {e}")))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft_append(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode_msg(req.get_ref())?;
        reply(&self.ctx.raft.append_entries(rpc).await)
    }

    async fn raft_vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = decode_msg(req.get_ref())?;
        reply(&self.ctx.raft.vote(rpc).await)
    }

    async fn raft_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode_msg(req.get_ref())?;
        reply(&self.ctx.raft.install_snapshot(rpc).await)
    }

    async fn forward_write(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let command: Command = decode_msg(req.get_ref())?;
        let answer = match self.ctx.write_once(command).await {
            Ok(result) => Ok(result),
            Err(WriteAttempt::NotLeader(leader)) => Err(ForwardError::NotLeader { leader }),
            Err(WriteAttempt::Failed(e)) => Err(ForwardError::Failed(e.to_string())),
        };
        reply(&answer)
    }

    async fn read_index(
        &self,
        _req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let index = self.ctx.read_point().await?;
        Ok(Response::new(ReadIndexResponse { index }))
    }

    async fn repair_soon(
        &self,
        _req: Request<RepairSoonRequest>,
    ) -> Result<Response<RepairSoonResponse>, Status> {
        self.ctx.workers.repair_due();
        Ok(Response::new(RepairSoonResponse {}))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        Ok(Response::new(
            membership::admit(&self.ctx, req.into_inner()).await?,
        ))
    }

    // Reads (`OwnerHas`, `OwnerGet`) are answered whatever epoch the coordinator routes by:
    // this node's answer about its own store does not depend on the map, and a coordinator
    // that has not applied the newest map yet (or an anti-entropy pass that began under the
    // previous one) must still find the copies. Only writes are refused from an older
    // epoch, so no chunk lands on an owner the current map no longer names.
    async fn owner_has(&self, req: Request<HasRequest>) -> Result<Response<HasResponse>, Status> {
        metrics::counter!(m::OWNER_CALLS, "call" => "has").increment(1);
        let req = req.into_inner();
        let ids = owner::ids_of(&req.ids)?;
        let found = owner::has(&self.ctx, ids).await?;
        Ok(Response::new(HasResponse {
            present: owner::to_bitmap(&found),
        }))
    }

    async fn owner_put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        metrics::counter!(m::OWNER_CALLS, "call" => "put").increment(1);
        let req = req.into_inner();
        self.ctx.check_epoch(req.epoch)?;
        let (outcome, new) = owner::verify_and_store(&self.ctx, req.chunks).await?;
        Ok(Response::new(PutResponse {
            stored: outcome.stored,
            existing: outcome.existing,
            stored_bytes: outcome.stored_bytes,
            stored_map: owner::to_bitmap(&new),
        }))
    }

    async fn owner_digest(
        &self,
        req: Request<DigestRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        Ok(Response::new(
            anti_entropy::serve_digest(&self.ctx, req.into_inner()).await?,
        ))
    }

    async fn owner_list(
        &self,
        req: Request<ListIdsRequest>,
    ) -> Result<Response<ListIdsResponse>, Status> {
        Ok(Response::new(
            anti_entropy::serve_list(&self.ctx, req.into_inner()).await?,
        ))
    }

    type OwnerGetStream = Pin<Box<dyn Stream<Item = Result<GetResponse, Status>> + Send>>;

    async fn owner_get(
        &self,
        req: Request<GetRequest>,
    ) -> Result<Response<Self::OwnerGetStream>, Status> {
        metrics::counter!(m::OWNER_CALLS, "call" => "get").increment(1);
        let req = req.into_inner();
        let ids = owner::ids_of(&req.ids)?;
        let (tx, rx) = mpsc::channel(2);
        let check = owner::check_asked(req.full_check);
        tokio::spawn(owner::stream_local(self.ctx.clone(), ids, check, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

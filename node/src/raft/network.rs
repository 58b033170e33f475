//! Raft transport over the internal `Peer` gRPC service: each openraft request is encoded
//! with the catalog's codec (a version byte, then postcard) into a `RaftMessage`, and the
//! answer comes back as an encoded `Result<response, RaftError>`, so a remote Raft error is
//! told apart from a transport failure.

use std::sync::Arc;
use std::time::Duration;

use hashgrid_proto::pb::peer::RaftMessage;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::codec::{decode, encode};
use super::{NodeId, TypeConfig};
use crate::peer::{PeerError, PeerPool};

/// Makes a [`PeerLink`] per replication target.
pub struct Network {
    pool: Arc<PeerPool>,
}

impl Network {
    pub fn new(pool: Arc<PeerPool>) -> Self {
        Network { pool }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerLink {
        PeerLink {
            target,
            addr: node.addr.clone(),
            pool: self.pool.clone(),
        }
    }
}

pub struct PeerLink {
    target: NodeId,
    addr: String,
    pool: Arc<PeerPool>,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl PeerLink {
    async fn send<Req, Resp, E>(
        &self,
        rpc: Rpc,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let msg = RaftMessage { data };
        let reply = self
            .pool
            .call(&self.addr, Some(ttl), |mut c| async move {
                match rpc {
                    Rpc::Append => c.raft_append(msg).await,
                    Rpc::Vote => c.raft_vote(msg).await,
                    Rpc::Snapshot => c.raft_snapshot(msg).await,
                }
            })
            .await
            .map_err(|e| match e {
                e @ (PeerError::BadAddress { .. } | PeerError::Timeout { .. }) => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                // Raft backs off from an unreachable target: only for a peer that is down or
                // hung, not for a connection that merely closed under a call (CANCELLED),
                // which the next append retries at once.
                PeerError::Status { ref status, .. }
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Unknown
                    ) =>
                {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                e => RPCError::Network(NetworkError::new(&e)),
            })?;
        let answer: Result<Resp, RaftError<NodeId, E>> =
            decode(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(Rpc::Append, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(Rpc::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(Rpc::Vote, &rpc, option.hard_ttl()).await
    }
}

//! Raft transport. The catalog group has a single voter until the cluster work (design §2)
//! adds peers over the internal gRPC service; a one-voter group never sends a Raft RPC, and
//! if it ever tried, the peer is reported unreachable rather than silently dropped.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use super::{NodeId, TypeConfig};

/// Network for a group without peers.
pub struct NoPeers;

fn unreachable<E: std::error::Error>(target: &str) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
        "no Raft transport to {target}: this node runs a one-voter catalog"
    ))))
}

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = PeerLink;

    async fn new_client(&mut self, _target: NodeId, node: &BasicNode) -> PeerLink {
        PeerLink {
            addr: node.addr.clone(),
        }
    }
}

pub struct PeerLink {
    addr: String,
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(unreachable(&self.addr))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(unreachable(&self.addr))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(unreachable(&self.addr))
    }
}

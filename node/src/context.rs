//! What every service needs: the chunk store, the Raft handle, the shared catalog, the
//! placement of the current map epoch (with the older maps still in transition), the peers,
//! and the one way to change the catalog ([`NodeContext::write`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hashgrid_proto::chunker::ChunkerParams;
use hashgrid_proto::pb::peer::{RaftMessage, ReadIndexRequest};
use hashgrid_proto::placement::{ClusterMap, Placement, PlacementHistory};
use hashgrid_proto::NodeId;
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};

use crate::anti_entropy::workers::Workers;
use crate::catalog::{ClusterConfig, Command, CommandResult};
use crate::chunk_store::ChunkStore;
use crate::error::NodeError;
use crate::peer::{ClusterSecret, PeerPool};
use crate::raft::codec::{decode, encode};
use crate::raft::state_machine::SharedCatalog;
use crate::raft::Raft;

/// How a forwarded catalog write failed, as the leader tells the forwarding node.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    /// The receiver is not the leader (any more); it names the leader it knows.
    #[error("not the catalog leader")]
    NotLeader { leader: Option<(NodeId, String)> },
    /// The write could not be made (Raft stopped, storage failed); display only.
    #[error("catalog write failed on the leader: {0}")]
    Failed(String),
}

pub struct NodeContext {
    pub node_id: NodeId,
    /// The address peers and agents reach this node at.
    pub advertise: String,
    pub store: Arc<ChunkStore>,
    pub raft: Raft,
    pub catalog: SharedCatalog,
    pub secret: ClusterSecret,
    pub peers: Arc<PeerPool>,
    /// The background workers' status (rebalance, repair).
    pub workers: Workers,
    ready: AtomicBool,
    placement: Mutex<Option<Arc<PlacementHistory>>>,
}

impl NodeContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: NodeId,
        advertise: String,
        store: Arc<ChunkStore>,
        raft: Raft,
        catalog: SharedCatalog,
        secret: ClusterSecret,
        peers: Arc<PeerPool>,
    ) -> Self {
        NodeContext {
            node_id,
            advertise,
            store,
            raft,
            catalog,
            secret,
            peers,
            workers: Workers::default(),
            ready: AtomicBool::new(false),
            placement: Mutex::new(None),
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The cluster config, or `NotReady` before this node's catalog has it. (Agents are
    /// kept out until the node is ready by the auth hook; the node's own startup reads the
    /// catalog before that.)
    pub fn config(&self) -> Result<ClusterConfig, NodeError> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .clone()
            .ok_or(NodeError::NotReady)
    }

    pub fn chunker(&self) -> Result<ChunkerParams, NodeError> {
        Ok(self.config()?.chunker)
    }

    pub fn map(&self) -> Result<ClusterMap, NodeError> {
        Ok(self.config()?.map)
    }

    /// Placement for the current epoch and the older ones still in transition, rebuilt only
    /// when the map or its history changes.
    pub fn placement(&self) -> Result<Arc<PlacementHistory>, NodeError> {
        let catalog = self.catalog.read().unwrap_or_else(|p| p.into_inner());
        let config = catalog.config.as_ref().ok_or(NodeError::NotReady)?;
        let older = &catalog.history.older;
        let mut cached = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        let current = cached.as_ref().filter(|p| {
            p.epoch() == config.map.epoch
                && p.older()
                    .iter()
                    .map(|o| o.epoch())
                    .eq(older.iter().map(|m| m.epoch))
        });
        if let Some(p) = current {
            return Ok(p.clone());
        }
        let built = build_history(&config.map, older)?;
        *cached = Some(built.clone());
        Ok(built)
    }

    /// Waits until this node has applied the map of `epoch` (another node told of it), for
    /// at most the peer deadline; then `Unavailable`.
    pub async fn wait_for_epoch(&self, epoch: u64) -> Result<(), NodeError> {
        let caught_up = self
            .wait_applied(self.peers.timeout(), || {
                self.placement().is_ok_and(|p| p.epoch() >= epoch)
            })
            .await;
        if !caught_up {
            return Err(NodeError::Unavailable(format!(
                "this node has not caught up with map epoch {epoch} yet; retry shortly"
            )));
        }
        Ok(())
    }

    /// Waits until `ready()` holds, checking again each time this node's Raft state moves
    /// (an entry applied, a heartbeat), for at most `within`; returns whether it held. For
    /// a follower catching up with what another node already acknowledged.
    pub async fn wait_applied(&self, within: Duration, mut ready: impl FnMut() -> bool) -> bool {
        let mut moved = self.raft.metrics();
        let give_up = tokio::time::Instant::now() + within;
        loop {
            if ready() {
                return true;
            }
            match tokio::time::timeout_at(give_up, moved.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return ready(),
            }
        }
    }

    /// The leader's read point ([`Peer::read_index`]): the index of the newest entry it
    /// committed, once a quorum has confirmed it still leads. `Unavailable` on a node that
    /// is not the leader, or one that cannot reach a quorum.
    ///
    /// [`Peer::read_index`]: hashgrid_proto::pb::peer::peer_server::Peer::read_index
    pub async fn read_point(&self) -> Result<u64, NodeError> {
        match self.raft.get_read_log_id().await {
            Ok((read, _applied)) => Ok(read.map_or(0, |l| l.index)),
            Err(e) => Err(NodeError::Unavailable(format!(
                "cannot confirm the catalog's read point here: {e}"
            ))),
        }
    }

    /// Brings this node's catalog up to every write the cluster acknowledged before a read
    /// that must see them (which snapshots exist: `restore latest` through one node right
    /// after a backup through another). The leader has applied all it acknowledged; a
    /// follower asks the leader for its read point and waits until it has applied that far,
    /// for at most `within` in all. Returns whether it got there: when the leader cannot
    /// be reached (a partition, an election) the caller answers from what this node has
    /// applied, which may miss the newest commits, rather than not at all.
    pub async fn catch_up(&self, within: Duration) -> bool {
        let start = tokio::time::Instant::now();
        let give_up = start + within;
        let Some(leader) = self.leader() else {
            return false;
        };
        if leader == self.node_id {
            // A leader elected a moment ago may not have applied what its predecessor
            // acknowledged, and one cut off from its quorum no longer leads.
            let confirmed = tokio::time::timeout_at(give_up, self.raft.ensure_linearizable());
            return matches!(confirmed.await, Ok(Ok(_)));
        }
        let Some(addr) = self.member_addr(leader) else {
            return false;
        };
        let asked = self
            .peers
            .call(&addr, Some(within), |mut c| async move {
                c.read_index(ReadIndexRequest {}).await
            })
            .await;
        let index = match asked {
            Ok(r) => r.index,
            Err(e) => {
                tracing::debug!(error = %e, leader, "no read point from the leader; answering from this replica");
                return false;
            }
        };
        let asked = tokio::time::Instant::now();
        let caught_up = self
            .wait_applied(give_up.saturating_duration_since(asked), || {
                self.applied_index() >= index
            })
            .await;
        tracing::debug!(
            index,
            caught_up,
            ask = ?(asked - start),
            apply = ?asked.elapsed(),
            "catching up with the leader's read point"
        );
        caught_up
    }

    /// The index of the newest catalog entry this node has applied (0: none).
    fn applied_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index)
    }

    /// The address member `id` serves on, as the catalog's membership records it.
    pub fn member_addr(&self, id: NodeId) -> Option<String> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// Refuses requests routed by an older map (agents refresh and retry). Epoch 0 means the
    /// caller does not route by the map (it sends everything to this node as coordinator).
    pub fn check_epoch(&self, sent: u64) -> Result<(), NodeError> {
        let current = self.placement()?.epoch();
        if sent != 0 && sent < current {
            return Err(NodeError::StaleEpoch { sent, current });
        }
        Ok(())
    }

    /// Proposes a catalog change and waits for its result, wherever the leader is: on this
    /// node through Raft, elsewhere forwarded to the leader over the peer service. Retries
    /// while a leader is being elected, for at most the peer deadline; then `Unavailable`
    /// (on the minority side of a partition, say). The outcome of a write that timed out is
    /// unknown: commands that must not apply twice carry their own idempotency key.
    pub async fn write(&self, command: Command) -> Result<CommandResult, NodeError> {
        let deadline = tokio::time::Instant::now() + self.peers.timeout();
        let unavailable = |why: String| {
            NodeError::Unavailable(format!(
                "the catalog cannot take writes now ({why}); retry when a majority of its \
                 voters is reachable"
            ))
        };
        let mut pause = Duration::from_millis(50);
        loop {
            let attempt = tokio::time::timeout_at(deadline, self.write_once(command.clone()));
            let leader = match attempt.await {
                Err(_) => return Err(unavailable("no answer within the deadline".into())),
                Ok(Ok(result)) => return Ok(result),
                Ok(Err(WriteAttempt::Failed(e))) => return Err(e),
                Ok(Err(WriteAttempt::NotLeader(leader))) => leader,
            };
            let forwarded = match leader {
                Some((id, addr)) if id != self.node_id => {
                    tokio::time::timeout_at(deadline, self.forward(&addr, &command)).await
                }
                _ => Ok(Err(WriteAttempt::NotLeader(None))),
            };
            match forwarded {
                Err(_) => return Err(unavailable("the leader did not answer in time".into())),
                Ok(Ok(result)) => return Ok(result),
                Ok(Err(WriteAttempt::Failed(e))) => return Err(e),
                Ok(Err(WriteAttempt::NotLeader(_))) => {}
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(unavailable("no leader elected".into()));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// One attempt on the local Raft.
    pub(crate) async fn write_once(&self, command: Command) -> Result<CommandResult, WriteAttempt> {
        match self.raft.client_write(command).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
                WriteAttempt::NotLeader(f.leader_id.zip(f.leader_node.map(|n| n.addr))),
            ),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => Err(
                WriteAttempt::Failed(NodeError::Internal(format!("membership change: {e}"))),
            ),
            Err(RaftError::Fatal(e)) => Err(WriteAttempt::Failed(NodeError::Unavailable(format!(
                "this node's catalog replica stopped: {e}"
            )))),
        }
    }

    async fn forward(&self, addr: &str, command: &Command) -> Result<CommandResult, WriteAttempt> {
        let data = encode(command)
            .map_err(|e| WriteAttempt::Failed(NodeError::Internal(format!("encoding: {e}"))))?;
        let reply = self
            .peers
            .call(addr, None, |mut c| async move {
                c.forward_write(RaftMessage { data }).await
            })
            .await;
        let reply = match reply {
            Ok(r) => r,
            // The leader we were told about is unreachable: ask again (it may have changed).
            Err(e) => {
                tracing::debug!(error = %e, "forwarding a catalog write failed");
                return Err(WriteAttempt::NotLeader(None));
            }
        };
        let answer: Result<CommandResult, ForwardError> = decode(&reply.data).map_err(|e| {
            WriteAttempt::Failed(NodeError::Internal(format!(
                "decoding the leader's answer: {e}"
            )))
        })?;
        match answer {
            Ok(r) => Ok(r),
            Err(ForwardError::NotLeader { leader }) => Err(WriteAttempt::NotLeader(leader)),
            Err(ForwardError::Failed(msg)) => {
                Err(WriteAttempt::Failed(NodeError::Unavailable(msg)))
            }
        }
    }

    /// The current catalog leader as this node knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }
}

/// How one write attempt ended when it did not produce a result.
pub(crate) enum WriteAttempt {
    NotLeader(Option<(NodeId, String)>),
    Failed(NodeError),
}

fn build_history(
    map: &ClusterMap,
    older: &[ClusterMap],
) -> Result<Arc<PlacementHistory>, NodeError> {
    let current = Arc::new(Placement::new(map)?);
    let older = older
        .iter()
        .map(|m| Placement::new(m).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(PlacementHistory::new(current, older)?))
}

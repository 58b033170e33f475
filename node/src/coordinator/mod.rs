//! The coordinator layer: the agent-facing chunk calls (`Has`, `Put`, `Get`) routed to the
//! owners of each chunk. Every node coordinates; an agent may talk to any one of them.
//!
//! - Owners come from the placement history: writes go to the current owners, lookups and
//!   reads to the current owners and then to the owners under older maps still in
//!   transition. Lookups and reads track each id on its own and ask each node once per
//!   round, with all the ids it is asked about (in a cluster wider than R nearly every
//!   partition has an owner set of its own); writes group chunks by owner set.
//! - This node's own share is served from its store directly ([`crate::owner`]); the other
//!   owners are reached through the peer service's `Owner*` calls, always through the one
//!   quorum helper ([`crate::quorum`]) with the peer deadline.
//! - When this node is the only member and owns everything (the one-node cluster, R = W = 1),
//!   every call goes straight to the local store, as fast as before there was a cluster.
//!
//! [`lookup`] (presence and repair on lookup), [`write`] (quorum writes) and [`read`]
//! (reads that fail over between replicas) hold the three calls.

pub mod lookup;
pub mod read;
pub mod source;
pub mod write;

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use hashgrid_proto::id::pack_ids;
use hashgrid_proto::pb::{self, GetRequest, HasRequest, PutRequest};
use hashgrid_proto::placement::{MemberState, Partition, PlacementHistory};
use hashgrid_proto::{ChunkId, NodeId};

use crate::chunk_store::{Check, PutOutcome};
use crate::context::NodeContext;
use crate::error::NodeError;
use crate::owner::{self, Outbound};
use crate::peer::PeerError;

/// The routing of one request: the placement history and where each member is, taken once
/// so every part of the request uses the same map.
#[derive(Clone)]
pub struct Route {
    ctx: Arc<NodeContext>,
    pub placement: Arc<PlacementHistory>,
    addrs: Arc<HashMap<NodeId, String>>,
    states: Arc<HashMap<NodeId, MemberState>>,
    /// Is this node the only member, owning every partition under every map?
    local_only: bool,
}

/// The peer pool's view of every member, taken once by [`Route::health`]: per member,
/// whether it hangs ([`Route::is_hanging`]) and whether it is slow ([`Route::is_slow`]).
pub struct Health(Vec<(NodeId, bool, bool)>);

impl Health {
    pub fn is_hanging(&self, node: NodeId) -> bool {
        self.0.iter().any(|&(n, hanging, _)| n == node && hanging)
    }

    pub fn is_slow(&self, node: NodeId) -> bool {
        self.0.iter().any(|&(n, _, slow)| n == node && slow)
    }

    /// Moves suspect, lagging and down peers to the end (a stable sort).
    fn slow_last(&self, nodes: &mut [NodeId]) {
        if nodes.iter().any(|&n| self.is_slow(n)) {
            nodes.sort_by_cached_key(|&n| self.is_slow(n));
        }
    }

    /// Moves suspect and lagging peers to the end (a stable sort); down ones stay where
    /// they are (asking them fails at once).
    pub fn hanging_last(&self, nodes: &mut [NodeId]) {
        if nodes.iter().any(|&n| self.is_hanging(n)) {
            nodes.sort_by_cached_key(|&n| self.is_hanging(n));
        }
    }
}

impl Route {
    pub fn new(ctx: &Arc<NodeContext>) -> Result<Route, NodeError> {
        let placement = ctx.placement()?;
        let map = ctx.map()?;
        let local_only = placement.older().is_empty()
            && map.members.len() == 1
            && map.members[0].id == ctx.node_id
            && map.members[0].state == MemberState::Active;
        let states = map.members.iter().map(|m| (m.id, m.state)).collect();
        let addrs = map
            .members
            .into_iter()
            .map(|m| (m.id, m.addr))
            .collect::<HashMap<_, _>>();
        Ok(Route {
            ctx: ctx.clone(),
            placement,
            addrs: Arc::new(addrs),
            states: Arc::new(states),
            local_only,
        })
    }

    pub fn ctx(&self) -> &Arc<NodeContext> {
        &self.ctx
    }

    pub fn is_local_only(&self) -> bool {
        self.local_only
    }

    pub fn is_local(&self, node: NodeId) -> bool {
        node == self.ctx.node_id
    }

    pub fn epoch(&self) -> u64 {
        self.placement.epoch()
    }

    /// The write quorum W of the current map.
    pub fn write_quorum(&self) -> usize {
        self.placement.current().write_quorum()
    }

    /// Every owner that may hold a copy of `partition`'s chunks, this node first when it is
    /// one (no network), then the current owners in preference order, then older owners.
    ///
    /// Peers whose last call ran out of time, or that leave a call unanswered past the
    /// hedge, go last (their order otherwise kept): a lookup's first wave then asks owners
    /// that answer, and a hung one is asked only when the others cannot decide (see
    /// [`crate::peer::PeerPool::is_suspect`] and [`crate::peer::PeerPool::is_lagging`]).
    pub fn read_owners(&self, partition: Partition, health: &Health) -> Vec<NodeId> {
        let mut owners = self.placement.read_owners(partition);
        if let Some(i) = owners.iter().position(|&n| self.is_local(n)) {
            owners[..=i].rotate_right(1);
        }
        health.slow_last(&mut owners);
        owners
    }

    /// The members that stand in for `partition`'s owners when too few of them can take a
    /// copy ([`hashgrid_proto::placement::Placement::fallbacks`]), in ring order with
    /// suspect and lagging peers last. This node is one of them only when the ring says so.
    pub fn fallbacks(&self, partition: Partition, health: &Health) -> Vec<NodeId> {
        let mut fallbacks = self.placement.current().fallbacks(partition).to_vec();
        health.slow_last(&mut fallbacks);
        fallbacks
    }

    /// What the peer pool says of every member now ([`Route::is_hanging`],
    /// [`Route::is_slow`]), read once. Why: a request that routes thousands of ids over
    /// thousands of partitions would otherwise ask the pool about each owner of each
    /// partition, each question taking its locks and hashing the peer's address: 4 % of
    /// the CPU of three nodes serving lookups (`perf`).
    pub fn health(&self) -> Health {
        Health(
            self.addrs
                .keys()
                .map(|&n| (n, self.is_hanging(n), self.is_slow(n)))
                .collect(),
        )
    }

    /// Whether `node`'s last call ran out of time, with no answer since
    /// ([`crate::peer::PeerPool::is_suspect`]).
    pub fn is_suspect(&self, node: NodeId) -> bool {
        self.addrs
            .get(&node)
            .is_some_and(|a| self.ctx.peers.is_suspect(a))
    }

    /// Whether calls to `node` hang: it is suspect, or has a call under way that has gone
    /// unanswered past the hedge ([`crate::peer::PeerPool::is_lagging`]). Lookups do not
    /// wait for such an owner, nor ask such a fallback.
    pub fn is_hanging(&self, node: NodeId) -> bool {
        self.addrs.get(&node).is_some_and(|a| {
            let peers = &self.ctx.peers;
            peers.is_suspect(a) || peers.is_lagging(a)
        })
    }

    /// Whether `node` hangs ([`Route::is_hanging`]) or lost its connection on its last call
    /// ([`crate::peer::PeerPool::is_down`]): asked last by reads and lookups, and written
    /// around by writes that have fallbacks. Why the down ones too: a write whose owners
    /// are one down and one hung would otherwise wait a hedge for the hung one, every time,
    /// before its fallback copy. (Lookups still ask a down owner, last: it fails at once if
    /// it is still down, and one that came back is found lacking copies and repaired.)
    pub fn is_slow(&self, node: NodeId) -> bool {
        self.is_hanging(node) || self.is_down(node)
    }

    /// Whether `node` lost its connection on its last call
    /// ([`crate::peer::PeerPool::is_down`]).
    fn is_down(&self, node: NodeId) -> bool {
        self.addrs
            .get(&node)
            .is_some_and(|a| self.ctx.peers.is_down(a))
    }

    /// `node`'s state in the map this request routes by (`None`: not a member).
    pub fn member_state(&self, node: NodeId) -> Option<MemberState> {
        self.states.get(&node).copied()
    }

    pub(crate) fn addr(&self, node: NodeId) -> Result<&str, NodeError> {
        self.addrs
            .get(&node)
            .map(String::as_str)
            .ok_or_else(|| NodeError::Unavailable(format!("node {node} is not in the map")))
    }

    /// An owner that could not do its part: unreachable, or refusing. Either way the
    /// request goes on with the other owners, so it is a retryable failure of that owner
    /// only; an owner that refused because it knows a newer map says which epoch (the
    /// coordinator then follows the map, see [`write`]), and one that refused what it was
    /// sent as invalid (a chunk that fails its verification) fails the request
    /// ([`NodeError::Invalid`]), as the coordinator itself would have.
    fn owner_failed(&self, e: PeerError) -> NodeError {
        if let PeerError::Status { status, addr } = &e {
            let newer = status
                .metadata()
                .get(crate::error::REFRESH_METADATA)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if let Some(current) = newer {
                return NodeError::StaleEpoch {
                    sent: self.epoch(),
                    current,
                };
            }
            if status.code() == tonic::Code::InvalidArgument {
                return NodeError::Invalid(format!(
                    "{} (refused by the owner at {addr})",
                    status.message()
                ));
            }
        }
        NodeError::Unavailable(e.to_string())
    }

    /// Which of `ids` `node` holds.
    pub async fn owner_has(&self, node: NodeId, ids: Vec<ChunkId>) -> Result<Vec<bool>, NodeError> {
        if self.is_local(node) {
            return owner::has(&self.ctx, ids).await;
        }
        let n = ids.len();
        let req = HasRequest {
            epoch: self.epoch(),
            ids: pack_ids(&ids),
        };
        let reply = self
            .ctx
            .peers
            .call(self.addr(node)?, None, |mut c| async move {
                c.owner_has(req).await
            })
            .await
            .map_err(|e| self.owner_failed(e))?;
        Ok(owner::from_bitmap(&reply.present, n))
    }

    /// Stores verified chunks on `node`, durably.
    pub async fn owner_put(
        &self,
        node: NodeId,
        chunks: Arc<Vec<Outbound>>,
    ) -> Result<PutOutcome, NodeError> {
        Ok(self.owner_put_each(node, chunks).await?.0)
    }

    /// [`Route::owner_put`], also saying of each chunk, in order, whether `node` newly
    /// stored it. A node of an earlier version does not say: its count of new chunks is
    /// taken to be the first ones (only the agent's figures of new bytes can be off).
    pub async fn owner_put_each(
        &self,
        node: NodeId,
        chunks: Arc<Vec<Outbound>>,
    ) -> Result<(PutOutcome, Vec<bool>), NodeError> {
        if self.is_local(node) {
            return owner::store_outbound(&self.ctx, chunks).await;
        }
        let n = chunks.len();
        let req = PutRequest {
            epoch: self.epoch(),
            chunks: chunks.iter().map(Outbound::to_wire).collect(),
        };
        let reply = self
            .ctx
            .peers
            .call(self.addr(node)?, None, |mut c| async move {
                c.owner_put(req).await
            })
            .await
            .map_err(|e| self.owner_failed(e))?;
        let new = if reply.stored_map.is_empty() {
            (0..n).map(|i| i < reply.stored as usize).collect()
        } else {
            owner::from_bitmap(&reply.stored_map, n)
        };
        let outcome = PutOutcome {
            stored: reply.stored,
            existing: reply.existing,
            stored_bytes: reply.stored_bytes,
        };
        Ok((outcome, new))
    }

    /// Reads `ids` from `node`, each copy checked there as `check` says: one reply per id,
    /// in order, with per-chunk faults.
    pub async fn owner_get(
        &self,
        node: NodeId,
        ids: Vec<ChunkId>,
        check: Check,
    ) -> Result<Vec<pb::Chunk>, NodeError> {
        if self.is_local(node) {
            let reads = owner::read(&self.ctx, ids.clone(), check).await?;
            return Ok(ids
                .into_iter()
                .zip(reads)
                .map(|(id, r)| owner::reply_chunk(id, r))
                .collect());
        }
        let n = ids.len();
        let req = GetRequest {
            epoch: self.epoch(),
            ids: pack_ids(&ids),
            full_check: check == Check::Full,
        };
        let chunks = self
            .ctx
            .peers
            .call(self.addr(node)?, None, |mut c| async move {
                let mut stream = c.owner_get(req).await?.into_inner();
                let mut chunks = Vec::with_capacity(n);
                while let Some(msg) = stream.next().await {
                    chunks.extend(msg?.chunks);
                }
                Ok::<_, tonic::Status>(tonic::Response::new(chunks))
            })
            .await
            .map_err(|e| self.owner_failed(e))?;
        if chunks.len() != n || chunks.iter().zip(&ids).any(|(c, id)| c.id != id.as_bytes()) {
            return Err(NodeError::Unavailable(format!(
                "owner {node} answered a read of {n} chunks out of order or incompletely"
            )));
        }
        Ok(chunks)
    }
}

/// Calls under way that were not hedged yet (by call number: when each started, its ids),
/// as lookups and reads keep them.
pub(super) type Unhedged = HashMap<u64, (std::time::Instant, Vec<usize>)>;

/// When the next hedge is due: the oldest call not hedged yet, plus `hedge`.
pub(super) fn hedge_due(
    unhedged: &Unhedged,
    hedge: std::time::Duration,
) -> Option<std::time::Instant> {
    unhedged.values().map(|(started, _)| *started + hedge).min()
}

/// The calls of `unhedged` under way for `hedge` or longer, taken out of it with their ids.
pub(super) fn take_late(
    unhedged: &mut Unhedged,
    hedge: std::time::Duration,
) -> Vec<(u64, Vec<usize>)> {
    let now = std::time::Instant::now();
    let late: Vec<u64> = unhedged
        .iter()
        .filter(|(_, (started, _))| *started + hedge <= now)
        .map(|(&call, _)| call)
        .collect();
    late.into_iter()
        .filter_map(|call| unhedged.remove(&call).map(|(_, js)| (call, js)))
        .collect()
}

/// Sleeps until `due`, or forever when nothing is due (a call that is not hedged yet
/// decides when the next hedge is due; with none, only answers wake the caller).
pub(super) async fn sleep_until_or_never(due: Option<std::time::Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Groups the indices of `ids` by owner set, as `owners_of` gives it per partition.
pub fn group_by_owners(
    route: &Route,
    ids: impl Iterator<Item = ChunkId>,
    owners_of: impl Fn(Partition) -> Vec<NodeId>,
) -> Vec<(Vec<NodeId>, Vec<usize>)> {
    let current = route.placement.current();
    let mut by_partition: HashMap<Partition, usize> = HashMap::new();
    let mut groups: Vec<(Vec<NodeId>, Vec<usize>)> = Vec::new();
    let mut by_owners: HashMap<Vec<NodeId>, usize> = HashMap::new();
    for (i, id) in ids.enumerate() {
        let p = current.partition_of(&id);
        let g = *by_partition.entry(p).or_insert_with(|| {
            let owners = owners_of(p);
            *by_owners.entry(owners.clone()).or_insert_with(|| {
                groups.push((owners, Vec::new()));
                groups.len() - 1
            })
        });
        groups[g].1.push(i);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ask_hanging_members_after_everyone_else_and_down_ones_in_their_place() {
        // (node, hanging, slow): 2 hangs (suspect or lagging), 3 is down (slow, not hanging).
        let health = Health(vec![
            (1, false, false),
            (2, true, true),
            (3, false, true),
            (4, false, false),
        ]);
        let mut nodes = vec![2, 3, 1, 4];
        health.hanging_last(&mut nodes);
        assert_eq!(nodes, [3, 1, 4, 2]);
        let mut nodes = vec![2, 3, 1, 4];
        health.slow_last(&mut nodes);
        assert_eq!(nodes, [1, 4, 2, 3]);
    }
}

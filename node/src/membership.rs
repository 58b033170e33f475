//! Who is in the cluster: joining, the catalog group's voters and learners, and removal.
//!
//! A node started with `--join` asks any member to admit it ([`join_through`]); the request
//! reaches the catalog leader ([`admit`]), which lists the node in the map as `Joining`,
//! adds it to the Raft group as a learner and waits until it has caught up, keeps the
//! voters at the target count ([`ensure_voters`]), and then makes the node `Active`, which
//! starts moving its share of the partitions to it (unless it joined as a standby: then
//! `hashgrid node add` activates it, so several nodes can join and take data in one move). Joining is idempotent: a node that
//! retries, or a member that restarts with a new address, is updated in place.
//!
//! Voters: 1 while the cluster has fewer than 3 members, then 3, then 5 from 5 members on;
//! the rest are learners. The leader re-checks the voter set periodically
//! ([`maintain`]), so a voter that was removed is replaced by a learner.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use hashgrid_proto::pb;
use hashgrid_proto::pb::peer::{JoinRequest, JoinResponse};
use hashgrid_proto::placement::MemberState;
use hashgrid_proto::snapshot::validate_label;
use hashgrid_proto::NodeId;
use openraft::{BasicNode, ChangeMembers};

use crate::catalog::{Command, CommandResult};
use crate::cluster_map::MapChange;
use crate::context::NodeContext;
use crate::error::NodeError;

/// How long the leader waits for a new learner to catch up before answering the joiner
/// (which then asks again).
const CATCH_UP: Duration = Duration::from_secs(120);
/// How often the leader re-checks the voter set.
const MAINTAIN_EVERY: Duration = Duration::from_secs(2);

/// Voters for a catalog group of `members` nodes.
pub fn voter_target(members: usize) -> usize {
    match members {
        0..=2 => 1,
        3..=4 => 3,
        _ => 5,
    }
}

/// Handles a join request on any member: forwarded to the leader, admitted there.
pub async fn admit(ctx: &NodeContext, req: JoinRequest) -> Result<JoinResponse, NodeError> {
    if req.node_id == 0 || req.addr.is_empty() || req.weight == 0 {
        return Err(NodeError::Decode(hashgrid_proto::DecodeError::Invalid {
            what: "join request",
            reason: "node id, address and weight must be set".into(),
        }));
    }
    validate_label("zone", &req.zone)?;
    match ctx.leader() {
        Some(leader) if leader == ctx.node_id => admit_as_leader(ctx, req).await,
        Some(leader) => {
            let addr = ctx
                .member_addr(leader)
                .ok_or_else(|| NodeError::Unavailable("catalog leader address unknown".into()))?;
            ctx.peers
                .call(
                    &addr,
                    Some(CATCH_UP),
                    |mut c| async move { c.join(req).await },
                )
                .await
                .map_err(|e| NodeError::Unavailable(format!("forwarding the join: {e}")))
        }
        None => Err(NodeError::Unavailable(
            "no catalog leader right now; retry shortly".into(),
        )),
    }
}

async fn admit_as_leader(ctx: &NodeContext, req: JoinRequest) -> Result<JoinResponse, NodeError> {
    let id = req.node_id;
    tracing::info!(node = id, addr = %req.addr, zone = %req.zone, "admitting a node");
    expect_map(
        ctx.write(Command::ChangeMap(MapChange::Upsert {
            id,
            addr: req.addr.clone(),
            zone: req.zone.clone(),
            weight: req.weight,
        }))
        .await?,
    )?;
    let node = BasicNode::new(req.addr.clone());
    let known = ctx
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&id)
        .cloned();
    match known {
        Some(n) if n.addr != node.addr => {
            // A member that moved: update where Raft reaches it.
            ctx.raft
                .change_membership(ChangeMembers::SetNodes(BTreeMap::from([(id, node)])), true)
                .await
                .map_err(raft_err)?;
        }
        Some(_) => {}
        None => {
            tokio::time::timeout(CATCH_UP, ctx.raft.add_learner(id, node, true))
                .await
                .map_err(|_| {
                    NodeError::Unavailable(format!(
                        "node {id} did not catch up with the catalog within {CATCH_UP:?}"
                    ))
                })?
                .map_err(raft_err)?;
        }
    }
    ensure_voters(ctx).await?;
    let joining = ctx
        .map()?
        .member(id)
        .is_some_and(|m| m.state == MemberState::Joining);
    if joining && !req.standby {
        expect_map(
            ctx.write(Command::ChangeMap(MapChange::SetState {
                id,
                state: MemberState::Active,
            }))
            .await?,
        )?;
    }
    let map = ctx.map()?;
    tracing::info!(node = id, epoch = map.epoch, "node admitted");
    Ok(JoinResponse {
        leader_id: ctx.node_id,
        map: Some(pb::ClusterMap::from(&map)),
    })
}

fn expect_map(result: CommandResult) -> Result<u64, NodeError> {
    match result {
        CommandResult::MapEpoch(e) => Ok(e),
        CommandResult::Rejected(why) => Err(NodeError::Rejected(why)),
        other => Err(NodeError::Internal(format!(
            "unexpected map change result {other:?}"
        ))),
    }
}

fn raft_err<E: std::fmt::Display>(e: E) -> NodeError {
    NodeError::Unavailable(format!("changing the catalog group: {e}"))
}

/// On the leader: makes the voters the target number of members that are not removed,
/// keeping current voters where possible, and drops removed members from the group.
pub async fn ensure_voters(ctx: &NodeContext) -> Result<(), NodeError> {
    if ctx.leader() != Some(ctx.node_id) {
        return Ok(());
    }
    let map = ctx.map()?;
    let membership = ctx.raft.metrics().borrow().membership_config.clone();
    let membership = membership.membership();
    let in_group: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
    let alive: Vec<NodeId> = map
        .members
        .iter()
        .filter(|m| m.state != MemberState::Removed && in_group.contains(&m.id))
        .map(|m| m.id)
        .collect();
    let removed: BTreeSet<NodeId> = map
        .members
        .iter()
        .filter(|m| m.state == MemberState::Removed && in_group.contains(&m.id))
        .map(|m| m.id)
        .collect();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let target = voter_target(
        map.members
            .iter()
            .filter(|m| m.state != MemberState::Removed)
            .count(),
    )
    .min(alive.len().max(1));
    // Keep the voters that are still members, this node first (it leads), then promote
    // learners in map order.
    let mut desired: Vec<NodeId> = vec![ctx.node_id];
    desired.extend(
        voters
            .iter()
            .copied()
            .filter(|v| *v != ctx.node_id && alive.contains(v)),
    );
    desired.extend(alive.iter().copied().filter(|n| !voters.contains(n)));
    desired.dedup();
    desired.truncate(target);
    let desired: BTreeSet<NodeId> = desired.into_iter().collect();
    if desired != voters {
        tracing::info!(?voters, ?desired, "changing the catalog voters");
        ctx.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(desired), true)
            .await
            .map_err(raft_err)?;
    }
    if !removed.is_empty() {
        ctx.raft
            .change_membership(ChangeMembers::RemoveNodes(removed), false)
            .await
            .map_err(raft_err)?;
    }
    Ok(())
}

/// Changes a member's state (admin request on any node), then keeps the voters right.
pub async fn change_state(
    ctx: &NodeContext,
    id: NodeId,
    state: MemberState,
) -> Result<hashgrid_proto::placement::ClusterMap, NodeError> {
    expect_map(
        ctx.write(Command::ChangeMap(MapChange::SetState { id, state }))
            .await?,
    )?;
    tracing::info!(node = id, state = state.as_str(), "member state changed");
    ensure_voters_anywhere(ctx).await;
    ctx.map()
}

/// Changes R and W (admin request on any node).
pub async fn set_replication(
    ctx: &NodeContext,
    replication: u8,
    write_quorum: u8,
) -> Result<hashgrid_proto::placement::ClusterMap, NodeError> {
    expect_map(
        ctx.write(Command::ChangeMap(MapChange::SetReplication {
            replication,
            write_quorum,
        }))
        .await?,
    )?;
    ctx.map()
}

/// Adjusts the voters now if this node leads; otherwise the leader's [`maintain`] loop
/// does it within a few seconds.
async fn ensure_voters_anywhere(ctx: &NodeContext) {
    if let Err(e) = ensure_voters(ctx).await {
        tracing::warn!(error = %e, "adjusting the catalog voters");
    }
}

/// The leader's periodic duty: keep the voter set right as members come and go.
pub async fn maintain(ctx: Arc<NodeContext>) {
    loop {
        tokio::time::sleep(MAINTAIN_EVERY).await;
        if !ctx.is_ready() {
            continue;
        }
        if let Err(e) = ensure_voters(&ctx).await {
            tracing::warn!(error = %e, "keeping the catalog voters at their target");
        }
    }
}

/// On a new node: asks the members at `seeds` (any one that answers) to admit it, retrying
/// until one does. Returns once the leader has admitted it.
pub async fn join_through(
    ctx: &NodeContext,
    seeds: &[String],
    zone: &str,
    weight: u32,
    standby: bool,
) -> Result<JoinResponse, NodeError> {
    let req = JoinRequest {
        node_id: ctx.node_id,
        addr: ctx.advertise.clone(),
        zone: zone.to_string(),
        weight,
        standby,
    };
    let mut pause = Duration::from_millis(200);
    loop {
        for seed in seeds {
            let r = req.clone();
            match ctx
                .peers
                .call(seed, Some(CATCH_UP + CATCH_UP), |mut c| async move {
                    c.join(r).await
                })
                .await
            {
                Ok(resp) => return Ok(resp),
                Err(crate::peer::PeerError::Status { status, .. })
                    if status.code() == tonic::Code::Unauthenticated =>
                {
                    return Err(NodeError::PermissionDenied(format!(
                        "{seed} refused the cluster secret: {}",
                        status.message()
                    )));
                }
                Err(e) => tracing::warn!(seed = %seed, error = %e, "join attempt failed; retrying"),
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voters_are_one_three_or_five() {
        let t: Vec<usize> = (1..=8).map(voter_target).collect();
        assert_eq!(t, vec![1, 1, 3, 3, 5, 5, 5, 5]);
    }
}

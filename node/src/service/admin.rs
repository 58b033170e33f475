//! The `Admin` service: node status (what an agent needs before a backup), statistics,
//! membership changes and verify.

use std::collections::BTreeMap;
use std::sync::Arc;

use hashgrid_proto::id::pack_ids;
use hashgrid_proto::pb::admin_server::Admin;
use hashgrid_proto::pb::{
    self, ChangeMemberRequest, ChangeMemberResponse, ClientStats, SetReplicationRequest,
    SetReplicationResponse, StatsRequest, StatsResponse, StatusRequest, StatusResponse,
    VerifyProgress, VerifyRequest,
};
use hashgrid_proto::placement::MemberState;
use tonic::{Request, Response, Status};

use super::auth::principal;
use crate::context::NodeContext;
use crate::membership;
use crate::verify;

pub struct AdminService {
    ctx: Arc<NodeContext>,
}

impl AdminService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        AdminService { ctx }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type VerifyStream = tokio_stream::wrappers::ReceiverStream<Result<VerifyProgress, Status>>;

    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> Result<Response<Self::VerifyStream>, Status> {
        principal(&req)?;
        let dry_run = req.into_inner().dry_run;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(verify::run(self.ctx.clone(), dry_run, tx));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        principal(&req)?;
        let config = self.ctx.config()?;
        let metrics = self.ctx.raft.metrics().borrow().clone();
        Ok(Response::new(StatusResponse {
            node_id: self.ctx.node_id,
            version: env!("CARGO_PKG_VERSION").into(),
            ready: self.ctx.is_ready(),
            map: Some(pb::ClusterMap::from(&config.map)),
            chunker: Some(config.chunker.into()),
            raft_leader: metrics.current_leader.unwrap_or(0),
            raft_term: metrics.current_term,
            raft_last_applied: metrics.last_applied.map_or(0, |l| l.index),
            raft_voters: metrics.membership_config.membership().voter_ids().collect(),
            raft_learners: metrics
                .membership_config
                .membership()
                .learner_ids()
                .collect(),
        }))
    }

    async fn change_member(
        &self,
        req: Request<ChangeMemberRequest>,
    ) -> Result<Response<ChangeMemberResponse>, Status> {
        principal(&req)?;
        let req = req.into_inner();
        let state = match pb::MemberState::try_from(req.state) {
            Ok(pb::MemberState::Active) => MemberState::Active,
            Ok(pb::MemberState::Draining) => MemberState::Draining,
            Ok(pb::MemberState::Removed) => MemberState::Removed,
            _ => {
                return Err(Status::invalid_argument(
                    "a member can be made active, draining or removed",
                ))
            }
        };
        let map = membership::change_state(&self.ctx, req.node_id, state).await?;
        Ok(Response::new(ChangeMemberResponse {
            map: Some(pb::ClusterMap::from(&map)),
        }))
    }

    async fn set_replication(
        &self,
        req: Request<SetReplicationRequest>,
    ) -> Result<Response<SetReplicationResponse>, Status> {
        principal(&req)?;
        let req = req.into_inner();
        let small = |v: u32| u8::try_from(v).unwrap_or(u8::MAX);
        let map =
            membership::set_replication(&self.ctx, small(req.replication), small(req.write_quorum))
                .await?;
        Ok(Response::new(SetReplicationResponse {
            map: Some(pb::ClusterMap::from(&map)),
        }))
    }

    async fn stats(&self, req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        principal(&req)?;
        let (under_replicated, missing) = self.ctx.workers.shortfall();
        let missing_ids = if req.get_ref().missing_ids {
            pack_ids(&missing)
        } else {
            Vec::new()
        };
        let counters = self.ctx.store.counters();
        // Before the catalog lock: placement() takes it too.
        let placement = self.ctx.placement().ok();
        let moving = placement.as_ref().map_or(0, |p| p.moving().count() as u64);
        let hand_off_pending = placement.as_ref().map_or(0, |p| {
            crate::anti_entropy::hand_off_pending(&self.ctx.store, p.current(), self.ctx.node_id)
        });
        let catalog = self.ctx.catalog.read().unwrap_or_else(|p| p.into_inner());
        let mut clients: BTreeMap<&str, ClientStats> = BTreeMap::new();
        let mut logical = 0u64;
        for s in catalog.snapshots.values() {
            logical += s.stats.logical_bytes;
            let c = clients.entry(&s.client).or_insert_with(|| ClientStats {
                client: s.client.clone(),
                ..Default::default()
            });
            c.snapshots += 1;
            c.logical_bytes += s.stats.logical_bytes;
            c.new_bytes += s.stats.new_bytes;
            c.sent_bytes += s.stats.sent_bytes;
        }
        Ok(Response::new(StatsResponse {
            chunks: counters.chunks,
            stored_bytes: counters.stored_bytes,
            plain_bytes: counters.plain_bytes,
            snapshots: catalog.snapshots.len() as u64,
            logical_bytes: logical,
            clients: clients.into_values().collect(),
            node_id: self.ctx.node_id,
            reclaimable_bytes: counters.reclaimable_bytes,
            under_replicated,
            moving,
            workers: self.ctx.workers.to_pb(self.ctx.peers.lost_contact()),
            hand_off_pending,
            move_limit_bytes_per_sec: self.ctx.workers.pacer.limit().unwrap_or(0),
            missing_ids,
        }))
    }
}

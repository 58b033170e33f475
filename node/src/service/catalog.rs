//! The `Catalog` service: commit, list and read snapshot records. Commits go through Raft; a
//! commit is refused unless the snapshot's root object is present (on W owners), a last
//! guard behind the agent's own rule of committing only after every upload was acknowledged.

use std::sync::Arc;

use hashgrid_proto::pb::catalog_server::Catalog;
use hashgrid_proto::pb::{
    CommitSnapshotRequest, CommitSnapshotResponse, GetSnapshotRequest, ListSnapshotsRequest,
    ListSnapshotsResponse, Snapshot,
};
use hashgrid_proto::snapshot::SnapshotRecord;
use hashgrid_proto::SnapshotId;
use tonic::{Request, Response, Status};

use super::auth::principal;
use crate::catalog::{Command, CommandResult, CommitKey, Principal};
use crate::context::NodeContext;
use crate::coordinator::{lookup, Route};
use crate::error::NodeError;
use crate::metrics as m;

pub struct CatalogService {
    ctx: Arc<NodeContext>,
}

impl CatalogService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        CatalogService { ctx }
    }

    /// May `who` see snapshots of `client`? Admins see all; per-client tokens arrive with the
    /// security work and will see only their own.
    fn may_read(who: &Principal, _client: &str) -> bool {
        match who {
            Principal::Admin => true,
        }
    }
}

#[tonic::async_trait]
impl Catalog for CatalogService {
    async fn commit_snapshot(
        &self,
        req: Request<CommitSnapshotRequest>,
    ) -> Result<Response<CommitSnapshotResponse>, Status> {
        let who = principal(&req)?;
        let req = req.into_inner();
        let key: Option<CommitKey> = match req.commit_key.len() {
            0 => None,
            _ => Some(
                req.commit_key
                    .as_slice()
                    .try_into()
                    .map_err(|_| Status::invalid_argument("a commit key has 16 bytes"))?,
            ),
        };
        let pb_snapshot = req
            .snapshot
            .ok_or_else(|| Status::invalid_argument("commit without a snapshot"))?;
        let record = SnapshotRecord::try_from(pb_snapshot).map_err(NodeError::from)?;
        if !Self::may_read(&who, &record.client) {
            return Err(NodeError::PermissionDenied(format!(
                "may not commit snapshots for client {}",
                record.client
            ))
            .into());
        }
        // Present as the coordinator counts it: on W owners, wherever they are.
        let root = record.root.0.clone();
        let found = lookup::lookup(&Route::new(&self.ctx)?, root.clone()).await?;
        let missing = root.iter().zip(found).find(|(_, f)| !f).map(|(id, _)| *id);
        if let Some(id) = missing {
            return Err(NodeError::Precondition(format!(
                "root object chunk {id} is not stored; upload every chunk before committing"
            ))
            .into());
        }
        let command = match key {
            Some(key) => Command::CommitSnapshotOnce { key, record },
            None => Command::CommitSnapshot(record),
        };
        match self.ctx.write(command).await? {
            CommandResult::Committed(id) => {
                metrics::counter!(m::SNAPSHOTS_COMMITTED).increment(1);
                tracing::info!(snapshot = %id, "snapshot committed");
                Ok(Response::new(CommitSnapshotResponse { id: id.0 }))
            }
            CommandResult::Rejected(reason) => Err(NodeError::Precondition(reason).into()),
            other => Err(NodeError::Internal(format!("unexpected commit result {other:?}")).into()),
        }
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let who = principal(&req)?;
        let req = req.into_inner();
        let catalog = self.ctx.catalog.read().unwrap_or_else(|p| p.into_inner());
        let snapshots = catalog
            .snapshots
            .values()
            .filter(|s| req.client.is_empty() || s.client == req.client)
            .filter(|s| req.dataset.is_empty() || s.dataset == req.dataset)
            .filter(|s| Self::may_read(&who, &s.client))
            .map(Snapshot::from)
            .collect();
        Ok(Response::new(ListSnapshotsResponse {
            snapshots,
            next_cursor: 0,
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<Snapshot>, Status> {
        let who = principal(&req)?;
        let id = SnapshotId(req.into_inner().id);
        let catalog = self.ctx.catalog.read().unwrap_or_else(|p| p.into_inner());
        catalog
            .snapshots
            .get(&id)
            .filter(|s| Self::may_read(&who, &s.client))
            .map(|s| Response::new(Snapshot::from(s)))
            .ok_or_else(|| NodeError::NotFound(format!("snapshot {id} does not exist")).into())
    }
}

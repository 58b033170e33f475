//! The `Catalog` service: commit, list and read snapshot records. Commits go through Raft; a
//! commit is refused unless every chunk its new objects reference is stored
//! ([`crate::commit_check`]), a last guard behind the agent's own rule of committing only
//! after every upload was acknowledged.

use std::sync::Arc;

use hashgrid_proto::limits::{DEFAULT_LIST_PAGE, MAX_LIST_PAGE, MAX_MESSAGE_BYTES};
use hashgrid_proto::pb;
use hashgrid_proto::pb::catalog_server::Catalog;
use hashgrid_proto::pb::{
    CommitSnapshotRequest, CommitSnapshotResponse, GetSnapshotRequest, ListSnapshotsRequest,
    ListSnapshotsResponse, Snapshot,
};
use hashgrid_proto::snapshot::{SnapshotKind, SnapshotRecord};
use hashgrid_proto::SnapshotId;
use prost::Message;
use tonic::{Request, Response, Status};

use super::auth::principal;
use super::blocking;
use crate::catalog::{CommitKey, Principal, SnapshotQuery};
use crate::commit_check::check_commit;
use crate::commit_queue::CommitQueue;
use crate::context::NodeContext;
use crate::coordinator::source::ClusterChunks;
use crate::coordinator::Route;
use crate::error::NodeError;
use crate::manifest_walk::LocalChunks;
use crate::metrics as m;

/// Encoded snapshots per `ListSnapshots` page at most, well under the message limit (a record
/// may carry a thousand source paths).
const PAGE_BYTES: usize = MAX_MESSAGE_BYTES / 2;

/// Longest a catalog read waits to catch up with the leader ([`NodeContext::catch_up`]): a
/// round trip to the leader and a dozen heartbeats, enough for a commit acknowledged
/// elsewhere to reach this node; past it, the node answers from what it has applied.
const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

fn not_found(id: SnapshotId) -> Status {
    NodeError::NotFound(format!("snapshot {id} does not exist")).into()
}

pub struct CatalogService {
    ctx: Arc<NodeContext>,
    commits: CommitQueue,
}

impl CatalogService {
    /// The service and its commit queue's writer task (call from within the runtime).
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        let commits = CommitQueue::start(ctx.clone());
        CatalogService { ctx, commits }
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
        // The parent's root is the base only when it is a committed snapshot the caller may
        // read and verify has not found damaged.
        let base = record.parent.and_then(|p| {
            let catalog = self.ctx.catalog.read().unwrap_or_else(|p| p.into_inner());
            catalog
                .snapshots
                .get(&p)
                .filter(|s| s.damage.is_none() && Self::may_read(&who, &s.client))
                .map(|s| s.root.clone())
        });
        // Present as the coordinator counts it: on W owners, wherever they are (this node's
        // own store when it is the only owner of everything).
        let route = Route::new(&self.ctx)?;
        let store = self.ctx.store.clone();
        let max_plain_len = self.ctx.chunker()?.max_size;
        let root = record.root.clone();
        let runtime = tokio::runtime::Handle::current();
        let started = std::time::Instant::now();
        let stats = blocking(move || {
            if route.is_local_only() {
                let source = LocalChunks {
                    store: &store,
                    max_plain_len,
                };
                check_commit(&source, &root, base.as_ref())
            } else {
                let source = ClusterChunks {
                    route,
                    runtime,
                    max_plain_len,
                };
                check_commit(&source, &root, base.as_ref())
            }
        })
        .await?;
        tracing::debug!(
            objects = stats.objects,
            chunks = stats.chunks,
            skipped = stats.skipped,
            elapsed = ?started.elapsed(),
            "commit check passed"
        );
        let id = self.commits.commit(key, record).await?;
        metrics::counter!(m::SNAPSHOTS_COMMITTED).increment(1);
        tracing::info!(snapshot = %id, "snapshot committed");
        Ok(Response::new(CommitSnapshotResponse { id: id.0 }))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let who = principal(&req)?;
        let req = req.into_inner();
        let kind = match req.kind.map(pb::SnapshotKind::try_from) {
            None => None,
            Some(Ok(pb::SnapshotKind::Files)) => Some(SnapshotKind::Files),
            Some(Ok(pb::SnapshotKind::Image)) => Some(SnapshotKind::Image),
            Some(Err(_)) => return Err(Status::invalid_argument("unknown snapshot kind")),
        };
        let query = SnapshotQuery {
            client: req.client,
            dataset: req.dataset,
            kind,
            undamaged_only: req.undamaged_only,
            newest_first: req.newest_first,
            cursor: req.cursor,
        };
        let limit = match req.limit {
            0 => DEFAULT_LIST_PAGE,
            n => n.min(MAX_LIST_PAGE),
        } as usize;
        // Every snapshot the cluster acknowledged is listed, whichever node answers (an
        // agent choosing its parent or `restore latest` right after a backup through another
        // node); cut off from the leader, this node lists what it has applied.
        self.ctx.catch_up(CATCH_UP).await;
        let catalog = self.ctx.catalog.read().unwrap_or_else(|p| p.into_inner());
        let mut snapshots: Vec<Snapshot> = Vec::new();
        let mut bytes = 0;
        let mut next_cursor = 0;
        for s in catalog
            .query(&query)
            .filter(|s| Self::may_read(&who, &s.client))
        {
            let s = Snapshot::from(s);
            let len = s.encoded_len();
            if snapshots.len() == limit || (bytes + len > PAGE_BYTES && !snapshots.is_empty()) {
                next_cursor = snapshots.last().map_or(0, |l| l.id);
                break;
            }
            bytes += len;
            snapshots.push(s);
        }
        Ok(Response::new(ListSnapshotsResponse {
            snapshots,
            next_cursor,
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<Snapshot>, Status> {
        let who = principal(&req)?;
        let id = SnapshotId(req.into_inner().id);
        // A follower may not have applied a commit another node just acknowledged (an agent
        // that backs up through one node and restores through another): an id past the
        // newest it knows makes it catch up first.
        let known = {
            let catalog = self.ctx.catalog.read().unwrap_or_else(|p| p.into_inner());
            catalog
                .snapshots
                .keys()
                .next_back()
                .is_some_and(|&n| n >= id)
        };
        if !known {
            self.ctx.catch_up(CATCH_UP).await;
        }
        let catalog = self.ctx.catalog.read().unwrap_or_else(|p| p.into_inner());
        catalog
            .snapshots
            .get(&id)
            .filter(|s| Self::may_read(&who, &s.client))
            .map(|s| Response::new(Snapshot::from(s)))
            .ok_or_else(|| not_found(id))
    }
}

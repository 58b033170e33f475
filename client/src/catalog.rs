//! Catalog queries shared by the commands: find a snapshot by id or as the latest of a
//! client and dataset.

use hashgrid_proto::pb::{GetSnapshotRequest, ListSnapshotsRequest};
use hashgrid_proto::snapshot::{SnapshotKind, SnapshotRecord};
use hashgrid_proto::SnapshotId;

use crate::connection::Connection;
use crate::error::{ClientError, Result};

pub async fn get(conn: &Connection, id: SnapshotId) -> Result<SnapshotRecord> {
    let mut c = conn.catalog.clone();
    let s = c
        .get_snapshot(GetSnapshotRequest { id: id.0 })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => ClientError::NotFound(s.message().to_string()),
            _ => ClientError::rpc(format!("reading snapshot {id}"), s),
        })?
        .into_inner();
    Ok(SnapshotRecord::try_from(s)?)
}

/// Snapshots visible to us, optionally of one client and dataset, oldest first.
pub async fn list(conn: &Connection, client: &str, dataset: &str) -> Result<Vec<SnapshotRecord>> {
    let mut c = conn.catalog.clone();
    let resp = c
        .list_snapshots(ListSnapshotsRequest {
            client: client.to_string(),
            dataset: dataset.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|s| ClientError::rpc("listing snapshots", s))?
        .into_inner();
    resp.snapshots
        .into_iter()
        .map(|s| SnapshotRecord::try_from(s).map_err(ClientError::from))
        .collect()
}

pub async fn latest(
    conn: &Connection,
    client: &str,
    dataset: &str,
    kind: Option<SnapshotKind>,
) -> Result<Option<SnapshotRecord>> {
    Ok(list(conn, client, dataset)
        .await?
        .into_iter()
        .filter(|s| kind.is_none_or(|k| s.kind == k))
        .max_by_key(|s| s.id))
}

/// Resolves a snapshot argument: a numeric id, or `latest` (of `client`/`dataset`, either
/// of which may be empty to mean any).
pub async fn resolve(
    conn: &Connection,
    arg: &str,
    client: &str,
    dataset: &str,
) -> Result<SnapshotRecord> {
    if arg == "latest" {
        return latest(conn, client, dataset, None).await?.ok_or_else(|| {
            ClientError::NotFound(format!(
                "no snapshot of client {client:?} dataset {dataset:?} (use --client/--dataset, or `snapshots` to list)"
            ))
        });
    }
    let id: SnapshotId = arg
        .parse()
        .map_err(|_| ClientError::Config(format!("snapshot {arg:?}: give a number or `latest`")))?;
    get(conn, id).await
}

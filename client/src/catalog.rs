//! Catalog queries shared by the commands: find a snapshot by id or as the latest of a
//! client and dataset, list snapshots page by page.

use hashgrid_proto::pb::{self, GetSnapshotRequest, ListSnapshotsRequest};
use hashgrid_proto::snapshot::{SnapshotKind, SnapshotRecord};
use hashgrid_proto::SnapshotId;

use crate::connection::Connection;
use crate::error::{ClientError, Result};

pub async fn get(conn: &Connection, id: SnapshotId) -> Result<SnapshotRecord> {
    let s = conn
        .call(&format!("reading snapshot {id}"), || {
            let mut c = conn.catalog.clone();
            async move {
                Ok(c.get_snapshot(GetSnapshotRequest { id: id.0 })
                    .await?
                    .into_inner())
            }
        })
        .await
        .map_err(|e| match e {
            ClientError::Rpc { status, .. } if status.code() == tonic::Code::NotFound => {
                ClientError::NotFound(status.message().to_string())
            }
            e => e,
        })?;
    Ok(SnapshotRecord::try_from(s)?)
}

/// Which snapshots to list, and in which order.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// Empty: any.
    pub client: String,
    /// Empty: any.
    pub dataset: String,
    pub kind: Option<SnapshotKind>,
    /// Leave out snapshots verify marked damaged.
    pub undamaged_only: bool,
    pub newest_first: bool,
}

/// One page of snapshots after `cursor` (0: the first page) and the cursor of the next page
/// (0 when this was the last). `limit` 0 takes the node's default page size.
pub async fn page(
    conn: &Connection,
    q: &ListQuery,
    cursor: u64,
    limit: u32,
) -> Result<(Vec<SnapshotRecord>, u64)> {
    let request = ListSnapshotsRequest {
        client: q.client.clone(),
        dataset: q.dataset.clone(),
        limit,
        cursor,
        newest_first: q.newest_first,
        kind: q.kind.map(|k| {
            let kind = match k {
                SnapshotKind::Files => pb::SnapshotKind::Files,
                SnapshotKind::Image => pb::SnapshotKind::Image,
            };
            kind as i32
        }),
        undamaged_only: q.undamaged_only,
    };
    let resp = conn
        .call("listing snapshots", || {
            let mut c = conn.catalog.clone();
            let request = request.clone();
            async move { Ok(c.list_snapshots(request).await?.into_inner()) }
        })
        .await?;
    let records = resp
        .snapshots
        .into_iter()
        .map(|s| SnapshotRecord::try_from(s).map_err(ClientError::from))
        .collect::<Result<_>>()?;
    Ok((records, resp.next_cursor))
}

/// Calls `each` with every page of snapshots `q` selects.
pub async fn for_each_page(
    conn: &Connection,
    q: &ListQuery,
    mut each: impl FnMut(Vec<SnapshotRecord>) -> Result<()>,
) -> Result<()> {
    let mut cursor = 0;
    loop {
        let (records, next) = page(conn, q, cursor, 0).await?;
        each(records)?;
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Snapshots visible to us, optionally of one client and dataset, oldest first (every page).
pub async fn list(conn: &Connection, client: &str, dataset: &str) -> Result<Vec<SnapshotRecord>> {
    let q = ListQuery {
        client: client.to_string(),
        dataset: dataset.to_string(),
        ..Default::default()
    };
    let mut all = Vec::new();
    for_each_page(conn, &q, |records| {
        all.extend(records);
        Ok(())
    })
    .await?;
    Ok(all)
}

/// The newest snapshot `q` selects: one page of one, newest first.
pub async fn newest(conn: &Connection, q: &ListQuery) -> Result<Option<SnapshotRecord>> {
    let q = ListQuery {
        newest_first: true,
        ..q.clone()
    };
    Ok(page(conn, &q, 0, 1).await?.0.into_iter().next())
}

pub async fn latest(
    conn: &Connection,
    client: &str,
    dataset: &str,
    kind: Option<SnapshotKind>,
) -> Result<Option<SnapshotRecord>> {
    newest(
        conn,
        &ListQuery {
            client: client.to_string(),
            dataset: dataset.to_string(),
            kind,
            ..Default::default()
        },
    )
    .await
}

/// The parent a backup compares with: the latest snapshot of the same client, dataset and
/// kind that verify has not found damaged (a damaged parent's unchanged files would be
/// reused, and with them its missing chunks; without it they are read and sent again).
pub async fn backup_parent(
    conn: &Connection,
    client: &str,
    dataset: &str,
    kind: SnapshotKind,
) -> Result<Option<SnapshotRecord>> {
    newest(
        conn,
        &ListQuery {
            client: client.to_string(),
            dataset: dataset.to_string(),
            kind: Some(kind),
            undamaged_only: true,
            newest_first: true,
        },
    )
    .await
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

//! Verify: read every stored chunk, find the snapshots that reference what is bad or gone,
//! and record that in the catalog.
//!
//! 1. Every chunk in the index is read and re-hashed, a page at a time (the store's verified
//!    read: a bad copy leaves the index and is counted, so the next backup that meets the id
//!    sends it again and the copy heals).
//! 2. Every snapshot's manifests are walked ([`crate::manifest_walk`]) and each referenced
//!    chunk is looked up through the coordinator (on a cluster, present means on W owners,
//!    as at commit; one under-replicated is copied to its owners by the lookup); subtrees found whole in one snapshot are not walked again for the
//!    next, so the walk costs the distinct data, and memory stays bounded by the walk's sets.
//! 3. Unless it is a dry run, one Raft command per batch records the damaged snapshots and
//!    clears the mark of those found whole again; the state machine persists the marks.
//!
//! Progress streams to the caller; the last message is the report.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashgrid_proto::manifest::ObjectRef;
use hashgrid_proto::pb::{DamagedSnapshot, VerifyProgress};
use hashgrid_proto::snapshot::SnapshotDamage;
use hashgrid_proto::{ChunkId, SnapshotId};
use tokio::sync::mpsc::Sender;
use tonic::Status;

use crate::catalog::{Command, CommandResult};
use crate::chunk_store::{Check, ChunkRead};
use crate::context::NodeContext;
use crate::coordinator::source::ClusterChunks;
use crate::coordinator::Route;
use crate::error::NodeError;
use crate::manifest_walk::{ChunkSource, LocalChunks, Missing, Walker, WholeSet, MISSING_EXAMPLES};

/// Chunks read per store call.
const SCAN_PAGE: usize = 1024;
/// Damage marks per Raft command, so one entry stays small.
const MARKS_PER_COMMAND: usize = 1000;
/// Progress messages at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Where progress and the report go.
pub type Progress = Sender<Result<VerifyProgress, Status>>;

/// What one snapshot's walk found.
struct Finding {
    id: SnapshotId,
    client: String,
    dataset: String,
    was: Option<SnapshotDamage>,
    now: Option<SnapshotDamage>,
}

/// The blocking part's result.
struct Found {
    progress: VerifyProgress,
    bad: Vec<ChunkId>,
    missing: Missing,
    findings: Vec<Finding>,
}

/// Runs a verify and streams its progress and report to `tx`.
pub async fn run(ctx: Arc<NodeContext>, dry_run: bool, tx: Progress) {
    if let Err(e) = verify(ctx, dry_run, &tx).await {
        tracing::warn!(error = %e, "verify failed");
        let _ = tx.send(Err(e.into())).await;
    }
}

async fn verify(ctx: Arc<NodeContext>, dry_run: bool, tx: &Progress) -> Result<(), NodeError> {
    let started_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let max_plain_len = ctx.chunker()?.max_size;
    let scan_ctx = ctx.clone();
    let scan_tx = tx.clone();
    let route = Route::new(&ctx)?;
    let runtime = tokio::runtime::Handle::current();
    let found = tokio::task::spawn_blocking(move || {
        if route.is_local_only() {
            let source = LocalChunks {
                store: &scan_ctx.store,
                max_plain_len,
            };
            scan(&scan_ctx, &source, max_plain_len, started_ms, &scan_tx)
        } else {
            let source = ClusterChunks {
                route,
                runtime,
                max_plain_len,
            };
            scan(&scan_ctx, &source, max_plain_len, started_ms, &scan_tx)
        }
    })
    .await
    .map_err(|e| NodeError::Internal(format!("verify task: {e}")))??;
    let Some(found) = found else {
        tracing::info!("verify abandoned: the caller went away");
        return Ok(());
    };
    let mut report = found.progress;
    let mut marks = Vec::new();
    for f in &found.findings {
        if f.now.is_some() {
            report.damaged.push(DamagedSnapshot {
                id: f.id.0,
                client: f.client.clone(),
                dataset: f.dataset.clone(),
                missing_chunks: f.now.as_ref().map_or(0, |d| d.missing_chunks),
            });
        }
        let changed = match (&f.was, &f.now) {
            (None, None) => false,
            (Some(_), None) => {
                report.healed_snapshots += 1;
                true
            }
            (Some(was), Some(now)) => was.missing_chunks != now.missing_chunks,
            (None, Some(_)) => true,
        };
        if changed {
            marks.push((f.id, f.now.clone()));
        }
    }
    if !dry_run {
        for batch in marks.chunks(MARKS_PER_COMMAND) {
            match ctx.write(Command::SetDamage(batch.to_vec())).await? {
                CommandResult::DamageMarked(_) => {}
                other => {
                    return Err(NodeError::Internal(format!(
                        "unexpected result recording damage: {other:?}"
                    )))
                }
            }
        }
    }
    report.bad_ids = found.bad.iter().map(|id| id.as_bytes().to_vec()).collect();
    report.missing_ids = found
        .missing
        .examples
        .iter()
        .map(|id| id.as_bytes().to_vec())
        .collect();
    report.done = true;
    tracing::info!(
        chunks = report.chunks_checked,
        bad = report.bad_chunks,
        missing = report.missing_chunks,
        damaged = report.damaged.len(),
        healed = report.healed_snapshots,
        dry_run,
        "verify done"
    );
    let _ = tx.send(Ok(report)).await;
    Ok(())
}

/// Sends progress now and then; `false` once the caller is gone.
struct Ticker<'a> {
    tx: &'a Progress,
    last: Instant,
}

impl Ticker<'_> {
    fn tick(&mut self, p: &VerifyProgress) -> bool {
        if self.last.elapsed() < PROGRESS_EVERY {
            return true;
        }
        self.last = Instant::now();
        self.tx.blocking_send(Ok(p.clone())).is_ok()
    }
}

/// Steps 1 and 2; `None` when the caller went away.
fn scan<S: ChunkSource>(
    ctx: &NodeContext,
    source: &S,
    max_plain_len: u32,
    started_ms: i64,
    tx: &Progress,
) -> Result<Option<Found>, NodeError> {
    let store = &ctx.store;
    let mut ticker = Ticker {
        tx,
        last: Instant::now()
            .checked_sub(PROGRESS_EVERY)
            .unwrap_or_else(Instant::now),
    };
    let mut p = VerifyProgress {
        chunks_total: store.counters().chunks,
        ..Default::default()
    };
    let mut bad = Vec::new();
    let mut after: Option<ChunkId> = None;
    loop {
        let page = store.ids_after(after.as_ref(), SCAN_PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some(*last);
        for (id, read) in page
            .iter()
            .zip(store.get(&page, max_plain_len, Check::Full)?)
        {
            if matches!(read, ChunkRead::Damaged) {
                p.bad_chunks += 1;
                if bad.len() < MISSING_EXAMPLES {
                    bad.push(*id);
                }
            }
        }
        p.chunks_checked += page.len() as u64;
        if !ticker.tick(&p) {
            return Ok(None);
        }
    }

    let snapshots: Vec<(
        SnapshotId,
        ObjectRef,
        String,
        String,
        Option<SnapshotDamage>,
    )> = {
        let catalog = ctx.catalog.read().unwrap_or_else(|p| p.into_inner());
        catalog
            .snapshots
            .values()
            .map(|s| {
                (
                    s.id,
                    s.root.clone(),
                    s.client.clone(),
                    s.dataset.clone(),
                    s.damage.clone(),
                )
            })
            .collect()
    };
    p.snapshots_total = snapshots.len() as u64;
    let mut whole = WholeSet::default();
    let mut missing = Missing::default();
    let mut findings = Vec::with_capacity(snapshots.len());
    for (id, root, client, dataset, was) in snapshots {
        let mut walker = Walker::new(source, Some(&mut whole));
        let now = match walker.walk(&root, None) {
            Ok(()) if walker.missing.count == 0 => None,
            Ok(()) => Some(SnapshotDamage {
                missing_chunks: walker.missing.count,
                examples: walker
                    .missing
                    .examples
                    .iter()
                    .take(SnapshotDamage::MAX_EXAMPLES)
                    .copied()
                    .collect(),
                found_unix_ms: started_ms,
            }),
            // A manifest that does not decode restores nothing past the bad object.
            Err(NodeError::Manifest(e)) => {
                tracing::warn!(snapshot = %id, error = %e, "snapshot manifest is invalid");
                Some(SnapshotDamage {
                    missing_chunks: walker.missing.count.max(1),
                    examples: walker
                        .missing
                        .examples
                        .iter()
                        .take(SnapshotDamage::MAX_EXAMPLES)
                        .copied()
                        .collect(),
                    found_unix_ms: started_ms,
                })
            }
            Err(e) => return Err(e),
        };
        for m in walker.missing.ids() {
            missing.add(*m);
        }
        if now.is_some() {
            tracing::warn!(
                snapshot = %id,
                missing = now.as_ref().map_or(0, |d| d.missing_chunks),
                "snapshot references chunks with no good copy"
            );
        }
        findings.push(Finding {
            id,
            client,
            dataset,
            was,
            now,
        });
        p.snapshots_checked += 1;
        p.missing_chunks = missing.count;
        if !ticker.tick(&p) {
            return Ok(None);
        }
    }
    Ok(Some(Found {
        progress: p,
        bad,
        missing,
        findings,
    }))
}

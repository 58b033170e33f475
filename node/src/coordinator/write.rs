//! Writes (`Put`): a batch is verified once, here, then stored on the current owners of each
//! chunk and acknowledged when W of them have it durably. The agent's bytes cross the WAN
//! once; the coordinator forwards them to the owners. The owners beyond the first W still get
//! their copy (the quorum helper lets their calls finish in the background).

use std::sync::Arc;

use futures::future::join_all;
use hashgrid_proto::pb::{PutRequest, PutResponse};

use super::{group_by_owners, Route};
use crate::chunk_store::{PutOutcome, VerifiedChunk};
use crate::error::NodeError;
use crate::owner;
use crate::quorum::{call_owners, QuorumError, Wait};
use crate::service::blocking;

/// Verifies and stores one `Put` batch; answers once every chunk is durable on W owners.
pub async fn write(route: &Route, req: PutRequest) -> Result<PutResponse, NodeError> {
    owner::check_put_count(req.chunks.len())?;
    let outcome = if route.is_local_only() {
        // One blocking call verifies and stores, as before there was a cluster.
        owner::verify_and_store(route.ctx(), req.chunks).await?
    } else {
        let max_len = route.ctx().chunker()?.max_size;
        let chunks = req.chunks;
        let verified = blocking(move || owner::verify_batch(chunks, max_len)).await?;
        replicate(route, verified).await?
    };
    Ok(PutResponse {
        stored: outcome.stored,
        existing: outcome.existing,
        stored_bytes: outcome.stored_bytes,
    })
}

/// How many newer maps one write follows before it gives up (each is a map change that
/// landed while the write was under way).
const MAP_FOLLOWS: usize = 3;

/// Stores verified chunks on their current owners, W of each durably before returning.
/// When owners refuse the write because they already know a newer map (this node has not
/// applied it yet), waits until this node has it and writes again by it, so a map change
/// does not fail the agent's upload.
async fn replicate(route: &Route, chunks: Vec<VerifiedChunk>) -> Result<PutOutcome, NodeError> {
    let mut route = route.clone();
    let mut follows = 0;
    loop {
        match replicate_once(&route, &chunks).await {
            Err(NodeError::StaleEpoch { current, .. }) if follows < MAP_FOLLOWS => {
                follows += 1;
                let ctx = route.ctx().clone();
                ctx.wait_for_epoch(current).await?;
                tracing::debug!(epoch = current, "owners know a newer map; writing by it");
                route = Route::new(&ctx)?;
            }
            other => return other,
        }
    }
}

/// One attempt of [`replicate`] under one map. The outcome counts each chunk once (as the
/// owner that stored most of the group saw it).
async fn replicate_once(route: &Route, chunks: &[VerifiedChunk]) -> Result<PutOutcome, NodeError> {
    let w = route.write_quorum();
    let groups = group_by_owners(route, chunks.iter().map(|c| c.id), |p| {
        route.placement.current().owners(p).to_vec()
    });
    let timeout = route.ctx().peers.timeout();
    let calls = groups.into_iter().map(|(owners, idx)| {
        let batch = Arc::new(idx.iter().map(|&i| chunks[i].clone()).collect::<Vec<_>>());
        async move {
            let answers = call_owners("write", &owners, w, Wait::Quorum, timeout, |node| {
                let route = route.clone();
                let batch = batch.clone();
                async move { route.owner_put(node, batch).await }
            })
            .await
            .map_err(newer_map_or)?;
            for (node, e) in &answers.failed {
                tracing::warn!(%node, error = %e, "an owner missed a write (it stays under-replicated until repaired)");
            }
            let most = answers
                .ok
                .iter()
                .map(|(_, o)| *o)
                .max_by_key(|o| (o.stored, o.stored_bytes))
                .unwrap_or_default();
            Ok::<_, NodeError>(most)
        }
    });
    let mut total = PutOutcome::default();
    for outcome in join_all(calls).await {
        let o = outcome?;
        total.stored += o.stored;
        total.existing += o.existing;
        total.stored_bytes += o.stored_bytes;
    }
    Ok(total)
}

/// A quorum missed because owners know a newer map is a stale epoch (the newest they
/// named), so [`replicate`] can follow it; any other miss is what it is.
fn newer_map_or(e: QuorumError) -> NodeError {
    if let QuorumError::NotReached { failed, .. } = &e {
        let newest = failed
            .iter()
            .filter_map(|(_, f)| match f {
                NodeError::StaleEpoch { sent, current } => Some((*sent, *current)),
                _ => None,
            })
            .max_by_key(|(_, current)| *current);
        if let Some((sent, current)) = newest {
            return NodeError::StaleEpoch { sent, current };
        }
    }
    e.into()
}

//! Reads (`Get`): one reply per id, in order, each chunk from the first owner that serves a
//! verified copy. Ids are read in groups; in each round every unserved id is asked of its
//! next owner (this node first when it owns the chunk, then the current owners, then older
//! ones, then the partition's fallbacks), all owners of a round at once through the quorum
//! helper. A copy that is missing or damaged on one owner is read from the next; only when
//! no owner serves it does the reply carry a fault (damaged when some owner had a copy that
//! failed verification). A damaged copy is rewritten from the good one in the background.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use hashgrid_proto::pb::{self, GetResponse};
use hashgrid_proto::{ChunkId, NodeId};
use tokio::sync::mpsc;
use tonic::Status;

use super::lookup::REPAIR_GROUP;
use super::Route;
use crate::error::NodeError;
use crate::owner::{self, ReplyBatcher};
use crate::quorum::{call_owners, Wait};
use crate::service::blocking;

/// Ids per read group: big enough that one round trip carries a few MiB.
const READ_GROUP: usize = 128;
/// Groups being read at once (the stream keeps the reply order).
const GROUPS_IN_FLIGHT: usize = 3;

/// Streams one reply per id of `ids` into `tx`.
pub async fn read(route: Route, ids: Vec<ChunkId>, tx: mpsc::Sender<Result<GetResponse, Status>>) {
    if route.is_local_only() {
        return owner::stream_local(route.ctx().clone(), ids, tx).await;
    }
    let mut batcher = ReplyBatcher::new(tx);
    let groups: Vec<Vec<ChunkId>> = ids.chunks(READ_GROUP).map(<[ChunkId]>::to_vec).collect();
    let mut replies = futures::stream::iter(groups)
        .map(|group| {
            let route = route.clone();
            async move { read_group(&route, group).await }
        })
        .buffered(GROUPS_IN_FLIGHT);
    while let Some(group) = replies.next().await {
        for c in group {
            if !batcher.push(c).await {
                return;
            }
        }
    }
    batcher.finish().await;
}

/// Reads one group, failing over between owners; one reply per id.
async fn read_group(route: &Route, ids: Vec<ChunkId>) -> Vec<pb::Chunk> {
    let current = route.placement.current();
    // Owners first; the fallbacks last, for copies written there while owners were down.
    let candidates: Vec<Vec<NodeId>> = ids
        .iter()
        .map(|id| {
            let p = current.partition_of(id);
            let mut nodes = route.read_owners(p);
            for f in route.fallbacks(p) {
                if !nodes.contains(&f) {
                    nodes.push(f);
                }
            }
            nodes
        })
        .collect();
    let mut replies: Vec<Option<pb::Chunk>> = vec![None; ids.len()];
    let mut damaged_on: Vec<Vec<NodeId>> = vec![Vec::new(); ids.len()];
    let rounds = candidates.iter().map(Vec::len).max().unwrap_or(0);
    let timeout = route.ctx().peers.timeout();
    for round in 0..rounds {
        let mut asked: HashMap<NodeId, Vec<usize>> = HashMap::new();
        for (j, owners) in candidates.iter().enumerate() {
            if replies[j].is_none() {
                if let Some(&node) = owners.get(round) {
                    asked.entry(node).or_default().push(j);
                }
            }
        }
        if asked.is_empty() {
            break;
        }
        let nodes: Vec<NodeId> = asked.keys().copied().collect();
        let answers = call_owners("read", &nodes, 0, Wait::All, timeout, |node| {
            let route = route.clone();
            let wanted = asked[&node].iter().map(|&j| ids[j]).collect();
            async move { route.owner_get(node, wanted).await }
        })
        .await;
        let Ok(answers) = answers else { continue };
        for (node, e) in &answers.failed {
            tracing::warn!(%node, error = %e, "reading from an owner failed; trying the next");
        }
        for (node, chunks) in answers.ok {
            for (&j, c) in asked[&node].iter().zip(chunks) {
                match pb::ChunkFault::try_from(c.fault) {
                    Ok(pb::ChunkFault::None) => replies[j] = Some(c),
                    Ok(pb::ChunkFault::Damaged) => damaged_on[j].push(node),
                    _ => {}
                }
            }
        }
    }
    heal_damaged(route, &replies, &damaged_on);
    ids.iter()
        .zip(replies)
        .zip(damaged_on)
        .map(|((id, reply), damaged)| {
            reply.unwrap_or_else(|| {
                let fault = if damaged.is_empty() {
                    pb::ChunkFault::Missing
                } else {
                    pb::ChunkFault::Damaged
                };
                pb::Chunk {
                    id: id.as_bytes().to_vec(),
                    fault: fault as i32,
                    ..Default::default()
                }
            })
        })
        .collect()
}

/// Rewrites, in the background, the copies found damaged on owners, from the good copies
/// this read found (the damaged copy already left the owner's index, so it stores afresh).
fn heal_damaged(route: &Route, replies: &[Option<pb::Chunk>], damaged_on: &[Vec<NodeId>]) {
    let mut by_node: HashMap<NodeId, Vec<pb::Chunk>> = HashMap::new();
    for (reply, nodes) in replies.iter().zip(damaged_on) {
        if let Some(c) = reply {
            for &n in nodes {
                by_node.entry(n).or_default().push(c.clone());
            }
        }
    }
    if by_node.is_empty() {
        return;
    }
    let route = route.clone();
    tokio::spawn(async move {
        let Ok(max_len) = route.ctx().chunker().map(|c| c.max_size) else {
            return;
        };
        let batches = by_node.into_iter().flat_map(|(node, chunks)| {
            chunks
                .chunks(REPAIR_GROUP)
                .map(|c| (node, c.to_vec()))
                .collect::<Vec<_>>()
        });
        for (node, chunks) in batches {
            let healed = async {
                let verified = blocking(move || owner::verify_batch(chunks, max_len)).await?;
                let n = verified.len();
                route.owner_put(node, Arc::new(verified)).await?;
                Ok::<_, NodeError>(n)
            };
            match healed.await {
                Ok(n) => {
                    tracing::info!(%node, chunks = n, "rewrote damaged copies from a good replica")
                }
                Err(e) => tracing::warn!(%node, error = %e, "rewriting damaged copies failed"),
            }
        }
    });
}

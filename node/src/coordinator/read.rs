//! Reads (`Get`): one reply per id, in order, each chunk from the first owner that serves a
//! verified copy. Ids are read in groups; each id is asked of its candidates in turn (this
//! node first when it owns the chunk, then the current owners, then older ones, then the
//! partition's fallbacks), the calls of a group grouped by node and under way at once. A
//! copy that is missing or damaged on one owner is read from the next, and an owner slow to
//! answer has the next asked beside it; only when no owner serves a chunk does the reply
//! carry a fault (damaged when some owner had a copy that failed verification). A damaged
//! copy is rewritten from the good one in the background.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hashgrid_proto::pb::{self, GetResponse};
use hashgrid_proto::{ChunkId, NodeId};
use tokio::sync::mpsc;
use tonic::Status;

use super::lookup::REPAIR_GROUP;
use super::{hedge_due, sleep_until_or_never, take_late, Route, Unhedged};
use crate::chunk_store::Check;
use crate::error::NodeError;
use crate::metrics as m;
use crate::owner::{self, Outbound, ReplyBatcher};
use crate::quorum::within;
use crate::service::blocking;

/// Ids per read group: big enough that one round trip carries a few MiB.
const READ_GROUP: usize = 128;
/// Groups being read at once (the stream keeps the reply order).
const GROUPS_IN_FLIGHT: usize = 3;

/// Streams one reply per id of `ids` into `tx`, each copy checked by its owner as `check`
/// says.
pub async fn read(
    route: Route,
    ids: Vec<ChunkId>,
    check: Check,
    tx: mpsc::Sender<Result<GetResponse, Status>>,
) {
    if route.is_local_only() {
        return owner::stream_local(route.ctx().clone(), ids, check, tx).await;
    }
    let mut batcher = ReplyBatcher::new(tx);
    let groups: Vec<Vec<ChunkId>> = ids.chunks(READ_GROUP).map(<[ChunkId]>::to_vec).collect();
    let mut replies = futures::stream::iter(groups)
        .map(|group| {
            let route = route.clone();
            async move { read_group(&route, group, check).await }
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
///
/// Each id is asked of its first candidate (the calls grouped by node, each in a task of
/// its own); an id a node did not serve (missing, damaged, or the call failed) is asked of
/// its next candidate as soon as no call for it is left. A call without an answer after
/// [`crate::peer::PeerPool::hedge_after`] has its ids asked of their next candidates beside
/// it, so an owner that stopped answering without closing its connections (SIGSTOP, a
/// silent partition) costs a read that long, not a whole peer deadline; the slow call runs
/// on in its task to its deadline, so the peer pool learns whether the owner is hung.
async fn read_group(route: &Route, ids: Vec<ChunkId>, check: Check) -> Vec<pb::Chunk> {
    let current = route.placement.current();
    let health = route.health();
    // Owners first; the fallbacks after them, for copies written there while owners were
    // down; and after all of them the members known to hang (suspect or lagging). Why
    // after the fallbacks too: a fallback that lacks the chunk says so at once, a hung
    // owner costs a hedge. A commit check whose reads met a partition with two owners dead
    // and the third stopped asked the stopped one before the fallbacks in each read, a
    // hedge each, one after the other (4 – 6 s where one hedge, 2 s, was due).
    let candidates: Vec<Vec<NodeId>> = ids
        .iter()
        .map(|id| {
            let p = current.partition_of(id);
            let mut nodes = route.read_owners(p, &health);
            for f in route.fallbacks(p, &health) {
                if !nodes.contains(&f) {
                    nodes.push(f);
                }
            }
            health.hanging_last(&mut nodes);
            nodes
        })
        .collect();
    let mut state = ReadState {
        ids: &ids,
        candidates: &candidates,
        replies: vec![None; ids.len()],
        damaged_on: vec![Vec::new(); ids.len()],
        next: vec![0; ids.len()],
        waits_on: vec![0; ids.len()],
        slow_waits: vec![0; ids.len()],
        inflight: FuturesUnordered::new(),
        unhedged: HashMap::new(),
        calls: 0,
        check,
    };
    let hedge = route.ctx().peers.hedge_after();
    state.ask_next(route, 0..ids.len());
    while !state.inflight.is_empty() {
        // The oldest call not hedged yet decides when the next hedge is due.
        let due = hedge_due(&state.unhedged, hedge);
        tokio::select! {
            Some(answer) = state.inflight.next() => {
                let retry = state.count(answer);
                state.ask_next(route, retry);
            }
            () = sleep_until_or_never(due) => {
                for (_, js) in take_late(&mut state.unhedged, hedge) {
                    for &j in &js {
                        state.slow_waits[j] += 1;
                    }
                    let unserved: Vec<usize> =
                        js.into_iter().filter(|&j| state.replies[j].is_none()).collect();
                    if state.ask_next(route, unserved) > 0 {
                        tracing::debug!(?hedge, "read: an owner is slow, asking the next beside it");
                        metrics::counter!(m::HEDGED_CALLS, "call" => "read").increment(1);
                    }
                }
            }
        }
        if state.replies.iter().all(Option::is_some) {
            // Calls still under way (a slow owner's) run on in their tasks.
            break;
        }
    }
    let ReadState {
        replies,
        damaged_on,
        ..
    } = state;
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

/// One owner's answer to a read of the ids at `js` of a group.
struct ReadAnswer {
    call: u64,
    node: NodeId,
    js: Vec<usize>,
    chunks: Result<Vec<pb::Chunk>, NodeError>,
}

/// Where the read of one group stands.
struct ReadState<'a> {
    ids: &'a [ChunkId],
    /// Per id, the nodes that may serve it, in the order they are asked.
    candidates: &'a [Vec<NodeId>],
    replies: Vec<Option<pb::Chunk>>,
    /// Per id, the nodes whose copy failed verification.
    damaged_on: Vec<Vec<NodeId>>,
    /// Per id, the index of the next candidate to ask.
    next: Vec<usize>,
    /// Per id, the calls under way that include it, and how many of those are past the
    /// hedge (their ids already asked of a next candidate).
    waits_on: Vec<usize>,
    slow_waits: Vec<usize>,
    /// The calls under way. Each runs in a task of its own: dropping its handle here (the
    /// group is read) leaves it running to its deadline.
    inflight: FuturesUnordered<BoxFuture<'static, ReadAnswer>>,
    /// Calls under way whose ids were not yet asked of anyone else: when each started, and
    /// its ids.
    unhedged: Unhedged,
    calls: u64,
    /// How owners check the copies they serve.
    check: Check,
}

impl ReadState<'_> {
    /// Asks the next candidate of each id in `js` that has one, one call per node; returns
    /// how many calls it made.
    fn ask_next(&mut self, route: &Route, js: impl IntoIterator<Item = usize>) -> usize {
        let mut by_node: HashMap<NodeId, Vec<usize>> = HashMap::new();
        for j in js {
            if let Some(&node) = self.candidates[j].get(self.next[j]) {
                self.next[j] += 1;
                self.waits_on[j] += 1;
                by_node.entry(node).or_default().push(j);
            }
        }
        let timeout = route.ctx().peers.timeout();
        let made = by_node.len();
        for (node, js) in by_node {
            let call = self.calls;
            self.calls += 1;
            self.unhedged.insert(call, (Instant::now(), js.clone()));
            let route = route.clone();
            let wanted: Vec<ChunkId> = js.iter().map(|&j| self.ids[j]).collect();
            let check = self.check;
            let task =
                tokio::spawn(
                    async move { within(timeout, route.owner_get(node, wanted, check)).await },
                );
            self.inflight.push(Box::pin(async move {
                let chunks = task
                    .await
                    .unwrap_or_else(|e| Err(NodeError::Internal(format!("read call task: {e}"))));
                ReadAnswer {
                    call,
                    node,
                    js,
                    chunks,
                }
            }));
        }
        made
    }

    /// Takes in one call's answer; returns the ids it did not serve that no other call is
    /// reading but slow ones, past the hedge (to be asked of their next candidates). Why
    /// not wait for the slow ones: the candidate asked beside a slow owner may fail at once
    /// (a dead owner), and the read would then wait out the slow owner's deadline with
    /// candidates left (the commit check read a snapshot's objects for 8 s that way, with
    /// two of their owners dead and the third stopped).
    fn count(&mut self, answer: ReadAnswer) -> Vec<usize> {
        let slow = self.unhedged.remove(&answer.call).is_none();
        for &j in &answer.js {
            self.waits_on[j] -= 1;
            if slow {
                self.slow_waits[j] -= 1;
            }
        }
        match answer.chunks {
            Ok(chunks) => {
                for (&j, c) in answer.js.iter().zip(chunks) {
                    if self.replies[j].is_some() {
                        continue;
                    }
                    match pb::ChunkFault::try_from(c.fault) {
                        Ok(pb::ChunkFault::None) => self.replies[j] = Some(c),
                        Ok(pb::ChunkFault::Damaged) => self.damaged_on[j].push(answer.node),
                        _ => {}
                    }
                }
            }
            Err(e) => {
                tracing::warn!(node = answer.node, error = %e, "reading from an owner failed; trying the next");
            }
        }
        answer
            .js
            .into_iter()
            .filter(|&j| self.replies[j].is_none() && self.waits_on[j] == self.slow_waits[j])
            .collect()
    }
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
                // Each copy on its own (see owner::verify_copy).
                let verified: Vec<_> = blocking(move || {
                    Ok(chunks
                        .into_iter()
                        .filter_map(|c| owner::verify_copy(c, max_len, None))
                        .collect())
                })
                .await?;
                let n = verified.len();
                if n == 0 {
                    return Ok(0);
                }
                route
                    .owner_put(
                        node,
                        Arc::new(verified.into_iter().map(Outbound::from).collect()),
                    )
                    .await?;
                Ok::<_, NodeError>(n)
            };
            match healed.await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(%node, chunks = n, "rewrote damaged copies from a good replica")
                }
                Err(e) => tracing::warn!(%node, error = %e, "rewriting damaged copies failed"),
            }
        }
    });
}

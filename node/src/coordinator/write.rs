//! Writes (`Put`): a batch is checked here, then stored on the current owners of each chunk
//! and acknowledged when W of them have it durably. Every owner verifies the chunks it
//! stores (design §4), this node among them for its own share; the chunks this node only
//! forwards are checked for form here and verified by their owners, whose refusal of a
//! bad chunk fails the write as `INVALID_ARGUMENT` ([`NodeError::Invalid`]), never as an
//! owner down (no fallback is asked, the agent does not retry). The agent's bytes cross the WAN
//! once; the coordinator forwards them to the owners, one call per owner for the whole batch
//! (each chunk's quorum still counted per owner set). The owners beyond the first W still get
//! their copy (each owner call runs to its end in a task of its own).
//!
//! When fewer than W owners can take a copy (they are down, cut off, or their disks are
//! full), the missing copies go to the partition's fallbacks, the members that follow the
//! owners on the ring (a sloppy quorum with hinted hand-off, as in Dynamo): a backup in a
//! majority partition, or with two of five nodes down, goes on instead of failing for the
//! ~3 in 10 chunks placed mostly on the unreachable side. A fallback keeps its copy in its
//! ordinary store, where it counts toward W for lookups and reads, until its hand-off pass
//! ([`crate::anti_entropy::hand_off`]) has written the chunk to every owner.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{join_all, BoxFuture, Shared};
use futures::FutureExt;
use hashgrid_proto::pb::{PutRequest, PutResponse};
use hashgrid_proto::{ChunkId, NodeId};

use super::{group_by_owners, Route};
use crate::chunk_store::PutOutcome;
use crate::error::NodeError;
use crate::metrics as m;
use crate::owner::{self, Outbound};
use crate::quorum::{call_hedged, call_owners, describe, within, QuorumError, Wait};
use crate::service::blocking;

/// Checks and stores one `Put` batch; answers once every chunk is durable on W owners.
pub async fn write(route: &Route, req: PutRequest) -> Result<PutResponse, NodeError> {
    owner::check_put_count(req.chunks.len())?;
    let outcome = if route.is_local_only() {
        // One blocking call verifies and stores, as before there was a cluster.
        owner::verify_and_store(route.ctx(), req.chunks).await?.0
    } else {
        let max_len = route.ctx().chunker()?.max_size;
        let chunks = req.chunks;
        let placement = route.placement.clone();
        let me = route.ctx().node_id;
        let stored_here = move |id: &ChunkId| placement.current().owners_of(id).contains(&me);
        let outbound = blocking(move || owner::prepare_batch(chunks, max_len, stored_here)).await?;
        replicate(route, outbound).await?
    };
    Ok(PutResponse {
        stored: outcome.stored,
        existing: outcome.existing,
        stored_bytes: outcome.stored_bytes,
        stored_map: Vec::new(),
    })
}

/// How many newer maps one write follows before it gives up (each is a map change that
/// landed while the write was under way).
const MAP_FOLLOWS: usize = 3;

/// Stores verified chunks on their current owners, W of each durably before returning.
/// When owners refuse the write because they already know a newer map (this node has not
/// applied it yet), waits until this node has it and writes again by it, so a map change
/// does not fail the agent's upload.
async fn replicate(route: &Route, chunks: Vec<Outbound>) -> Result<PutOutcome, NodeError> {
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
///
/// Chunks are grouped by owner set: each group reaches its quorum (or turns to fallbacks)
/// on its own. The groups' calls to the same owner are one call, though ([`OwnerPuts`]):
/// a batch of ~64 chunks spans dozens of owner sets (R = 3 over three nodes already has
/// six orders of them), and one call per group and owner was dozens of calls and stores
/// per node per batch.
async fn replicate_once(route: &Route, chunks: &[Outbound]) -> Result<PutOutcome, NodeError> {
    let w = route.write_quorum();
    let groups = group_by_owners(route, chunks.iter().map(Outbound::id), |p| {
        route.placement.current().owners(p).to_vec()
    });
    let timeout = route.ctx().peers.timeout();
    let hedge = route.ctx().peers.hedge_after();
    let health = route.health();
    let plans: Vec<GroupPlan> = groups
        .into_iter()
        .map(|(owners, idx)| {
            let batch = Arc::new(idx.iter().map(|&i| chunks[i].clone()).collect::<Vec<_>>());
            let hung: Vec<NodeId> = owners
                .iter()
                .copied()
                .filter(|&n| health.is_slow(n))
                .collect();
            let fallback = has_fallback(route, &batch);
            let around = owners.len() - hung.len() < w && fallback;
            GroupPlan {
                owners,
                batch,
                hung,
                fallback,
                around,
            }
        })
        .collect();
    let puts = OwnerPuts::start(route, &plans, timeout);
    let calls = plans.iter().enumerate().map(|(g, plan)| {
        let puts = &puts;
        async move {
            if plan.around {
                return write_around(route, &plan.owners, &plan.hung, plan.batch.clone(), w)
                    .await;
            }
            // With fallbacks to turn to, an owner that has not answered after the hedge
            // does not hold the group up: its copy goes to a fallback beside it.
            let wait = if plan.fallback {
                Wait::QuorumWithin(hedge)
            } else {
                Wait::Quorum
            };
            let put = call_owners("write", &plan.owners, w, wait, timeout, |node| {
                puts.outcome(g, node, plan.batch.clone())
            })
            .await;
            let answers = match put {
                Ok(answers) => answers,
                Err(e) => match fallback_need(route, &plan.batch, &e, w) {
                    Some(need) => return stand_in(route, &plan.batch, need, &e).await,
                    None => return Err(newer_map_or(e)),
                },
            };
            for (node, e) in &answers.failed {
                tracing::warn!(%node, error = %e, "an owner missed a write (it stays under-replicated until repaired)");
            }
            Ok::<_, NodeError>(most_stored(answers.ok.iter().map(|(_, o)| *o)))
        }
    });
    sum(join_all(calls).await)
}

/// How one group of a write goes: to its owners, or around the hung ones.
struct GroupPlan {
    owners: Vec<NodeId>,
    batch: Arc<Vec<Outbound>>,
    /// Owners that hang or are down ([`Route::is_slow`]).
    hung: Vec<NodeId>,
    /// Whether some chunk of the group has a fallback.
    fallback: bool,
    /// Too few owners that answer to make W, and fallbacks to turn to: [`write_around`].
    around: bool,
}

/// A call's result, shared by the groups it carries (errors are not `Clone`).
type SharedPut = Shared<BoxFuture<'static, Result<Arc<Vec<bool>>, Arc<NodeError>>>>;

/// One owner call per node for the groups of a write that go to their owners, each in a
/// task of its own (so an owner beyond the quorum still gets its copy when the write has
/// answered), and where each group's chunks sit in it.
struct OwnerPuts {
    calls: HashMap<NodeId, SharedPut>,
    at: HashMap<(usize, NodeId), Range<usize>>,
}

impl OwnerPuts {
    fn start(route: &Route, plans: &[GroupPlan], timeout: Duration) -> OwnerPuts {
        let mut payloads: HashMap<NodeId, Vec<Outbound>> = HashMap::new();
        let mut at = HashMap::new();
        for (g, plan) in plans.iter().enumerate().filter(|(_, p)| !p.around) {
            for &node in &plan.owners {
                let payload = payloads.entry(node).or_default();
                let start = payload.len();
                payload.extend(plan.batch.iter().cloned());
                at.insert((g, node), start..payload.len());
            }
        }
        let calls = payloads
            .into_iter()
            .map(|(node, chunks)| {
                let route = route.clone();
                let task = tokio::spawn(async move {
                    within(timeout, route.owner_put_each(node, Arc::new(chunks)))
                        .await
                        .map(|(_, new)| Arc::new(new))
                        .map_err(Arc::new)
                });
                let shared = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(Arc::new(NodeError::Internal(format!(
                            "write call task: {e}"
                        ))))
                    })
                }
                .boxed()
                .shared();
                (node, shared)
            })
            .collect();
        OwnerPuts { calls, at }
    }

    /// What `node` did with group `g`'s chunks (`batch`), once its call has answered.
    fn outcome(
        &self,
        g: usize,
        node: NodeId,
        batch: Arc<Vec<Outbound>>,
    ) -> impl Future<Output = Result<PutOutcome, NodeError>> + 'static {
        let call = self.calls.get(&node).cloned();
        let range = self.at.get(&(g, node)).cloned();
        async move {
            let (Some(call), Some(range)) = (call, range) else {
                return Err(NodeError::Internal(format!(
                    "write: no call to owner {node} for group {g}"
                )));
            };
            let new = call.await.map_err(|e| shared_error(&e))?;
            let mut outcome = PutOutcome::default();
            for (chunk, &stored) in batch.iter().zip(&new[range]) {
                if stored {
                    outcome.stored += 1;
                    outcome.stored_bytes += chunk.encoded_len() as u64;
                } else {
                    outcome.existing += 1;
                }
            }
            Ok(outcome)
        }
    }
}

/// One group's copy of a shared call's error: a stale epoch stays one (the write follows
/// the newer map), a refusal of the chunks stays one (the write fails), anything else is
/// the owner unavailable, as a failed owner call is.
fn shared_error(e: &NodeError) -> NodeError {
    match e {
        NodeError::StaleEpoch { sent, current } => NodeError::StaleEpoch {
            sent: *sent,
            current: *current,
        },
        other if other.is_invalid() => NodeError::Invalid(other.to_string()),
        other => NodeError::Unavailable(other.to_string()),
    }
}

/// The outcomes of a request's groups added up, or the first group's failure.
fn sum(groups: Vec<Result<PutOutcome, NodeError>>) -> Result<PutOutcome, NodeError> {
    let mut total = PutOutcome::default();
    for outcome in groups {
        let o = outcome?;
        total.stored += o.stored;
        total.existing += o.existing;
        total.stored_bytes += o.stored_bytes;
    }
    Ok(total)
}

/// The outcome of the copy that stored most of a group (each chunk counted once).
fn most_stored(outcomes: impl Iterator<Item = PutOutcome>) -> PutOutcome {
    outcomes
        .max_by_key(|o| (o.stored, o.stored_bytes))
        .unwrap_or_default()
}

/// Whether some chunk of `batch` has a fallback (not every member is an owner).
fn has_fallback(route: &Route, batch: &[Outbound]) -> bool {
    let current = route.placement.current();
    batch
        .iter()
        .any(|c| !current.fallbacks(current.partition_of(&c.id())).is_empty())
}

/// Writes a group whose owners include hung ones (suspect: their last call ran out of time,
/// see [`crate::peer::PeerPool::is_suspect`]; lagging: a call to them has gone unanswered
/// past the hedge, see [`crate::peer::PeerPool::is_lagging`]; or down: their last call lost
/// its connection, see [`crate::peer::PeerPool::is_down`]) and too few others to make W.
/// A lagging owner may only be slow (a long fsync): then the fallbacks' copies are extra,
/// handed back by their hand-off pass, a cost paid only while an owner is that slow. The hung owners
/// get their copy in the background, under their deadline; the others are written and the
/// fallbacks take the copies they cannot, without first waiting out the hung owners'
/// deadlines (which would cost every write group behind a silent partition that long).
async fn write_around(
    route: &Route,
    owners: &[NodeId],
    hung: &[NodeId],
    batch: Arc<Vec<Outbound>>,
    w: usize,
) -> Result<PutOutcome, NodeError> {
    for &node in hung {
        let route = route.clone();
        let batch = batch.clone();
        tokio::spawn(async move {
            if let Err(e) = route.owner_put(node, batch).await {
                tracing::debug!(%node, error = %e, "a hung owner missed a write");
            }
        });
    }
    let live: Vec<NodeId> = owners
        .iter()
        .copied()
        .filter(|n| !hung.contains(n))
        .collect();
    let timeout = route.ctx().peers.timeout();
    // An owner that seems live may hang too, before the pool knows it (no call to it yet
    // past the hedge): waited for at most a hedge, as a write to its owners waits, so its
    // copy goes to a fallback rather than the write waiting out its deadline (a backup
    // with two owners of a partition dead and the third just stopped: 10 s instead of 2).
    let hedge = route.ctx().peers.hedge_after();
    let answers = call_owners("write", &live, 0, Wait::AllWithin(hedge), timeout, |node| {
        let route = route.clone();
        let batch = batch.clone();
        async move { route.owner_put(node, batch).await }
    })
    .await?;
    let mut failed = answers.failed;
    failed.extend(hung.iter().map(|&n| {
        (
            n,
            NodeError::Unavailable(
                "slow or down: its last call ran out of time or lost its connection, or one is \
                 unanswered past the hedge"
                    .into(),
            ),
        )
    }));
    let cause = QuorumError::NotReached {
        what: "write",
        owners: owners.len(),
        needed: w,
        answered: answers.ok.len(),
        failed,
    };
    match fallback_need(route, &batch, &cause, w) {
        Some(need) => stand_in(route, &batch, need, &cause).await,
        None => Err(newer_map_or(cause)),
    }
}

/// How many copies of `batch` the fallbacks must take after its owners missed the quorum
/// with `e`: `None` when they cannot help (owners know a newer map, which the write
/// follows instead; an owner refused a chunk as invalid, which a fallback would too; or
/// no chunk of the batch has a fallback: every member is an owner).
fn fallback_need(route: &Route, batch: &[Outbound], e: &QuorumError, w: usize) -> Option<usize> {
    let QuorumError::NotReached {
        answered, failed, ..
    } = e
    else {
        return None;
    };
    let settled = failed
        .iter()
        .any(|(_, f)| matches!(f, NodeError::StaleEpoch { .. }) || f.is_invalid());
    (!settled && has_fallback(route, batch)).then(|| w - answered)
}

/// Writes the `need` copies of `batch` that its owners could not take (their quorum failed
/// with `cause`) to the chunks' fallbacks, in ring order, until enough have stored them: a
/// fallback that fails, or is slow to answer, has the next one asked ([`call_hedged`]).
/// Fails `UNAVAILABLE` when the fallbacks run out first.
async fn stand_in(
    route: &Route,
    batch: &[Outbound],
    need: usize,
    cause: &QuorumError,
) -> Result<PutOutcome, NodeError> {
    let current = route.placement.current();
    let health = route.health();
    let groups = group_by_owners(route, batch.iter().map(Outbound::id), |p| {
        route.fallbacks(p, &health)
    });
    let timeout = route.ctx().peers.timeout();
    let hedge = route.ctx().peers.hedge_after();
    let calls = groups.into_iter().map(|(fallbacks, idx)| {
        let chunks = Arc::new(idx.iter().map(|&i| batch[i].clone()).collect::<Vec<_>>());
        async move {
            let answers = call_hedged(
                "write to a fallback",
                &fallbacks,
                need,
                timeout,
                hedge,
                |node| route.is_hanging(node),
                |node| {
                    let route = route.clone();
                    let chunks = chunks.clone();
                    async move { route.owner_put(node, chunks).await }
                },
            )
            .await;
            let missing = need - answers.ok.len().min(need);
            let refused = answers.failed;
            if let Some((_, invalid)) = refused.iter().find(|(_, e)| e.is_invalid()) {
                return Err(NodeError::Invalid(invalid.to_string()));
            }
            let outcomes = answers.ok.into_iter().map(|(_, o)| o);
            if missing > 0 {
                let why = if refused.is_empty() {
                    String::new()
                } else {
                    format!(": {}", describe(&refused))
                };
                return Err(NodeError::Unavailable(format!(
                    "{cause}; and the fallbacks could not take the {missing} missing cop(ies) \
                     of {} chunk(s){why}",
                    chunks.len(),
                )));
            }
            metrics::counter!(m::FALLBACK_COPIES).increment((chunks.len() * need) as u64);
            tracing::debug!(
                chunks = chunks.len(),
                copies = need,
                partition = current.partition_of(&chunks[0].id()).0,
                "owners unreachable: copies written to fallbacks"
            );
            Ok::<_, NodeError>(most_stored(outcomes))
        }
    });
    sum(join_all(calls).await)
}

/// A quorum missed because an owner refused a chunk is that refusal; one missed because
/// owners know a newer map is a stale epoch (the newest they named), so [`replicate`] can
/// follow it; any other miss is what it is.
fn newer_map_or(e: QuorumError) -> NodeError {
    if let QuorumError::NotReached { failed, .. } = &e {
        if let Some((_, invalid)) = failed.iter().find(|(_, f)| f.is_invalid()) {
            return NodeError::Invalid(invalid.to_string());
        }
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

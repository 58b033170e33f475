//! Lookups (`Has`): a chunk is present only when W owners hold a verified copy of it.
//!
//! The owners of the ids' partitions are asked (this node first, then the current owners,
//! then owners under older maps still in transition) in waves until each id is decided, and
//! the copies are counted. A chunk found on at least
//! one owner but on fewer than W is under-replicated: it is copied from a good copy to the
//! current owners that answered "absent" before the lookup answers, so the agent does not
//! send it again (its bytes would cross the WAN a second time). A lookup for which so many
//! owners of a partition failed that W copies could not be counted fails `UNAVAILABLE`, and
//! so does one whose id has fewer than W copies counted while the current owners that
//! failed could hold the rest: an unreachable owner is not an owner without the chunk.
//!
//! When owners failed, the partition's fallbacks are asked too: copies a write could not
//! place on unreachable owners went there ([`super::write`]), and they count toward W
//! until handed off. What stays undecided is answered by [`Presence`]: an agent's lookup
//! calls it absent (the agent sends the chunk and the write finds room for it), the commit
//! check fails `UNAVAILABLE` (it must not call a stored chunk missing).

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::join_all;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hashgrid_proto::{pb, ChunkId, NodeId};
use tokio::task::JoinHandle;

use super::{group_by_owners, Route};
use crate::chunk_store::VerifiedChunk;
use crate::error::NodeError;
use crate::metrics as m;
use crate::owner;
use crate::quorum::{call_owners, within, QuorumError, Wait};
use crate::service::blocking;

/// Under-replicated chunks copied per round of a repair on lookup: bounds the bytes held,
/// and keeps one owner call (at most 32 chunks of 256 KiB) under the message limit.
pub(super) const REPAIR_GROUP: usize = 32;

/// What a lookup answers for an id it cannot decide (fewer than W copies counted, and
/// owners that failed might hold the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// Absent: for an agent's `Has`. At worst the chunk is sent and stored again (it merges
    /// with the copies already there); failing would stop the backup.
    Upload,
    /// `UNAVAILABLE`: for the commit check, which must not refuse a snapshot for a chunk
    /// that is stored, nor accept one for a chunk that is not.
    Strict,
}

/// Which of `ids` are present (on W owners or their fallbacks, after repairing
/// under-replicated ones).
pub async fn lookup(
    route: &Route,
    ids: Vec<ChunkId>,
    presence: Presence,
) -> Result<Vec<bool>, NodeError> {
    if route.is_local_only() {
        return owner::has(route.ctx(), ids).await;
    }
    let w = route.write_quorum();
    let groups = group_by_owners(route, ids.iter().copied(), |p| route.read_owners(p));
    let ids = Arc::new(ids);
    let results = join_all(
        groups
            .into_iter()
            .map(|(owners, idx)| lookup_group(route, &ids, owners, idx, w, presence)),
    )
    .await;
    let mut present = vec![false; ids.len()];
    for group in results {
        for (i, p) in group? {
            present[i] = p;
        }
    }
    Ok(present)
}

/// Looks up the ids at `idx` (which share the owner set `owners`, this node first).
///
/// Owners are asked in waves: first W of them (the fewest that can prove presence), then one
/// more at a time, each time only for the ids still undecided: an id is decided once W
/// owners hold it, or once the owners not yet asked could no longer bring it to W. In the
/// common cases (a chunk on every owner, or on none) that costs W lookups per id, not R.
/// A wave is not waited out when an owner is slow: after [`crate::peer::PeerPool::hedge_after`]
/// without an answer every owner not yet asked and the fallbacks are asked beside it, and an
/// agent's lookup ([`Presence::Upload`]) answers once they have, without the owners that were
/// slow; so a hung owner that is not yet suspect costs an agent's lookup one hedge, not its
/// deadline, and once it is lagging ([`crate::peer::PeerPool::is_lagging`]) nothing.
async fn lookup_group(
    route: &Route,
    ids: &[ChunkId],
    owners: Vec<NodeId>,
    idx: Vec<usize>,
    w: usize,
    presence: Presence,
) -> Result<Vec<(usize, bool)>, NodeError> {
    if owners.len() < w {
        return Err(QuorumError::TooFewOwners {
            what: "lookup",
            owners: owners.len(),
            needed: w,
        }
        .into());
    }
    let group: Vec<ChunkId> = idx.iter().map(|&i| ids[i]).collect();
    let current = route.placement.current();
    let mut t = Tally::new(group.len());
    // Owners whose last call ran out of time, or that have a call unanswered past the
    // hedge, are not waited for while others can decide: they count as unknown from the
    // start (a silent partition would otherwise cost every lookup their deadline, and every
    // lookup started before the first call to a hung owner runs out a hedge). The commit
    // check asks them last, if it must.
    let (live, hung): (Vec<NodeId>, Vec<NodeId>) =
        owners.iter().partition(|&&n| !route.is_hanging(n));
    for (j, id) in group.iter().enumerate() {
        t.unknown[j] = current
            .owners_of(id)
            .iter()
            .filter(|n| hung.contains(n))
            .count();
    }
    let mut undecided: Vec<usize> = (0..group.len()).collect();
    let mut asked = 0;
    // Calls under way (and to whom), and how many of them each id waits on.
    let mut inflight = FuturesUnordered::new();
    let mut pending: Vec<NodeId> = Vec::new();
    let mut waits_on = vec![0usize; group.len()];
    let hedge = route.ctx().peers.hedge_after();
    // Fallbacks asked early (the ids asked about, the calls), see the hedge below.
    let mut early_fallbacks: Option<(Vec<usize>, Vec<JoinHandle<OwnerAnswer>>)> = None;
    // The owners whose calls were still under way when the hedge passed (`None`: it has
    // not).
    let mut slow: Option<Vec<NodeId>> = None;
    loop {
        if inflight.is_empty() {
            if undecided.is_empty() || asked >= live.len() {
                break;
            }
            let wave_len = if asked == 0 { w } else { 1 };
            let wave = &live[asked..(asked + wave_len).min(live.len())];
            asked += wave.len();
            for &node in wave {
                inflight.push(ask_owner(route, node, &group, &undecided, &mut waits_on));
                pending.push(node);
            }
        }
        tokio::select! {
            Some(answer) = inflight.next() => {
                if let Ok(a) = &answer {
                    if let Some(at) = pending.iter().position(|&n| n == a.node) {
                        pending.swap_remove(at);
                    }
                }
                t.count(route, &group, answer, false, &mut waits_on)?;
            }
            // An owner has not answered in a while: ask every owner not asked yet and the
            // fallbacks (copies a write could not place on unreachable owners are there)
            // beside it, rather than after its deadline (the first call to a peer cut off
            // without a word would otherwise cost each wave a whole peer timeout).
            () = tokio::time::sleep(hedge), if slow.is_none() => {
                metrics::counter!(m::HEDGED_CALLS, "call" => "lookup").increment(1);
                tracing::debug!(slow = ?pending, ?hedge, "lookup: owners slow, asking the others beside them");
                slow = Some(pending.clone());
                for &node in &live[asked..] {
                    inflight.push(ask_owner(route, node, &group, &undecided, &mut waits_on));
                    pending.push(node);
                }
                asked = live.len();
                early_fallbacks = Some((undecided.clone(), ask_fallbacks(route, &group, &undecided, presence)));
            }
        }
        // An agent's lookup does not wait out owners that were slow at the hedge once every
        // other call is answered: they count as unknown, and what stays undecided is absent
        // (at worst the agent sends a chunk again) rather than the backup held for their
        // deadline. Their calls run on in their tasks, so the peer pool learns whether they
        // are hung. The commit check waits for them.
        let only_slow_left = slow
            .as_ref()
            .is_some_and(|slow| !pending.is_empty() && pending.iter().all(|n| slow.contains(n)));
        if presence == Presence::Upload && only_slow_left {
            tracing::debug!(slow = ?pending, "lookup: answering without the slow owners");
            for (unknown, waits) in t.unknown.iter_mut().zip(waits_on.iter_mut()) {
                *unknown += std::mem::take(waits);
            }
            inflight = FuturesUnordered::new();
            pending.clear();
        }
        let unasked = live.len() - asked;
        // Absent is decided only when even the owners that failed, and those still being
        // asked, could not make W copies.
        undecided.retain(|&j| {
            t.holders[j].len() < w && t.holders[j].len() + t.unknown[j] + unasked + waits_on[j] >= w
        });
        if undecided.is_empty() {
            // Calls still under way (a slow owner's) run on in their tasks to their
            // deadline, so the peer pool learns whether that owner is hung.
            break;
        }
    }
    // Copies that unreachable owners could not take are on the fallbacks.
    let short = |t: &Tally| -> Vec<usize> {
        (0..group.len())
            .filter(|&j| t.holders[j].len() < w && t.unknown[j] > 0)
            .collect()
    };
    let first_short = short(&t);
    if !first_short.is_empty() {
        let (covered, mut calls) = early_fallbacks.unwrap_or_default();
        let mut asked_early = vec![false; group.len()];
        for j in covered {
            asked_early[j] = true;
        }
        let rest: Vec<usize> = first_short
            .into_iter()
            .filter(|&j| !asked_early[j])
            .collect();
        if !rest.is_empty() {
            calls.extend(ask_fallbacks(route, &group, &rest, presence));
        }
        let within = (presence == Presence::Upload).then_some(hedge);
        count_fallbacks(calls, &mut t.holders, within).await;
    }
    if presence == Presence::Strict && !hung.is_empty() {
        let left = short(&t);
        if !left.is_empty() {
            let mut calls: FuturesUnordered<_> = hung
                .iter()
                .map(|&node| ask_owner(route, node, &group, &left, &mut waits_on))
                .collect();
            while let Some(answer) = calls.next().await {
                t.count(route, &group, answer, true, &mut waits_on)?;
            }
        }
    }
    let Tally {
        mut holders,
        lacking,
        unknown,
        failed,
        answered,
    } = t;
    let too_many_failed = failed.len() > owners.len() - w;
    // Fewer than W copies counted, but enough current owners failed that W may exist:
    // "absent" would be a guess.
    let undecided = |holders: &[Vec<NodeId>], j: usize| {
        holders[j].len() < w && (too_many_failed || holders[j].len() + unknown[j] >= w)
    };
    let unavailable = |failed: Vec<(NodeId, NodeError)>| -> NodeError {
        QuorumError::NotReached {
            what: "lookup",
            owners: owners.len(),
            needed: w,
            answered,
            failed,
        }
        .into()
    };
    if presence == Presence::Strict && (0..group.len()).any(|j| undecided(&holders, j)) {
        return Err(unavailable(failed));
    }
    let under: Vec<usize> = (0..group.len())
        .filter(|&j| !holders[j].is_empty() && holders[j].len() < w && !lacking[j].is_empty())
        .collect();
    for batch in under.chunks(REPAIR_GROUP) {
        repair(route, &group, batch, &mut holders, &lacking).await;
    }
    Ok(idx
        .into_iter()
        .zip(holders)
        .map(|(i, h)| (i, h.len() >= w))
        .collect())
}

/// What the owners said about a group's ids, by index into the group.
struct Tally {
    /// Nodes holding a copy.
    holders: Vec<Vec<NodeId>>,
    /// Current owners that answered "absent" (targets of a repair on lookup).
    lacking: Vec<Vec<NodeId>>,
    /// Current owners that were not asked or failed: each may hold a copy nobody counted.
    /// Owners under older maps are left out: while a move is unfinished they are every
    /// member, and a lookup would fail whenever any member is unreachable.
    unknown: Vec<usize>,
    failed: Vec<(NodeId, NodeError)>,
    /// Owners that answered.
    answered: usize,
}

impl Tally {
    fn new(n: usize) -> Self {
        Tally {
            holders: vec![Vec::new(); n],
            lacking: vec![Vec::new(); n],
            unknown: vec![0; n],
            failed: Vec::new(),
            answered: 0,
        }
    }

    /// Counts one owner's answer about the ids at `js`. `counted` says the owner was already
    /// counted as unknown (a hung owner, asked last): if it answers it stops being unknown,
    /// if it fails it is not counted twice.
    fn count(
        &mut self,
        route: &Route,
        group: &[ChunkId],
        answer: Result<OwnerAnswer, tokio::task::JoinError>,
        counted: bool,
        waits_on: &mut [usize],
    ) -> Result<(), NodeError> {
        let OwnerAnswer { node, js, found } =
            answer.map_err(|e| NodeError::Internal(format!("lookup call task: {e}")))?;
        let current = route.placement.current();
        for &j in &js {
            waits_on[j] -= 1;
        }
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(%node, error = %e, "lookup: owner call failed");
                if !counted {
                    for &j in &js {
                        self.unknown[j] +=
                            usize::from(current.owners_of(&group[j]).contains(&node));
                    }
                }
                self.failed.push((node, e));
                return Ok(());
            }
        };
        self.answered += 1;
        for (&j, &f) in js.iter().zip(&found) {
            let owner = current.owners_of(&group[j]).contains(&node);
            if owner && counted {
                self.unknown[j] = self.unknown[j].saturating_sub(1);
            }
            if f {
                self.holders[j].push(node);
            } else if owner {
                self.lacking[j].push(node);
            }
        }
        Ok(())
    }
}

/// One owner's answer about the ids at `js` of a group.
struct OwnerAnswer {
    node: NodeId,
    js: Vec<usize>,
    found: Result<Vec<bool>, NodeError>,
}

/// [`spawn_has`], counted in `waits_on` until [`Tally::count`].
fn ask_owner(
    route: &Route,
    node: NodeId,
    group: &[ChunkId],
    js: &[usize],
    waits_on: &mut [usize],
) -> JoinHandle<OwnerAnswer> {
    for &j in js {
        waits_on[j] += 1;
    }
    spawn_has(route, node, group, js.to_vec())
}

/// Asks `node` which of the ids at `js` it holds, under the peer deadline, in a task of its
/// own: a lookup that is decided before a slow owner answers leaves the call to finish
/// there (see [`lookup_group`]), so the peer pool still learns whether the owner is hung.
fn spawn_has(
    route: &Route,
    node: NodeId,
    group: &[ChunkId],
    js: Vec<usize>,
) -> JoinHandle<OwnerAnswer> {
    let route = route.clone();
    let wanted: Vec<ChunkId> = js.iter().map(|&j| group[j]).collect();
    let timeout = route.ctx().peers.timeout();
    tokio::spawn(async move {
        let found = within(timeout, route.owner_has(node, wanted)).await;
        OwnerAnswer { node, js, found }
    })
}

/// Asks the fallbacks of the ids at `short` (each id's partition's, see
/// [`Route::fallbacks`]) which of them they hold, all at once, each in a task of its own;
/// [`count_fallbacks`] adds their answers.
/// An agent's lookup ([`Presence::Upload`]) leaves out fallbacks that hang
/// ([`Route::is_hanging`]): it would not wait for their answer anyway (see
/// [`count_fallbacks`]).
fn ask_fallbacks(
    route: &Route,
    group: &[ChunkId],
    short: &[usize],
    presence: Presence,
) -> Vec<JoinHandle<OwnerAnswer>> {
    let current = route.placement.current();
    let mut asked: HashMap<NodeId, Vec<usize>> = HashMap::new();
    for &j in short {
        for node in route.fallbacks(current.partition_of(&group[j])) {
            if presence == Presence::Upload && route.is_hanging(node) {
                continue;
            }
            asked.entry(node).or_default().push(j);
        }
    }
    asked
        .into_iter()
        .map(|(node, js)| spawn_has(route, node, group, js))
        .collect()
}

/// Waits for the fallbacks' answers: each fallback that holds an id joins its holders. A
/// fallback that fails adds nothing, and so does one that has not answered `within` (when
/// given: an agent's lookup, which calls what it cannot count absent, does not wait out a
/// hung fallback's deadline; the call runs on in its task).
async fn count_fallbacks(
    calls: Vec<JoinHandle<OwnerAnswer>>,
    holders: &mut [Vec<NodeId>],
    within: Option<std::time::Duration>,
) {
    let deadline = within.map(|d| tokio::time::Instant::now() + d);
    for call in calls {
        let joined = match deadline {
            Some(at) => match tokio::time::timeout_at(at, call).await {
                Ok(joined) => joined,
                Err(_) => {
                    tracing::debug!("lookup: a fallback is slow; answering without it");
                    continue;
                }
            },
            None => call.await,
        };
        let answer = match joined {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "lookup on a fallback: call task failed");
                continue;
            }
        };
        let found = match answer.found {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(node = answer.node, error = %e, "lookup on a fallback failed");
                continue;
            }
        };
        for (&j, f) in answer.js.iter().zip(found) {
            if f && !holders[j].contains(&answer.node) {
                holders[j].push(answer.node);
            }
        }
    }
}

/// Copies the chunks at `batch` from one of their holders to the current owners that lack
/// them; every owner that stored a copy joins the chunk's holders. Failures leave a chunk
/// under-replicated (and so absent to the agent, which sends it again).
async fn repair(
    route: &Route,
    group: &[ChunkId],
    batch: &[usize],
    holders: &mut [Vec<NodeId>],
    lacking: &[Vec<NodeId>],
) {
    // Read each chunk from its first holder (this node when it holds it: see read_owners).
    let mut by_source: HashMap<NodeId, Vec<usize>> = HashMap::new();
    for &j in batch {
        let source = holders[j]
            .iter()
            .copied()
            .find(|&n| route.is_local(n))
            .unwrap_or(holders[j][0]);
        by_source.entry(source).or_default().push(j);
    }
    let reads = join_all(by_source.into_iter().map(|(source, js)| async move {
        let wanted = js.iter().map(|&j| group[j]).collect();
        (js, route.owner_get(source, wanted).await)
    }))
    .await;
    let mut good: Vec<pb::Chunk> = Vec::new();
    let mut good_at: Vec<usize> = Vec::new();
    for (js, read) in reads {
        match read {
            Ok(chunks) => {
                for (j, c) in js.into_iter().zip(chunks) {
                    if c.fault == pb::ChunkFault::None as i32 {
                        good.push(c);
                        good_at.push(j);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "repair on lookup: reading a good copy failed"),
        }
    }
    let Ok(max_len) = route.ctx().chunker().map(|c| c.max_size) else {
        return;
    };
    let verified = match blocking(move || owner::verify_batch(good, max_len)).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "repair on lookup: a copy read for repair failed verification");
            return;
        }
    };
    // Send each target the chunks it lacks, all targets at once.
    let mut by_target: HashMap<NodeId, (Vec<usize>, Vec<VerifiedChunk>)> = HashMap::new();
    for (j, chunk) in good_at.iter().zip(verified) {
        for &t in &lacking[*j] {
            let entry = by_target.entry(t).or_default();
            entry.0.push(*j);
            entry.1.push(chunk.clone());
        }
    }
    let targets: Vec<NodeId> = by_target.keys().copied().collect();
    let timeout = route.ctx().peers.timeout();
    let mut payloads: HashMap<NodeId, Arc<Vec<VerifiedChunk>>> = by_target
        .iter_mut()
        .map(|(&t, (_, chunks))| (t, Arc::new(std::mem::take(chunks))))
        .collect();
    let stored = call_owners("repair", &targets, 0, Wait::All, timeout, |node| {
        let route = route.clone();
        let chunks = payloads.remove(&node).unwrap_or_default();
        async move { route.owner_put(node, chunks).await }
    })
    .await;
    let Ok(stored) = stored else { return };
    for (node, _) in stored.ok {
        for &j in &by_target[&node].0 {
            holders[j].push(node);
            metrics::counter!(m::REPAIRED_ON_LOOKUP).increment(1);
        }
    }
    for (node, e) in stored.failed {
        tracing::warn!(%node, error = %e, "repair on lookup: storing a copy failed");
    }
}

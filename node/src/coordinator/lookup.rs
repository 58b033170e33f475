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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hashgrid_proto::placement::Partition;
use hashgrid_proto::{pb, ChunkId, NodeId};
use tokio::task::JoinHandle;

use super::{hedge_due, sleep_until_or_never, take_late, Route, Unhedged};
use crate::chunk_store::Check;
use crate::error::NodeError;
use crate::metrics as m;
use crate::owner::{self, Outbound};
use crate::quorum::{call_owners, within, QuorumError, Wait};
use crate::service::blocking;

/// Under-replicated chunks copied per round of a repair on lookup: bounds the bytes held,
/// and keeps one owner call (at most 32 chunks of 256 KiB) under the message limit.
pub(super) const REPAIR_GROUP: usize = 32;
/// Ids per call of a lookup's share on this node.
const LOCAL_PART: usize = 1024;
/// Rounds of a repair on lookup under way at once.
const REPAIRS_IN_FLIGHT: usize = 4;

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
///
/// The ids of one request are looked up together, whatever their partitions: each id has
/// its own owners and its own progress, and every round of questions is one call per node
/// with all the ids that node is asked about (as [`super::read`] does). Why not one lookup
/// per owner set: in a cluster wider than R nearly every partition has an owner set of its
/// own, and a lookup of 4096 ids through one of eight nodes became ~200 owner calls.
pub async fn lookup(
    route: &Route,
    ids: Vec<ChunkId>,
    presence: Presence,
) -> Result<Vec<bool>, NodeError> {
    if route.is_local_only() {
        return owner::has(route.ctx(), ids).await;
    }
    let mut l = Lookup::new(route, &ids, presence)?;
    l.ask_owners().await?;
    l.ask_fallbacks().await;
    if presence == Presence::Strict {
        // The copies that answer make W again first, so hung owners are waited for only
        // for ids no answering member holds.
        l.repair_under().await;
        l.ask_hung_owners().await?;
    }
    l.finish().await
}

/// One partition's owners, as a lookup asks them.
struct Owners {
    partition: Partition,
    /// Owners that do not hang ([`Route::is_hanging`]), in the order they are asked
    /// ([`Route::read_owners`]: this node first, then the current owners, then older ones).
    live: Vec<NodeId>,
    /// Owners that hang: counted unknown from the start, asked only by the commit check.
    hung: Vec<NodeId>,
    /// The partition's owners under the current map: an id lacking on one of them is
    /// repaired there, and one that fails or hangs may hold a copy nobody counted. Owners
    /// under older maps are left out of that: while a move is unfinished they are every
    /// member, and a lookup would fail whenever any member is unreachable.
    current: Vec<NodeId>,
}

impl Owners {
    fn len(&self) -> usize {
        self.live.len() + self.hung.len()
    }
}

/// Where the lookup of one request stands: per id (by index into the request), what the
/// owners said and which calls it waits on.
///
/// Owners are asked in rounds: first W of an id's owners (the fewest that can prove
/// presence), then one more per round while it is undecided (a round ends when its calls
/// have answered or are past the hedge): an id is decided once W owners hold it, or once the owners not yet asked
/// could no longer bring it to W. In the common cases (a chunk on every owner, or on none)
/// that costs W lookups per id, not R. A call is not waited out when its owner is slow:
/// after [`crate::peer::PeerPool::hedge_after`] without an answer, every owner not yet
/// asked of its undecided ids and their fallbacks are asked beside it, and an agent's
/// lookup ([`Presence::Upload`]) answers once only such slow calls are left, counting them
/// unknown; so a hung owner that is not yet suspect costs an agent's lookup one hedge, not
/// its deadline, and once it is lagging ([`crate::peer::PeerPool::is_lagging`]) nothing.
/// The commit check waits for such calls only for ids that the copies which answered
/// cannot bring back to W ([`Lookup::repair_under`], run once the slow calls are all that
/// is left).
struct Lookup<'a> {
    route: &'a Route,
    ids: &'a [ChunkId],
    presence: Presence,
    w: usize,
    owners: Vec<Owners>,
    /// Per id, its partition's entry in `owners`.
    owners_of: Vec<usize>,
    /// Per id, the nodes holding a copy.
    holders: Vec<Vec<NodeId>>,
    /// Per id, the current owners that answered "absent" (targets of a repair on lookup).
    lacking: Vec<Vec<NodeId>>,
    /// Per id, the current owners that hang or failed: each may hold a copy nobody counted.
    unknown: Vec<usize>,
    /// Per id, how many of its owners failed to answer.
    failed_on: Vec<usize>,
    failed: Vec<(NodeId, NodeError)>,
    /// The nodes that answered.
    answered: HashSet<NodeId>,
    /// Per id, how many of its live owners were asked.
    next: Vec<usize>,
    /// Per id, the calls under way that include it, and how many of those are slow.
    waits_on: Vec<usize>,
    slow_waits: Vec<usize>,
    /// The ids not decided yet.
    open: Vec<usize>,
    /// Per id, whether its fallbacks were asked; and those calls.
    fallbacks_asked: Vec<bool>,
    fallback_calls: Vec<JoinHandle<OwnerAnswer>>,
    /// The owner calls under way, each in a task of its own: a lookup that is decided
    /// before a slow owner answers leaves the call to finish there, so the peer pool still
    /// learns whether the owner is hung.
    inflight: FuturesUnordered<JoinHandle<OwnerAnswer>>,
    /// Calls under way not yet past the hedge (when each started, its ids), and those past
    /// it (its ids).
    unhedged: Unhedged,
    slow: HashMap<u64, Vec<usize>>,
    /// The nodes of calls past the hedge, and the owners passed over because they hang
    /// (per id: counted unknown; the commit check asks them last).
    slow_nodes: HashSet<NodeId>,
    passed_over: Vec<(usize, NodeId)>,
    /// Which node each call under way asks.
    call_node: HashMap<u64, NodeId>,
    calls: u64,
    /// Whether the commit check repaired under-replicated ids while waiting on slow owners.
    repaired_early: bool,
}

impl<'a> Lookup<'a> {
    fn new(route: &'a Route, ids: &'a [ChunkId], presence: Presence) -> Result<Self, NodeError> {
        let w = route.write_quorum();
        let current = route.placement.current();
        let mut owners: Vec<Owners> = Vec::new();
        // Each partition's entry in `owners` (`usize::MAX`: none yet).
        let mut by_partition = vec![usize::MAX; current.partitions() as usize];
        let health = route.health();
        let mut owners_of = Vec::with_capacity(ids.len());
        for id in ids {
            let p = current.partition_of(id);
            let at = match by_partition[p.0 as usize] {
                at if at != usize::MAX => at,
                _ => {
                    // Owners whose last call ran out of time, or that have a call
                    // unanswered past the hedge, are not waited for while others can
                    // decide (a silent partition would otherwise cost every lookup their
                    // deadline). The commit check asks them last, if it must.
                    let (live, hung) = route
                        .read_owners(p, &health)
                        .into_iter()
                        .partition(|&n| !health.is_hanging(n));
                    let o = Owners {
                        partition: p,
                        live,
                        hung,
                        current: current.owners_of(id).to_vec(),
                    };
                    if o.len() < w {
                        return Err(QuorumError::TooFewOwners {
                            what: "lookup",
                            owners: o.len(),
                            needed: w,
                        }
                        .into());
                    }
                    owners.push(o);
                    by_partition[p.0 as usize] = owners.len() - 1;
                    owners.len() - 1
                }
            };
            owners_of.push(at);
        }
        let unknown = owners_of
            .iter()
            .map(|&o| {
                let o = &owners[o];
                o.current.iter().filter(|n| o.hung.contains(n)).count()
            })
            .collect();
        let n = ids.len();
        Ok(Lookup {
            route,
            ids,
            presence,
            w,
            owners,
            owners_of,
            holders: vec![Vec::new(); n],
            lacking: vec![Vec::new(); n],
            unknown,
            failed_on: vec![0; n],
            failed: Vec::new(),
            answered: HashSet::new(),
            next: vec![0; n],
            waits_on: vec![0; n],
            slow_waits: vec![0; n],
            open: (0..n).collect(),
            fallbacks_asked: vec![false; n],
            fallback_calls: Vec::new(),
            inflight: FuturesUnordered::new(),
            unhedged: HashMap::new(),
            slow: HashMap::new(),
            slow_nodes: HashSet::new(),
            passed_over: Vec::new(),
            call_node: HashMap::new(),
            calls: 0,
            repaired_early: false,
        })
    }

    fn owners(&self, j: usize) -> &Owners {
        &self.owners[self.owners_of[j]]
    }

    /// Whether id `j` is still undecided: fewer than W copies counted, and the owners that
    /// failed, those being asked and those not asked yet could still make W. (Absent is
    /// decided only when even they could not.)
    fn undecided(&self, j: usize) -> bool {
        let held = self.holders[j].len();
        let unasked = self.owners(j).live.len() - self.next[j];
        held < self.w && held + self.unknown[j] + unasked + self.waits_on[j] >= self.w
    }

    /// Asks up to `more` live owners not asked yet of each id in `js`, one call per node.
    ///
    /// An owner that hangs by now (the peer pool says so, or a call of this lookup to it
    /// is past the hedge) is passed over and counted unknown, as the owners that hung
    /// when the lookup began: each round would otherwise wait another hedge for it (the
    /// commit check asks it last, in [`Lookup::ask_hung_owners`]).
    fn ask_next(&mut self, js: impl IntoIterator<Item = usize>, more: usize) {
        // Per node asked: whether it hangs, and its ids. A few nodes: a list, not a map
        // (this runs for every id of every lookup).
        let mut by_node: Vec<(NodeId, bool, Vec<usize>)> = Vec::new();
        for j in js {
            let o = &self.owners[self.owners_of[j]];
            let mut asked = 0;
            while asked < more && self.next[j] < o.live.len() {
                let node = o.live[self.next[j]];
                self.next[j] += 1;
                let at = match by_node.iter().position(|(n, ..)| *n == node) {
                    Some(at) => at,
                    None => {
                        let hangs = self.slow_nodes.contains(&node) || self.route.is_hanging(node);
                        by_node.push((node, hangs, Vec::new()));
                        by_node.len() - 1
                    }
                };
                let (_, hangs, ids) = &mut by_node[at];
                if *hangs {
                    self.unknown[j] += usize::from(o.current.contains(&node));
                    self.passed_over.push((j, node));
                    continue;
                }
                ids.push(j);
                asked += 1;
            }
            self.waits_on[j] += asked;
        }
        for (node, _, js) in by_node {
            // This node's own share is looked up in parts, each on a blocking thread of
            // its own (no network: more calls cost nothing but a task).
            let part = if self.route.is_local(node) {
                LOCAL_PART
            } else {
                usize::MAX
            };
            for js in js.chunks(part) {
                let call = self.calls;
                self.calls += 1;
                self.unhedged.insert(call, (Instant::now(), js.to_vec()));
                self.call_node.insert(call, node);
                self.inflight
                    .push(spawn_has(self.route, node, self.ids, js.to_vec(), call));
            }
        }
    }

    /// Asks the owners until every id is decided or waits on nothing more, hedging calls
    /// that are slow to answer.
    async fn ask_owners(&mut self) -> Result<(), NodeError> {
        let hedge = self.route.ctx().peers.hedge_after();
        self.ask_next(0..self.ids.len(), self.w);
        loop {
            let mut open = std::mem::take(&mut self.open);
            open.retain(|&j| self.undecided(j));
            self.open = open;
            // A round ends when no undecided id waits on a call that is neither answered
            // nor past the hedge: then the next owner of each undecided id is asked, one
            // call per node for the round (asking as each answer came would split a round
            // into a call per node per answer). Ids waiting on slow calls only had every
            // owner left asked at the hedge.
            if self
                .open
                .iter()
                .all(|&j| self.waits_on[j] == self.slow_waits[j])
            {
                let again: Vec<usize> = self
                    .open
                    .iter()
                    .copied()
                    .filter(|&j| self.waits_on[j] == 0)
                    .collect();
                self.ask_next(again, 1);
            }
            if self.open.iter().all(|&j| self.waits_on[j] == 0) {
                // Calls still under way (a slow owner's) run on in their tasks to their
                // deadline, so the peer pool learns whether that owner is hung.
                return Ok(());
            }
            // The commit check, left waiting only on owners that were slow at the hedge,
            // first has the copies that answered make W where they can (once): an id
            // that has W copies then does not wait on the slow owner's deadline, which for
            // the first call to a peer nobody knew to hang is the whole peer timeout.
            if self.presence == Presence::Strict
                && !self.repaired_early
                && self
                    .open
                    .iter()
                    .all(|&j| self.waits_on[j] == self.slow_waits[j])
            {
                self.repaired_early = true;
                self.repair_under().await;
                continue;
            }
            // An agent's lookup does not wait out owners that were slow at the hedge once
            // every other call is answered: they count as unknown, and what stays
            // undecided is absent (at worst the agent sends a chunk again) rather than the
            // backup held for their deadline. The commit check waits for them.
            if self.presence == Presence::Upload
                && self
                    .open
                    .iter()
                    .all(|&j| self.waits_on[j] == self.slow_waits[j])
            {
                tracing::debug!(
                    calls = self.slow.len(),
                    "lookup: answering without the slow owners"
                );
                for &j in &self.open {
                    self.unknown[j] += std::mem::take(&mut self.waits_on[j]);
                    self.slow_waits[j] = 0;
                }
                return Ok(());
            }
            let due = hedge_due(&self.unhedged, hedge);
            tokio::select! {
                Some(answer) = self.inflight.next() => {
                    let answer = answer
                        .map_err(|e| NodeError::Internal(format!("lookup call task: {e}")))?;
                    self.count(answer, false);
                }
                () = sleep_until_or_never(due) => self.hedge(hedge),
            }
        }
    }

    /// Calls unanswered past the hedge: ask every owner not asked yet of their undecided
    /// ids, and those ids' fallbacks (copies a write could not place on unreachable owners
    /// are there), beside them, rather than after their deadline (the first call to a peer
    /// cut off without a word would otherwise cost each wave a whole peer timeout).
    fn hedge(&mut self, hedge: Duration) {
        let mut again = Vec::new();
        for (call, js) in take_late(&mut self.unhedged, hedge) {
            if let Some(&node) = self.call_node.get(&call) {
                self.slow_nodes.insert(node);
            }
            for &j in &js {
                self.slow_waits[j] += 1;
                if self.undecided(j) {
                    again.push(j);
                }
            }
            self.slow.insert(call, js);
        }
        again.sort_unstable();
        again.dedup();
        if again.is_empty() {
            return;
        }
        metrics::counter!(m::HEDGED_CALLS, "call" => "lookup").increment(1);
        tracing::debug!(
            ?hedge,
            ids = again.len(),
            "lookup: owners slow, asking the others beside them"
        );
        self.ask_next(again.iter().copied(), usize::MAX);
        let early: Vec<usize> = again
            .into_iter()
            .filter(|&j| !std::mem::replace(&mut self.fallbacks_asked[j], true))
            .collect();
        let calls = self.spawn_fallbacks(&early);
        self.fallback_calls.extend(calls);
    }

    /// Counts one owner's answer. `counted` says the owner was already counted as unknown
    /// (a hung owner, asked last): if it answers it stops being unknown, if it fails it is
    /// not counted twice.
    fn count(&mut self, answer: OwnerAnswer, counted: bool) {
        let OwnerAnswer {
            call,
            node,
            js,
            found,
        } = answer;
        self.call_node.remove(&call);
        if let Some(slow) = self.slow.remove(&call) {
            for j in slow {
                self.slow_waits[j] -= 1;
            }
        } else {
            self.unhedged.remove(&call);
        }
        for &j in &js {
            self.waits_on[j] -= 1;
        }
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(%node, error = %e, "lookup: owner call failed");
                for &j in &js {
                    self.failed_on[j] += 1;
                    if !counted {
                        self.unknown[j] += usize::from(self.owners(j).current.contains(&node));
                    }
                }
                self.failed.push((node, e));
                return;
            }
        };
        self.answered.insert(node);
        for (&j, &f) in js.iter().zip(&found) {
            let owner = self.owners(j).current.contains(&node);
            if owner && counted {
                self.unknown[j] = self.unknown[j].saturating_sub(1);
            }
            if f {
                self.holders[j].push(node);
            } else if owner {
                self.lacking[j].push(node);
            }
        }
    }

    /// The ids with fewer than W copies counted while some owner may hold one uncounted.
    fn short(&self) -> Vec<usize> {
        (0..self.ids.len())
            .filter(|&j| self.holders[j].len() < self.w && self.unknown[j] > 0)
            .collect()
    }

    /// Copies that unreachable owners could not take are on the fallbacks: asks those of
    /// the ids still short that the hedge did not ask already, and counts the fallbacks'
    /// answers until every id asked of them has W copies or no call is left. An agent's
    /// lookup waits for them at most a hedge. Why not wait for every fallback: the commit
    /// check would wait out the deadline of one that hangs although the others' answers
    /// already counted W copies of every id (8 s of a backup's commit, with the first
    /// fallback of two dead owners' partitions stopped). The calls not waited for run on
    /// in their tasks, so the peer pool still learns which fallback hangs.
    async fn ask_fallbacks(&mut self) {
        let short = self.short();
        if short.is_empty() {
            return;
        }
        let rest: Vec<usize> = short
            .into_iter()
            .filter(|&j| !std::mem::replace(&mut self.fallbacks_asked[j], true))
            .collect();
        let mut calls: FuturesUnordered<_> = std::mem::take(&mut self.fallback_calls)
            .into_iter()
            .chain(self.spawn_fallbacks(&rest))
            .collect();
        let asked: Vec<usize> = (0..self.ids.len())
            .filter(|&j| self.fallbacks_asked[j])
            .collect();
        let deadline = (self.presence == Presence::Upload)
            .then(|| tokio::time::Instant::now() + self.route.ctx().peers.hedge_after());
        while asked.iter().any(|&j| self.holders[j].len() < self.w) {
            let next = match deadline {
                Some(at) => match tokio::time::timeout_at(at, calls.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        tracing::debug!("lookup: a fallback is slow; answering without it");
                        break;
                    }
                },
                None => calls.next().await,
            };
            let Some(joined) = next else { break };
            count_fallback(joined, &mut self.holders);
        }
    }

    /// Asks the fallbacks of the ids at `js` (each id's partition's, see
    /// [`Route::fallbacks`]) which of them they hold, one call per fallback, each in a task
    /// of its own. An agent's lookup leaves out fallbacks that hang: it would not wait for
    /// their answer anyway (see [`Lookup::ask_fallbacks`]).
    fn spawn_fallbacks(&mut self, js: &[usize]) -> Vec<JoinHandle<OwnerAnswer>> {
        let mut asked: HashMap<NodeId, Vec<usize>> = HashMap::new();
        let mut fallbacks_of: HashMap<Partition, Vec<NodeId>> = HashMap::new();
        let health = self.route.health();
        for &j in js {
            let p = self.owners(j).partition;
            let fallbacks = fallbacks_of
                .entry(p)
                .or_insert_with(|| self.route.fallbacks(p, &health));
            for &node in fallbacks.iter() {
                let hangs = self.slow_nodes.contains(&node) || health.is_hanging(node);
                if self.presence == Presence::Upload && hangs {
                    continue;
                }
                asked.entry(node).or_default().push(j);
            }
        }
        asked
            .into_iter()
            .map(|(node, js)| {
                let call = self.calls;
                self.calls += 1;
                spawn_has(self.route, node, self.ids, js, call)
            })
            .collect()
    }

    /// The commit check must not guess: the ids still short are asked of the owners that
    /// hang too, and their answers waited for (to their deadline).
    async fn ask_hung_owners(&mut self) -> Result<(), NodeError> {
        let short = self.short();
        let mut is_short = vec![false; self.ids.len()];
        for &j in &short {
            is_short[j] = true;
        }
        let mut by_node: HashMap<NodeId, Vec<usize>> = HashMap::new();
        for &j in &short {
            for &node in &self.owners(j).hung {
                by_node.entry(node).or_default().push(j);
            }
        }
        for &(j, node) in &self.passed_over {
            if is_short[j] {
                by_node.entry(node).or_default().push(j);
            }
        }
        let mut calls: FuturesUnordered<_> = FuturesUnordered::new();
        for (node, js) in by_node {
            for &j in &js {
                self.waits_on[j] += 1;
            }
            let call = self.calls;
            self.calls += 1;
            calls.push(spawn_has(self.route, node, self.ids, js, call));
        }
        while let Some(answer) = calls.next().await {
            let answer =
                answer.map_err(|e| NodeError::Internal(format!("lookup call task: {e}")))?;
            self.count(answer, true);
        }
        Ok(())
    }

    /// Copies the ids found on fewer than W members, but on some, from a good copy to the
    /// current owners that answered "absent"; the copies stored join their holders.
    ///
    /// For the commit check too, before its verdict: a chunk acknowledged on W owners, one
    /// of which then stopped answering (the agent's coordinator, stopped right after it
    /// stored its own copy and one other), has a single copy that answers; copied to an
    /// owner that lacks it, it has W again and the snapshot commits, instead of the check
    /// waiting on the stopped owner and failing `UNAVAILABLE` until it is back.
    async fn repair_under(&mut self) {
        let w = self.w;
        let under: Vec<usize> = (0..self.ids.len())
            .filter(|&j| {
                let held = self.holders[j].len();
                held > 0 && held < w && !self.lacking[j].is_empty()
            })
            .collect();
        let batches: Vec<Vec<usize>> = under.chunks(REPAIR_GROUP).map(<[usize]>::to_vec).collect();
        let (route, ids, holders, lacking) = (self.route, self.ids, &self.holders, &self.lacking);
        let repairs: Vec<Vec<(usize, NodeId)>> = futures::stream::iter(batches)
            .map(|batch| async move { repair(route, ids, &batch, holders, lacking).await })
            .buffer_unordered(REPAIRS_IN_FLIGHT)
            .collect()
            .await;
        for (j, node) in repairs.into_iter().flatten() {
            self.holders[j].push(node);
            self.lacking[j].retain(|&n| n != node);
        }
    }

    /// Decides every id: under-replicated ones are repaired; then the commit check fails
    /// `UNAVAILABLE` if any is undecided; an id is present when W copies are counted.
    async fn finish(mut self) -> Result<Vec<bool>, NodeError> {
        let w = self.w;
        self.repair_under().await;
        // Fewer than W copies counted, but enough owners failed that W may exist: "absent"
        // would be a guess.
        let undecided = |l: &Lookup, j: usize| {
            let held = l.holders[j].len();
            let too_many_failed = l.failed_on[j] > l.owners(j).len() - w;
            held < w && (too_many_failed || held + l.unknown[j] >= w)
        };
        if self.presence == Presence::Strict {
            if let Some(j) = (0..self.ids.len()).find(|&j| undecided(&self, j)) {
                return Err(QuorumError::NotReached {
                    what: "lookup",
                    owners: self.owners(j).len(),
                    needed: w,
                    answered: self.answered.len(),
                    failed: std::mem::take(&mut self.failed),
                }
                .into());
            }
        }
        Ok(self.holders.iter().map(|h| h.len() >= w).collect())
    }
}

/// One owner's answer about the ids at `js` of a lookup.
struct OwnerAnswer {
    call: u64,
    node: NodeId,
    js: Vec<usize>,
    found: Result<Vec<bool>, NodeError>,
}

/// Asks `node` which of the ids at `js` it holds, under the peer deadline, in a task of its
/// own: a lookup that is decided before a slow owner answers leaves the call to finish
/// there (see [`Lookup`]), so the peer pool still learns whether the owner is hung.
fn spawn_has(
    route: &Route,
    node: NodeId,
    ids: &[ChunkId],
    js: Vec<usize>,
    call: u64,
) -> JoinHandle<OwnerAnswer> {
    let route = route.clone();
    let wanted: Vec<ChunkId> = js.iter().map(|&j| ids[j]).collect();
    let timeout = route.ctx().peers.timeout();
    tokio::spawn(async move {
        let found = within(timeout, route.owner_has(node, wanted)).await;
        OwnerAnswer {
            call,
            node,
            js,
            found,
        }
    })
}

/// Counts one fallback's answer: each id it holds joins its holders. A fallback that
/// failed adds nothing.
fn count_fallback(
    joined: Result<OwnerAnswer, tokio::task::JoinError>,
    holders: &mut [Vec<NodeId>],
) {
    let answer = match joined {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "lookup on a fallback: call task failed");
            return;
        }
    };
    let found = match answer.found {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(node = answer.node, error = %e, "lookup on a fallback failed");
            return;
        }
    };
    for (&j, f) in answer.js.iter().zip(found) {
        if f && !holders[j].contains(&answer.node) {
            holders[j].push(answer.node);
        }
    }
}

/// Copies the chunks at `batch` from one of their holders to the current owners that lack
/// them; returns the copies stored (the id's index, the owner), which join the chunks'
/// holders. Failures leave a chunk under-replicated (and so absent to the agent, which
/// sends it again).
async fn repair(
    route: &Route,
    group: &[ChunkId],
    batch: &[usize],
    holders: &[Vec<NodeId>],
    lacking: &[Vec<NodeId>],
) -> Vec<(usize, NodeId)> {
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
        (
            js,
            source,
            route.owner_get(source, wanted, Check::Stored).await,
        )
    }))
    .await;
    // (the id's index, the copy, where it was read)
    let mut copies: Vec<(usize, pb::Chunk, NodeId)> = Vec::new();
    for (js, source, read) in reads {
        match read {
            Ok(chunks) => copies.extend(
                js.into_iter()
                    .zip(chunks)
                    .filter(|(_, c)| c.fault == pb::ChunkFault::None as i32)
                    .map(|(j, c)| (j, c, source)),
            ),
            Err(e) => tracing::warn!(error = %e, "repair on lookup: reading a good copy failed"),
        }
    }
    let Ok(max_len) = route.ctx().chunker().map(|c| c.max_size) else {
        return Vec::new();
    };
    // Each copy on its own: one that fails (gone bad before its holder took the checksum
    // its own read checks) is left out, and the rest of the batch is still repaired.
    let verified = match blocking(move || {
        Ok(copies
            .into_iter()
            .filter_map(|(j, c, source)| Some((j, owner::verify_copy(c, max_len, Some(source))?)))
            .collect::<Vec<_>>())
    })
    .await
    {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "repair on lookup: verifying the copies read failed");
            return Vec::new();
        }
    };
    // Send each target the chunks it lacks, all targets at once.
    let mut by_target: HashMap<NodeId, (Vec<usize>, Vec<Outbound>)> = HashMap::new();
    for (j, chunk) in verified {
        for &t in &lacking[j] {
            let entry = by_target.entry(t).or_default();
            entry.0.push(j);
            entry.1.push(Outbound::from(chunk.clone()));
        }
    }
    let targets: Vec<NodeId> = by_target.keys().copied().collect();
    let timeout = route.ctx().peers.timeout();
    let mut payloads: HashMap<NodeId, Arc<Vec<Outbound>>> = by_target
        .iter_mut()
        .map(|(&t, (_, chunks))| (t, Arc::new(std::mem::take(chunks))))
        .collect();
    let stored = call_owners("repair", &targets, 0, Wait::All, timeout, |node| {
        let route = route.clone();
        let chunks = payloads.remove(&node).unwrap_or_default();
        async move { route.owner_put(node, chunks).await }
    })
    .await;
    let Ok(stored) = stored else {
        return Vec::new();
    };
    for (node, e) in stored.failed {
        tracing::warn!(%node, error = %e, "repair on lookup: storing a copy failed");
    }
    let mut copies = Vec::new();
    for (node, _) in stored.ok {
        for &j in &by_target[&node].0 {
            copies.push((j, node));
            metrics::counter!(m::REPAIRED_ON_LOOKUP).increment(1);
        }
    }
    copies
}

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
use hashgrid_proto::{pb, ChunkId, NodeId};

use super::{group_by_owners, Route};
use crate::chunk_store::VerifiedChunk;
use crate::error::NodeError;
use crate::metrics as m;
use crate::owner;
use crate::quorum::{call_owners, QuorumError, Wait};
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
    // Owners whose last call ran out of time are not waited for while others can decide:
    // they count as unknown from the start (a silent partition would otherwise cost every
    // lookup their deadline). The commit check asks them last, if it must.
    let (live, hung): (Vec<NodeId>, Vec<NodeId>) =
        owners.iter().partition(|&&n| !route.is_suspect(n));
    for (j, id) in group.iter().enumerate() {
        t.unknown[j] = current
            .owners_of(id)
            .iter()
            .filter(|n| hung.contains(n))
            .count();
    }
    let mut undecided: Vec<usize> = (0..group.len()).collect();
    let mut asked = 0;
    while !undecided.is_empty() && asked < live.len() {
        let wave_len = if asked == 0 { w } else { 1 };
        let wave = &live[asked..(asked + wave_len).min(live.len())];
        asked += wave.len();
        t.ask(route, wave, &group, &undecided, false).await?;
        let unasked = live.len() - asked;
        // Absent is decided only when even the owners that failed could not make W copies.
        undecided.retain(|&j| {
            t.holders[j].len() < w && t.holders[j].len() + t.unknown[j] + unasked >= w
        });
    }
    // Copies that unreachable owners could not take are on the fallbacks.
    let short = |t: &Tally| -> Vec<usize> {
        (0..group.len())
            .filter(|&j| t.holders[j].len() < w && t.unknown[j] > 0)
            .collect()
    };
    let first_short = short(&t);
    if !first_short.is_empty() {
        ask_fallbacks(route, &group, &first_short, &mut t.holders).await;
    }
    if presence == Presence::Strict && !hung.is_empty() {
        let left = short(&t);
        if !left.is_empty() {
            asked += hung.len();
            t.ask(route, &hung, &group, &left, true).await?;
        }
    }
    let Tally {
        mut holders,
        lacking,
        unknown,
        failed,
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
            answered: asked - failed.len(),
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
}

impl Tally {
    fn new(n: usize) -> Self {
        Tally {
            holders: vec![Vec::new(); n],
            lacking: vec![Vec::new(); n],
            unknown: vec![0; n],
            failed: Vec::new(),
        }
    }

    /// Asks every node of `wave` at once about the ids at `js`, each under its deadline,
    /// and counts the answers. `counted` says the wave's owners were already counted as
    /// unknown (hung owners, asked last): one that answers stops being unknown, one that
    /// fails is not counted twice.
    async fn ask(
        &mut self,
        route: &Route,
        wave: &[NodeId],
        group: &[ChunkId],
        js: &[usize],
        counted: bool,
    ) -> Result<(), NodeError> {
        let current = route.placement.current();
        let wanted: Vec<ChunkId> = js.iter().map(|&j| group[j]).collect();
        let timeout = route.ctx().peers.timeout();
        // Quorum 0: every node of the wave is waited for (under its deadline); what a
        // failed one could not say is decided by the ones after it.
        let answers = call_owners("lookup", wave, 0, Wait::All, timeout, |node| {
            let route = route.clone();
            let wanted = wanted.clone();
            async move { route.owner_has(node, wanted).await }
        })
        .await?;
        if !counted {
            for (node, _) in &answers.failed {
                for &j in js {
                    self.unknown[j] += usize::from(current.owners_of(&group[j]).contains(node));
                }
            }
        }
        self.failed.extend(answers.failed);
        for (node, found) in &answers.ok {
            for (&j, &f) in js.iter().zip(found) {
                let owner = current.owners_of(&group[j]).contains(node);
                if owner && counted {
                    self.unknown[j] = self.unknown[j].saturating_sub(1);
                }
                if f {
                    self.holders[j].push(*node);
                } else if owner {
                    self.lacking[j].push(*node);
                }
            }
        }
        Ok(())
    }
}

/// Asks the fallbacks of the ids at `short` (each id's partition's, see
/// [`Route::fallbacks`]) which of them they hold, all at once; each that does joins the id's
/// holders. A fallback that fails adds nothing.
async fn ask_fallbacks(
    route: &Route,
    group: &[ChunkId],
    short: &[usize],
    holders: &mut [Vec<NodeId>],
) {
    let current = route.placement.current();
    let mut asked: HashMap<NodeId, Vec<usize>> = HashMap::new();
    for &j in short {
        for node in route.fallbacks(current.partition_of(&group[j])) {
            asked.entry(node).or_default().push(j);
        }
    }
    let nodes: Vec<NodeId> = asked.keys().copied().collect();
    let timeout = route.ctx().peers.timeout();
    let answers = call_owners(
        "lookup on a fallback",
        &nodes,
        0,
        Wait::All,
        timeout,
        |node| {
            let route = route.clone();
            let wanted: Vec<ChunkId> = asked[&node].iter().map(|&j| group[j]).collect();
            async move { route.owner_has(node, wanted).await }
        },
    )
    .await;
    let Ok(answers) = answers else { return };
    for (node, found) in answers.ok {
        for (&j, f) in asked[&node].iter().zip(found) {
            if f && !holders[j].contains(&node) {
                holders[j].push(node);
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

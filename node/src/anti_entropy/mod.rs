//! Anti-entropy: how an owner comes to hold every chunk of its partitions that another node
//! holds, and how a node hands off the partitions it no longer owns.
//!
//! One mechanism serves rebalancing (a new owner pulls a moved partition from its old
//! owners), repair (owners of a partition compare their sets and pull what they lack: a
//! node that was down catches up, one whose store was lost refills, survivors of a removed
//! node re-replicate) and hand-off (a node that no longer owns a partition makes sure every
//! current owner has its chunks, then takes them out of its index).
//!
//! Per partition, the owners first compare digests (the count and a sum of the held ids,
//! kept up to date by the store with every insert and drop, see
//! [`ChunkStore::partition_digest`]), in batches of partitions per call, so owners that agree
//! exchange 45 bytes per partition and nothing else, and a pass reads no index to find out.
//! Where a partition's digests differ, its 16-bit sub-ranges are compared the same way and
//! only those that differ are listed (ids, page by page); the missing chunks are read from
//! the source, and the receiving node verifies every chunk before it stores it, as it does
//! for an agent's.
//! Pulling, not pushing: each node is responsible for its own copies, so a node that comes
//! back knows what to fetch without anyone tracking what it missed.

pub mod pacer;
pub mod workers;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use hashgrid_proto::id::{pack_ids, unpack_ids};
use hashgrid_proto::limits::MAX_IDS_PER_REQUEST;
use hashgrid_proto::pb::peer::{
    DigestRequest, DigestResponse, ListIdsRequest, ListIdsResponse, PartitionDigest,
};
use hashgrid_proto::pb::{self, ChunkFault};
use hashgrid_proto::placement::{partition_range, MemberState, Partition, Placement};
use hashgrid_proto::{ChunkId, DecodeError, NodeId};

use crate::chunk_store::digests::BUCKET_BITS;
use crate::chunk_store::{Check, ChunkRead, ChunkStore, StoreError};
use crate::context::NodeContext;
use crate::coordinator::Route;
use crate::error::NodeError;
use crate::metrics as m;
use crate::owner::{self, Outbound};
use crate::service::blocking;

/// Most partitions one digest call may ask about.
pub const MAX_DIGEST_PARTITIONS: usize = 4096;
/// Ids read from a source per call while copying (at most 16 MiB of chunks at 128 KiB).
const COPY_BATCH: usize = 128;
/// Ids checked with the current owners per call while handing off.
const HANDOFF_BATCH: usize = 4096;

/// A node's set of ids in one partition, in brief.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub count: u64,
    pub hash: [u8; 32],
}

/// The local store's digests of `partitions` (from its table in memory: no scan).
fn local_digests(store: &ChunkStore, bits: u8, partitions: &[Partition]) -> Vec<Digest> {
    partitions
        .iter()
        .map(|&p| {
            let (count, hash) = store.partition_digest(bits, p.0);
            Digest { count, hash }
        })
        .collect()
}

/// Every id the local store holds in `partition` (blocking).
fn local_ids(
    store: &ChunkStore,
    bits: u8,
    partition: Partition,
) -> Result<Vec<ChunkId>, StoreError> {
    let (start, end) = partition_range(bits, partition);
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let (page, done) = store.ids_in_range(&start, end.as_ref(), after.as_ref(), 64 * 1024)?;
        after = page.last().copied();
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}

/// The bits a digest or list request names: the cluster's partition bits, or more, up to
/// [`BUCKET_BITS`], for the sub-ranges of a partition (see [`differing_ranges`]).
fn check_bits(ctx: &NodeContext, bits: u32) -> Result<u8, NodeError> {
    let ours = ctx.placement()?.current().partition_bits();
    if bits < u32::from(ours) || bits > u32::from(BUCKET_BITS) {
        return Err(NodeError::Decode(DecodeError::invalid(
            "partition bits",
            format!("asked with {bits}, this cluster has {ours} (sub-ranges up to {BUCKET_BITS})"),
        )));
    }
    Ok(bits as u8)
}

fn check_partition(bits: u8, p: u32) -> Result<Partition, NodeError> {
    if u64::from(p) >= 1u64 << bits {
        return Err(NodeError::Decode(DecodeError::invalid(
            "partition",
            format!("{p} is not below 2^{bits}"),
        )));
    }
    Ok(Partition(p))
}

/// Answers `OwnerDigest`.
pub async fn serve_digest(
    ctx: &NodeContext,
    req: DigestRequest,
) -> Result<DigestResponse, NodeError> {
    let bits = check_bits(ctx, req.partition_bits)?;
    if req.partitions.len() > MAX_DIGEST_PARTITIONS {
        return Err(NodeError::TooMany {
            what: "partitions",
            count: req.partitions.len(),
            limit: MAX_DIGEST_PARTITIONS,
        });
    }
    let parts = req
        .partitions
        .iter()
        .map(|&p| check_partition(bits, p))
        .collect::<Result<Vec<_>, _>>()?;
    let d = local_digests(&ctx.store, bits, &parts);
    let digests = parts
        .into_iter()
        .zip(d)
        .map(|(p, d)| PartitionDigest {
            partition: p.0,
            count: d.count,
            digest: d.hash.to_vec(),
        })
        .collect();
    Ok(DigestResponse { digests })
}

/// Answers `OwnerList`.
pub async fn serve_list(
    ctx: &NodeContext,
    req: ListIdsRequest,
) -> Result<ListIdsResponse, NodeError> {
    let bits = check_bits(ctx, req.partition_bits)?;
    let p = check_partition(bits, req.partition)?;
    let limit = req.limit as usize;
    if limit == 0 || limit > MAX_IDS_PER_REQUEST {
        return Err(NodeError::Decode(DecodeError::invalid(
            "list limit",
            format!("{limit} is not in 1..={MAX_IDS_PER_REQUEST}"),
        )));
    }
    let after = if req.after.is_empty() {
        None
    } else {
        Some(ChunkId::from_slice(&req.after)?)
    };
    let store = ctx.store.clone();
    let (ids, done) = blocking(move || {
        let (start, end) = partition_range(bits, p);
        Ok(store.ids_in_range(&start, end.as_ref(), after.as_ref(), limit)?)
    })
    .await?;
    Ok(ListIdsResponse {
        ids: pack_ids(&ids),
        done,
    })
}

/// `node`'s digests of `partitions`, in that order.
async fn peer_digests(
    route: &Route,
    node: NodeId,
    bits: u8,
    partitions: &[Partition],
) -> Result<Vec<Digest>, NodeError> {
    let mut out = Vec::with_capacity(partitions.len());
    for batch in partitions.chunks(MAX_DIGEST_PARTITIONS) {
        let req = DigestRequest {
            partition_bits: u32::from(bits),
            partitions: batch.iter().map(|p| p.0).collect(),
        };
        let reply = route
            .ctx()
            .peers
            .call(route.addr(node)?, None, |mut c| async move {
                c.owner_digest(req).await
            })
            .await
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        if reply.digests.len() != batch.len()
            || reply
                .digests
                .iter()
                .zip(batch)
                .any(|(d, p)| d.partition != p.0)
        {
            return Err(NodeError::Unavailable(format!(
                "node {node} answered a digest request for other partitions"
            )));
        }
        for d in reply.digests {
            let hash: [u8; 32] = d.digest.as_slice().try_into().map_err(|_| {
                NodeError::Unavailable(format!("node {node} sent a digest of the wrong length"))
            })?;
            out.push(Digest {
                count: d.count,
                hash,
            });
        }
    }
    Ok(out)
}

/// Every id `node` holds in `partition`.
async fn peer_ids(
    route: &Route,
    node: NodeId,
    bits: u8,
    partition: Partition,
) -> Result<Vec<ChunkId>, NodeError> {
    let mut out = Vec::new();
    let mut after = Vec::new();
    loop {
        let req = ListIdsRequest {
            partition_bits: u32::from(bits),
            partition: partition.0,
            after: std::mem::take(&mut after),
            limit: MAX_IDS_PER_REQUEST as u32,
        };
        let reply = route
            .ctx()
            .peers
            .call(route.addr(node)?, None, |mut c| async move {
                c.owner_list(req).await
            })
            .await
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        let page = unpack_ids(&reply.ids)?;
        metrics::counter!(m::ANTI_ENTROPY_LISTED).increment(page.len() as u64);
        if let Some(last) = page.last() {
            after = last.as_bytes().to_vec();
        }
        let empty = page.is_empty();
        out.extend(page);
        if reply.done || empty {
            return Ok(out);
        }
    }
}

/// The ranges of partition `p` (of `2^bits`) to list from `source`, whose digest of `p`
/// differs from ours: the sub-ranges at [`BUCKET_BITS`] whose digests differ (16 of them
/// per partition at 12 bits; the store keeps their digests), so a pass that finds a few
/// chunks missing lists a sixteenth of the partition or less, not all of it. A source that
/// cannot answer for sub-ranges (a node from before they existed) has the whole partition
/// listed.
async fn differing_ranges(
    route: &Route,
    source: NodeId,
    bits: u8,
    p: Partition,
) -> Vec<(u8, Partition)> {
    if bits >= BUCKET_BITS {
        return vec![(bits, p)];
    }
    let shift = BUCKET_BITS - bits;
    let subs: Vec<Partition> = ((p.0 << shift)..((p.0 + 1) << shift))
        .map(Partition)
        .collect();
    match peer_digests(route, source, BUCKET_BITS, &subs).await {
        Ok(theirs) => {
            let mine = local_digests(&route.ctx().store, BUCKET_BITS, &subs);
            subs.into_iter()
                .zip(theirs)
                .zip(mine)
                .filter(|((_, t), m)| t.count > 0 && t != m)
                .map(|((s, _), _)| (BUCKET_BITS, s))
                .collect()
        }
        Err(e) => {
            tracing::debug!(%source, partition = p.0, error = %e, "no sub-range digests; listing the partition");
            vec![(bits, p)]
        }
    }
}

/// The most ids of missing copies a pass keeps for the status (32 bytes each); beyond it
/// they are only counted.
pub const MISSING_IDS_KEPT: usize = 16_384;

/// What a pull did.
#[derive(Debug, Default)]
pub struct PullReport {
    pub copied: u64,
    pub copied_bytes: u64,
    /// Ids some source listed that no source could provide a good copy of.
    pub not_copied: u64,
    /// The first [`MISSING_IDS_KEPT`] of those ids, for a cluster-wide count that takes a
    /// chunk two owners both lack once.
    pub missing: Vec<ChunkId>,
    /// Ids the sources listed, in the ranges whose digests differed.
    pub listed: u64,
    /// Per partition, the sources that could not be asked (unreachable, refusing).
    pub unreachable: BTreeMap<Partition, Vec<NodeId>>,
    /// The local count of ids per pulled partition, after the pull.
    pub local_counts: HashMap<Partition, u64>,
    /// One line per failure, for the worker's status.
    pub errors: Vec<String>,
}

/// Pulls into this node every chunk that a node of `sources_of(p)` holds in partition `p`
/// and this node lacks, for every partition of `partitions` (in that order; `progress` is
/// told how many are done).
pub async fn pull(
    route: &Route,
    partitions: &[Partition],
    sources_of: impl Fn(Partition) -> Vec<NodeId>,
    mut progress: impl FnMut(usize, &PullReport),
) -> Result<PullReport, NodeError> {
    let ctx = route.ctx().clone();
    let bits = route.placement.current().partition_bits();
    let mut report = PullReport::default();
    let mut by_source: BTreeMap<NodeId, Vec<Partition>> = BTreeMap::new();
    for &p in partitions {
        for s in sources_of(p) {
            if s != ctx.node_id {
                by_source.entry(s).or_default().push(p);
            }
        }
    }
    if by_source.is_empty() {
        // The only owner: nothing to compare with.
        progress(partitions.len(), &report);
        return Ok(report);
    }
    let mine = local_digests(&ctx.store, bits, partitions);
    let mine: HashMap<Partition, Digest> = partitions.iter().copied().zip(mine).collect();

    // Which (partition, source) pairs differ, asking each source about all its partitions.
    let mut differing: BTreeMap<Partition, Vec<NodeId>> = BTreeMap::new();
    for (&source, parts) in &by_source {
        match peer_digests(route, source, bits, parts).await {
            Ok(theirs) => {
                for (&p, d) in parts.iter().zip(theirs) {
                    if d.count > 0 && d != mine[&p] {
                        differing.entry(p).or_default().push(source);
                    }
                }
            }
            Err(e) => {
                report.errors.push(format!("node {source}: {e}"));
                for &p in parts {
                    report.unreachable.entry(p).or_default().push(source);
                }
            }
        }
    }

    for (done, &p) in partitions.iter().enumerate() {
        let mut count = mine[&p].count;
        if let Some(sources) = differing.get(&p) {
            // Our ids, read a range at a time as some source's list needs them.
            let mut held: BTreeSet<ChunkId> = BTreeSet::new();
            let mut read: HashSet<(u8, Partition)> = HashSet::new();
            let mut wanted: BTreeSet<ChunkId> = BTreeSet::new();
            for &source in sources {
                // Holding nothing there (a refill), every range differs: list it whole.
                let ranges = if mine[&p].count == 0 {
                    vec![(bits, p)]
                } else {
                    differing_ranges(route, source, bits, p).await
                };
                for (range_bits, range) in ranges {
                    if !read.contains(&(bits, p)) && read.insert((range_bits, range)) {
                        let store = ctx.store.clone();
                        held.extend(
                            blocking(move || Ok(local_ids(&store, range_bits, range)?)).await?,
                        );
                    }
                    let listed = match peer_ids(route, source, range_bits, range).await {
                        Ok(ids) => ids,
                        Err(e) => {
                            report.errors.push(format!("node {source}: {e}"));
                            report.unreachable.entry(p).or_default().push(source);
                            break;
                        }
                    };
                    report.listed += listed.len() as u64;
                    let missing: Vec<ChunkId> =
                        listed.into_iter().filter(|id| !held.contains(id)).collect();
                    wanted.extend(missing.iter().copied());
                    let mut failed = false;
                    for batch in missing.chunks(ctx.workers.pacer.batch(COPY_BATCH)) {
                        match copy_from(route, source, batch.to_vec()).await {
                            Ok((ids, stored, bytes)) => {
                                report.copied += stored;
                                report.copied_bytes += bytes;
                                for id in ids {
                                    wanted.remove(&id);
                                    held.insert(id);
                                }
                            }
                            Err(e) if e.is_retryable() => {
                                report
                                    .errors
                                    .push(format!("copying from node {source}: {e}"));
                                report.unreachable.entry(p).or_default().push(source);
                                failed = true;
                                break;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    if failed {
                        break;
                    }
                }
            }
            report.not_copied += wanted.len() as u64;
            let room = MISSING_IDS_KEPT.saturating_sub(report.missing.len());
            report.missing.extend(wanted.iter().take(room).copied());
            count = ctx.store.partition_digest(bits, p.0).0;
        }
        report.local_counts.insert(p, count);
        progress(done + 1, &report);
    }
    for nodes in report.unreachable.values_mut() {
        nodes.sort_unstable();
        nodes.dedup();
    }
    Ok(report)
}

/// Reads `ids` from `source` and stores the good copies here (verified again before they
/// are stored), at the pace the node's move limit allows. Returns the ids now held and the
/// chunks and encoded bytes newly stored (a chunk another pass stored meanwhile is held but
/// not counted); ids the source lacks or holds only a damaged copy of, and copies that fail
/// verification here, are left out.
async fn copy_from(
    route: &Route,
    source: NodeId,
    ids: Vec<ChunkId>,
) -> Result<(Vec<ChunkId>, u64, u64), NodeError> {
    let chunks: Vec<pb::Chunk> = route
        .owner_get(source, ids, Check::Stored)
        .await?
        .into_iter()
        .filter(|c| c.fault == ChunkFault::None as i32)
        .collect();
    if chunks.is_empty() {
        return Ok((Vec::new(), 0, 0));
    }
    let moved: usize = chunks.iter().map(|c| c.data.len()).sum();
    route.ctx().workers.pacer.charge(moved as u64).await;
    let (outcome, got) = owner::store_copies(route.ctx(), chunks, source).await?;
    Ok((got, u64::from(outcome.stored), outcome.stored_bytes))
}

/// What a hand-off did.
#[derive(Debug, Default)]
pub struct HandoffReport {
    /// Copies written to current owners that lacked them.
    pub handed: u64,
    /// Their encoded bytes.
    pub handed_bytes: u64,
    /// Index entries released.
    pub released: u64,
    /// Partitions left for a later pass (an owner could not be reached).
    pub incomplete: u64,
    /// Chunks held in those partitions: copies not on all their owners yet.
    pub pending: u64,
    pub errors: Vec<String>,
}

/// Chunks this node holds in partitions it does not own under `current`: what [`hand_off`]
/// has left to do. Read from the store's digest table (a count per id prefix, exact after
/// every write), so it is right the moment a fallback copy lands, where the hand-off
/// worker's figure is as of its last pass. 4,096 partitions of 16 table entries each: cheap
/// enough for every status request.
pub fn hand_off_pending(store: &ChunkStore, current: &Placement, node: NodeId) -> u64 {
    let bits = current.partition_bits();
    (0..current.partitions())
        .map(Partition)
        .filter(|&p| !current.owners(p).contains(&node))
        .map(|p| store.partition_count(bits, p.0))
        .sum()
}

/// For every partition this node holds chunks of but does not own under the current map
/// (moved away, or copies it took as a fallback for unreachable owners): makes sure every
/// current owner holds each chunk (writing it to those that lack it), then releases the
/// chunk from this node's index. Run only once no older map is in transition, so no reader
/// still counts on this node for those partitions. An owner that cannot be reached leaves
/// its partitions for a later pass, and is not asked again in this one (a hung owner would
/// otherwise cost a deadline per partition).
pub async fn hand_off(route: &Route) -> Result<HandoffReport, NodeError> {
    let ctx = route.ctx().clone();
    let current = route.placement.current();
    let bits = current.partition_bits();
    let mut report = HandoffReport::default();
    let mut down: HashSet<NodeId> = HashSet::new();
    for p in (0..current.partitions()).map(Partition) {
        let owners = current.owners(p);
        if owners.contains(&ctx.node_id) {
            continue;
        }
        let mut left = owners.iter().any(|o| down.contains(o));
        let mut after: Option<ChunkId> = None;
        loop {
            let store = ctx.store.clone();
            let from = after;
            let (page, done) = blocking(move || {
                let (start, end) = partition_range(bits, p);
                Ok(store.ids_in_range(&start, end.as_ref(), from.as_ref(), HANDOFF_BATCH)?)
            })
            .await?;
            if page.is_empty() {
                break;
            }
            after = page.last().copied();
            let held = page.len() as u64;
            if left {
                report.pending += held;
            } else {
                match hand_off_page(route, owners, page, &mut down).await {
                    Ok((handed, handed_bytes, released)) => {
                        report.handed += handed;
                        report.handed_bytes += handed_bytes;
                        report.released += released;
                    }
                    Err(e) if e.is_retryable() => {
                        report.errors.push(format!("partition {}: {e}", p.0));
                        report.pending += held;
                        left = true;
                    }
                    Err(e) => return Err(e),
                }
            }
            if done {
                break;
            }
        }
        report.incomplete += u64::from(left);
    }
    Ok(report)
}

/// Hands off one page of ids of a partition owned by `owners`, at the pace the node's move
/// limit allows; an owner that fails joins `down`. Returns the copies written, their
/// encoded bytes, and the index entries released.
async fn hand_off_page(
    route: &Route,
    owners: &[NodeId],
    ids: Vec<ChunkId>,
    down: &mut HashSet<NodeId>,
) -> Result<(u64, u64, u64), NodeError> {
    let ctx = route.ctx();
    let (mut handed, mut handed_bytes) = (0u64, 0u64);
    for &owner_id in owners {
        let has = match route.owner_has(owner_id, ids.clone()).await {
            Ok(has) => has,
            Err(e) => {
                down.insert(owner_id);
                return Err(e);
            }
        };
        let lacking: Vec<ChunkId> = ids
            .iter()
            .zip(&has)
            .filter(|(_, h)| !**h)
            .map(|(id, _)| *id)
            .collect();
        for batch in lacking.chunks(ctx.workers.pacer.batch(COPY_BATCH)) {
            let reads = owner::read(ctx, batch.to_vec(), Check::Full).await?;
            let chunks: Vec<_> = batch
                .iter()
                .zip(reads)
                .filter_map(|(id, r)| match r {
                    ChunkRead::Found(c) => Some(c.into_verified(*id)),
                    ChunkRead::Missing | ChunkRead::Damaged => None,
                })
                .collect();
            if chunks.is_empty() {
                continue;
            }
            let bytes: usize = chunks.iter().map(|c| c.data.len()).sum();
            ctx.workers.pacer.charge(bytes as u64).await;
            handed += chunks.len() as u64;
            handed_bytes += bytes as u64;
            if let Err(e) = route
                .owner_put(
                    owner_id,
                    Arc::new(chunks.into_iter().map(Outbound::from).collect()),
                )
                .await
            {
                down.insert(owner_id);
                return Err(e);
            }
        }
    }
    // Every owner now holds every good copy of this page (a damaged local copy already left
    // the index when it was read).
    let store = ctx.store.clone();
    let released = blocking(move || Ok(store.release(&ids)?)).await?;
    Ok((handed, handed_bytes, released))
}

/// Is `node` gone for good (removed from the map), so a source that cannot be reached is no
/// reason to keep a partition moving?
pub fn is_removed(route: &Route, node: NodeId) -> bool {
    route
        .member_state(node)
        .is_none_or(|s| s == MemberState::Removed)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use hashgrid_proto::placement::{ClusterMap, Member};

    use super::*;
    use crate::chunk_store::VerifiedChunk;

    /// Five active members, R = 3: each owns about 3/5 of the partitions.
    fn placement() -> Placement {
        Placement::new(&ClusterMap {
            epoch: 2,
            partition_bits: 12,
            replication: 3,
            write_quorum: 2,
            members: (1..=5)
                .map(|id| Member {
                    id,
                    addr: format!("10.0.0.{id}:7420"),
                    zone: String::new(),
                    weight: 1,
                    state: MemberState::Active,
                })
                .collect(),
        })
        .unwrap()
    }

    #[test]
    fn hand_off_pending_counts_the_chunks_of_partitions_the_node_does_not_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let p = placement();
        assert_eq!(hand_off_pending(&store, &p, 1), 0, "an empty store");
        let chunks: Vec<VerifiedChunk> = (0..300u32)
            .map(|i| {
                let plain = Bytes::from(format!("chunk {i}").into_bytes());
                VerifiedChunk::new(ChunkId::of(&plain), plain.len() as u32, 0, plain)
            })
            .collect();
        store.put(chunks.clone()).unwrap();
        let foreign: Vec<ChunkId> = chunks
            .iter()
            .map(|c| c.id)
            .filter(|id| !p.owners_of(id).contains(&1))
            .collect();
        assert!(!foreign.is_empty() && foreign.len() < chunks.len());
        assert_eq!(hand_off_pending(&store, &p, 1), foreign.len() as u64);
        // A member owning none of them (not in the map) would hand off all of them.
        assert_eq!(hand_off_pending(&store, &p, 99), chunks.len() as u64);
        // Once handed off (released from the index), nothing is pending.
        store.release(&foreign).unwrap();
        assert_eq!(hand_off_pending(&store, &p, 1), 0);
    }
}

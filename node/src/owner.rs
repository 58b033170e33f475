//! The owner layer: what a node does with the chunks it owns, on its local [`ChunkStore`].
//!
//! Two callers reach it: the coordinator on the same node (its own share of a request, with
//! no RPC) and coordinators on other nodes through the `Owner*` calls of the internal peer
//! service. Both go through the functions here, so the rules are written once: request
//! bounds ([`ids_of`], [`verify_batch`]), chunk verification (every chunk must decode to
//! exactly `plain_len` bytes, within the cluster's maximum chunk size, that hash to its id,
//! and must not be all zeros), durable stores, and verified reads with per-chunk faults.
//! An agent's batch is all or nothing ([`verify_batch`]); copies that move between nodes
//! are taken one by one ([`verify_copy`]), so one bad copy costs only its chunk.
//!
//! The agent-facing service verifies every chunk once as coordinator, before forwarding it;
//! an owner called over the peer service verifies again before storing, because a
//! coordinator is trusted to route, not to vouch for bytes.

use std::sync::Arc;

use hashgrid_proto::codec::{check_form, decode_verified, is_zero, ChunkError};
use hashgrid_proto::id::unpack_ids;
use hashgrid_proto::limits::{MAX_CHUNKS_PER_PUT, MAX_IDS_PER_REQUEST, TARGET_BATCH_BYTES};
use hashgrid_proto::pb::{self, GetResponse};
use hashgrid_proto::{ChunkId, NodeId};
use tokio::sync::mpsc;
use tonic::Status;

use crate::chunk_store::{Check, ChunkRead, ChunkStore, PutOutcome, VerifiedChunk};
use crate::context::NodeContext;
use crate::error::NodeError;
use crate::metrics as m;
use crate::service::blocking;

/// Ids read from the store per blocking call while streaming a `Get`.
const READ_GROUP: usize = 64;

/// The ids of a packed id list, bounded by [`MAX_IDS_PER_REQUEST`].
pub fn ids_of(packed: &[u8]) -> Result<Vec<ChunkId>, NodeError> {
    let ids = unpack_ids(packed)?;
    check_count("ids", ids.len(), MAX_IDS_PER_REQUEST)?;
    Ok(ids)
}

fn check_count(what: &'static str, count: usize, limit: usize) -> Result<(), NodeError> {
    if count > limit {
        return Err(NodeError::TooMany { what, count, limit });
    }
    Ok(())
}

/// Checks the size of a `Put` batch before any of it is decoded.
pub fn check_put_count(chunks: usize) -> Result<(), NodeError> {
    check_count("chunks", chunks, MAX_CHUNKS_PER_PUT)
}

/// Verifies every chunk of a batch (blocking: decompresses and hashes). One bad chunk fails
/// the whole batch, naming the chunk, so nothing of a bad batch is stored or forwarded.
pub fn verify_batch(chunks: Vec<pb::Chunk>, max_len: u32) -> Result<Vec<VerifiedChunk>, NodeError> {
    check_put_count(chunks.len())?;
    chunks
        .into_iter()
        .map(|c| verify_one(c, max_len))
        .collect::<Result<Vec<_>, ChunkError>>()
        .map_err(refused)
}

/// Verifies one copy another node served (blocking: decompresses and hashes); `None` when
/// it fails, logged with its `source` when known and counted (`reason` = `verify`). Where
/// copies move between nodes (a pull, a repair on lookup, a heal after a read) each is
/// verified on its own: one copy gone bad where it was read must cost only that chunk, not
/// every other chunk that came with it.
pub fn verify_copy(c: pb::Chunk, max_len: u32, source: Option<NodeId>) -> Option<VerifiedChunk> {
    match verify_one(c, max_len) {
        Ok(v) => Some(v),
        Err(e) => {
            match source {
                Some(source) => {
                    tracing::warn!(%source, error = %e, "refused a copy another owner served")
                }
                None => tracing::warn!(error = %e, "refused a copy another owner served"),
            }
            metrics::counter!(m::REJECTED, "reason" => "verify").increment(1);
            None
        }
    }
}

/// One chunk's verification: it decodes to its declared length, within `max_len`, hashes
/// to its id, and is not all zeros.
fn verify_one(c: pb::Chunk, max_len: u32) -> Result<VerifiedChunk, ChunkError> {
    let (id, plain) = decode_verified(&c, max_len)?;
    if is_zero(&plain) {
        return Err(ChunkError::AllZero { id });
    }
    Ok(VerifiedChunk::new(id, c.plain_len, c.codec, c.data))
}

/// A batch refused for a bad chunk: logged and counted.
fn refused(e: ChunkError) -> NodeError {
    tracing::warn!(error = %e, "refused a chunk batch");
    metrics::counter!(m::REJECTED, "reason" => "verify").increment(1);
    NodeError::from(e)
}

/// A verified chunk in its wire form, to forward to another owner (the bytes are shared).
pub fn to_wire(c: &VerifiedChunk) -> pb::Chunk {
    pb::Chunk {
        id: c.id.as_bytes().to_vec(),
        plain_len: c.plain_len,
        codec: c.codec,
        data: c.data.clone(),
        fault: pb::ChunkFault::None as i32,
    }
}

/// A chunk on its way to its owners. Every owner verifies what it stores, so a coordinator
/// verifies (decompresses and hashes) only the chunks it stores itself; one it only
/// forwards is checked for form ([`check_form`]) and verified by each owner it reaches.
/// Why: in a cluster wider than R most chunks a coordinator receives are not its own, and
/// it verified each anyway, four verifications of a new chunk for its three copies.
#[derive(Clone, Debug)]
pub enum Outbound {
    /// Verified here: this node may store it as it is.
    Verified(VerifiedChunk),
    /// Checked for form only: whoever stores it verifies it first (this node too, should
    /// it come to store it, as a fallback or under a newer map).
    Unverified { id: ChunkId, chunk: pb::Chunk },
}

impl Outbound {
    pub fn id(&self) -> ChunkId {
        match self {
            Outbound::Verified(c) => c.id,
            Outbound::Unverified { id, .. } => *id,
        }
    }

    /// The chunk, if it was verified here.
    pub fn verified(&self) -> Option<&VerifiedChunk> {
        match self {
            Outbound::Verified(c) => Some(c),
            Outbound::Unverified { .. } => None,
        }
    }

    /// The length of its encoded bytes, as stored.
    pub fn encoded_len(&self) -> usize {
        match self {
            Outbound::Verified(c) => c.data.len(),
            Outbound::Unverified { chunk, .. } => chunk.data.len(),
        }
    }

    /// Its wire form (the bytes are shared).
    pub fn to_wire(&self) -> pb::Chunk {
        match self {
            Outbound::Verified(c) => to_wire(c),
            Outbound::Unverified { chunk, .. } => chunk.clone(),
        }
    }
}

impl From<VerifiedChunk> for Outbound {
    fn from(c: VerifiedChunk) -> Self {
        Outbound::Verified(c)
    }
}

/// Checks a `Put` batch as it arrives at its coordinator (blocking: decompresses and hashes
/// the chunks it verifies): every chunk for form, and those `stored_here` says this node
/// stores fully ([`verify_batch`]'s checks). One bad chunk fails the whole batch, naming it.
pub fn prepare_batch(
    chunks: Vec<pb::Chunk>,
    max_len: u32,
    stored_here: impl Fn(&ChunkId) -> bool,
) -> Result<Vec<Outbound>, NodeError> {
    check_put_count(chunks.len())?;
    chunks
        .into_iter()
        .map(|c| {
            let (id, _) = check_form(&c, max_len)?;
            if stored_here(&id) {
                Ok(Outbound::Verified(verify_one(c, max_len)?))
            } else {
                // Forwarded as an owner expects a chunk: no read fault (those are replies').
                let chunk = pb::Chunk {
                    fault: pb::ChunkFault::None as i32,
                    ..c
                };
                Ok(Outbound::Unverified { id, chunk })
            }
        })
        .collect::<Result<Vec<_>, ChunkError>>()
        .map_err(refused)
}

/// `chunks` as this node may store them: the unverified ones verified now (blocking).
pub fn verify_outbound(chunks: &[Outbound], max_len: u32) -> Result<Vec<VerifiedChunk>, NodeError> {
    chunks
        .iter()
        .map(|c| match c {
            Outbound::Verified(v) => Ok(v.clone()),
            Outbound::Unverified { chunk, .. } => verify_one(chunk.clone(), max_len),
        })
        .collect::<Result<Vec<_>, ChunkError>>()
        .map_err(refused)
}

/// Which of `ids` this node holds (a verified copy as far as its index knows); refreshes
/// `last_seen` of the found ones.
pub async fn has(ctx: &NodeContext, ids: Vec<ChunkId>) -> Result<Vec<bool>, NodeError> {
    let store = ctx.store.clone();
    blocking(move || Ok(store.has(&ids)?)).await
}

/// Stores chunks that were already verified, durably, before returning; says of each chunk
/// whether it was newly stored (see [`ChunkStore::put_each`]).
pub async fn store(
    ctx: &NodeContext,
    chunks: Vec<VerifiedChunk>,
) -> Result<(PutOutcome, Vec<bool>), NodeError> {
    note_held_for_others(ctx, chunks.iter().map(|c| &c.id));
    let store = ctx.store.clone();
    let (outcome, new) = blocking(move || Ok(store.put_each(chunks)?)).await?;
    record_put(&ctx.store, outcome);
    Ok((outcome, new))
}

/// Stores chunks a coordinator on this node routed here, verifying first those it only
/// checked for form ([`Outbound::Unverified`]).
pub async fn store_outbound(
    ctx: &NodeContext,
    chunks: Arc<Vec<Outbound>>,
) -> Result<(PutOutcome, Vec<bool>), NodeError> {
    let verified = match chunks
        .iter()
        .map(Outbound::verified)
        .collect::<Option<Vec<_>>>()
    {
        Some(verified) => verified.into_iter().cloned().collect(),
        None => {
            let max_len = ctx.chunker()?.max_size;
            blocking(move || verify_outbound(&chunks, max_len)).await?
        }
    };
    store(ctx, verified).await
}

/// Verifies and stores one batch sent by a coordinator; says of each chunk whether it was
/// newly stored.
pub async fn verify_and_store(
    ctx: &NodeContext,
    chunks: Vec<pb::Chunk>,
) -> Result<(PutOutcome, Vec<bool>), NodeError> {
    check_put_count(chunks.len())?;
    let max_len = ctx.chunker()?.max_size;
    let store = ctx.store.clone();
    let (outcome, new, ids) = blocking(move || {
        let verified = verify_batch(chunks, max_len)?;
        let ids: Vec<ChunkId> = verified.iter().map(|c| c.id).collect();
        let (outcome, new) = store.put_each(verified)?;
        Ok((outcome, new, ids))
    })
    .await?;
    note_held_for_others(ctx, ids.iter());
    record_put(&ctx.store, outcome);
    Ok((outcome, new))
}

/// Stores the good copies of `chunks`, which another owner served (a repair or a
/// rebalance pull): each is verified on its own, and one that fails is left out, logged and
/// counted (`reason` = `verify`), not allowed to fail the rest. A source whose copy passed
/// its own stored-bytes check yet decodes wrong here (damaged before that check was taken,
/// or a faulty peer) must not stall every pass that pulls from it; the id stays missing
/// here, for another source or a later pass. Returns what was stored and the ids now held.
pub async fn store_copies(
    ctx: &NodeContext,
    chunks: Vec<pb::Chunk>,
    source: NodeId,
) -> Result<(PutOutcome, Vec<ChunkId>), NodeError> {
    check_put_count(chunks.len())?;
    let max_len = ctx.chunker()?.max_size;
    let store = ctx.store.clone();
    let (outcome, ids) = blocking(move || {
        let good: Vec<VerifiedChunk> = chunks
            .into_iter()
            .filter_map(|c| verify_copy(c, max_len, Some(source)))
            .collect();
        let ids: Vec<ChunkId> = good.iter().map(|c| c.id).collect();
        if good.is_empty() {
            return Ok((PutOutcome::default(), ids));
        }
        let (outcome, _) = store.put_each(good)?;
        Ok((outcome, ids))
    })
    .await?;
    note_held_for_others(ctx, ids.iter());
    record_put(&ctx.store, outcome);
    Ok((outcome, ids))
}

/// A copy stored here of a chunk this node does not own under the current map (it stands
/// in for unreachable owners, see [`crate::coordinator::write`]) is due to be handed off:
/// tells the rebalance worker to run a hand-off pass.
fn note_held_for_others<'a>(ctx: &NodeContext, mut ids: impl Iterator<Item = &'a ChunkId>) {
    let Ok(placement) = ctx.placement() else {
        return;
    };
    let current = placement.current();
    if ids.any(|id| !current.owners_of(id).contains(&ctx.node_id)) {
        ctx.workers.hand_off_due();
    }
}

fn record_put(store: &ChunkStore, outcome: PutOutcome) {
    metrics::counter!(m::PUT_CHUNKS, "result" => "stored").increment(u64::from(outcome.stored));
    metrics::counter!(m::PUT_CHUNKS, "result" => "existing").increment(u64::from(outcome.existing));
    metrics::counter!(m::PUT_BYTES).increment(outcome.stored_bytes);
    publish_store_gauges(store);
}

pub fn publish_store_gauges(store: &ChunkStore) {
    let counters = store.counters();
    metrics::gauge!(m::STORE_CHUNKS).set(counters.chunks as f64);
    metrics::gauge!(m::STORE_BYTES).set(counters.stored_bytes as f64);
    metrics::gauge!(m::STORE_RECLAIMABLE).set(counters.reclaimable_bytes as f64);
}

/// Reads `ids` from the local store, checking each copy as `check` says: for a reader that
/// decodes and hashes what it gets anyway (an agent, another owner verifying a copy before
/// storing it) that its bytes are the ones verified when stored ([`Check::Stored`]); in
/// full where this node lets go of its copy once another holds it (a hand-off), so that a
/// copy gone bad before its checksum was taken is found here, not refused there. A copy
/// that fails leaves the index and comes back as [`ChunkRead::Damaged`].
pub async fn read(
    ctx: &NodeContext,
    ids: Vec<ChunkId>,
    check: Check,
) -> Result<Vec<ChunkRead>, NodeError> {
    let max_len = ctx.chunker()?.max_size;
    let store = ctx.store.clone();
    let reads = blocking(move || Ok(store.get(&ids, max_len, check)?)).await?;
    let count = |what: fn(&ChunkRead) -> bool| reads.iter().filter(|r| what(r)).count() as u64;
    let missing = count(|r| matches!(r, ChunkRead::Missing));
    let damaged = count(|r| matches!(r, ChunkRead::Damaged));
    let served = reads.len() as u64 - missing - damaged;
    metrics::counter!(m::GET_CHUNKS, "result" => "served").increment(served);
    metrics::counter!(m::GET_CHUNKS, "result" => "missing").increment(missing);
    metrics::counter!(m::GET_CHUNKS, "result" => "damaged").increment(damaged);
    if damaged > 0 {
        publish_store_gauges(&ctx.store);
    }
    Ok(reads)
}

/// How a `Get` or `OwnerGet` asks its copies to be checked: against their stored checksum,
/// or, with `full_check`, decoded and hashed (see `GetRequest.full_check`).
pub fn check_asked(full_check: bool) -> Check {
    if full_check {
        Check::Full
    } else {
        Check::Stored
    }
}

/// The reply for one requested id.
pub fn reply_chunk(id: ChunkId, read: ChunkRead) -> pb::Chunk {
    let fault = |fault: pb::ChunkFault| pb::Chunk {
        id: id.as_bytes().to_vec(),
        fault: fault as i32,
        ..Default::default()
    };
    match read {
        ChunkRead::Found(c) => pb::Chunk {
            id: id.as_bytes().to_vec(),
            plain_len: c.plain_len,
            codec: c.codec,
            data: c.data,
            fault: pb::ChunkFault::None as i32,
        },
        ChunkRead::Missing => fault(pb::ChunkFault::Missing),
        ChunkRead::Damaged => fault(pb::ChunkFault::Damaged),
    }
}

/// Streams one reply per id of `ids` from the local store, in order, in messages of about
/// [`TARGET_BATCH_BYTES`].
pub async fn stream_local(
    ctx: Arc<NodeContext>,
    ids: Vec<ChunkId>,
    check: Check,
    tx: mpsc::Sender<Result<GetResponse, Status>>,
) {
    let mut batcher = ReplyBatcher::new(tx);
    for group in ids.chunks(READ_GROUP) {
        let reads = match read(&ctx, group.to_vec(), check).await {
            Ok(r) => r,
            Err(e) => return batcher.fail(e).await,
        };
        for (&id, r) in group.iter().zip(reads) {
            if !batcher.push(reply_chunk(id, r)).await {
                return;
            }
        }
    }
    batcher.finish().await;
}

/// Gathers `Get` replies into messages of about [`TARGET_BATCH_BYTES`].
pub struct ReplyBatcher {
    tx: mpsc::Sender<Result<GetResponse, Status>>,
    pending: GetResponse,
    bytes: usize,
}

impl ReplyBatcher {
    pub fn new(tx: mpsc::Sender<Result<GetResponse, Status>>) -> Self {
        ReplyBatcher {
            tx,
            pending: GetResponse::default(),
            bytes: 0,
        }
    }

    /// Adds one reply; false when the receiver is gone.
    pub async fn push(&mut self, c: pb::Chunk) -> bool {
        self.bytes += c.data.len();
        metrics::counter!(m::GET_BYTES).increment(c.data.len() as u64);
        self.pending.chunks.push(c);
        if self.bytes >= TARGET_BATCH_BYTES {
            self.bytes = 0;
            return self
                .tx
                .send(Ok(std::mem::take(&mut self.pending)))
                .await
                .is_ok();
        }
        true
    }

    pub async fn finish(self) {
        if !self.pending.chunks.is_empty() {
            let _ = self.tx.send(Ok(self.pending)).await;
        }
    }

    pub async fn fail(self, e: NodeError) {
        let _ = self.tx.send(Err(e.into())).await;
    }
}

pub use hashgrid_proto::id::{from_bitmap, to_bitmap};

#[cfg(test)]
mod tests {
    use super::*;

    /// `b` encoded as an agent sends it.
    fn chunk(b: &[u8]) -> pb::Chunk {
        let plain = bytes::Bytes::copy_from_slice(b);
        hashgrid_proto::codec::encode_chunk(ChunkId::of(&plain), &plain, 3)
    }

    #[test]
    fn a_batch_with_one_bad_chunk_is_refused_whole() {
        let good = chunk(b"good chunk");
        let mut bad = chunk(b"bad chunk");
        bad.id[0] ^= 1;
        let err = verify_batch(vec![good.clone(), bad], 1 << 20).unwrap_err();
        assert!(matches!(err, NodeError::Chunk(_)), "{err}");
        assert_eq!(verify_batch(vec![good], 1 << 20).unwrap().len(), 1);
        let zero = chunk(&[0u8; 100]);
        assert!(matches!(
            verify_batch(vec![zero], 1 << 20),
            Err(NodeError::Chunk(ChunkError::AllZero { .. }))
        ));
    }

    #[test]
    fn a_coordinator_verifies_what_it_stores_and_checks_the_form_of_the_rest() {
        let mine = chunk(b"a chunk this node owns");
        let theirs = chunk(b"a chunk other nodes own");
        let mine_id = ChunkId::from_slice(&mine.id).unwrap();
        let stored_here = move |id: &ChunkId| *id == mine_id;
        let out = prepare_batch(vec![mine.clone(), theirs.clone()], 1 << 20, stored_here).unwrap();
        assert!(matches!(&out[0], Outbound::Verified(c) if c.id == mine_id));
        assert!(matches!(&out[1], Outbound::Unverified { .. }));
        assert_eq!(out[1].to_wire(), theirs);
        assert_eq!(out[1].encoded_len(), theirs.data.len());

        // A forwarded chunk whose bytes do not hash to its id passes the form check; the
        // node that comes to store it (an owner, or this one) refuses it.
        let mut wrong = theirs.clone();
        wrong.id[0] ^= 1;
        let out = prepare_batch(vec![wrong.clone()], 1 << 20, stored_here).unwrap();
        assert!(matches!(
            verify_outbound(&out, 1 << 20),
            Err(NodeError::Chunk(ChunkError::WrongHash { .. }))
        ));
        // One it stores is refused at once, and so is a forwarded one of a bad form.
        let mut bad_mine = mine.clone();
        bad_mine.data = bytes::Bytes::from_static(b"not a zstd frame");
        let refused = prepare_batch(vec![bad_mine], 1 << 20, |_| true).unwrap_err();
        assert!(refused.is_invalid(), "{refused}");
        let mut bad_form = theirs;
        bad_form.plain_len = 2 << 20;
        assert!(matches!(
            prepare_batch(vec![bad_form], 1 << 20, |_| false),
            Err(NodeError::Chunk(ChunkError::TooLarge { .. }))
        ));
    }

    #[test]
    fn oversized_requests_are_refused() {
        let ids = vec![0u8; 32 * (MAX_IDS_PER_REQUEST + 1)];
        assert!(matches!(ids_of(&ids), Err(NodeError::TooMany { .. })));
        assert!(matches!(
            check_put_count(MAX_CHUNKS_PER_PUT + 1),
            Err(NodeError::TooMany { .. })
        ));
    }
}

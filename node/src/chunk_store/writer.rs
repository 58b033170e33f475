//! The chunk store's one writer thread. Inserts and drops of damaged copies all go through
//! it: it merges whatever insert batches are waiting into one synced write (group commit:
//! one fsync for several streams' batches) and does the check-then-insert for all of them,
//! so a chunk arriving twice at once is stored and counted once, and the counters have a
//! single writer.

use std::collections::HashSet;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use hashgrid_proto::ChunkId;
use rocksdb::{WriteBatch, WriteOptions, DB};

use super::digests::{Delta, Digests};
use super::{
    cf, metas, now_secs, pack_err, rocks, ChunkMeta, PutOutcome, StoreCounters, StoreError,
    VerifiedChunk, CF_META, CF_STORE, KEY_COUNTERS, TOUCH_INTERVAL_SECS,
};
use crate::metrics as m;
use crate::pack::{PackFiles, Record, HEADER_LEN};

/// Upper bound on the bytes one group commit gathers before its synced write.
const GROUP_BYTES: usize = 32 << 20;

pub(super) enum Request {
    Put(PutRequest),
    Drop(DropRequest),
    Upgrade(UpgradeRequest),
}

pub(super) struct PutRequest {
    pub(super) chunks: Vec<VerifiedChunk>,
    /// The outcome, and per chunk whether it was newly stored.
    pub(super) reply: SyncSender<Result<(PutOutcome, Vec<bool>), StoreError>>,
}

/// Copies to take out of the index, each with the metadata that pointed at it: an entry
/// that changed since (another read dropped it and a new copy came) is left alone.
pub(super) struct DropRequest {
    pub(super) copies: Vec<(ChunkId, ChunkMeta)>,
    pub(super) why: DropReason,
    pub(super) reply: SyncSender<Result<u64, StoreError>>,
}

/// Entries written before checksums were kept ([`super::META_V1`]) whose copies a read just
/// decoded and hashed: each gets the checksum of its encoded bytes, so later reads check that
/// instead of decoding again. Nobody waits for it: a read that found the queue full leaves
/// the entry for the next read, and a crash before the (unsynced) write loses nothing.
pub(super) struct UpgradeRequest {
    /// Each entry as the read found it, and the checksum of the bytes that passed.
    pub(super) copies: Vec<(ChunkId, ChunkMeta, u64)>,
}

/// Why copies leave the index; both leave their pack bytes reclaimable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DropReason {
    /// The copy failed verification (counted as damaged).
    Damaged,
    /// The chunk's partition moved to other owners, who hold it.
    Released,
}

/// The writer thread's handles.
pub(super) struct Writer {
    pub(super) db: Arc<DB>,
    pub(super) packs: Arc<PackFiles>,
    pub(super) counters: Arc<Mutex<StoreCounters>>,
    pub(super) digests: Arc<Digests>,
    pub(super) fence: Arc<RwLock<()>>,
}

impl Writer {
    /// Starts the writer thread; it runs until every sender of the returned channel is gone.
    pub(super) fn spawn(self) -> Result<(SyncSender<Request>, JoinHandle<()>), StoreError> {
        let (requests, inbox) = sync_channel(64);
        let thread = std::thread::Builder::new()
            .name("chunk-writer".into())
            .spawn(move || self.run(&inbox))
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        Ok((requests, thread))
    }

    /// Takes the next request; for an insert, also whatever other inserts are already
    /// waiting, and commits them together.
    fn run(&self, requests: &Receiver<Request>) {
        let mut held = None;
        loop {
            let Some(first) = held.take().or_else(|| requests.recv().ok()) else {
                return;
            };
            let first = match first {
                Request::Drop(d) => {
                    let _ = d.reply.send(self.drop_copies(&d.copies, d.why));
                    continue;
                }
                Request::Upgrade(u) => {
                    if let Err(e) = self.upgrade_entries(&u.copies) {
                        tracing::warn!(error = %e, "adding checksums to old index entries");
                    }
                    continue;
                }
                Request::Put(p) => p,
            };
            let mut bytes: usize = first.chunks.iter().map(|c| c.data.len()).sum();
            let mut group = vec![first];
            while bytes < GROUP_BYTES {
                match requests.try_recv() {
                    Ok(Request::Put(r)) => {
                        bytes += r.chunks.iter().map(|c| c.data.len()).sum::<usize>();
                        group.push(r);
                    }
                    Ok(other) => {
                        held = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            match self.write_group(&group) {
                Ok(outcomes) => {
                    for (req, outcome) in group.into_iter().zip(outcomes) {
                        let _ = req.reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    for req in group {
                        let _ = req.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    fn counters(&self) -> StoreCounters {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `batch` with the counters `next` and the digest changes `delta` in it, synced,
    /// then publishes both.
    fn commit(
        &self,
        mut batch: WriteBatch,
        next: StoreCounters,
        delta: Delta<'_>,
        op: &'static str,
    ) -> Result<(), StoreError> {
        batch.put_cf(cf(&self.db, CF_STORE), KEY_COUNTERS, next.encode());
        delta.write(&mut batch, cf(&self.db, CF_STORE));
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db
            .write_opt(batch, &sync)
            .map_err(rocks(&self.db, op))?;
        *self.counters.lock().unwrap_or_else(|p| p.into_inner()) = next;
        self.digests.apply(delta);
        Ok(())
    }

    /// Commits several requests together: new chunks' bytes go to a pack file (synced), then
    /// all metadata and the counters in one synced write batch. Returns each request's
    /// outcome, and per chunk whether it was newly stored.
    fn write_group(
        &self,
        group: &[PutRequest],
    ) -> Result<Vec<(PutOutcome, Vec<bool>)>, StoreError> {
        let db = &*self.db;
        let ids: Vec<ChunkId> = group
            .iter()
            .flat_map(|r| r.chunks.iter().map(|c| c.id))
            .collect();
        let found = metas(db, &ids)?;
        let now = now_secs();
        let mut batch = WriteBatch::default();
        let mut seen = HashSet::with_capacity(ids.len());
        let mut new_chunks: Vec<&VerifiedChunk> = Vec::new();
        let mut outcomes = Vec::with_capacity(group.len());
        let mut found = found.into_iter();
        for req in group {
            let mut outcome = PutOutcome::default();
            let mut new = Vec::with_capacity(req.chunks.len());
            for chunk in &req.chunks {
                let meta = found.next().flatten();
                new.push(meta.is_none() && !seen.contains(&chunk.id));
                if !seen.insert(chunk.id) {
                    outcome.existing += 1;
                    continue;
                }
                match meta {
                    Some(m) => {
                        outcome.existing += 1;
                        if m.last_seen + TOUCH_INTERVAL_SECS < now {
                            let m = ChunkMeta {
                                last_seen: now,
                                ..m
                            };
                            batch.put_cf(cf(db, CF_META), chunk.id.as_bytes(), m.encode());
                        }
                    }
                    None => {
                        outcome.stored += 1;
                        outcome.stored_bytes += chunk.data.len() as u64;
                        new_chunks.push(chunk);
                    }
                }
            }
            outcomes.push((outcome, new));
        }
        if !new_chunks.is_empty() {
            let records: Vec<Record<'_>> = new_chunks
                .iter()
                .map(|c| Record {
                    id: &c.id,
                    plain_len: c.plain_len,
                    codec: c.codec,
                    data: &c.data,
                })
                .collect();
            let locations = self
                .packs
                .append(&records)
                .map_err(|e| pack_err("appending chunks", e))
                .inspect_err(|e| {
                    if matches!(e, StoreError::NoSpace(_)) {
                        tracing::warn!(error = %e, "chunk upload refused");
                    }
                })?;
            let mut next = self.counters();
            let mut delta = self.digests.delta();
            for (chunk, location) in new_chunks.iter().zip(locations) {
                let meta = ChunkMeta {
                    location,
                    plain_len: chunk.plain_len,
                    codec: chunk.codec,
                    last_seen: now,
                    sum: Some(chunk.sum),
                };
                batch.put_cf(cf(db, CF_META), chunk.id.as_bytes(), meta.encode());
                next.chunks += 1;
                next.stored_bytes += chunk.data.len() as u64;
                next.plain_bytes += u64::from(chunk.plain_len);
                delta.add(&chunk.id);
            }
            self.commit(batch, next, delta, "write chunk metadata")?;
        } else if !batch.is_empty() {
            db.write(batch).map_err(rocks(db, "touch last_seen"))?;
        }
        Ok(outcomes)
    }

    /// Drops copies from the index and counts them, in one synced batch. Returns how many
    /// were dropped (a copy another read dropped first is not counted twice).
    fn drop_copies(
        &self,
        copies: &[(ChunkId, ChunkMeta)],
        why: DropReason,
    ) -> Result<u64, StoreError> {
        let _fence = self.fence.write().unwrap_or_else(|p| p.into_inner());
        let db = &*self.db;
        let ids: Vec<ChunkId> = copies.iter().map(|(id, _)| *id).collect();
        let current = metas(db, &ids)?;
        let mut next = self.counters();
        let mut delta = self.digests.delta();
        let mut batch = WriteBatch::default();
        let mut dropped = 0u64;
        let mut seen = HashSet::with_capacity(copies.len());
        for ((id, bad), indexed) in copies.iter().zip(current) {
            if indexed.map(|m| m.location) != Some(bad.location) || !seen.insert(*id) {
                continue;
            }
            batch.delete_cf(cf(db, CF_META), id.as_bytes());
            delta.remove(id);
            next.chunks = next.chunks.saturating_sub(1);
            next.stored_bytes = next
                .stored_bytes
                .saturating_sub(u64::from(bad.location.len));
            next.plain_bytes = next.plain_bytes.saturating_sub(u64::from(bad.plain_len));
            next.reclaimable_bytes += u64::from(bad.location.len) + HEADER_LEN as u64;
            if why == DropReason::Damaged {
                next.damaged += 1;
            }
            dropped += 1;
        }
        if dropped > 0 {
            match why {
                DropReason::Damaged => {
                    self.commit(batch, next, delta, "drop damaged chunks")?;
                    metrics::counter!(m::STORE_DAMAGED).increment(dropped);
                }
                DropReason::Released => {
                    self.commit(batch, next, delta, "release moved chunks")?;
                }
            }
        }
        Ok(dropped)
    }

    /// Adds the checksum to entries that still point where the read found them and still lack
    /// one (a copy dropped or replaced since is left alone). Under the fence, so a `has` that
    /// read an entry before this cannot write its `last_seen` refresh back over the upgrade.
    /// Returns how many entries were upgraded.
    fn upgrade_entries(&self, copies: &[(ChunkId, ChunkMeta, u64)]) -> Result<u64, StoreError> {
        let _fence = self.fence.write().unwrap_or_else(|p| p.into_inner());
        let db = &*self.db;
        let ids: Vec<ChunkId> = copies.iter().map(|(id, _, _)| *id).collect();
        let mut batch = WriteBatch::default();
        let mut upgraded = 0u64;
        for ((id, read, sum), indexed) in copies.iter().zip(metas(db, &ids)?) {
            match indexed {
                Some(m) if m.location == read.location && m.sum.is_none() => {
                    let m = ChunkMeta {
                        sum: Some(*sum),
                        ..m
                    };
                    batch.put_cf(cf(db, CF_META), id.as_bytes(), m.encode());
                    upgraded += 1;
                }
                _ => {}
            }
        }
        if upgraded > 0 {
            db.write(batch)
                .map_err(rocks(db, "add checksums to entries"))?;
            metrics::counter!(m::STORE_UPGRADED).increment(upgraded);
        }
        Ok(upgraded)
    }
}

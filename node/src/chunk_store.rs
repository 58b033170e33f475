//! The node's chunk store: chunk metadata in RocksDB, chunk bytes in pack files.
//!
//! - `chunk_meta` (RocksDB column family): id -> where the bytes are (pack, offset, length),
//!   plaintext length, codec, last_seen. Small values with bloom filters and a block cache,
//!   so `has` answers absent ids without a disk seek and never touches chunk bytes.
//! - `packs/` ([`crate::pack`]): append-only files of chunk records, written once.
//! - `store_meta`: counters (chunks, bytes), updated in the same write batch as the metadata.
//!
//! Guarantees: an insert is durable before it returns (pack bytes synced, then metadata
//! written with a synced WAL); a stored chunk is never overwritten (a second insert only
//! refreshes `last_seen`); chunks leave only by GC (a later issue), which relies on
//! `last_seen` as PBS relies on atime.

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hashgrid_proto::ChunkId;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Options, WriteBatch,
    WriteOptions, DB,
};
use thiserror::Error;

use crate::pack::{Location, PackFiles, Record};

const CF_META: &str = "chunk_meta";
const CF_STORE: &str = "store_meta";
const KEY_COUNTERS: &[u8] = b"counters";

/// `last_seen` is rewritten only when older than this, so lookups of hot chunks do not turn
/// into a write each. GC's grace period must exceed it (PBS uses the same trick with atime).
pub const TOUCH_INTERVAL_SECS: u64 = 3600;

const META_VERSION: u8 = 1;
const META_LEN: usize = 30;

#[derive(Clone, Debug, Error)]
pub enum StoreError {
    #[error("chunk store: {0}")]
    Thread(String),
    #[error("chunk store at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    #[error("chunk store {op}: {source}")]
    Rocks {
        op: &'static str,
        source: rocksdb::Error,
    },
    #[error("chunk store: corrupt metadata for chunk {id}")]
    CorruptMeta { id: ChunkId },
    #[error("chunk store: pack files: {0}")]
    Pack(String),
    #[error("chunk store: out of disk space ({0}); free space or add capacity, then retry")]
    NoSpace(String),
}

fn rocks(op: &'static str) -> impl FnOnce(rocksdb::Error) -> StoreError {
    move |source| {
        // RocksDB reports a full disk only in its message text.
        if source.to_string().contains("No space left on device") {
            return StoreError::NoSpace(format!("{op}: {source}"));
        }
        StoreError::Rocks { op, source }
    }
}

/// A pack file error, with a full disk (or quota) told apart so agents get
/// `RESOURCE_EXHAUSTED` and the operator a warning rather than an internal error.
fn pack_err(what: &str, e: std::io::Error) -> StoreError {
    let full = e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded;
    if full {
        StoreError::NoSpace(format!("{what}: {e}"))
    } else {
        StoreError::Pack(format!("{what}: {e}"))
    }
}

/// What a chunk's metadata record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub location: Location,
    pub plain_len: u32,
    pub codec: i32,
    pub last_seen: u64,
}

impl ChunkMeta {
    fn encode(&self) -> [u8; META_LEN] {
        let mut out = [0u8; META_LEN];
        out[0] = META_VERSION;
        out[1..5].copy_from_slice(&self.location.pack.to_le_bytes());
        out[5..13].copy_from_slice(&self.location.offset.to_le_bytes());
        out[13..17].copy_from_slice(&self.location.len.to_le_bytes());
        out[17..21].copy_from_slice(&self.plain_len.to_le_bytes());
        out[21] = self.codec as u8;
        out[22..30].copy_from_slice(&self.last_seen.to_le_bytes());
        out
    }

    fn decode(id: &ChunkId, b: &[u8]) -> Result<Self, StoreError> {
        if b.len() != META_LEN || b[0] != META_VERSION {
            return Err(StoreError::CorruptMeta { id: *id });
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(ChunkMeta {
            location: Location {
                pack: u32_at(1),
                offset: u64_at(5),
                len: u32_at(13),
            },
            plain_len: u32_at(17),
            codec: i32::from(b[21]),
            last_seen: u64_at(22),
        })
    }
}

/// A chunk whose encoded bytes were checked against its id (see `hashgrid_proto::codec`).
#[derive(Clone, Debug)]
pub struct VerifiedChunk {
    pub id: ChunkId,
    pub plain_len: u32,
    pub codec: i32,
    pub data: Bytes,
}

/// A chunk as stored, ready to send.
#[derive(Clone, Debug)]
pub struct StoredChunk {
    pub plain_len: u32,
    pub codec: i32,
    pub data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PutOutcome {
    pub stored: u32,
    pub existing: u32,
    pub stored_bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreCounters {
    pub chunks: u64,
    pub stored_bytes: u64,
    pub plain_bytes: u64,
}

impl StoreCounters {
    fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.chunks.to_le_bytes());
        out[8..16].copy_from_slice(&self.stored_bytes.to_le_bytes());
        out[16..].copy_from_slice(&self.plain_bytes.to_le_bytes());
        out
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let u = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        Some(StoreCounters {
            chunks: u(0)?,
            stored_bytes: u(8)?,
            plain_bytes: u(16)?,
        })
    }
}

/// Upper bound on the bytes one group commit gathers before its synced write.
const GROUP_BYTES: usize = 32 << 20;

pub struct ChunkStore {
    db: Arc<DB>,
    packs: Arc<PackFiles>,
    /// Inserts go to one writer thread, which merges whatever batches are waiting into one
    /// synced write (group commit: one fsync for several streams' batches) and does the
    /// check-then-insert for all of them, so a chunk arriving twice at once is stored and
    /// counted once.
    writer: Option<SyncSender<WriteRequest>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    counters: Arc<Mutex<StoreCounters>>,
}

impl Drop for ChunkStore {
    /// Stops the writer thread and waits for it, so the database is closed (and its lock
    /// released) when the store is dropped.
    fn drop(&mut self) {
        drop(self.writer.take());
        if let Some(t) = self.writer_thread.take() {
            let _ = t.join();
        }
    }
}

struct WriteRequest {
    chunks: Vec<VerifiedChunk>,
    reply: SyncSender<Result<PutOutcome, StoreError>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ChunkStore {
    /// Opens (creating if needed) the store in `path`. `cache_bytes` sizes the block cache
    /// shared by both column families' index, filter and data blocks.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let cache = Cache::new_lru_cache(cache_bytes);

        let mut meta_table = BlockBasedOptions::default();
        meta_table.set_block_cache(&cache);
        meta_table.set_bloom_filter(10.0, false);
        meta_table.set_cache_index_and_filter_blocks(true);
        meta_table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        let mut meta_opts = Options::default();
        meta_opts.set_block_based_table_factory(&meta_table);
        meta_opts.set_compression_type(DBCompressionType::Lz4);
        meta_opts.set_write_buffer_size(32 << 20);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_META, meta_opts),
            ColumnFamilyDescriptor::new(CF_STORE, Options::default()),
        ];
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let db = DB::open_cf_descriptors(&db_opts, path.join("meta"), cfs).map_err(open_err)?;
        let packs =
            Arc::new(PackFiles::open(&path.join("packs")).map_err(|e| pack_err("opening", e))?);
        let counters = db
            .get_cf(db.cf_handle(CF_STORE).expect("cf opened"), KEY_COUNTERS)
            .map_err(rocks("read counters"))?
            .and_then(|b| StoreCounters::decode(&b))
            .unwrap_or_default();
        let db = Arc::new(db);
        let counters = Arc::new(Mutex::new(counters));
        let (writer, requests) = sync_channel(64);
        let writer_thread = {
            let db = db.clone();
            let packs = packs.clone();
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("chunk-writer".into())
                .spawn(move || write_loop(&db, &packs, &requests, &counters))
                .map_err(|e| StoreError::Thread(e.to_string()))?
        };
        Ok(ChunkStore {
            db,
            packs,
            writer: Some(writer),
            writer_thread: Some(writer_thread),
            counters,
        })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        cf(&self.db, name)
    }

    /// Which of `ids` are stored. Found chunks have `last_seen` refreshed (lazily).
    pub fn has(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        let metas = metas(&self.db, ids)?;
        let now = now_secs();
        let mut touch = WriteBatch::default();
        for (id, meta) in ids.iter().zip(&metas) {
            if let Some(m) = meta {
                if m.last_seen + TOUCH_INTERVAL_SECS < now {
                    let m = ChunkMeta {
                        last_seen: now,
                        ..*m
                    };
                    touch.put_cf(self.cf(CF_META), id.as_bytes(), m.encode());
                }
            }
        }
        if !touch.is_empty() {
            self.db.write(touch).map_err(rocks("touch last_seen"))?;
        }
        Ok(metas.iter().map(Option::is_some).collect())
    }

    /// Stores verified chunks atomically and durably. Chunks already present are not
    /// rewritten; their `last_seen` is refreshed.
    pub fn put(&self, chunks: Vec<VerifiedChunk>) -> Result<PutOutcome, StoreError> {
        let (reply, outcome) = sync_channel(1);
        self.writer
            .as_ref()
            .ok_or_else(|| StoreError::Thread("chunk store closed".into()))?
            .send(WriteRequest { chunks, reply })
            .map_err(|_| StoreError::Thread("chunk writer stopped".into()))?;
        outcome
            .recv()
            .map_err(|_| StoreError::Thread("chunk writer stopped".into()))?
    }

    /// Reads chunks; `None` for ids not stored.
    pub fn get(&self, ids: &[ChunkId]) -> Result<Vec<Option<StoredChunk>>, StoreError> {
        metas(&self.db, ids)?
            .into_iter()
            .map(|meta| {
                let Some(meta) = meta else { return Ok(None) };
                let data = self
                    .packs
                    .read(meta.location)
                    .map_err(|e| pack_err(&format!("reading {:?}", meta.location), e))?;
                Ok(Some(StoredChunk {
                    plain_len: meta.plain_len,
                    codec: meta.codec,
                    data,
                }))
            })
            .collect()
    }

    pub fn counters(&self) -> StoreCounters {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flushes memtables so the WAL can be dropped; called on clean shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in [CF_META, CF_STORE] {
            self.db.flush_cf(self.cf(cf)).map_err(rocks("flush"))?;
        }
        Ok(())
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name)
        .expect("column family opened in ChunkStore::open")
}

fn metas(db: &DB, ids: &[ChunkId]) -> Result<Vec<Option<ChunkMeta>>, StoreError> {
    db.batched_multi_get_cf(cf(db, CF_META), ids.iter().map(|id| id.as_bytes()), false)
        .into_iter()
        .zip(ids)
        .map(|(r, id)| match r.map_err(rocks("read metadata"))? {
            Some(v) => ChunkMeta::decode(id, &v).map(Some),
            None => Ok(None),
        })
        .collect()
}

/// The writer thread: takes the next request and whatever else is already waiting, and
/// commits them together.
fn write_loop(
    db: &DB,
    packs: &PackFiles,
    requests: &Receiver<WriteRequest>,
    counters: &Mutex<StoreCounters>,
) {
    while let Ok(first) = requests.recv() {
        let mut bytes: usize = first.chunks.iter().map(|c| c.data.len()).sum();
        let mut group = vec![first];
        while bytes < GROUP_BYTES {
            match requests.try_recv() {
                Ok(r) => {
                    bytes += r.chunks.iter().map(|c| c.data.len()).sum::<usize>();
                    group.push(r);
                }
                Err(_) => break,
            }
        }
        match write_group(db, packs, &group, counters) {
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

/// Commits several requests together: new chunks' bytes go to a pack file (synced), then
/// all metadata and the counters in one synced write batch. Returns each request's outcome.
fn write_group(
    db: &DB,
    packs: &PackFiles,
    group: &[WriteRequest],
    counters: &Mutex<StoreCounters>,
) -> Result<Vec<PutOutcome>, StoreError> {
    let ids: Vec<ChunkId> = group
        .iter()
        .flat_map(|r| r.chunks.iter().map(|c| c.id))
        .collect();
    let found = metas(db, &ids)?;
    let now = now_secs();
    let mut batch = WriteBatch::default();
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    let mut new_chunks: Vec<&VerifiedChunk> = Vec::new();
    let mut outcomes = Vec::with_capacity(group.len());
    let mut found = found.into_iter();
    for req in group {
        let mut outcome = PutOutcome::default();
        for chunk in &req.chunks {
            let meta = found.next().flatten();
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
        outcomes.push(outcome);
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
        let locations = packs
            .append(&records)
            .map_err(|e| pack_err("appending chunks", e))
            .inspect_err(|e| {
                if matches!(e, StoreError::NoSpace(_)) {
                    tracing::warn!(error = %e, "chunk upload refused");
                }
            })?;
        let mut next = *counters.lock().unwrap_or_else(|p| p.into_inner());
        for (chunk, location) in new_chunks.iter().zip(locations) {
            let meta = ChunkMeta {
                location,
                plain_len: chunk.plain_len,
                codec: chunk.codec,
                last_seen: now,
            };
            batch.put_cf(cf(db, CF_META), chunk.id.as_bytes(), meta.encode());
            next.chunks += 1;
            next.stored_bytes += chunk.data.len() as u64;
            next.plain_bytes += u64::from(chunk.plain_len);
        }
        batch.put_cf(cf(db, CF_STORE), KEY_COUNTERS, next.encode());
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        db.write_opt(batch, &sync)
            .map_err(rocks("write chunk metadata"))?;
        *counters.lock().unwrap_or_else(|p| p.into_inner()) = next;
    } else if !batch.is_empty() {
        db.write(batch).map_err(rocks("touch last_seen"))?;
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(plain: &[u8]) -> VerifiedChunk {
        VerifiedChunk {
            id: ChunkId::of(plain),
            plain_len: plain.len() as u32,
            codec: 0,
            data: Bytes::copy_from_slice(plain),
        }
    }

    #[test]
    fn put_has_get_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let a = chunk(b"alpha");
        let b = chunk(b"bravo");
        assert_eq!(store.has(&[a.id, b.id]).unwrap(), vec![false, false]);
        let out = store.put(vec![a.clone()]).unwrap();
        assert_eq!((out.stored, out.existing, out.stored_bytes), (1, 0, 5));
        assert_eq!(store.has(&[a.id, b.id]).unwrap(), vec![true, false]);
        let got = store.get(&[a.id, b.id]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().data, b"alpha");
        assert!(got[1].is_none());
    }

    #[test]
    fn second_insert_does_not_overwrite_or_recount() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let a = chunk(b"alpha");
        store.put(vec![a.clone(), a.clone()]).unwrap();
        let mut evil = a.clone();
        evil.data = Bytes::from_static(b"other");
        let out = store.put(vec![evil]).unwrap();
        assert_eq!((out.stored, out.existing), (0, 1));
        assert_eq!(
            store.get(&[a.id]).unwrap()[0].as_ref().unwrap().data,
            b"alpha"
        );
        assert_eq!(store.counters().chunks, 1);
    }

    #[test]
    fn counters_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
            store.put(vec![chunk(b"one"), chunk(b"three")]).unwrap();
        }
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(
            store.counters(),
            StoreCounters {
                chunks: 2,
                stored_bytes: 8,
                plain_bytes: 8
            }
        );
        assert_eq!(store.has(&[ChunkId::of(b"one")]).unwrap(), vec![true]);
    }
}

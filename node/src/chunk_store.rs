//! The node's chunk store: chunk metadata and chunk bytes in two RocksDB column families.
//!
//! - `chunk_meta`: id -> plaintext length, encoded length, codec, last_seen. Small values with
//!   bloom filters and a block cache, so `has` answers absent ids without a disk seek and
//!   never touches chunk bytes.
//! - `chunk_data`: id -> encoded bytes, kept in blob files (key-value separation), so
//!   compaction of the LSM does not rewrite chunk data.
//! - `store_meta`: counters (chunks, bytes), updated in the same write batch as the chunks.
//!
//! Guarantees: an insert is atomic and durable (WAL synced) before it returns; a stored chunk
//! is never overwritten (a second insert only refreshes `last_seen`); chunks leave only by GC
//! (a later issue), which relies on `last_seen` as PBS relies on atime.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hashgrid_proto::ChunkId;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Options, WriteBatch,
    WriteOptions, DB,
};
use thiserror::Error;

const CF_META: &str = "chunk_meta";
const CF_DATA: &str = "chunk_data";
const CF_STORE: &str = "store_meta";
const KEY_COUNTERS: &[u8] = b"counters";

/// `last_seen` is rewritten only when older than this, so lookups of hot chunks do not turn
/// into a write each. GC's grace period must exceed it (PBS uses the same trick with atime).
pub const TOUCH_INTERVAL_SECS: u64 = 3600;

const META_VERSION: u8 = 1;
const META_LEN: usize = 18;

#[derive(Debug, Error)]
pub enum StoreError {
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
    #[error("chunk store: metadata for {id} but no data: the store is damaged")]
    MissingData { id: ChunkId },
}

fn rocks(op: &'static str) -> impl FnOnce(rocksdb::Error) -> StoreError {
    move |source| StoreError::Rocks { op, source }
}

/// What a chunk's metadata record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub plain_len: u32,
    pub stored_len: u32,
    pub codec: i32,
    pub last_seen: u64,
}

impl ChunkMeta {
    fn encode(&self) -> [u8; META_LEN] {
        let mut out = [0u8; META_LEN];
        out[0] = META_VERSION;
        out[1..5].copy_from_slice(&self.plain_len.to_le_bytes());
        out[5..9].copy_from_slice(&self.stored_len.to_le_bytes());
        out[9] = self.codec as u8;
        out[10..18].copy_from_slice(&self.last_seen.to_le_bytes());
        out
    }

    fn decode(id: &ChunkId, b: &[u8]) -> Result<Self, StoreError> {
        if b.len() != META_LEN || b[0] != META_VERSION {
            return Err(StoreError::CorruptMeta { id: *id });
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Ok(ChunkMeta {
            plain_len: u32_at(1),
            stored_len: u32_at(5),
            codec: i32::from(b[9]),
            last_seen: u64::from_le_bytes(b[10..18].try_into().expect("8 bytes")),
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

pub struct ChunkStore {
    db: DB,
    /// Serialises the check-then-insert of `put`, so a chunk arriving on two streams at once
    /// is counted once, and keeps the counters exact.
    insert_lock: Mutex<StoreCounters>,
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

        let mut data_table = BlockBasedOptions::default();
        data_table.set_block_cache(&cache);
        data_table.set_bloom_filter(10.0, false);
        let mut data_opts = Options::default();
        data_opts.set_block_based_table_factory(&data_table);
        data_opts.set_enable_blob_files(true);
        data_opts.set_min_blob_size(256);
        data_opts.set_blob_file_size(256 << 20);
        // Chunks arrive compressed when compression helps; compressing again wastes CPU.
        data_opts.set_blob_compression_type(DBCompressionType::None);
        data_opts.set_enable_blob_gc(true);
        data_opts.set_write_buffer_size(64 << 20);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_max_total_wal_size(256 << 20);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_META, meta_opts),
            ColumnFamilyDescriptor::new(CF_DATA, data_opts),
            ColumnFamilyDescriptor::new(CF_STORE, Options::default()),
        ];
        let db =
            DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let counters = db
            .get_cf(db.cf_handle(CF_STORE).expect("cf opened"), KEY_COUNTERS)
            .map_err(rocks("read counters"))?
            .and_then(|b| StoreCounters::decode(&b))
            .unwrap_or_default();
        Ok(ChunkStore {
            db,
            insert_lock: Mutex::new(counters),
        })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family opened in ChunkStore::open")
    }

    fn metas(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkMeta>>, StoreError> {
        let cf = self.cf(CF_META);
        self.db
            .batched_multi_get_cf(cf, ids.iter().map(|id| id.as_bytes()), false)
            .into_iter()
            .zip(ids)
            .map(|(r, id)| match r.map_err(rocks("read metadata"))? {
                Some(v) => ChunkMeta::decode(id, &v).map(Some),
                None => Ok(None),
            })
            .collect()
    }

    /// Which of `ids` are stored. Found chunks have `last_seen` refreshed (lazily).
    pub fn has(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        let metas = self.metas(ids)?;
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
    pub fn put(&self, chunks: &[VerifiedChunk]) -> Result<PutOutcome, StoreError> {
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        let mut counters = self.insert_lock.lock().unwrap_or_else(|p| p.into_inner());
        let metas = self.metas(&ids)?;
        let now = now_secs();
        let mut batch = WriteBatch::default();
        let mut outcome = PutOutcome::default();
        let mut next = *counters;
        let mut seen = std::collections::HashSet::with_capacity(chunks.len());
        for (chunk, meta) in chunks.iter().zip(&metas) {
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
                            ..*m
                        };
                        batch.put_cf(self.cf(CF_META), chunk.id.as_bytes(), m.encode());
                    }
                }
                None => {
                    let meta = ChunkMeta {
                        plain_len: chunk.plain_len,
                        stored_len: chunk.data.len() as u32,
                        codec: chunk.codec,
                        last_seen: now,
                    };
                    batch.put_cf(self.cf(CF_DATA), chunk.id.as_bytes(), &chunk.data);
                    batch.put_cf(self.cf(CF_META), chunk.id.as_bytes(), meta.encode());
                    outcome.stored += 1;
                    outcome.stored_bytes += chunk.data.len() as u64;
                    next.chunks += 1;
                    next.stored_bytes += chunk.data.len() as u64;
                    next.plain_bytes += u64::from(chunk.plain_len);
                }
            }
        }
        if batch.is_empty() {
            return Ok(outcome);
        }
        if outcome.stored > 0 {
            batch.put_cf(self.cf(CF_STORE), KEY_COUNTERS, next.encode());
        }
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db
            .write_opt(batch, &sync)
            .map_err(rocks("write chunks"))?;
        *counters = next;
        Ok(outcome)
    }

    /// Reads chunks; `None` for ids not stored.
    pub fn get(&self, ids: &[ChunkId]) -> Result<Vec<Option<StoredChunk>>, StoreError> {
        let metas = self.metas(ids)?;
        let data = self.db.batched_multi_get_cf(
            self.cf(CF_DATA),
            ids.iter().map(|id| id.as_bytes()),
            false,
        );
        ids.iter()
            .zip(metas)
            .zip(data)
            .map(|((id, meta), data)| {
                let Some(meta) = meta else { return Ok(None) };
                let data = data
                    .map_err(rocks("read chunk"))?
                    .ok_or(StoreError::MissingData { id: *id })?;
                Ok(Some(StoredChunk {
                    plain_len: meta.plain_len,
                    codec: meta.codec,
                    data: data.to_vec(),
                }))
            })
            .collect()
    }

    pub fn counters(&self) -> StoreCounters {
        *self.insert_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flushes memtables so the WAL can be dropped; called on clean shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in [CF_META, CF_DATA, CF_STORE] {
            self.db.flush_cf(self.cf(cf)).map_err(rocks("flush"))?;
        }
        Ok(())
    }
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
        let out = store.put(std::slice::from_ref(&a)).unwrap();
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
        store.put(&[a.clone(), a.clone()]).unwrap();
        let mut evil = a.clone();
        evil.data = Bytes::from_static(b"other");
        let out = store.put(&[evil]).unwrap();
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
            store.put(&[chunk(b"one"), chunk(b"three")]).unwrap();
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

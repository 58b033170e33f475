//! The node's chunk store: chunk metadata in RocksDB, chunk bytes in pack files.
//!
//! - `chunk_meta` (RocksDB column family): id -> where the bytes are (pack, offset, length),
//!   plaintext length, codec, last_seen, a checksum of the encoded bytes. Small values with
//!   bloom filters (on the table files and on the memtable) and a block cache, so `has`
//!   answers absent ids without a disk seek or a skip-list search and never touches chunk
//!   bytes.
//! - `packs/` ([`crate::pack`]): append-only files of chunk records, written once.
//! - `store_meta`: counters (chunks, bytes, damaged copies) and the id set's digests per id
//!   prefix ([`digests`], what anti-entropy compares), updated in the same write batch as the
//!   metadata.
//!
//! Guarantees: an insert is durable before it returns (pack bytes synced, then metadata
//! written with a synced WAL); a stored chunk is never overwritten (a second insert only
//! refreshes `last_seen`); presence means a verified copy: a chunk is decoded and checked
//! against its id before it is stored, and every read checks the record header and that the
//! bytes are the ones verified (a checksum taken then, see [`Check`]; `verify` decodes and
//! hashes every copy again), and a copy that fails leaves the index (so `has` answers absent
//! and the next insert stores a fresh copy). Otherwise chunks leave only by GC (a later
//! issue), which relies on `last_seen` as PBS relies on atime.

use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hashgrid_proto::codec::{decode_verified, ChunkError};
use hashgrid_proto::{pb, ChunkId};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Options, WriteBatch, DB,
};
use thiserror::Error;

use crate::durable;
use crate::pack::{Location, PackFiles, RecordHeader, SyncData, HEADER_LEN};

pub mod digests;
mod writer;
use digests::{Digests, LoadError};
use writer::{DropReason, DropRequest, PutRequest, Request, UpgradeRequest, Writer};

const CF_META: &str = "chunk_meta";
const CF_STORE: &str = "store_meta";
const KEY_COUNTERS: &[u8] = b"counters";

/// `last_seen` is rewritten only when older than this, so lookups of hot chunks do not turn
/// into a write each. GC's grace period must exceed it (PBS uses the same trick with atime).
pub const TOUCH_INTERVAL_SECS: u64 = 3600;

/// Entries written before the stored-bytes checksum (30 bytes); still read.
const META_V1: u8 = 1;
const META_V1_LEN: usize = 30;
/// Entries with the checksum of the encoded bytes ([`stored_sum`]) at the end.
const META_V2: u8 = 2;
const META_V2_LEN: usize = 38;

/// The checksum of a copy's encoded bytes that the index keeps (XXH3, 64 bits). It is taken
/// from the bytes that were just decoded and hashed against the chunk's id, before they are
/// written, so a later read whose bytes have this checksum reads the verified bytes: disk
/// corruption, a truncated or overwritten pack, a misplaced offset all change it. Checking it
/// costs a few percent of decoding and hashing the copy again (see [`Check`]).
pub fn stored_sum(encoded: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(encoded)
}

/// How much of a stored copy a read checks. A copy that fails either check leaves the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The record header, and the encoded bytes against the checksum taken when they were
    /// verified ([`stored_sum`]): the bytes read are the bytes verified when stored. A copy
    /// stored before checksums were kept is decoded and hashed (as [`Check::Full`]), and its
    /// entry then gets the checksum (see [`ChunkStore::get`]). For
    /// readers that decode and hash what they get anyway: agents restoring, owners receiving
    /// a copy (they verify before storing), manifest walks.
    Stored,
    /// The record header, then the copy decoded and its BLAKE3 compared with its id, whatever
    /// the index holds: what `verify` does, and what catches a fault no checksum of the
    /// stored bytes could (a copy written wrong before the checksum existed).
    Full,
}

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
    #[error("chunk store: corrupt digest table entry {key:?}")]
    CorruptDigests { key: String },
    #[error("chunk store: pack files: {0}")]
    Pack(String),
    #[error("chunk store: out of disk space ({0}); free space or add capacity, then retry")]
    NoSpace(String),
}

/// Maps a RocksDB error on the database `db`. RocksDB tells a full disk apart only in its
/// message text, which is not a contract; so an I/O error is classified by asking the file
/// system under the database how much room is left.
fn rocks<'a>(db: &'a DB, op: &'static str) -> impl FnOnce(rocksdb::Error) -> StoreError + 'a {
    move |source| {
        if source.kind() == rocksdb::ErrorKind::IOError && nearly_full(db.path()) {
            return StoreError::NoSpace(format!("{op}: {source}"));
        }
        StoreError::Rocks { op, source }
    }
}

/// Below this much free space, a failed write is taken to be a full disk.
const FULL_DISK_MARGIN: u64 = 64 << 20;

fn nearly_full(path: &Path) -> bool {
    rustix::fs::statvfs(path)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize) < FULL_DISK_MARGIN)
        .unwrap_or(false)
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
    /// [`stored_sum`] of the encoded bytes; `None` in entries written before it was kept.
    pub sum: Option<u64>,
}

impl ChunkMeta {
    /// An entry without a checksum keeps the first version's shape (a `last_seen` refresh
    /// rewrites the entry as it was read).
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![
            0u8;
            if self.sum.is_some() {
                META_V2_LEN
            } else {
                META_V1_LEN
            }
        ];
        out[0] = if self.sum.is_some() { META_V2 } else { META_V1 };
        out[1..5].copy_from_slice(&self.location.pack.to_le_bytes());
        out[5..13].copy_from_slice(&self.location.offset.to_le_bytes());
        out[13..17].copy_from_slice(&self.location.len.to_le_bytes());
        out[17..21].copy_from_slice(&self.plain_len.to_le_bytes());
        out[21] = self.codec as u8;
        out[22..30].copy_from_slice(&self.last_seen.to_le_bytes());
        if let Some(sum) = self.sum {
            out[30..38].copy_from_slice(&sum.to_le_bytes());
        }
        out
    }

    fn decode(id: &ChunkId, b: &[u8]) -> Result<Self, StoreError> {
        match (b.first(), b.len()) {
            (Some(&META_V1), META_V1_LEN) | (Some(&META_V2), META_V2_LEN) => {}
            _ => return Err(StoreError::CorruptMeta { id: *id }),
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
            sum: (b[0] == META_V2).then(|| u64_at(30)),
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
    /// [`stored_sum`] of `data`, taken right after it was verified.
    pub sum: u64,
}

impl VerifiedChunk {
    /// A chunk whose encoded bytes `data` were just checked against `id`; call it right
    /// after the check, so the checksum the index keeps is of the bytes that passed.
    pub fn new(id: ChunkId, plain_len: u32, codec: i32, data: Bytes) -> Self {
        let sum = stored_sum(&data);
        VerifiedChunk {
            id,
            plain_len,
            codec,
            data,
            sum,
        }
    }
}

/// A chunk as stored, checked when read (see [`Check`]), ready to send.
#[derive(Clone, Debug)]
pub struct StoredChunk {
    pub plain_len: u32,
    pub codec: i32,
    pub data: Bytes,
    /// [`stored_sum`] of `data`.
    pub sum: u64,
}

impl StoredChunk {
    /// The chunk as one to store elsewhere: its bytes were verified against `id` when stored
    /// and are checked to be those bytes when read.
    pub fn into_verified(self, id: ChunkId) -> VerifiedChunk {
        VerifiedChunk {
            id,
            plain_len: self.plain_len,
            codec: self.codec,
            data: self.data,
            sum: self.sum,
        }
    }
}

/// What a read found for one id.
#[derive(Clone, Debug)]
pub enum ChunkRead {
    Found(StoredChunk),
    /// Not in the index.
    Missing,
    /// The copy failed verification; it has been dropped from the index.
    Damaged,
}

/// Why a stored copy failed verification.
#[derive(Debug, Error)]
pub enum Damage {
    #[error("pack unreadable: {0}")]
    Unreadable(std::io::Error),
    #[error("the index gives an encoded length of {len} bytes, more than any chunk can have")]
    ImpossibleLength { len: u32 },
    #[error("no record header in front of the bytes")]
    NoHeader,
    #[error("the record header says {found:?}, the index {expected:?}")]
    HeaderMismatch {
        found: RecordHeader,
        expected: RecordHeader,
    },
    #[error("the encoded bytes' checksum is {found:016x}, the index kept {expected:016x}")]
    Checksum { found: u64, expected: u64 },
    #[error(transparent)]
    Content(ChunkError),
}

/// Read errors that mean the copy is bad (the pack file is gone, shorter than the index says,
/// or unreadable at that place) rather than the node being short of a resource for now (too
/// many open files, memory): only the former drop a chunk from the index.
fn is_damage(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{InvalidData, NotFound, UnexpectedEof};
    matches!(e.kind(), NotFound | UnexpectedEof | InvalidData)
        || matches!(
            e.raw_os_error(),
            Some(libc::EIO | libc::EBADMSG | libc::EUCLEAN)
        )
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
    /// Copies dropped from the index because they failed verification, ever.
    pub damaged: u64,
    /// Pack bytes no index entry points at any more (damaged copies, chunks handed off
    /// after their partition moved away): what pack compaction will give back.
    pub reclaimable_bytes: u64,
}

impl StoreCounters {
    fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.chunks.to_le_bytes());
        out[8..16].copy_from_slice(&self.stored_bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.plain_bytes.to_le_bytes());
        out[24..32].copy_from_slice(&self.damaged.to_le_bytes());
        out[32..].copy_from_slice(&self.reclaimable_bytes.to_le_bytes());
        out
    }

    /// Stores written before the `damaged` counter existed have 24 bytes, before
    /// `reclaimable_bytes` 32.
    fn decode(b: &[u8]) -> Option<Self> {
        let u = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        Some(StoreCounters {
            chunks: u(0)?,
            stored_bytes: u(8)?,
            plain_bytes: u(16)?,
            damaged: if b.len() > 24 { u(24)? } else { 0 },
            reclaimable_bytes: if b.len() > 32 { u(32)? } else { 0 },
        })
    }
}

pub struct ChunkStore {
    db: Arc<DB>,
    packs: Arc<PackFiles>,
    /// Inserts and drops of damaged copies go to one writer thread ([`writer`]).
    writer: Option<SyncSender<Request>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    counters: Arc<Mutex<StoreCounters>>,
    digests: Arc<Digests>,
    /// Held shared by `has` from reading metadata to refreshing `last_seen`, and exclusively
    /// while damaged copies are dropped, so a refresh cannot write back an entry just dropped.
    fence: Arc<RwLock<()>>,
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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ChunkStore {
    /// Opens (creating if needed) the store in `path`. `cache_bytes` sizes the block cache
    /// shared by both column families' index, filter and data blocks.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        Self::open_with_sync(path, cache_bytes, Arc::new(std::fs::File::sync_data))
    }

    /// [`ChunkStore::open`] with another way of syncing pack appends (tests make it fail).
    pub fn open_with_sync(
        path: &Path,
        cache_bytes: usize,
        sync: SyncData,
    ) -> Result<Self, StoreError> {
        durable::create_dirs(&path.join("meta")).map_err(|e| pack_err("creating", e))?;
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
        // Most lookups are for ids the node does not hold yet (an agent asks before it
        // sends, and a put checks again): a bloom filter over the memtable answers those
        // without searching its skip list, as the table filters do for the files below.
        meta_opts.set_memtable_whole_key_filtering(true);
        meta_opts.set_memtable_prefix_bloom_ratio(0.1);

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
        let packs = Arc::new(
            PackFiles::open_with_sync(&path.join("packs"), sync)
                .map_err(|e| pack_err("opening", e))?,
        );
        let counters = db
            .get_cf(db.cf_handle(CF_STORE).expect("cf opened"), KEY_COUNTERS)
            .map_err(rocks(&db, "read counters"))?
            .and_then(|b| StoreCounters::decode(&b))
            .unwrap_or_default();
        let digests =
            Digests::load(&db, cf(&db, CF_STORE), cf(&db, CF_META)).map_err(|e| match e {
                LoadError::Rocks(source) => open_err(source),
                LoadError::Corrupt(key) => StoreError::CorruptDigests {
                    key: String::from_utf8_lossy(&key).into_owned(),
                },
            })?;
        let db = Arc::new(db);
        let counters = Arc::new(Mutex::new(counters));
        let digests = Arc::new(digests);
        let fence = Arc::new(RwLock::new(()));
        let (writer, writer_thread) = Writer {
            db: db.clone(),
            packs: packs.clone(),
            counters: counters.clone(),
            digests: digests.clone(),
            fence: fence.clone(),
        }
        .spawn()?;
        Ok(ChunkStore {
            db,
            packs,
            writer: Some(writer),
            writer_thread: Some(writer_thread),
            counters,
            digests,
            fence,
        })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        cf(&self.db, name)
    }

    /// Which of `ids` are stored. Found chunks have `last_seen` refreshed (lazily). Reads
    /// metadata only: a damaged copy counts as present until a read finds it out.
    pub fn has(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        let _fence = self.fence.read().unwrap_or_else(|p| p.into_inner());
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
            self.db
                .write(touch)
                .map_err(rocks(&self.db, "touch last_seen"))?;
        }
        Ok(metas.iter().map(Option::is_some).collect())
    }

    /// Stores verified chunks atomically and durably. Chunks already present are not
    /// rewritten; their `last_seen` is refreshed.
    pub fn put(&self, chunks: Vec<VerifiedChunk>) -> Result<PutOutcome, StoreError> {
        Ok(self.put_each(chunks)?.0)
    }

    /// [`ChunkStore::put`], also saying of each chunk, in order, whether this put stored it
    /// (`false`: it was held already, or came earlier in the same put).
    pub fn put_each(
        &self,
        chunks: Vec<VerifiedChunk>,
    ) -> Result<(PutOutcome, Vec<bool>), StoreError> {
        let (reply, outcome) = sync_channel(1);
        self.send(Request::Put(PutRequest { chunks, reply }))?;
        outcome
            .recv()
            .map_err(|_| StoreError::Thread("chunk writer stopped".into()))?
    }

    fn send(&self, request: Request) -> Result<(), StoreError> {
        self.writer
            .as_ref()
            .ok_or_else(|| StoreError::Thread("chunk store closed".into()))?
            .send(request)
            .map_err(|_| StoreError::Thread("chunk writer stopped".into()))
    }

    /// Reads chunks, checking each copy as `check` says (see [`ChunkStore::read_checked`]);
    /// `max_plain_len` is the cluster's largest chunk. Copies that fail are dropped from the
    /// index (durably, before this returns), counted and logged, and reported `Damaged`.
    /// Entries from before checksums were kept whose copies pass are given the checksum of
    /// the bytes that passed, by the writer thread after this returns, so the next read of
    /// them is a cheap one.
    /// CPU-bound: call it from a blocking thread.
    pub fn get(
        &self,
        ids: &[ChunkId],
        max_plain_len: u32,
        check: Check,
    ) -> Result<Vec<ChunkRead>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        let mut damaged = Vec::new();
        let mut upgrades = Vec::new();
        for (id, meta) in ids.iter().zip(metas(&self.db, ids)?) {
            let Some(meta) = meta else {
                out.push(ChunkRead::Missing);
                continue;
            };
            match self.read_checked(id, &meta, max_plain_len, check)? {
                Ok(chunk) => {
                    if meta.sum.is_none() {
                        upgrades.push((*id, meta, chunk.sum));
                    }
                    out.push(ChunkRead::Found(chunk));
                }
                Err(damage) => {
                    tracing::warn!(
                        chunk = %id,
                        pack = meta.location.pack,
                        offset = meta.location.offset,
                        error = %damage,
                        "stored chunk failed verification; dropping it from the index"
                    );
                    damaged.push((*id, meta));
                    out.push(ChunkRead::Damaged);
                }
            }
        }
        if !upgrades.is_empty() {
            // Best effort, and never waited for (see `UpgradeRequest`).
            if let Some(w) = &self.writer {
                let _ = w.try_send(Request::Upgrade(UpgradeRequest { copies: upgrades }));
            }
        }
        if !damaged.is_empty() {
            let (reply, dropped) = sync_channel(1);
            self.send(Request::Drop(DropRequest {
                copies: damaged,
                why: DropReason::Damaged,
                reply,
            }))?;
            dropped
                .recv()
                .map_err(|_| StoreError::Thread("chunk writer stopped".into()))??;
        }
        Ok(out)
    }

    /// Reads the copy `meta` points at and checks that the record header in front of it names
    /// the same id, lengths and codec; then that the encoded bytes have the checksum the
    /// index kept ([`Check::Stored`]) or decode to the plaintext the id names
    /// ([`decode_verified`], [`Check::Full`], and entries without a checksum). The inner
    /// error says what is wrong with the copy; the outer one is a failure of the node (a
    /// resource short for now), which says nothing about it.
    fn read_checked(
        &self,
        id: &ChunkId,
        meta: &ChunkMeta,
        max_plain_len: u32,
        check: Check,
    ) -> Result<Result<StoredChunk, Damage>, StoreError> {
        let len = meta.location.len;
        if len as usize > zstd::zstd_safe::compress_bound(max_plain_len as usize) {
            return Ok(Err(Damage::ImpossibleLength { len }));
        }
        let record = match self.packs.read_record(meta.location) {
            Ok(r) => r,
            Err(e) if is_damage(&e) => return Ok(Err(Damage::Unreadable(e))),
            Err(e) => return Err(pack_err(&format!("reading {:?}", meta.location), e)),
        };
        let expected = RecordHeader {
            id: *id,
            plain_len: meta.plain_len,
            codec: meta.codec as u8,
            len,
        };
        match RecordHeader::decode(&record) {
            None => return Ok(Err(Damage::NoHeader)),
            Some(found) if found != expected => {
                return Ok(Err(Damage::HeaderMismatch { found, expected }))
            }
            Some(_) => {}
        }
        let data = record.slice(HEADER_LEN..);
        let sum = stored_sum(&data);
        if let Some(expected) = meta.sum {
            if sum != expected {
                return Ok(Err(Damage::Checksum {
                    found: sum,
                    expected,
                }));
            }
        }
        if check == Check::Full || meta.sum.is_none() {
            let chunk = pb::Chunk {
                id: id.as_bytes().to_vec(),
                plain_len: meta.plain_len,
                codec: meta.codec,
                data: data.clone(),
                ..Default::default()
            };
            if let Err(e) = decode_verified(&chunk, max_plain_len) {
                return Ok(Err(Damage::Content(e)));
            }
        }
        Ok(Ok(StoredChunk {
            plain_len: meta.plain_len,
            codec: meta.codec,
            data,
            sum,
        }))
    }

    /// Up to `limit` stored ids after `after` (from the start when `None`), in id order: how
    /// verify pages through the whole index without holding it.
    pub fn ids_after(
        &self,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<ChunkId>, StoreError> {
        let start = after.map_or([0u8; 32], |id| *id.as_bytes());
        let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
        let mut out = Vec::with_capacity(limit.min(4096));
        for item in self.db.iterator_cf(self.cf(CF_META), mode) {
            let (key, _) = item.map_err(rocks(&self.db, "iterate metadata"))?;
            let Ok(id) = ChunkId::from_slice(&key) else {
                continue;
            };
            if after == Some(&id) {
                continue;
            }
            out.push(id);
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// How many ids the store holds in `partition` of `2^bits` (`bits` in `1..=16`) and a
    /// digest of them ([`digests`]): two stores holding the same ids in a partition have the
    /// same digest. Anti-entropy compares these before exchanging any id list. Reads a table
    /// kept in memory: no scan, whatever the store holds.
    pub fn partition_digest(&self, bits: u8, partition: u32) -> (u64, [u8; 32]) {
        let d = self.digests.partition(bits, partition);
        (d.count, d.hash())
    }

    /// How many ids the store holds in partition `partition` of `bits` bits, from the same
    /// table (no index read).
    pub fn partition_count(&self, bits: u8, partition: u32) -> u64 {
        self.digests.partition(bits, partition).count
    }

    /// Up to `limit` ids in `[start, end)` after `after` (from `start` when `None`), in id
    /// order, and whether the range has no more.
    pub fn ids_in_range(
        &self,
        start: &[u8; 32],
        end: Option<&[u8; 32]>,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<(Vec<ChunkId>, bool), StoreError> {
        let from = match after {
            Some(a) if a.as_bytes() >= start => a.as_bytes(),
            _ => start,
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        let mut done = true;
        self.scan_range(from, end, |id| {
            if after == Some(id) {
                return true;
            }
            if out.len() == limit {
                done = false;
                return false;
            }
            out.push(*id);
            true
        })?;
        Ok((out, done))
    }

    /// Calls `visit` for every stored id in `[start, end)` in id order until it answers
    /// false.
    fn scan_range(
        &self,
        start: &[u8; 32],
        end: Option<&[u8; 32]>,
        mut visit: impl FnMut(&ChunkId) -> bool,
    ) -> Result<(), StoreError> {
        let mut opts = rocksdb::ReadOptions::default();
        if let Some(end) = end {
            opts.set_iterate_upper_bound(end.to_vec());
        }
        // A scan reads each block once: keep it from evicting the lookups' hot blocks.
        opts.fill_cache(false);
        let mode = rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf_opt(self.cf(CF_META), opts, mode) {
            let (key, _) = item.map_err(rocks(&self.db, "iterate metadata"))?;
            let Ok(id) = ChunkId::from_slice(&key) else {
                continue;
            };
            if !visit(&id) {
                break;
            }
        }
        Ok(())
    }

    /// Takes `ids` out of the index, durably: their partition moved to other owners, who
    /// hold copies. The pack bytes stay until compaction and count as reclaimable. Returns
    /// how many entries were released (ids not held are skipped).
    pub fn release(&self, ids: &[ChunkId]) -> Result<u64, StoreError> {
        let copies: Vec<(ChunkId, ChunkMeta)> = ids
            .iter()
            .zip(metas(&self.db, ids)?)
            .filter_map(|(id, m)| Some((*id, m?)))
            .collect();
        if copies.is_empty() {
            return Ok(0);
        }
        let (reply, released) = sync_channel(1);
        self.send(Request::Drop(DropRequest {
            copies,
            why: DropReason::Released,
            reply,
        }))?;
        released
            .recv()
            .map_err(|_| StoreError::Thread("chunk writer stopped".into()))?
    }

    pub fn counters(&self) -> StoreCounters {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flushes memtables so the WAL can be dropped; called on clean shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in [CF_META, CF_STORE] {
            self.db
                .flush_cf(self.cf(cf))
                .map_err(rocks(&self.db, "flush"))?;
        }
        Ok(())
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name)
        .expect("column family opened in ChunkStore::open")
}

/// The index entries of `ids`, in their order.
///
/// The keys go to RocksDB sorted (`sorted_input`): unsorted, its `MultiGet` sorts them
/// itself through the comparator's virtual calls, which was a tenth of the CPU of a node
/// serving lookups (`perf`, three nodes, 4096-id lookups); sorting the positions here by
/// the ids' bytes (the column family's bytewise order) costs a fraction of that.
fn metas(db: &DB, ids: &[ChunkId]) -> Result<Vec<Option<ChunkMeta>>, StoreError> {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_unstable_by_key(|&i| &ids[i as usize]);
    let found = db.batched_multi_get_cf(
        cf(db, CF_META),
        order.iter().map(|&i| ids[i as usize].as_bytes()),
        true,
    );
    let mut out: Vec<Option<ChunkMeta>> = vec![None; ids.len()];
    for (r, &i) in found.into_iter().zip(&order) {
        let id = &ids[i as usize];
        if let Some(v) = r.map_err(rocks(db, "read metadata"))? {
            out[i as usize] = Some(ChunkMeta::decode(id, &v)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::pack_path;
    use std::os::unix::fs::FileExt;

    const MAX: u32 = 1 << 20;

    fn chunk(plain: &[u8]) -> VerifiedChunk {
        VerifiedChunk::new(
            ChunkId::of(plain),
            plain.len() as u32,
            0,
            Bytes::copy_from_slice(plain),
        )
    }

    fn zstd_chunk(plain: &[u8]) -> VerifiedChunk {
        let (codec, data) = hashgrid_proto::codec::encode(&Bytes::copy_from_slice(plain), 3);
        assert_eq!(codec, hashgrid_proto::codec::Codec::Zstd);
        VerifiedChunk::new(
            ChunkId::of(plain),
            plain.len() as u32,
            pb::Codec::Zstd as i32,
            data,
        )
    }

    fn found(read: &ChunkRead) -> &[u8] {
        match read {
            ChunkRead::Found(c) => &c.data,
            other => panic!("expected the chunk, got {other:?}"),
        }
    }

    fn location(store: &ChunkStore, id: &ChunkId) -> Location {
        metas(&store.db, &[*id]).unwrap()[0].unwrap().location
    }

    /// Flips one bit of the pack file `at` bytes from the start of `loc`'s encoded bytes
    /// (negative: inside the record header).
    fn flip(dir: &Path, loc: Location, at: i64) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pack_path(&dir.join("packs"), loc.pack))
            .unwrap();
        let pos = (loc.offset as i64 + at) as u64;
        let mut b = [0u8];
        f.read_exact_at(&mut b, pos).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], pos).unwrap();
    }

    #[test]
    fn put_has_get_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let a = chunk(b"alpha");
        let b = chunk(b"bravo");
        let z = zstd_chunk(&b"zulu".repeat(1000));
        assert_eq!(store.has(&[a.id, b.id]).unwrap(), vec![false, false]);
        let out = store.put(vec![a.clone(), z.clone()]).unwrap();
        assert_eq!((out.stored, out.existing), (2, 0));
        assert_eq!(store.has(&[a.id, b.id]).unwrap(), vec![true, false]);
        let got = store.get(&[a.id, b.id, z.id], MAX, Check::Stored).unwrap();
        assert_eq!(found(&got[0]), b"alpha");
        assert!(matches!(got[1], ChunkRead::Missing));
        assert_eq!(found(&got[2]), &z.data[..]);
    }

    #[test]
    fn a_put_says_which_of_its_chunks_it_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let (a, b, c) = (chunk(b"alpha"), chunk(b"bravo"), chunk(b"charlie"));
        store.put(vec![a.clone()]).unwrap();
        // Held already, new, a repeat within the put, new.
        let (out, new) = store
            .put_each(vec![a.clone(), b.clone(), b.clone(), c.clone()])
            .unwrap();
        assert_eq!(new, [false, true, false, true]);
        assert_eq!((out.stored, out.existing), (2, 2));
        assert_eq!(out.stored_bytes, (b.data.len() + c.data.len()) as u64);
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
            found(&store.get(&[a.id], MAX, Check::Stored).unwrap()[0]),
            b"alpha"
        );
        assert_eq!(store.counters().chunks, 1);
    }

    #[test]
    fn ids_page_through_the_index_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let chunks: Vec<VerifiedChunk> = (0..10u8).map(|i| chunk(&[i + 1; 3])).collect();
        store.put(chunks.clone()).unwrap();
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = store.ids_after(after.as_ref(), 3).unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().copied();
            all.extend(page);
        }
        let mut expected: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        expected.sort();
        assert_eq!(all, expected);
    }

    #[test]
    fn ranges_digest_list_and_release_what_they_hold() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let chunks: Vec<VerifiedChunk> = (0..40u8).map(|i| chunk(&[i + 1; 5])).collect();
        store.put(chunks.clone()).unwrap();
        let mut ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        ids.sort();
        // The lower half of the id space, by the top bit.
        let mid = {
            let mut k = [0u8; 32];
            k[0] = 0x80;
            k
        };
        let low: Vec<ChunkId> = ids
            .iter()
            .copied()
            .filter(|i| i.as_bytes()[0] < 0x80)
            .collect();
        // Partition 0 of 2 is the lower half. Another store holding only those ids, put in
        // another order, has the same digest of it.
        let (count, digest) = store.partition_digest(1, 0);
        assert_eq!(count, low.len() as u64);
        let other_dir = tempfile::tempdir().unwrap();
        let other = ChunkStore::open(other_dir.path(), 8 << 20).unwrap();
        let mut low_chunks: Vec<VerifiedChunk> = chunks
            .iter()
            .filter(|c| low.contains(&c.id))
            .cloned()
            .collect();
        low_chunks.reverse();
        for pair in low_chunks.chunks(2) {
            other.put(pair.to_vec()).unwrap();
        }
        assert_eq!(other.partition_digest(1, 0), (count, digest));
        assert_eq!(other.partition_digest(1, 1).0, 0);
        assert_eq!(
            store.partition_digest(1, 1).0,
            (ids.len() - low.len()) as u64
        );
        other.release(&low[..1]).unwrap();
        assert_ne!(other.partition_digest(1, 0).1, digest, "one id fewer");

        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let (page, done) = store
                .ids_in_range(&[0u8; 32], Some(&mid), after.as_ref(), 4)
                .unwrap();
            after = page.last().copied();
            listed.extend(page);
            if done {
                break;
            }
        }
        assert_eq!(listed, low);

        let before = store.counters();
        let released = store.release(&low).unwrap();
        assert_eq!(released, low.len() as u64);
        assert_eq!(
            store.release(&low).unwrap(),
            0,
            "a second release finds nothing"
        );
        let after = store.counters();
        assert_eq!(after.chunks, before.chunks - low.len() as u64);
        assert_eq!(after.damaged, 0);
        assert_eq!(
            after.reclaimable_bytes,
            low.len() as u64 * (5 + HEADER_LEN as u64)
        );
        assert_eq!(store.partition_digest(1, 0), (0, [0u8; 32]));
        assert!(store.has(&low).unwrap().iter().all(|h| !h));
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
                plain_bytes: 8,
                damaged: 0,
                reclaimable_bytes: 0,
            }
        );
        assert_eq!(store.has(&[ChunkId::of(b"one")]).unwrap(), vec![true]);
    }

    #[test]
    fn digests_survive_reopen_and_are_built_for_older_stores() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<VerifiedChunk> = (0..50u8).map(|i| chunk(&[i + 1; 7])).collect();
        let digests = |store: &ChunkStore| -> Vec<(u64, [u8; 32])> {
            (0..16).map(|p| store.partition_digest(4, p)).collect()
        };
        let before = {
            let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
            store.put(chunks[..30].to_vec()).unwrap();
            store.put(chunks[20..].to_vec()).unwrap();
            store.release(&[chunks[3].id]).unwrap();
            let d = digests(&store);
            assert_eq!(d.iter().map(|(n, _)| n).sum::<u64>(), 49);
            d
        };
        {
            let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
            assert_eq!(digests(&store), before, "read back as written");
            // As a store from before the table existed: no table at all.
            let keys: Vec<Box<[u8]>> = store
                .db
                .iterator_cf(store.cf(CF_STORE), rocksdb::IteratorMode::Start)
                .map(|kv| kv.unwrap().0)
                .filter(|k| k.starts_with(b"digest"))
                .collect();
            assert!(keys.len() > 1);
            for k in keys {
                store.db.delete_cf(store.cf(CF_STORE), k).unwrap();
            }
        }
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(digests(&store), before, "built from the index");
    }

    #[test]
    fn counters_written_before_the_damaged_count_still_read() {
        let old = [
            &5u64.to_le_bytes()[..],
            &6u64.to_le_bytes(),
            &7u64.to_le_bytes(),
        ]
        .concat();
        let c = StoreCounters::decode(&old).unwrap();
        assert_eq!(
            (c.chunks, c.stored_bytes, c.plain_bytes, c.damaged),
            (5, 6, 7, 0)
        );
        assert_eq!(StoreCounters::decode(&c.encode()), Some(c));
    }

    #[test]
    fn a_flipped_byte_is_found_dropped_counted_and_healed_by_the_next_put() {
        let dir = tempfile::tempdir().unwrap();
        let a = zstd_chunk(&b"alpha ".repeat(2000));
        let b = chunk(b"bravo");
        {
            let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
            store.put(vec![a.clone(), b.clone()]).unwrap();
            flip(dir.path(), location(&store, &a.id), 5);
            // `has` reads metadata only.
            assert_eq!(store.has(&[a.id]).unwrap(), vec![true]);
            // Asked for twice in one read: dropped and counted once.
            let got = store.get(&[a.id, b.id, a.id], MAX, Check::Stored).unwrap();
            assert!(matches!(got[0], ChunkRead::Damaged), "{:?}", got[0]);
            assert_eq!(found(&got[1]), b"bravo");
            assert!(matches!(got[2], ChunkRead::Damaged));
            assert_eq!(store.has(&[a.id, b.id]).unwrap(), vec![false, true]);
            assert!(matches!(
                store.get(&[a.id], MAX, Check::Stored).unwrap()[0],
                ChunkRead::Missing
            ));
        }
        // The drop and its count are durable; the bad copy's bytes are reclaimable.
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(
            store.counters(),
            StoreCounters {
                chunks: 1,
                stored_bytes: 5,
                plain_bytes: 5,
                damaged: 1,
                reclaimable_bytes: (a.data.len() + HEADER_LEN) as u64,
            }
        );
        assert_eq!(store.has(&[a.id]).unwrap(), vec![false]);
        // The next upload of the chunk stores a fresh copy, which reads back whole.
        let out = store.put(vec![a.clone()]).unwrap();
        assert_eq!((out.stored, out.existing), (1, 0));
        assert_eq!(
            found(&store.get(&[a.id], MAX, Check::Stored).unwrap()[0]),
            &a.data[..]
        );
        assert_eq!(store.counters().chunks, 2);
    }

    #[test]
    fn both_checks_find_a_flipped_byte_but_only_a_full_check_finds_a_copy_stored_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let (a, b) = (zstd_chunk(&b"alpha ".repeat(900)), chunk(b"bravo"));
        // A copy whose bytes do not decode to its id but whose checksum is of those bytes:
        // what a fault before the checksum was taken would leave (it cannot come through
        // `verify_batch`).
        let mut wrong = chunk(b"charlie");
        wrong.data = Bytes::from_static(b"CHARLIE");
        wrong.sum = stored_sum(&wrong.data);
        store
            .put(vec![a.clone(), b.clone(), wrong.clone()])
            .unwrap();
        for check in [Check::Stored, Check::Full] {
            let got = store.get(&[a.id, b.id], MAX, check).unwrap();
            assert_eq!(found(&got[0]), &a.data[..], "{check:?}");
            assert_eq!(found(&got[1]), b"bravo");
            if let ChunkRead::Found(c) = &got[0] {
                assert_eq!(c.sum, a.sum);
            }
        }
        assert_eq!(
            found(&store.get(&[wrong.id], MAX, Check::Stored).unwrap()[0]),
            b"CHARLIE",
            "the stored check takes the bytes for the ones verified"
        );
        assert!(matches!(
            store.get(&[wrong.id], MAX, Check::Full).unwrap()[0],
            ChunkRead::Damaged
        ));
        flip(dir.path(), location(&store, &a.id), 7);
        flip(dir.path(), location(&store, &b.id), 1);
        let got = store.get(&[a.id], MAX, Check::Stored).unwrap();
        assert!(matches!(got[0], ChunkRead::Damaged), "{:?}", got[0]);
        let got = store.get(&[b.id], MAX, Check::Full).unwrap();
        assert!(matches!(got[0], ChunkRead::Damaged), "{:?}", got[0]);
        assert_eq!(store.counters().damaged, 3);
        assert_eq!(store.counters().chunks, 0);
    }

    /// Rewrites the entries of `ids` as the first version wrote them: 30 bytes, no checksum.
    fn downgrade(store: &ChunkStore, ids: &[ChunkId]) {
        for id in ids {
            let meta = ChunkMeta {
                sum: None,
                ..metas(&store.db, &[*id]).unwrap()[0].unwrap()
            };
            let old = meta.encode();
            assert_eq!((old.len(), old[0]), (META_V1_LEN, META_V1));
            store
                .db
                .put_cf(store.cf(CF_META), id.as_bytes(), &old)
                .unwrap();
        }
    }

    /// Waits until the writer thread has handled every request sent before this one.
    fn settle(store: &ChunkStore) {
        store.put(Vec::new()).unwrap();
    }

    fn sum_of(store: &ChunkStore, id: &ChunkId) -> Option<u64> {
        metas(&store.db, &[*id]).unwrap()[0].unwrap().sum
    }

    #[test]
    fn entries_written_before_checksums_are_decoded_once_then_get_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let (a, b) = (zstd_chunk(&b"alpha ".repeat(900)), chunk(b"bravo"));
        store.put(vec![a.clone(), b.clone()]).unwrap();
        downgrade(&store, &[a.id, b.id]);
        let got = store.get(&[a.id, b.id], MAX, Check::Stored).unwrap();
        assert_eq!(found(&got[0]), &a.data[..]);
        assert_eq!(found(&got[1]), b"bravo");
        if let ChunkRead::Found(c) = &got[1] {
            assert_eq!(c.sum, b.sum, "the checksum is taken on the way");
        }
        // The read that decoded and hashed the old copies gave their entries the checksum.
        settle(&store);
        assert_eq!(sum_of(&store, &a.id), Some(a.sum));
        assert_eq!(sum_of(&store, &b.id), Some(b.sum));
        assert_eq!(store.counters().chunks, 2);

        // A damaged old copy is found by decoding it, whichever check was asked for, and is
        // dropped, not upgraded.
        downgrade(&store, &[a.id]);
        flip(dir.path(), location(&store, &a.id), 7);
        let got = store.get(&[a.id], MAX, Check::Stored).unwrap();
        assert!(matches!(got[0], ChunkRead::Damaged), "{:?}", got[0]);
        settle(&store);
        assert!(metas(&store.db, &[a.id]).unwrap()[0].is_none());

        // An entry that changed between the read and the upgrade is left as it is.
        downgrade(&store, &[b.id]);
        let read = metas(&store.db, &[b.id]).unwrap()[0].unwrap();
        let elsewhere = ChunkMeta {
            location: Location {
                offset: read.location.offset + 4096,
                ..read.location
            },
            ..read
        };
        store
            .send(Request::Upgrade(UpgradeRequest {
                copies: vec![(b.id, elsewhere, 7)],
            }))
            .unwrap();
        settle(&store);
        assert_eq!(sum_of(&store, &b.id), None);

        // Refreshing `last_seen` keeps an old entry's shape.
        let meta = metas(&store.db, &[b.id]).unwrap()[0].unwrap();
        assert_eq!(meta.sum, None);
        let refreshed = ChunkMeta {
            last_seen: 1,
            ..meta
        };
        assert_eq!(
            ChunkMeta::decode(&b.id, &refreshed.encode()).unwrap(),
            refreshed
        );
        let new = ChunkMeta {
            sum: Some(7),
            ..refreshed
        };
        assert_eq!(new.encode().len(), META_V2_LEN);
        assert_eq!(ChunkMeta::decode(&b.id, &new.encode()).unwrap(), new);
        for bad in [
            &new.encode()[..30],
            &refreshed.encode()[..29],
            &[3u8; 38][..],
        ] {
            assert!(matches!(
                ChunkMeta::decode(&b.id, bad),
                Err(StoreError::CorruptMeta { .. })
            ));
        }
    }

    #[test]
    fn a_header_that_disagrees_with_the_index_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let chunks = [chunk(b"magic"), chunk(b"id"), chunk(b"plain length")];
        store.put(chunks.to_vec()).unwrap();
        // Byte offsets into the header, counted back from the encoded bytes.
        let header = -(HEADER_LEN as i64);
        for (c, at) in chunks.iter().zip([header, header + 4, header + 36]) {
            flip(dir.path(), location(&store, &c.id), at);
        }
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        let got = store.get(&ids, MAX, Check::Stored).unwrap();
        assert!(
            got.iter().all(|r| matches!(r, ChunkRead::Damaged)),
            "{got:?}"
        );
        assert_eq!(store.counters().damaged, 3);
        assert_eq!(store.counters().chunks, 0);
    }

    #[test]
    fn a_short_or_missing_pack_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let a = chunk(b"alpha");
        store.put(vec![a.clone()]).unwrap();
        let loc = location(&store, &a.id);
        let pack = pack_path(&dir.path().join("packs"), loc.pack);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&pack)
            .unwrap()
            .set_len(loc.offset + 2)
            .unwrap();
        assert!(matches!(
            store.get(&[a.id], MAX, Check::Stored).unwrap()[0],
            ChunkRead::Damaged
        ));
        drop(store);

        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        store.put(vec![a.clone()]).unwrap();
        std::fs::remove_file(pack_path(&dir.path().join("packs"), 1)).unwrap();
        assert!(matches!(
            store.get(&[a.id], MAX, Check::Stored).unwrap()[0],
            ChunkRead::Damaged
        ));
        assert_eq!(store.has(&[a.id]).unwrap(), vec![false]);
    }

    #[test]
    fn a_failed_pack_sync_fails_the_batch_and_loses_nothing_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two, three) = (chunk(b"one"), chunk(b"two"), chunk(b"three"));
        {
            let sync = crate::pack::tests::failing_sync(&[1]);
            let store = ChunkStore::open_with_sync(dir.path(), 8 << 20, sync).unwrap();
            store.put(vec![one.clone()]).unwrap();
            assert!(matches!(
                store.put(vec![two.clone()]),
                Err(StoreError::Pack(_))
            ));
            assert_eq!(store.has(&[two.id]).unwrap(), vec![false], "indexed anyway");
            let out = store.put(vec![three.clone()]).unwrap();
            assert_eq!(out.stored, 1);
            assert_ne!(
                location(&store, &three.id).pack,
                location(&store, &one.id).pack,
                "appended to the pack whose sync failed"
            );
        }
        let store = ChunkStore::open(dir.path(), 8 << 20).unwrap();
        let got = store
            .get(&[one.id, two.id, three.id], MAX, Check::Stored)
            .unwrap();
        assert_eq!(found(&got[0]), b"one");
        assert!(matches!(got[1], ChunkRead::Missing));
        assert_eq!(found(&got[2]), b"three");
        assert_eq!(store.counters().chunks, 2);
    }
}

//! Digests of the index's id set, kept per id prefix and updated with every insert and drop,
//! so anti-entropy compares a partition's ids without scanning them.
//!
//! Ids fall into `2^16` buckets by their top 16 bits; a partition (the top 1-16 bits of the
//! id, see `hashgrid_proto::placement`) is a run of whole buckets, so its digest is the
//! buckets' digests added up: 2^(16-bits) additions, whatever the number of chunks. A
//! bucket's digest is its number of ids and the sum of its ids taken as four 64-bit lanes,
//! mod 2^64 each. The sum does not depend on insertion order (two owners holding the same ids
//! agree however their copies arrived) and is undone by subtracting, which is what lets a
//! drop update it. Ids are BLAKE3 outputs, so two different sets of the same size match
//! by accident with probability ~2^-256; an agent cannot choose which ids an owner misses.
//!
//! The table is persisted beside the store's counters, in the same synced write batch as the
//! index change it reflects (only the buckets the batch touched), so it is exact after a
//! crash. A store written before the table existed gets it from one scan of the index when
//! it is opened.

use std::collections::BTreeMap;
use std::sync::RwLock;

use hashgrid_proto::ChunkId;
use rocksdb::{ColumnFamily, WriteBatch, DB};

/// Bits of the id that choose a bucket: the most partition bits a cluster may have.
pub const BUCKET_BITS: u8 = 16;
const BUCKETS: usize = 1 << BUCKET_BITS;

/// Present (value: format version) once every bucket of the table has been written.
const KEY_BUILT: &[u8] = b"digests-built";
const BUILT_VERSION: u8 = 1;
/// A bucket's key: this prefix and the bucket number, big-endian.
const KEY_BUCKET: &[u8] = b"digest/";

/// A set of ids in brief: how many, and their lane-wise sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetDigest {
    pub count: u64,
    sum: [u64; 4],
}

impl SetDigest {
    fn lanes(id: &ChunkId) -> [u64; 4] {
        let b = id.as_bytes();
        std::array::from_fn(|i| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8")))
    }

    fn add(&mut self, id: &ChunkId) {
        self.count += 1;
        for (s, l) in self.sum.iter_mut().zip(Self::lanes(id)) {
            *s = s.wrapping_add(l);
        }
    }

    fn remove(&mut self, id: &ChunkId) {
        self.count = self.count.saturating_sub(1);
        for (s, l) in self.sum.iter_mut().zip(Self::lanes(id)) {
            *s = s.wrapping_sub(l);
        }
    }

    fn merge(&mut self, other: &SetDigest) {
        self.count += other.count;
        for (s, o) in self.sum.iter_mut().zip(other.sum) {
            *s = s.wrapping_add(o);
        }
    }

    /// The sum as 32 bytes (what peers exchange beside the count).
    pub fn hash(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (chunk, lane) in out.chunks_exact_mut(8).zip(self.sum) {
            chunk.copy_from_slice(&lane.to_le_bytes());
        }
        out
    }

    fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.count.to_le_bytes());
        out[8..].copy_from_slice(&self.hash());
        out
    }

    fn decode(b: &[u8]) -> Option<SetDigest> {
        let b: &[u8; 40] = b.try_into().ok()?;
        let lane = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        Some(SetDigest {
            count: lane(0),
            sum: std::array::from_fn(|i| lane(8 + i * 8)),
        })
    }
}

fn bucket_of(id: &ChunkId) -> u16 {
    let b = id.as_bytes();
    u16::from_be_bytes([b[0], b[1]])
}

fn bucket_key(bucket: u16) -> [u8; KEY_BUCKET.len() + 2] {
    let mut key = [0u8; KEY_BUCKET.len() + 2];
    key[..KEY_BUCKET.len()].copy_from_slice(KEY_BUCKET);
    key[KEY_BUCKET.len()..].copy_from_slice(&bucket.to_be_bytes());
    key
}

/// The table, shared by the writer thread (its only writer) and the readers.
pub struct Digests {
    buckets: RwLock<Vec<SetDigest>>,
}

/// Errors reading or building the table; the caller maps them into its own kinds.
#[derive(Debug)]
pub enum LoadError {
    Rocks(rocksdb::Error),
    Corrupt(Vec<u8>),
}

impl From<rocksdb::Error> for LoadError {
    fn from(e: rocksdb::Error) -> Self {
        LoadError::Rocks(e)
    }
}

impl Digests {
    /// Reads the table from `store_cf`, or, for a store written before it existed, builds it
    /// from every id in `meta_cf` and writes it (synced) before returning.
    pub fn load(
        db: &DB,
        store_cf: &ColumnFamily,
        meta_cf: &ColumnFamily,
    ) -> Result<Self, LoadError> {
        let mut buckets = vec![SetDigest::default(); BUCKETS];
        if db.get_cf(store_cf, KEY_BUILT)?.as_deref() == Some(&[BUILT_VERSION][..]) {
            let mode = rocksdb::IteratorMode::From(KEY_BUCKET, rocksdb::Direction::Forward);
            for item in db.iterator_cf(store_cf, mode) {
                let (key, value) = item?;
                let Some(bucket) = key.strip_prefix(KEY_BUCKET) else {
                    break;
                };
                let bucket: [u8; 2] = bucket
                    .try_into()
                    .map_err(|_| LoadError::Corrupt(key.to_vec()))?;
                buckets[usize::from(u16::from_be_bytes(bucket))] =
                    SetDigest::decode(&value).ok_or_else(|| LoadError::Corrupt(key.to_vec()))?;
            }
            return Ok(Digests {
                buckets: RwLock::new(buckets),
            });
        }
        let started = std::time::Instant::now();
        for item in db.iterator_cf(meta_cf, rocksdb::IteratorMode::Start) {
            let (key, _) = item?;
            if let Ok(id) = ChunkId::from_slice(&key) {
                buckets[usize::from(bucket_of(&id))].add(&id);
            }
        }
        let mut batch = WriteBatch::default();
        for (bucket, d) in buckets.iter().enumerate() {
            if d.count > 0 {
                batch.put_cf(store_cf, bucket_key(bucket as u16), d.encode());
            }
        }
        batch.put_cf(store_cf, KEY_BUILT, [BUILT_VERSION]);
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        db.write_opt(batch, &sync)?;
        tracing::info!(
            chunks = buckets.iter().map(|d| d.count).sum::<u64>(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built the index's digest table (a store from before it existed)"
        );
        Ok(Digests {
            buckets: RwLock::new(buckets),
        })
    }

    /// The digest of the ids in `partition` of `2^bits` (`bits` in `1..=16`).
    pub fn partition(&self, bits: u8, partition: u32) -> SetDigest {
        debug_assert!((1..=BUCKET_BITS).contains(&bits));
        let shift = BUCKET_BITS - bits;
        let first = (partition as usize) << shift;
        let buckets = self.buckets.read().unwrap_or_else(|p| p.into_inner());
        let mut out = SetDigest::default();
        for d in &buckets[first..first + (1 << shift)] {
            out.merge(d);
        }
        out
    }

    /// A change to the table: collect it while building a write batch, [`Delta::write`] it
    /// into the batch, and [`Digests::apply`] it once the batch is committed.
    pub fn delta(&self) -> Delta<'_> {
        Delta {
            table: self,
            changed: BTreeMap::new(),
        }
    }

    pub fn apply(&self, delta: Delta<'_>) {
        let mut buckets = self.buckets.write().unwrap_or_else(|p| p.into_inner());
        for (bucket, d) in delta.changed {
            buckets[usize::from(bucket)] = d;
        }
    }

    fn get(&self, bucket: u16) -> SetDigest {
        self.buckets.read().unwrap_or_else(|p| p.into_inner())[usize::from(bucket)]
    }
}

/// The new values of the buckets one write batch changes.
pub struct Delta<'a> {
    table: &'a Digests,
    changed: BTreeMap<u16, SetDigest>,
}

impl Delta<'_> {
    fn entry(&mut self, id: &ChunkId) -> &mut SetDigest {
        let bucket = bucket_of(id);
        let table = self.table;
        self.changed
            .entry(bucket)
            .or_insert_with(|| table.get(bucket))
    }

    /// An id entering the index.
    pub fn add(&mut self, id: &ChunkId) {
        self.entry(id).add(id);
    }

    /// An id leaving the index.
    pub fn remove(&mut self, id: &ChunkId) {
        self.entry(id).remove(id);
    }

    /// Puts the changed buckets into `batch`.
    pub fn write(&self, batch: &mut WriteBatch, store_cf: &ColumnFamily) {
        for (&bucket, d) in &self.changed {
            batch.put_cf(store_cf, bucket_key(bucket), d.encode());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_ignore_order_and_undo_on_remove() {
        let ids: Vec<ChunkId> = (0..100u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        let mut forward = SetDigest::default();
        ids.iter().for_each(|id| forward.add(id));
        let mut backward = SetDigest::default();
        ids.iter().rev().for_each(|id| backward.add(id));
        assert_eq!(forward, backward);
        let mut fewer = forward;
        fewer.remove(&ids[7]);
        assert_ne!(fewer, forward);
        assert_eq!(fewer.count, 99);
        fewer.add(&ids[7]);
        assert_eq!(fewer, forward);
        assert_eq!(SetDigest::decode(&forward.encode()), Some(forward));
    }

    #[test]
    fn a_partition_is_a_run_of_whole_buckets() {
        use hashgrid_proto::placement::{partition_range, Partition};
        for bits in [1u8, 3, 12, 16] {
            let shift = BUCKET_BITS - bits;
            for p in [0u32, (1 << bits) - 1, (1 << bits) / 3] {
                let (start, end) = partition_range(bits, Partition(p));
                let start = ChunkId::from_slice(&start).unwrap();
                assert_eq!(usize::from(bucket_of(&start)), (p as usize) << shift);
                match end {
                    Some(end) => assert_eq!(
                        usize::from(bucket_of(&ChunkId::from_slice(&end).unwrap())),
                        (p as usize + 1) << shift
                    ),
                    None => assert_eq!(p, (1 << bits) - 1),
                }
            }
        }
    }
}

//! Typed identifiers. A [`ChunkId`] is the BLAKE3-256 digest of a chunk's plaintext: equal
//! content has equal ids everywhere, which is what makes deduplication global.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::DecodeError;

/// Identifies a chunk by the BLAKE3-256 hash of its plaintext (never of its compressed form).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    pub const LEN: usize = 32;

    /// The id of `plain`.
    pub fn of(plain: &[u8]) -> Self {
        ChunkId(*blake3::hash(plain).as_bytes())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        ChunkId(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| DecodeError::IdLength(bytes.len()))?;
        Ok(ChunkId(arr))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The id's leading 64 bits, big-endian: placement takes partitions from the top bits.
    pub fn prefix_u64(&self) -> u64 {
        let mut top = [0u8; 8];
        top.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(top)
    }

    /// Does `plain` hash to this id?
    pub fn verifies(&self, plain: &[u8]) -> bool {
        // blake3::Hash compares in constant time; timing does not matter here but it is free.
        blake3::Hash::from_bytes(self.0) == blake3::hash(plain)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &hex::encode(&self.0[..8]))
    }
}

impl FromStr for ChunkId {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s).map_err(|_| DecodeError::IdHex(s.to_string()))?;
        ChunkId::from_slice(&bytes)
    }
}

/// Packs ids into the wire form used by `Has` and `Get`: 32 bytes each, back to back.
pub fn pack_ids<'a>(ids: impl IntoIterator<Item = &'a ChunkId>) -> Vec<u8> {
    let iter = ids.into_iter();
    let mut out = Vec::with_capacity(iter.size_hint().0 * ChunkId::LEN);
    for id in iter {
        out.extend_from_slice(&id.0);
    }
    out
}

/// Unpacks the wire form produced by [`pack_ids`].
pub fn unpack_ids(packed: &[u8]) -> Result<Vec<ChunkId>, DecodeError> {
    if !packed.len().is_multiple_of(ChunkId::LEN) {
        return Err(DecodeError::PackedIdsLength(packed.len()));
    }
    Ok(packed
        .chunks_exact(ChunkId::LEN)
        .map(|c| ChunkId(c.try_into().expect("exact chunk")))
        .collect())
}

/// The `HasResponse` bitmap of `found`: bit (i % 8) of byte (i / 8) set when id i is present.
pub fn to_bitmap(found: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; found.len().div_ceil(8)];
    for (i, &f) in found.iter().enumerate() {
        if f {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// Whether answer `i` of a `HasResponse` bitmap is "present" (missing bytes count as absent).
pub fn bit_set(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Reads `n` answers back from a `HasResponse` bitmap.
pub fn from_bitmap(bitmap: &[u8], n: usize) -> Vec<bool> {
    (0..n).map(|i| bit_set(bitmap, i)).collect()
}

/// A node's identity in the cluster map and the Raft group (openraft wants a plain integer).
pub type NodeId = u64;

/// A snapshot's catalog id: the Raft log index of the entry that committed it, so ids are
/// unique and increase with time across the whole cluster.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default, Serialize, Deserialize,
)]
pub struct SnapshotId(pub u64);

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for SnapshotId {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .map(SnapshotId)
            .ok_or_else(|| {
                DecodeError::invalid("snapshot id", format!("{s:?} is not a positive number"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_round_trips() {
        let found = [
            true, false, false, true, true, false, true, false, true, true,
        ];
        let bits = to_bitmap(&found);
        assert_eq!(bits.len(), 2);
        assert_eq!(from_bitmap(&bits, found.len()), found);
        assert_eq!(from_bitmap(&[], 3), [false; 3]);
    }

    #[test]
    fn id_is_blake3_of_plaintext() {
        let id = ChunkId::of(b"hello");
        assert_eq!(
            id.to_string(),
            "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
        );
        assert!(id.verifies(b"hello"));
        assert!(!id.verifies(b"hellO"));
    }

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of(b"x");
        assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
        assert!("abc".parse::<ChunkId>().is_err());
    }

    #[test]
    fn packing_round_trips_and_rejects_ragged_input() {
        let ids: Vec<_> = (0..5u8).map(|i| ChunkId::of(&[i])).collect();
        let packed = pack_ids(&ids);
        assert_eq!(packed.len(), 160);
        assert_eq!(unpack_ids(&packed).unwrap(), ids);
        assert!(matches!(
            unpack_ids(&packed[..33]),
            Err(DecodeError::PackedIdsLength(33))
        ));
    }

    #[test]
    fn snapshot_ids_are_positive() {
        assert_eq!("12".parse::<SnapshotId>().unwrap(), SnapshotId(12));
        assert!("0".parse::<SnapshotId>().is_err());
        assert!("x".parse::<SnapshotId>().is_err());
    }
}

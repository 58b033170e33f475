//! Chunk encoding: how a chunk's plaintext travels and rests. Agents compress with zstd when
//! that shrinks the chunk; nodes store the encoded form as received, after checking that it
//! decodes to exactly the plaintext its id names. Restore applies the same check.
//!
//! The check also bounds the encoded form to what an honest encoder produces (raw data of
//! exactly the plaintext length, or one zstd frame no larger than zstd's worst case), so a
//! client cannot make a node store padding, trailing bytes or hidden skippable frames beside
//! a valid chunk: what a node keeps is a function of the chunk's plaintext.

use std::cell::RefCell;

use bytes::Bytes;
use thiserror::Error;

use crate::{pb, ChunkId};

/// zstd level agents use by default. Measured on the benchmark's 3 GiB image and 1 GiB tree,
/// level 2 stores 0.1% more than level 3 and 1.5% less than level 1, at the CPU cost of
/// level 1 (about 12% less than level 3); compression is most of an agent's CPU.
pub const DEFAULT_ZSTD_LEVEL: i32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Raw,
    Zstd,
}

impl From<Codec> for pb::Codec {
    fn from(c: Codec) -> Self {
        match c {
            Codec::Raw => pb::Codec::Raw,
            Codec::Zstd => pb::Codec::Zstd,
        }
    }
}

#[derive(Debug, Error)]
pub enum ChunkError {
    #[error("chunk {id}: unknown codec {codec}")]
    UnknownCodec { id: ChunkId, codec: i32 },
    #[error("chunk {id}: plaintext length {len} exceeds the limit {limit}")]
    TooLarge { id: ChunkId, len: u64, limit: u64 },
    #[error("chunk {id}: encoded form does not decode: {reason}")]
    Corrupt { id: ChunkId, reason: String },
    #[error("chunk {id}: content hashes to {actual}, not to its id")]
    WrongHash { id: ChunkId, actual: ChunkId },
    #[error("chunk {id}: all zeros; zero runs are holes and are never stored")]
    AllZero { id: ChunkId },
    #[error("chunk {id}: {why}; an honest encoder never produces that")]
    NonCanonical { id: ChunkId, why: NonCanonical },
    #[error("malformed chunk: {0}")]
    Malformed(String),
}

/// Ways an encoded chunk can differ from what an encoder makes of its plaintext.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum NonCanonical {
    #[error("raw data of {len} bytes for a plaintext of {plain_len}")]
    RawLength { len: usize, plain_len: u32 },
    #[error("zstd data of {len} bytes exceeds zstd's bound of {bound} for its plaintext")]
    OverBound { len: usize, bound: usize },
    #[error("zstd data does not start with a zstd frame (skippable or legacy frame)")]
    NotAFrame,
    #[error("{extra} bytes follow the zstd frame")]
    Trailing { extra: usize },
}

thread_local! {
    /// zstd contexts are costly to create (~1 µs and fresh memory each); each thread keeps
    /// one per level it uses.
    static COMPRESSORS: RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(Vec::new()) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Below this a chunk is compressed without probing first.
const PROBE_ABOVE: usize = 16 * 1024;
const PROBE_LEN: usize = 4096;

fn compress_with(level: i32, data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSORS.with(|cell| {
        let mut all = cell.borrow_mut();
        let idx = match all.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                all.push((level, zstd::bulk::Compressor::new(level).ok()?));
                all.len() - 1
            }
        };
        all[idx].1.compress(data).ok()
    })
}

/// Encodes `plain` for upload: zstd at `level` when that makes it smaller, raw otherwise.
/// Large chunks are probed first: when a 4 KiB sample from their middle does not shrink by
/// 3% at level 1, the chunk is taken as incompressible (encrypted or already compressed
/// data) and sent raw without spending a full compression on it.
pub fn encode(plain: &Bytes, level: i32) -> (Codec, Bytes) {
    if level == 0 {
        return (Codec::Raw, plain.clone());
    }
    if plain.len() > PROBE_ABOVE {
        let mid = plain.len() / 2 - PROBE_LEN / 2;
        let sample = &plain[mid..mid + PROBE_LEN];
        match compress_with(1, sample) {
            Some(z) if z.len() * 100 < sample.len() * 97 => {}
            _ => return (Codec::Raw, plain.clone()),
        }
    }
    match compress_with(level, plain) {
        Some(z) if z.len() < plain.len() => (Codec::Zstd, Bytes::from(z)),
        _ => (Codec::Raw, plain.clone()),
    }
}

/// `plain` (whose id is `id`) encoded with [`encode`], as a chunk on the wire.
pub fn encode_chunk(id: ChunkId, plain: &Bytes, level: i32) -> pb::Chunk {
    let (codec, data) = encode(plain, level);
    pb::Chunk {
        id: id.as_bytes().to_vec(),
        plain_len: plain.len() as u32,
        codec: pb::Codec::from(codec) as i32,
        data,
        ..Default::default()
    }
}

/// Checks that `data` is exactly what an encoder with `codec` could have made of a
/// plaintext of `plain_len` bytes: nothing before, around or after the encoded plaintext.
/// Cheap (a scan of the zstd block headers), so it runs before any decompression.
fn check_canonical(codec: pb::Codec, data: &[u8], plain_len: u32) -> Result<(), NonCanonical> {
    let len = data.len();
    match codec {
        pb::Codec::Raw if len != plain_len as usize => {
            Err(NonCanonical::RawLength { len, plain_len })
        }
        pb::Codec::Raw => Ok(()),
        pb::Codec::Zstd => {
            let bound = zstd::zstd_safe::compress_bound(plain_len as usize);
            if len > bound {
                return Err(NonCanonical::OverBound { len, bound });
            }
            // Skippable frames (any content) and legacy formats have other magic numbers.
            let magic = data.first_chunk::<4>().map(|m| u32::from_le_bytes(*m));
            if magic != Some(zstd::zstd_safe::MAGICNUMBER) {
                return Err(NonCanonical::NotAFrame);
            }
            match zstd::zstd_safe::find_frame_compressed_size(data) {
                Ok(frame) if frame < len => Err(NonCanonical::Trailing { extra: len - frame }),
                // A truncated or garbled frame: decompression reports it.
                _ => Ok(()),
            }
        }
    }
}

/// The checks of [`decode_verified`] that need neither decompression nor hashing: a
/// well-formed id, a declared length within `max_len`, a known codec, and encoded bytes of
/// a size an honest encoder produces. A node that only forwards a chunk to the owners that
/// verify it checks this much, so a malformed batch is refused where it arrives.
pub fn check_form(chunk: &pb::Chunk, max_len: u32) -> Result<(ChunkId, pb::Codec), ChunkError> {
    let id = ChunkId::from_slice(&chunk.id).map_err(|e| ChunkError::Malformed(e.to_string()))?;
    if chunk.plain_len > max_len {
        return Err(ChunkError::TooLarge {
            id,
            len: u64::from(chunk.plain_len),
            limit: u64::from(max_len),
        });
    }
    let Ok(codec) = pb::Codec::try_from(chunk.codec) else {
        return Err(ChunkError::UnknownCodec {
            id,
            codec: chunk.codec,
        });
    };
    check_canonical(codec, &chunk.data, chunk.plain_len)
        .map_err(|why| ChunkError::NonCanonical { id, why })?;
    Ok((id, codec))
}

/// Decodes a chunk and checks it against its id and declared length; returns the plaintext.
/// `max_len` bounds the plaintext so a hostile chunk cannot make us allocate without limit,
/// and the encoded bytes must be no more than an honest encoder produces (see [`NonCanonical`]).
/// Raw chunks are checked in place, without a copy.
pub fn decode_verified(chunk: &pb::Chunk, max_len: u32) -> Result<(ChunkId, Bytes), ChunkError> {
    let (id, codec) = check_form(chunk, max_len)?;
    let corrupt = |reason: String| ChunkError::Corrupt { id, reason };
    let plain = match codec {
        pb::Codec::Raw => chunk.data.clone(),
        pb::Codec::Zstd => DECOMPRESSOR
            .with(|cell| {
                let mut d = cell.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                }
                d.as_mut()
                    .expect("set above")
                    .decompress(&chunk.data, chunk.plain_len as usize)
                    .map_err(|e| e.to_string())
            })
            .map(Bytes::from)
            .map_err(corrupt)?,
    };
    if plain.len() != chunk.plain_len as usize {
        return Err(corrupt(format!(
            "decodes to {} bytes, declared {}",
            plain.len(),
            chunk.plain_len
        )));
    }
    let actual = ChunkId::of(&plain);
    if actual != id {
        return Err(ChunkError::WrongHash { id, actual });
    }
    Ok((id, plain))
}

/// Is every byte zero? Such runs become holes instead of chunks.
pub fn is_zero(data: &[u8]) -> bool {
    let (body, tail) = data.split_at(data.len() - data.len() % 16);
    body.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(plain: &[u8], level: i32) -> pb::Chunk {
        encode_chunk(ChunkId::of(plain), &Bytes::copy_from_slice(plain), level)
    }

    #[test]
    fn compressible_chunks_shrink_and_verify() {
        let plain = b"abcabcabc".repeat(1000);
        let c = chunk(&plain, 3);
        assert_eq!(c.codec, pb::Codec::Zstd as i32);
        assert!(c.data.len() < plain.len() / 10);
        assert_eq!(decode_verified(&c, 1 << 20).unwrap().1, plain);
    }

    #[test]
    fn incompressible_chunks_stay_raw() {
        let mut plain = vec![0u8; 4096];
        blake3::Hasher::new().finalize_xof().fill(&mut plain);
        let c = chunk(&plain, 3);
        assert_eq!(c.codec, pb::Codec::Raw as i32);
        assert_eq!(decode_verified(&c, 1 << 20).unwrap().1, plain);
    }

    #[test]
    fn wrong_hash_wrong_length_and_bombs_are_rejected() {
        let plain = b"hello world".repeat(100);
        let mut c = chunk(&plain, 3);
        c.id = ChunkId::of(b"other").as_bytes().to_vec();
        assert!(matches!(
            decode_verified(&c, 1 << 20),
            Err(ChunkError::WrongHash { .. })
        ));

        let mut c = chunk(&plain, 3);
        c.plain_len -= 1;
        assert!(decode_verified(&c, 1 << 20).is_err());

        let c = chunk(&plain, 3);
        assert!(matches!(
            decode_verified(&c, 100),
            Err(ChunkError::TooLarge { .. })
        ));

        let mut c = chunk(&plain, 3);
        c.data = Bytes::from_static(b"not zstd");
        assert!(matches!(
            decode_verified(&c, 1 << 20),
            Err(ChunkError::NonCanonical {
                why: NonCanonical::NotAFrame,
                ..
            })
        ));

        let mut c = chunk(&plain, 3);
        c.data = c.data.slice(..c.data.len() - 3);
        assert!(matches!(
            decode_verified(&c, 1 << 20),
            Err(ChunkError::Corrupt { .. })
        ));
    }

    fn skippable_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = 0x184D_2A5Au32.to_le_bytes().to_vec();
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn non_canonical(c: &pb::Chunk) -> NonCanonical {
        match decode_verified(c, 1 << 20) {
            Err(ChunkError::NonCanonical { why, .. }) => why,
            other => panic!("accepted or refused for another reason: {other:?}"),
        }
    }

    #[test]
    fn skippable_frames_beside_a_valid_frame_are_refused() {
        let plain = b"hello world".repeat(100);
        let honest = chunk(&plain, 3);
        let hidden = skippable_frame(b"a stowaway the node must not keep");

        let mut after = honest.clone();
        after.data = [&honest.data[..], &hidden].concat().into();
        assert_eq!(
            non_canonical(&after),
            NonCanonical::Trailing {
                extra: hidden.len()
            }
        );

        let mut before = honest.clone();
        before.data = [&hidden, &honest.data[..]].concat().into();
        assert_eq!(non_canonical(&before), NonCanonical::NotAFrame);
    }

    #[test]
    fn trailing_bytes_and_padding_after_the_frame_are_refused() {
        let plain = b"hello world".repeat(100);
        let honest = chunk(&plain, 3);
        let mut trailing = honest.clone();
        trailing.data = [&honest.data[..], b"garbage"].concat().into();
        assert_eq!(
            non_canonical(&trailing),
            NonCanonical::Trailing { extra: 7 }
        );

        let mut padded = honest.clone();
        padded.data = [&honest.data[..], &[0u8; 8192][..]].concat().into();
        let bound = zstd::zstd_safe::compress_bound(plain.len());
        assert_eq!(
            non_canonical(&padded),
            NonCanonical::OverBound {
                len: honest.data.len() + 8192,
                bound
            }
        );
        // The honest chunk itself passes.
        assert_eq!(decode_verified(&honest, 1 << 20).unwrap().1, plain);
    }

    #[test]
    fn raw_data_must_be_exactly_the_plaintext() {
        let mut plain = vec![0u8; 4096];
        blake3::Hasher::new().finalize_xof().fill(&mut plain);
        let honest = chunk(&plain, 0);
        assert_eq!(honest.codec, pb::Codec::Raw as i32);
        let mut oversized = honest.clone();
        oversized.data = [&plain[..], b"extra"].concat().into();
        assert_eq!(
            non_canonical(&oversized),
            NonCanonical::RawLength {
                len: 4101,
                plain_len: 4096
            }
        );
        let mut short = honest.clone();
        short.data = honest.data.slice(..4000);
        assert_eq!(
            non_canonical(&short),
            NonCanonical::RawLength {
                len: 4000,
                plain_len: 4096
            }
        );
    }

    #[test]
    fn large_incompressible_chunks_skip_compression_and_mixed_ones_do_not() {
        let mut random = vec![0u8; 64 * 1024];
        blake3::Hasher::new().finalize_xof().fill(&mut random);
        let (codec, data) = encode(&Bytes::from(random.clone()), 3);
        assert_eq!((codec, data.len()), (Codec::Raw, random.len()));
        // Text in the middle: the probe sees it and the chunk gets compressed.
        random[16 * 1024..48 * 1024]
            .copy_from_slice(&b"text ".repeat(32 * 1024 / 5 + 1)[..32 * 1024]);
        let (codec, data) = encode(&Bytes::from(random.clone()), 3);
        assert_eq!(codec, Codec::Zstd);
        assert!(data.len() < random.len() * 3 / 4);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 100]));
        assert!(is_zero(&[]));
        let mut v = vec![0u8; 100];
        v[99] = 1;
        assert!(!is_zero(&v));
        v[99] = 0;
        v[0] = 1;
        assert!(!is_zero(&v));
    }
}

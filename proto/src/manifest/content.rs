//! File content as a sequence of extents, and the streaming chunk-list object for files with
//! more extents than fit comfortably inline.

use prost::bytes::Buf;
use prost::Message;

use super::object::{ObjectKind, HEADER_LEN};
use super::ObjectRef;
use crate::pb::manifest as mpb;
use crate::{ChunkId, DecodeError};

/// Files with at most this many extents list them inline in their tree entry; larger ones
/// get a chunk-list object. 64 extents is ~4 MiB of content and ~2.5 KiB of tree entry, so a
/// directory of many large files still encodes to a modest tree object.
pub const INLINE_EXTENTS_MAX: usize = 64;

/// Largest chunk any cluster can be configured for (FastCDC v2020's maximum).
const MAX_CHUNK_LEN: u32 = 16 * 1024 * 1024;

/// One run of file content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Extent {
    /// `len` bytes stored as the chunk `id`.
    Chunk { id: ChunkId, len: u32 },
    /// `len` zero bytes, never stored or sent; restore leaves them unallocated.
    Hole { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Chunk { len, .. } => u64::from(len),
            Extent::Hole { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn to_wire(self) -> mpb::Extent {
        match self {
            Extent::Chunk { id, len } => mpb::Extent {
                id: id.as_bytes().to_vec(),
                len: u64::from(len),
            },
            Extent::Hole { len } => mpb::Extent {
                id: Vec::new(),
                len,
            },
        }
    }

    fn from_wire(e: &mpb::Extent) -> Result<Self, DecodeError> {
        if e.len == 0 {
            return Err(DecodeError::invalid("extent", "zero length"));
        }
        if e.id.is_empty() {
            return Ok(Extent::Hole { len: e.len });
        }
        let id = ChunkId::from_slice(&e.id)?;
        match u32::try_from(e.len) {
            Ok(len) if len <= MAX_CHUNK_LEN => Ok(Extent::Chunk { id, len }),
            _ => Err(DecodeError::TooLarge {
                what: "chunk extent",
                size: e.len,
                limit: u64::from(MAX_CHUNK_LEN),
            }),
        }
    }
}

/// Where a file's extents are.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Content {
    Inline(Vec<Extent>),
    /// A chunk-list object holding `extents` extents, `chunks` of them chunks.
    List {
        list: ObjectRef,
        extents: u64,
        chunks: u64,
    },
}

impl Content {
    /// How many data chunks (not holes) the content references.
    pub fn chunk_count(&self) -> u64 {
        match self {
            Content::Inline(extents) => extents
                .iter()
                .filter(|e| matches!(e, Extent::Chunk { .. }))
                .count() as u64,
            Content::List { chunks, .. } => *chunks,
        }
    }

    pub(crate) fn to_wire(&self) -> mpb::Content {
        match self {
            Content::Inline(extents) => mpb::Content {
                extents: extents.iter().map(|e| e.to_wire()).collect(),
                list: Vec::new(),
                extent_count: extents.len() as u64,
                chunk_count: self.chunk_count(),
            },
            Content::List {
                list,
                extents,
                chunks,
            } => mpb::Content {
                extents: Vec::new(),
                list: list.to_wire(),
                extent_count: *extents,
                chunk_count: *chunks,
            },
        }
    }

    /// Decodes and checks that inline extents add up to `size`. (A list's total is checked
    /// by whoever streams it, against the same `size`.)
    pub(crate) fn from_wire(c: &mpb::Content, size: u64) -> Result<Self, DecodeError> {
        if !c.list.is_empty() {
            if !c.extents.is_empty() {
                return Err(DecodeError::invalid(
                    "content",
                    "both inline extents and a list",
                ));
            }
            if c.chunk_count > c.extent_count {
                return Err(DecodeError::invalid("content", "more chunks than extents"));
            }
            return Ok(Content::List {
                list: ObjectRef::from_wire(&c.list, "chunk list reference")?,
                extents: c.extent_count,
                chunks: c.chunk_count,
            });
        }
        let extents = c
            .extents
            .iter()
            .map(Extent::from_wire)
            .collect::<Result<Vec<_>, _>>()?;
        let total: u64 = extents.iter().map(Extent::len).sum();
        if total != size {
            return Err(DecodeError::invalid(
                "content",
                format!("extents add up to {total} bytes, entry size is {size}"),
            ));
        }
        Ok(Content::Inline(extents))
    }
}

/// Writes a chunk-list object one extent at a time. The output is a valid `ChunkList`
/// protobuf message after the header, because a repeated field may be encoded piecewise.
pub struct ChunkListEncoder;

impl ChunkListEncoder {
    /// The bytes that start every chunk-list object.
    pub fn header() -> [u8; HEADER_LEN] {
        ObjectKind::ChunkList.header()
    }

    /// Appends one extent's encoding to `out`.
    pub fn encode_extent(extent: &Extent, out: &mut Vec<u8>) {
        prost::encoding::message::encode(1, &extent.to_wire(), out);
    }
}

/// Reads a chunk-list object fed in arbitrary pieces (its chunks, in order).
#[derive(Default)]
pub struct ChunkListDecoder {
    buf: Vec<u8>,
    pos: usize,
    header_checked: bool,
}

impl ChunkListDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next piece of the object.
    pub fn push(&mut self, piece: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > (1 << 20) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(piece);
    }

    /// The next complete extent, or `None` when more input is needed.
    pub fn next_extent(&mut self) -> Result<Option<Extent>, DecodeError> {
        if !self.header_checked {
            if self.buf.len() < HEADER_LEN {
                return Ok(None);
            }
            ObjectKind::ChunkList.strip(&self.buf[..HEADER_LEN])?;
            self.pos = HEADER_LEN;
            self.header_checked = true;
        }
        let mut rest = &self.buf[self.pos..];
        let available = rest.len();
        if available == 0 {
            return Ok(None);
        }
        let Some((field, wire_type, body_len)) = read_field_header(&mut rest)? else {
            return Ok(None);
        };
        if field != 1 || wire_type != prost::encoding::WireType::LengthDelimited {
            return Err(DecodeError::invalid(
                "chunk list",
                format!("unexpected field {field} ({wire_type:?})"),
            ));
        }
        if body_len > 64 {
            return Err(DecodeError::invalid(
                "chunk list",
                "oversized extent record",
            ));
        }
        if rest.len() < body_len {
            return Ok(None);
        }
        let extent = mpb::Extent::decode(&rest[..body_len])?;
        let consumed = available - rest.len() + body_len;
        self.pos += consumed;
        Extent::from_wire(&extent).map(Some)
    }

    /// Checks that the object ended on a record boundary.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if !self.header_checked || self.pos != self.buf.len() {
            return Err(DecodeError::invalid("chunk list", "truncated object"));
        }
        Ok(())
    }
}

/// Reads a field key and a length prefix, or `None` if `buf` ends inside them.
fn read_field_header(
    buf: &mut &[u8],
) -> Result<Option<(u32, prost::encoding::WireType, usize)>, DecodeError> {
    // Varints are at most 10 bytes; with fewer bytes left a decode failure may only mean
    // "not arrived yet".
    let complete = |b: &[u8]| b.iter().take(10).any(|&x| x & 0x80 == 0);
    if !complete(buf) {
        return if buf.len() >= 10 {
            Err(DecodeError::invalid("chunk list", "bad varint"))
        } else {
            Ok(None)
        };
    }
    let (field, wire_type) = prost::encoding::decode_key(buf)?;
    if !complete(buf) {
        return if buf.len() >= 10 {
            Err(DecodeError::invalid("chunk list", "bad varint"))
        } else {
            Ok(None)
        };
    }
    let len = prost::encoding::decode_varint(buf)?;
    let _ = buf.remaining();
    Ok(Some((field, wire_type, len as usize)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<Extent> {
        (0..n)
            .map(|i| {
                if i % 7 == 3 {
                    Extent::Hole {
                        len: 1 + i as u64 * 4096,
                    }
                } else {
                    Extent::Chunk {
                        id: ChunkId::of(&i.to_le_bytes()),
                        len: 1000 + i as u32,
                    }
                }
            })
            .collect()
    }

    #[test]
    fn chunk_list_streams_through_arbitrary_piece_boundaries() {
        let extents = sample(500);
        let mut obj = ChunkListEncoder::header().to_vec();
        for e in &extents {
            ChunkListEncoder::encode_extent(e, &mut obj);
        }
        // Also a valid whole protobuf message after the header.
        let whole = mpb::ChunkList::decode(&obj[HEADER_LEN..]).unwrap();
        assert_eq!(whole.extents.len(), 500);

        for piece in [1usize, 3, 33, 4096] {
            let mut dec = ChunkListDecoder::new();
            let mut out = Vec::new();
            for p in obj.chunks(piece) {
                dec.push(p);
                while let Some(e) = dec.next_extent().unwrap() {
                    out.push(e);
                }
            }
            dec.finish().unwrap();
            assert_eq!(out, extents, "piece size {piece}");
        }
    }

    #[test]
    fn truncated_list_is_an_error() {
        let mut obj = ChunkListEncoder::header().to_vec();
        for e in &sample(3) {
            ChunkListEncoder::encode_extent(e, &mut obj);
        }
        let mut dec = ChunkListDecoder::new();
        dec.push(&obj[..obj.len() - 1]);
        while dec.next_extent().unwrap().is_some() {}
        assert!(dec.finish().is_err());
    }

    #[test]
    fn zero_length_and_oversized_extents_are_rejected() {
        let zero = mpb::Extent {
            id: Vec::new(),
            len: 0,
        };
        assert!(Extent::from_wire(&zero).is_err());
        let big = mpb::Extent {
            id: vec![1; 32],
            len: u64::from(MAX_CHUNK_LEN) + 1,
        };
        assert!(Extent::from_wire(&big).is_err());
    }

    #[test]
    fn inline_extents_must_add_up_to_size() {
        let c = Content::Inline(sample(3)).to_wire();
        let size: u64 = sample(3).iter().map(Extent::len).sum();
        Content::from_wire(&c, size).unwrap();
        assert!(Content::from_wire(&c, size + 1).is_err());
    }
}

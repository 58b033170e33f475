//! The manifest format: what a snapshot contains.
//!
//! A snapshot's root is a [`Tree`] object: one directory's entries, sorted by raw name bytes.
//! A subdirectory entry points at its own tree object, so a subtree that did not change
//! encodes to the same bytes, gets the same chunk ids, and is stored once (a Merkle tree, as
//! in git and restic). A file entry lists its content as [`Extent`]s (chunk or hole); files
//! with many extents keep them in a separate chunk-list object that is written and read as a
//! stream, so a 50 GiB image never needs its whole chunk list in memory.
//!
//! A directory too large for one tree object (over [`crate::limits::MAX_TREE_BYTES`]) is
//! split by name over several tree objects listed by a [`TreeIndex`]; a reader meets either
//! through [`decode_dir`].
//!
//! Every object is framed ([`object`]) with magic bytes, a kind and a format version, then cut
//! into chunks like file data. Both agents (backup, restore) and nodes (GC marking, verify)
//! decode with the functions here, and decoding rejects anything a restore must not act on:
//! names with `/`, NUL, `.` or `..`, duplicate or unsorted names, and oversized objects.

mod content;
mod name;
mod object;
mod tree;
mod tree_index;

pub use content::{ChunkListDecoder, ChunkListEncoder, Content, Extent, INLINE_EXTENTS_MAX};
pub use name::validate_name;
pub use object::{ObjectKind, FORMAT_VERSION, MAGIC};
pub use tree::{Entry, EntryKind, Metadata, Timestamp, Tree, Xattr};
pub use tree_index::{decode_dir, DirObject, TreeIndex, TreePart};

use serde::{Deserialize, Serialize};

use crate::limits::MAX_OBJECT_REF_IDS;
use crate::{ChunkId, DecodeError};

/// The ids of the chunks that hold one manifest object, in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ObjectRef(pub Vec<ChunkId>);

impl ObjectRef {
    pub(crate) fn from_wire(ids: &[Vec<u8>], what: &'static str) -> Result<Self, DecodeError> {
        if ids.is_empty() {
            return Err(DecodeError::invalid(what, "empty object reference"));
        }
        if ids.len() > MAX_OBJECT_REF_IDS {
            return Err(DecodeError::TooLarge {
                what,
                size: ids.len() as u64,
                limit: MAX_OBJECT_REF_IDS as u64,
            });
        }
        ids.iter()
            .map(|b| ChunkId::from_slice(b))
            .collect::<Result<_, _>>()
            .map(ObjectRef)
    }

    pub(crate) fn to_wire(&self) -> Vec<Vec<u8>> {
        self.0.iter().map(|id| id.as_bytes().to_vec()).collect()
    }
}

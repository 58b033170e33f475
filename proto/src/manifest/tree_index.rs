//! Tree indexes: how a directory too large for one tree object is stored. Its entries are
//! split in name order over several tree objects (parts), each under
//! [`MAX_TREE_BYTES`](crate::limits::MAX_TREE_BYTES), and the directory's subtree reference
//! points at an index object listing the parts with their first and last names. A reader
//! never holds more than one part, and finds a name by binary search over the parts.
//!
//! The index is untrusted like everything in a manifest: it is validated on decoding (names,
//! order, no overlap), and each part, once loaded, is checked against what the index says
//! of it ([`TreePart::check`]), so a lying index cannot smuggle in unsorted or duplicate
//! names across parts.

use prost::Message;

use super::name::validate_name;
use super::object::ObjectKind;
use super::tree::Tree;
use super::ObjectRef;
use crate::limits::MAX_TREE_BYTES;
use crate::pb::manifest as mpb;
use crate::DecodeError;

/// One part of a split directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreePart {
    /// The part's tree object.
    pub object: ObjectRef,
    pub first_name: Vec<u8>,
    pub last_name: Vec<u8>,
    pub entries: u64,
}

impl TreePart {
    /// Describes `tree` (non-empty, sorted) stored as `object`.
    pub fn describe(object: ObjectRef, tree: &Tree) -> TreePart {
        TreePart {
            object,
            first_name: tree
                .entries
                .first()
                .map(|e| e.name.clone())
                .unwrap_or_default(),
            last_name: tree
                .entries
                .last()
                .map(|e| e.name.clone())
                .unwrap_or_default(),
            entries: tree.entries.len() as u64,
        }
    }

    /// Checks that a loaded part is what the index says it is.
    pub fn check(&self, tree: &Tree) -> Result<(), DecodeError> {
        let first = tree.entries.first().map(|e| e.name.as_slice());
        let last = tree.entries.last().map(|e| e.name.as_slice());
        if first != Some(self.first_name.as_slice())
            || last != Some(self.last_name.as_slice())
            || tree.entries.len() as u64 != self.entries
        {
            return Err(DecodeError::invalid(
                "tree part",
                format!(
                    "holds {} entries from {:?} to {:?}, the index says {} from {:?} to {:?}",
                    tree.entries.len(),
                    first.map(String::from_utf8_lossy),
                    last.map(String::from_utf8_lossy),
                    self.entries,
                    String::from_utf8_lossy(&self.first_name),
                    String::from_utf8_lossy(&self.last_name),
                ),
            ));
        }
        Ok(())
    }

    /// Could `name` be in this part?
    pub fn may_hold(&self, name: &[u8]) -> bool {
        self.first_name.as_slice() <= name && name <= self.last_name.as_slice()
    }
}

/// The part list of a split directory, in name order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TreeIndex {
    pub parts: Vec<TreePart>,
}

impl TreeIndex {
    /// Total entries over all parts.
    pub fn entries(&self) -> u64 {
        self.parts.iter().map(|p| p.entries).sum()
    }

    /// The part that may hold `name`, by binary search.
    pub fn part_for(&self, name: &[u8]) -> Option<&TreePart> {
        let i = self
            .parts
            .partition_point(|p| p.last_name.as_slice() < name);
        self.parts.get(i).filter(|p| p.may_hold(name))
    }

    pub fn encode(&self) -> Vec<u8> {
        let msg = mpb::TreeIndex {
            parts: self
                .parts
                .iter()
                .map(|p| mpb::TreePart {
                    object: p.object.to_wire(),
                    first_name: p.first_name.clone(),
                    last_name: p.last_name.clone(),
                    entries: p.entries,
                })
                .collect(),
        };
        let mut out = ObjectKind::TreeIndex.header().to_vec();
        out.reserve(msg.encoded_len());
        msg.encode(&mut out).expect("Vec grows");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<TreeIndex, DecodeError> {
        if bytes.len() as u64 > MAX_TREE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "tree index object",
                size: bytes.len() as u64,
                limit: MAX_TREE_BYTES,
            });
        }
        let body = ObjectKind::TreeIndex.strip(bytes)?;
        let msg = mpb::TreeIndex::decode(body)?;
        if msg.parts.is_empty() {
            return Err(DecodeError::invalid("tree index", "no parts"));
        }
        let mut parts = Vec::with_capacity(msg.parts.len());
        for p in msg.parts {
            validate_name(&p.first_name)?;
            validate_name(&p.last_name)?;
            let ordered = match p.entries {
                0 => false,
                1 => p.first_name == p.last_name,
                _ => p.first_name < p.last_name,
            };
            if !ordered {
                return Err(DecodeError::invalid(
                    "tree index",
                    format!(
                        "part from {:?} to {:?} with {} entries is inconsistent",
                        String::from_utf8_lossy(&p.first_name),
                        String::from_utf8_lossy(&p.last_name),
                        p.entries
                    ),
                ));
            }
            let part = TreePart {
                object: ObjectRef::from_wire(&p.object, "tree part reference")?,
                first_name: p.first_name,
                last_name: p.last_name,
                entries: p.entries,
            };
            if let Some(prev) = parts.last() {
                let prev: &TreePart = prev;
                if prev.last_name >= part.first_name {
                    return Err(DecodeError::Unsorted(
                        String::from_utf8_lossy(&part.first_name).into_owned(),
                    ));
                }
            }
            parts.push(part);
        }
        Ok(TreeIndex { parts })
    }
}

/// What a directory's subtree reference holds: its entries, or the index of its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirObject {
    Tree(Tree),
    Index(TreeIndex),
}

/// Decodes a directory object of either kind.
pub fn decode_dir(bytes: &[u8]) -> Result<DirObject, DecodeError> {
    match ObjectKind::of(bytes)? {
        ObjectKind::Tree => Tree::decode(bytes).map(DirObject::Tree),
        ObjectKind::TreeIndex => TreeIndex::decode(bytes).map(DirObject::Index),
        ObjectKind::ChunkList => Err(DecodeError::WrongKind {
            expected: 'T',
            found: 'L',
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Entry, EntryKind, Metadata};
    use crate::ChunkId;

    fn dir(name: &str) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            meta: Metadata::default(),
            kind: EntryKind::Dir {
                subtree: ObjectRef(vec![ChunkId::of(name.as_bytes())]),
            },
        }
    }

    fn tree(n: usize) -> Tree {
        let mut t = Tree {
            entries: (0..n).map(|i| dir(&format!("entry-{i:06}"))).collect(),
        };
        t.sort();
        t
    }

    fn index_of(parts: &[Tree]) -> TreeIndex {
        TreeIndex {
            parts: parts
                .iter()
                .map(|p| TreePart::describe(ObjectRef(vec![ChunkId::of(&p.encode())]), p))
                .collect(),
        }
    }

    #[test]
    fn split_keeps_order_and_bounds_every_part() {
        let whole = tree(1000);
        let limit = 4096;
        let parts = whole.clone().split(limit);
        assert!(parts.len() > 5, "{} parts", parts.len());
        for p in &parts {
            assert!(p.encode().len() <= limit + 5, "{}", p.encode().len());
        }
        let rejoined: Vec<Entry> = parts.iter().flat_map(|p| p.entries.clone()).collect();
        assert_eq!(rejoined, whole.entries);
        assert_eq!(whole.clone().split(usize::MAX), vec![whole]);
        assert_eq!(Tree::default().split(10), vec![Tree::default()]);
    }

    #[test]
    fn index_round_trips_and_finds_parts() {
        let parts = tree(500).split(2000);
        let index = index_of(&parts);
        let bytes = index.encode();
        assert_eq!(&bytes[..5], b"HGMI\x01");
        let back = match decode_dir(&bytes).unwrap() {
            DirObject::Index(i) => i,
            other => panic!("{other:?}"),
        };
        assert_eq!(back, index);
        assert_eq!(back.entries(), 500);
        for (i, p) in parts.iter().enumerate() {
            for e in &p.entries {
                assert_eq!(back.part_for(&e.name), Some(&back.parts[i]));
            }
            back.parts[i].check(p).unwrap();
        }
        assert_eq!(back.part_for(b"zzz"), None);
        assert_eq!(back.part_for(b"a"), None);
        assert!(back.parts[0].check(&parts[1]).is_err());
        assert!(matches!(
            decode_dir(&tree(3).encode()).unwrap(),
            DirObject::Tree(_)
        ));
    }

    #[test]
    fn overlapping_or_inconsistent_parts_are_rejected() {
        let parts = tree(100).split(1000);
        let mut index = index_of(&parts);
        index.parts.swap(0, 1);
        assert!(matches!(
            TreeIndex::decode(&index.encode()),
            Err(DecodeError::Unsorted(_))
        ));
        let mut index = index_of(&parts);
        index.parts[0].entries = 0;
        assert!(TreeIndex::decode(&index.encode()).is_err());
        let mut index = index_of(&parts);
        index.parts[0].first_name = b"..".to_vec();
        assert!(TreeIndex::decode(&index.encode()).is_err());
        assert!(TreeIndex::decode(&TreeIndex::default().encode()).is_err());
    }
}

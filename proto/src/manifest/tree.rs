//! Tree objects: one directory's entries with their metadata.

use std::num::NonZeroU64;

use prost::Message;

use super::content::Content;
use super::name::validate_name;
use super::object::ObjectKind;
use super::ObjectRef;
use crate::limits::{MAX_SYMLINK_BYTES, MAX_TREE_BYTES, MAX_XATTRS, MAX_XATTR_BYTES};
use crate::pb::manifest as mpb;
use crate::DecodeError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// Metadata common to every kind of entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Metadata {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    /// Content length for files, target length for symlinks, 0 otherwise.
    pub size: u64,
    pub xattrs: Vec<Xattr>,
    /// Change detection only: the next backup compares these with `lstat` to skip re-reading.
    pub ctime: Timestamp,
    pub inode: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File {
        content: Content,
        /// Shared by all names of a file with more than one hard link.
        link_key: Option<NonZeroU64>,
    },
    Dir {
        subtree: ObjectRef,
    },
    Symlink {
        target: Vec<u8>,
    },
    Fifo,
    Socket,
    CharDevice {
        rdev: u64,
    },
    BlockDevice {
        rdev: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub name: Vec<u8>,
    pub meta: Metadata,
    pub kind: EntryKind,
}

/// One directory's entries, sorted by name bytes with no duplicates.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tree {
    pub entries: Vec<Entry>,
}

impl Tree {
    /// Sorts the entries into the canonical order, so equal directories encode identically.
    pub fn sort(&mut self) {
        self.entries.sort_by(|a, b| a.name.cmp(&b.name));
    }

    /// The framed object bytes. Entries must already be sorted (see [`Tree::sort`]).
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.entries.windows(2).all(|w| w[0].name < w[1].name));
        let msg = mpb::Tree {
            entries: self.entries.iter().map(Entry::to_wire).collect(),
        };
        let mut out = ObjectKind::Tree.header().to_vec();
        out.reserve(msg.encoded_len());
        msg.encode(&mut out).expect("Vec grows");
        out
    }

    /// Decodes and validates a whole tree object.
    pub fn decode(bytes: &[u8]) -> Result<Tree, DecodeError> {
        if bytes.len() as u64 > MAX_TREE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "tree object",
                size: bytes.len() as u64,
                limit: MAX_TREE_BYTES,
            });
        }
        let body = ObjectKind::Tree.strip(bytes)?;
        // Entry by entry rather than through `mpb::Tree`, and into a vector sized by a first
        // pass, so a tree never costs its wire form and its decoded form at once: a 30 MB
        // tree of 1.3 million tiny entries peaks at ~300 MB to decode, not ~600 MB.
        let mut entries = Vec::with_capacity(for_each_entry(body, |_| Ok(()))?);
        for_each_entry(body, |raw| {
            entries.push(Entry::from_wire(&mpb::Entry::decode(raw)?)?);
            Ok(())
        })?;
        for pair in entries.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(DecodeError::Unsorted(
                    String::from_utf8_lossy(&pair[1].name).into_owned(),
                ));
            }
        }
        Ok(Tree { entries })
    }

    /// Splits a sorted tree into parts whose encodings stay under `part_bytes` each (every
    /// part holds at least one entry), keeping name order. A tree that fits is one part.
    pub fn split(self, part_bytes: usize) -> Vec<Tree> {
        let mut parts = Vec::new();
        let mut current = Tree::default();
        let mut size = 0usize;
        for entry in self.entries {
            let len = entry.encoded_len();
            if !current.entries.is_empty() && size + len > part_bytes {
                parts.push(std::mem::take(&mut current));
                size = 0;
            }
            size += len;
            current.entries.push(entry);
        }
        if !current.entries.is_empty() || parts.is_empty() {
            parts.push(current);
        }
        parts
    }

    /// The entry called `name`, by binary search over the sorted entries.
    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }
}

/// Calls `f` with the encoded bytes of each entry (field 1) of a `Tree` message body,
/// skipping unknown fields; returns how many there were.
fn for_each_entry(
    mut body: &[u8],
    mut f: impl FnMut(&[u8]) -> Result<(), DecodeError>,
) -> Result<usize, DecodeError> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let mut n = 0;
    while !body.is_empty() {
        let (tag, wire_type) = decode_key(&mut body)?;
        if tag != 1 {
            skip_field(wire_type, tag, &mut body, DecodeContext::default())?;
            continue;
        }
        if wire_type != WireType::LengthDelimited {
            return Err(DecodeError::invalid("tree", "entry is not a message"));
        }
        let len = usize::try_from(decode_varint(&mut body)?).unwrap_or(usize::MAX);
        if len > body.len() {
            return Err(DecodeError::invalid("tree", "truncated entry"));
        }
        let (raw, rest) = body.split_at(len);
        f(raw)?;
        body = rest;
        n += 1;
    }
    Ok(n)
}

impl Entry {
    /// Bytes this entry adds to an encoded tree (the field key and length prefix included).
    pub fn encoded_len(&self) -> usize {
        prost::encoding::message::encoded_len(1, &self.to_wire())
    }

    fn to_wire(&self) -> mpb::Entry {
        let m = &self.meta;
        let mut e = mpb::Entry {
            name: self.name.clone(),
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            mtime_sec: m.mtime.sec,
            mtime_nsec: m.mtime.nsec,
            size: m.size,
            xattrs: m
                .xattrs
                .iter()
                .map(|x| mpb::Xattr {
                    name: x.name.clone(),
                    value: x.value.clone(),
                })
                .collect(),
            ctime_sec: m.ctime.sec,
            ctime_nsec: m.ctime.nsec,
            inode: m.inode,
            ..Default::default()
        };
        let kind = match &self.kind {
            EntryKind::File { content, link_key } => {
                e.content = Some(content.to_wire());
                e.link_key = link_key.map_or(0, NonZeroU64::get);
                mpb::EntryKind::File
            }
            EntryKind::Dir { subtree } => {
                e.subtree = subtree.to_wire();
                mpb::EntryKind::Dir
            }
            EntryKind::Symlink { target } => {
                e.symlink_target = target.clone();
                mpb::EntryKind::Symlink
            }
            EntryKind::Fifo => mpb::EntryKind::Fifo,
            EntryKind::Socket => mpb::EntryKind::Socket,
            EntryKind::CharDevice { rdev } => {
                e.rdev = *rdev;
                mpb::EntryKind::CharDevice
            }
            EntryKind::BlockDevice { rdev } => {
                e.rdev = *rdev;
                mpb::EntryKind::BlockDevice
            }
        };
        e.kind = kind as i32;
        e
    }

    fn from_wire(e: &mpb::Entry) -> Result<Entry, DecodeError> {
        validate_name(&e.name)?;
        let invalid = |reason: String| {
            DecodeError::invalid(
                "tree entry",
                format!("{}: {reason}", String::from_utf8_lossy(&e.name)),
            )
        };
        if e.mode & !0o7777 != 0 {
            return Err(invalid(format!("mode {:o} has bits beyond 07777", e.mode)));
        }
        if e.mtime_nsec >= 1_000_000_000 || e.ctime_nsec >= 1_000_000_000 {
            return Err(invalid("nanoseconds out of range".into()));
        }
        if e.xattrs.len() > MAX_XATTRS
            || e.xattrs
                .iter()
                .map(|x| x.name.len() + x.value.len())
                .sum::<usize>()
                > MAX_XATTR_BYTES
        {
            return Err(invalid("too many or too large xattrs".into()));
        }
        let kind = match mpb::EntryKind::try_from(e.kind) {
            Ok(mpb::EntryKind::File) => {
                let content = e
                    .content
                    .as_ref()
                    .ok_or_else(|| invalid("file without content".into()))?;
                EntryKind::File {
                    content: Content::from_wire(content, e.size)?,
                    link_key: NonZeroU64::new(e.link_key),
                }
            }
            Ok(mpb::EntryKind::Dir) => EntryKind::Dir {
                subtree: ObjectRef::from_wire(&e.subtree, "subtree reference")?,
            },
            Ok(mpb::EntryKind::Symlink) => {
                let t = &e.symlink_target;
                if t.is_empty() || t.len() > MAX_SYMLINK_BYTES || t.contains(&0) {
                    return Err(invalid("symlink target empty, too long or with NUL".into()));
                }
                EntryKind::Symlink { target: t.clone() }
            }
            Ok(mpb::EntryKind::Fifo) => EntryKind::Fifo,
            Ok(mpb::EntryKind::Socket) => EntryKind::Socket,
            Ok(mpb::EntryKind::CharDevice) => EntryKind::CharDevice { rdev: e.rdev },
            Ok(mpb::EntryKind::BlockDevice) => EntryKind::BlockDevice { rdev: e.rdev },
            Err(_) => return Err(invalid(format!("unknown kind {}", e.kind))),
        };
        Ok(Entry {
            name: e.name.clone(),
            meta: Metadata {
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: Timestamp {
                    sec: e.mtime_sec,
                    nsec: e.mtime_nsec,
                },
                size: e.size,
                xattrs: e
                    .xattrs
                    .iter()
                    .map(|x| Xattr {
                        name: x.name.clone(),
                        value: x.value.clone(),
                    })
                    .collect(),
                ctime: Timestamp {
                    sec: e.ctime_sec,
                    nsec: e.ctime_nsec,
                },
                inode: e.inode,
            },
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Extent;
    use crate::ChunkId;

    fn file(name: &[u8], data: &[u8]) -> Entry {
        Entry {
            name: name.to_vec(),
            meta: Metadata {
                mode: 0o644,
                size: data.len() as u64,
                mtime: Timestamp { sec: 1, nsec: 2 },
                ..Default::default()
            },
            kind: EntryKind::File {
                content: Content::Inline(vec![Extent::Chunk {
                    id: ChunkId::of(data),
                    len: data.len() as u32,
                }]),
                link_key: None,
            },
        }
    }

    #[test]
    fn round_trip_all_kinds() {
        let mut tree = Tree {
            entries: vec![
                file(b"b", b"hello"),
                file(&[0xff, 0x01], b"x"),
                Entry {
                    name: b"a".to_vec(),
                    meta: Metadata::default(),
                    kind: EntryKind::Dir {
                        subtree: ObjectRef(vec![ChunkId::of(b"t")]),
                    },
                },
                Entry {
                    name: b"l".to_vec(),
                    meta: Metadata {
                        size: 4,
                        ..Default::default()
                    },
                    kind: EntryKind::Symlink {
                        target: b"/etc".to_vec(),
                    },
                },
                Entry {
                    name: b"dev".to_vec(),
                    meta: Metadata::default(),
                    kind: EntryKind::CharDevice { rdev: 259 },
                },
            ],
        };
        tree.sort();
        let bytes = tree.encode();
        assert_eq!(&bytes[..5], b"HGMT\x01");
        assert_eq!(Tree::decode(&bytes).unwrap(), tree);
        assert!(tree.get(b"b").is_some());
        assert!(tree.get(b"c").is_none());
    }

    #[test]
    fn equal_trees_encode_identically() {
        let mut a = Tree {
            entries: vec![file(b"y", b"1"), file(b"x", b"2")],
        };
        let mut b = Tree {
            entries: vec![file(b"x", b"2"), file(b"y", b"1")],
        };
        a.sort();
        b.sort();
        assert_eq!(a.encode(), b.encode());
    }

    fn raw_tree(entries: Vec<mpb::Entry>) -> Vec<u8> {
        let mut out = ObjectKind::Tree.header().to_vec();
        mpb::Tree { entries }.encode(&mut out).unwrap();
        out
    }

    fn raw_file(name: &[u8]) -> mpb::Entry {
        file(name, b"data").to_wire()
    }

    #[test]
    fn hostile_names_are_rejected() {
        for name in [&b".."[..], b"/abs", b"a/../../x", b"", b"nul\0"] {
            let err = Tree::decode(&raw_tree(vec![raw_file(name)])).unwrap_err();
            assert!(matches!(err, DecodeError::InvalidName { .. }), "{name:?}");
        }
    }

    #[test]
    fn duplicate_and_unsorted_names_are_rejected() {
        let dup = raw_tree(vec![raw_file(b"a"), raw_file(b"a")]);
        assert!(matches!(Tree::decode(&dup), Err(DecodeError::Unsorted(_))));
        let unsorted = raw_tree(vec![raw_file(b"b"), raw_file(b"a")]);
        assert!(matches!(
            Tree::decode(&unsorted),
            Err(DecodeError::Unsorted(_))
        ));
    }

    #[test]
    fn inconsistent_entries_are_rejected() {
        let mut e = raw_file(b"f");
        e.content = None;
        assert!(Tree::decode(&raw_tree(vec![e])).is_err());
        let mut e = raw_file(b"f");
        e.mode = 0o170755;
        assert!(Tree::decode(&raw_tree(vec![e])).is_err());
        let mut e = raw_file(b"f");
        e.kind = mpb::EntryKind::Symlink as i32;
        assert!(Tree::decode(&raw_tree(vec![e])).is_err());
        let mut e = raw_file(b"d");
        e.kind = mpb::EntryKind::Dir as i32;
        assert!(Tree::decode(&raw_tree(vec![e])).is_err());
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        assert!(Tree::decode(b"").is_err());
        assert!(Tree::decode(b"HGMT\x01\xff\xff\xff").is_err());
    }
}

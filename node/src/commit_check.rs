//! The commit invariant's last guard: a snapshot never commits while it references a chunk
//! that is not stored.
//!
//! At `CommitSnapshot` the node walks the new snapshot's manifests against its parent's
//! ([`crate::manifest_walk`]): every chunk the *new* objects reference (tree objects and
//! tree-index parts, chunk-list objects, data chunks) must be present. A subtree, part, file
//! content or chunk list identical to the parent's stands on the parent's commit and is not
//! checked again, so an unchanged re-backup of a large tree costs a walk of its root, not of
//! its millions of files. A parent marked damaged (by verify) is never a base: the whole new
//! snapshot is checked.
//!
//! Presence comes through [`ChunkSource`], so the cluster can answer from W owners later
//! without changing the rule here.

use hashgrid_proto::manifest::ObjectRef;

use crate::error::NodeError;
use crate::manifest_walk::{ChunkSource, WalkStats, Walker};

/// Checks that every chunk `root` references is present, skipping what stands on `base`
/// (the root of an undamaged, committed parent). `Err(NodeError::MissingChunks)` names one
/// missing chunk and counts them all; an invalid manifest is `NodeError::Manifest`.
pub fn check_commit<S: ChunkSource + ?Sized>(
    source: &S,
    root: &ObjectRef,
    base: Option<&ObjectRef>,
) -> Result<WalkStats, NodeError> {
    let mut walker = Walker::new(source, None);
    walker.walk(root, base)?;
    match walker.missing.examples.first() {
        Some(&example) => Err(NodeError::MissingChunks {
            example,
            count: walker.missing.count,
        }),
        None => Ok(walker.stats),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    use bytes::Bytes;
    use hashgrid_proto::manifest::{
        ChunkListEncoder, Content, Entry, EntryKind, Extent, Metadata, Tree, TreeIndex, TreePart,
    };
    use hashgrid_proto::ChunkId;

    use super::*;
    use crate::manifest_walk::{ManifestError, WholeSet, MAX_WALK_DEPTH};

    /// Chunks in memory; counts presence queries per id.
    #[derive(Default)]
    struct Mem {
        chunks: HashMap<ChunkId, Bytes>,
        asked: AtomicU64,
    }

    impl Mem {
        fn put(&mut self, plain: &[u8]) -> ChunkId {
            let id = ChunkId::of(plain);
            self.chunks.insert(id, Bytes::copy_from_slice(plain));
            id
        }

        fn object(&mut self, bytes: &[u8]) -> ObjectRef {
            // Two pieces, so multi-chunk references are exercised.
            let mid = bytes.len() / 2;
            ObjectRef(vec![self.put(&bytes[..mid]), self.put(&bytes[mid..])])
        }

        fn tree(&mut self, entries: Vec<Entry>) -> ObjectRef {
            let mut t = Tree { entries };
            t.sort();
            self.object(&t.encode())
        }
    }

    impl ChunkSource for Mem {
        fn present(&self, ids: &[ChunkId]) -> Result<Vec<bool>, NodeError> {
            self.asked.fetch_add(ids.len() as u64, Ordering::Relaxed);
            Ok(ids.iter().map(|id| self.chunks.contains_key(id)).collect())
        }

        fn read(&self, ids: &[ChunkId]) -> Result<Vec<Option<Bytes>>, NodeError> {
            Ok(ids.iter().map(|id| self.chunks.get(id).cloned()).collect())
        }
    }

    fn file(name: &str, ids: &[ChunkId]) -> Entry {
        Entry {
            name: name.into(),
            meta: Metadata {
                size: ids.len() as u64 * 10,
                ..Default::default()
            },
            kind: EntryKind::File {
                content: Content::Inline(
                    ids.iter()
                        .map(|&id| Extent::Chunk { id, len: 10 })
                        .collect(),
                ),
                link_key: None,
            },
        }
    }

    fn dir(name: &str, subtree: ObjectRef) -> Entry {
        Entry {
            name: name.into(),
            meta: Metadata::default(),
            kind: EntryKind::Dir { subtree },
        }
    }

    fn missing(r: Result<WalkStats, NodeError>) -> (ChunkId, u64) {
        match r {
            Err(NodeError::MissingChunks { example, count }) => (example, count),
            other => panic!("expected missing chunks, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_data_chunk_or_tree_object_is_found_and_counted() {
        let mut m = Mem::default();
        let a = m.put(b"aaaaaaaaaa");
        let lost = ChunkId::of(b"never stored");
        let lost2 = ChunkId::of(b"never stored either");
        let sub = m.tree(vec![file("f", &[a, lost, lost2, lost])]);
        let root = m.tree(vec![dir("d", sub), file("g", &[a])]);
        let (example, count) = missing(check_commit(&m, &root, None));
        assert_eq!((example, count), (lost, 2));

        // A subtree whose object is not stored.
        let absent_tree = ObjectRef(vec![ChunkId::of(b"no such tree")]);
        let root = m.tree(vec![dir("d", absent_tree.clone())]);
        assert_eq!(
            missing(check_commit(&m, &root, None)),
            (absent_tree.0[0], 1)
        );
    }

    #[test]
    fn what_stands_on_the_parent_is_not_checked_again() {
        let mut m = Mem::default();
        let ids: Vec<ChunkId> = (0..500u32).map(|i| m.put(&i.to_le_bytes())).collect();
        let big = m.tree(
            ids.chunks(5)
                .enumerate()
                .map(|(i, c)| file(&format!("f{i}"), c))
                .collect(),
        );
        let parent = m.tree(vec![dir("big", big.clone()), file("x", &ids[..1])]);
        let full = check_commit(&m, &parent, None).unwrap();
        assert_eq!(full.chunks, 500 + 1 + 2 + 2);

        // Same big subtree, a changed small file: only the root and the new file are checked.
        let new = m.put(b"new content");
        let child = m.tree(vec![dir("big", big), file("x", &[new])]);
        let before = m.asked.load(Ordering::Relaxed);
        let stats = check_commit(&m, &child, Some(&parent)).unwrap();
        assert_eq!(stats.chunks, 2 + 1, "{stats:?}");
        assert_eq!(m.asked.load(Ordering::Relaxed) - before, 3);
        assert_eq!(stats.skipped, 1);

        // Identical file content under a changed directory is skipped too.
        let big2 = m.tree(
            ids.chunks(5)
                .enumerate()
                .map(|(i, c)| file(&format!("f{i}"), c))
                .chain([file("added", &[new])])
                .collect(),
        );
        let child2 = m.tree(vec![dir("big", big2), file("x", &[new])]);
        let stats = check_commit(&m, &child2, Some(&child)).unwrap();
        assert_eq!(stats.chunks, 2 + 2 + 1, "{stats:?}");
        assert_eq!(stats.skipped, 101);
    }

    #[test]
    fn a_repeated_reference_is_walked_once() {
        let mut m = Mem::default();
        let ids: Vec<ChunkId> = (0..100u32).map(|i| m.put(&i.to_le_bytes())).collect();
        let leaf = m.tree(vec![file("f", &ids)]);
        let mid = m.tree(
            (0..1000)
                .map(|i| dir(&format!("d{i}"), leaf.clone()))
                .collect(),
        );
        let root = m.tree(
            (0..1000)
                .map(|i| dir(&format!("d{i}"), mid.clone()))
                .collect(),
        );
        let stats = check_commit(&m, &root, None).unwrap();
        assert_eq!(stats.objects, 3);
        assert_eq!(stats.chunks, 6 + 100);
    }

    #[test]
    fn deep_trees_are_walked_without_recursion_and_bounded() {
        let mut m = Mem::default();
        let a = m.put(b"leaf data!");
        let mut r = m.tree(vec![file("f", &[a])]);
        for _ in 0..20_000 {
            r = m.tree(vec![dir("d", r)]);
        }
        check_commit(&m, &r, None).unwrap();

        // Deeper than the bound: refused, not walked forever.
        let mut m = Mem::default();
        let mut r = m.tree(vec![]);
        for _ in 0..MAX_WALK_DEPTH + 1 {
            r = m.tree(vec![dir("d", r)]);
        }
        assert!(matches!(
            check_commit(&m, &r, None),
            Err(NodeError::Manifest(ManifestError::TooDeep { .. }))
        ));
    }

    #[test]
    fn chunk_lists_and_split_directories_are_walked() {
        let mut m = Mem::default();
        let ids: Vec<ChunkId> = (0..300u32).map(|i| m.put(&i.to_le_bytes())).collect();
        let lost = ChunkId::of(b"lost");
        let mut list = ChunkListEncoder::header().to_vec();
        for id in ids.iter().chain([&lost]) {
            ChunkListEncoder::encode_extent(&Extent::Chunk { id: *id, len: 4 }, &mut list);
        }
        let list = m.object(&list);
        let listed = Entry {
            name: b"big".to_vec(),
            meta: Metadata {
                size: 301 * 4,
                ..Default::default()
            },
            kind: EntryKind::File {
                content: Content::List {
                    list,
                    extents: 301,
                    chunks: 301,
                },
                link_key: None,
            },
        };
        let mut whole = Tree {
            entries: (0..200)
                .map(|i| file(&format!("f{i:03}"), &ids[i..i + 1]))
                .chain([listed])
                .collect(),
        };
        whole.sort();
        let parts: Vec<Tree> = whole.split(2000);
        assert!(parts.len() > 2);
        let index = TreeIndex {
            parts: parts
                .iter()
                .map(|p| TreePart::describe(m.object(&p.encode()), p))
                .collect(),
        };
        let dir_ref = m.object(&index.encode());
        let root = m.tree(vec![dir("split", dir_ref)]);
        assert_eq!(missing(check_commit(&m, &root, None)), (lost, 1));

        // A missing part is found too.
        let mut index2 = index.clone();
        index2.parts[1].object = ObjectRef(vec![ChunkId::of(b"no part")]);
        let dir_ref = m.object(&index2.encode());
        let root = m.tree(vec![dir("split", dir_ref)]);
        let (_, count) = missing(check_commit(&m, &root, None));
        assert_eq!(count, 2);
    }

    #[test]
    fn verify_style_walks_share_whole_subtrees_and_keep_damage() {
        let mut m = Mem::default();
        let a = m.put(b"aaaaaaaaaa");
        let lost = ChunkId::of(b"lost");
        let good = m.tree(vec![file("f", &[a])]);
        let bad = m.tree(vec![file("f", &[lost])]);
        let root1 = m.tree(vec![dir("g", good.clone()), dir("b", bad.clone())]);
        let root2 = m.tree(vec![dir("g2", good), dir("b2", bad)]);
        let mut whole = WholeSet::default();
        let mut w = Walker::new(&m, Some(&mut whole));
        w.walk(&root1, None).unwrap();
        assert_eq!(w.missing.count, 1);
        let mut w = Walker::new(&m, Some(&mut whole));
        w.walk(&root2, None).unwrap();
        assert_eq!(
            w.missing.count, 1,
            "damage under a shared subtree is found again"
        );
        assert_eq!(w.stats.skipped, 1, "the whole subtree is not walked again");
    }
}

//! Walking a snapshot's manifests on a node: which chunks does a snapshot reference, and is
//! each of them stored? The commit check walks a new snapshot against its parent (an object
//! or chunk list identical to the parent's stands on the parent's commit and is skipped, so
//! the cost tracks the change); verify walks every snapshot, skipping subtrees an earlier
//! snapshot already showed whole (so the cost tracks the distinct data).
//!
//! Manifests are untrusted input. The walk keeps its own stack (no recursion, whatever the
//! depth), bounds the depth and the size of every object it reassembles (checked piece by
//! piece while reading, never after), streams chunk lists, and visits each distinct object
//! once per walk, so a reference repeated a million times costs one visit.
//!
//! Presence and reads go through [`ChunkSource`], the seam where the cluster will answer
//! "present on W owners" instead of the local store.

use std::collections::HashSet;

use bytes::Bytes;
use hashgrid_proto::codec::decode_verified;
use hashgrid_proto::limits::MAX_TREE_BYTES;
use hashgrid_proto::manifest::{
    decode_dir, ChunkListDecoder, Content, DirObject, Entry, EntryKind, Extent, ObjectRef, Tree,
    TreeIndex, TreePart,
};
use hashgrid_proto::{pb, ChunkId, DecodeError};
use thiserror::Error;

use crate::chunk_store::{Check, ChunkRead, ChunkStore};
use crate::error::NodeError;

/// Directories nested deeper than this make a snapshot invalid (restore handles thousands;
/// the bound only stops a hostile manifest from walking forever).
pub const MAX_WALK_DEPTH: usize = 65_536;

/// Data chunk ids checked per presence query.
const PRESENCE_BATCH: usize = 4096;
/// Object pieces read per store read.
const READ_GROUP: usize = 16;
/// Most objects remembered as visited (or whole) per set; past it objects are walked again,
/// which costs time, never correctness.
const MAX_REMEMBERED: usize = 8 << 20;
/// Distinct missing ids remembered to count each once; past it they may count twice.
const MAX_MISSING_SEEN: usize = 1 << 20;
/// Missing ids kept as examples.
pub const MISSING_EXAMPLES: usize = 100;

/// Which chunks exist, and their plaintexts. For use on blocking threads.
pub trait ChunkSource {
    /// Whether each of `ids` is present.
    fn present(&self, ids: &[ChunkId]) -> Result<Vec<bool>, NodeError>;
    /// The verified plaintext of each of `ids`, or `None` where no good copy is held.
    fn read(&self, ids: &[ChunkId]) -> Result<Vec<Option<Bytes>>, NodeError>;
}

/// The node's own chunk store as a [`ChunkSource`]: presence from the index, reads checked
/// and decoded against their ids (so a bad copy met on the way leaves the index).
pub struct LocalChunks<'a> {
    pub store: &'a ChunkStore,
    /// The cluster's largest chunk.
    pub max_plain_len: u32,
}

impl ChunkSource for LocalChunks<'_> {
    fn present(&self, ids: &[ChunkId]) -> Result<Vec<bool>, NodeError> {
        Ok(self.store.has(ids)?)
    }

    fn read(&self, ids: &[ChunkId]) -> Result<Vec<Option<Bytes>>, NodeError> {
        self.store
            .get(ids, self.max_plain_len, Check::Stored)?
            .into_iter()
            .zip(ids)
            .map(|(read, id)| match read {
                ChunkRead::Found(c) => {
                    let chunk = pb::Chunk {
                        id: id.as_bytes().to_vec(),
                        plain_len: c.plain_len,
                        codec: c.codec,
                        data: c.data,
                        ..Default::default()
                    };
                    match decode_verified(&chunk, self.max_plain_len) {
                        Ok((_, plain)) => Ok(Some(plain)),
                        // The bytes are the stored ones but do not decode to the id: a
                        // copy stored wrong. Read it again with the full check, which
                        // drops it from the index.
                        Err(_) => {
                            match self.store.get(&[*id], self.max_plain_len, Check::Full)?[..] {
                                [ChunkRead::Found(_)] => Err(NodeError::Internal(format!(
                                    "chunk {id} decoded once and not once"
                                ))),
                                _ => Ok(None),
                            }
                        }
                    }
                }
                ChunkRead::Missing | ChunkRead::Damaged => Ok(None),
            })
            .collect()
    }
}

/// Why a manifest cannot be walked: it is invalid, whatever is stored.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("manifest object {object}: {source}")]
    Decode {
        object: ChunkId,
        source: DecodeError,
    },
    #[error("directories nest deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("manifest object {object} is larger than the {limit}-byte bound")]
    TooLarge { object: ChunkId, limit: u64 },
}

/// Referenced chunks with no good copy: counted once each, with some examples.
#[derive(Debug, Default)]
pub struct Missing {
    pub count: u64,
    pub examples: Vec<ChunkId>,
    seen: HashSet<ChunkId>,
}

impl Missing {
    pub fn add(&mut self, id: ChunkId) {
        if self.seen.contains(&id) {
            return;
        }
        if self.seen.len() < MAX_MISSING_SEEN {
            self.seen.insert(id);
        }
        self.count += 1;
        if self.examples.len() < MISSING_EXAMPLES {
            self.examples.push(id);
        }
    }

    /// Every id counted (up to the remembering bound).
    pub fn ids(&self) -> impl Iterator<Item = &ChunkId> {
        self.seen.iter()
    }
}

/// What a walk did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Manifest objects read (trees, tree-index parts, chunk lists).
    pub objects: u64,
    /// Chunk references checked for presence.
    pub chunks: u64,
    /// Subtrees, parts and files skipped because they stand on the base or were seen whole.
    pub skipped: u64,
}

/// Objects (by [`key_of`]) whose every reference was found present: verify carries it from
/// one snapshot to the next.
#[derive(Default)]
pub struct WholeSet(HashSet<[u8; 32]>);

impl WholeSet {
    fn contains(&self, key: &[u8; 32]) -> bool {
        self.0.contains(key)
    }

    fn insert(&mut self, key: [u8; 32]) {
        if self.0.len() < MAX_REMEMBERED {
            self.0.insert(key);
        }
    }
}

/// A fixed-size key for an object reference: its one id, or the hash of its ids.
fn key_of(r: &ObjectRef) -> [u8; 32] {
    match r.0.as_slice() {
        [one] => *one.as_bytes(),
        many => {
            let mut h = blake3::Hasher::new_derive_key("hashgrid object reference key");
            for id in many {
                h.update(id.as_bytes());
            }
            *h.finalize().as_bytes()
        }
    }
}

fn first_id(r: &ObjectRef) -> ChunkId {
    r.0.first()
        .copied()
        .unwrap_or_else(|| ChunkId::from_bytes([0; 32]))
}

/// Reading a whole tree or tree-index object.
enum ObjectRead {
    Whole(Vec<u8>),
    Missing(ChunkId),
    TooLarge,
}

/// Reads a tree or tree-index object piece by piece, stopping as soon as it passes the size
/// bound.
fn read_object<S: ChunkSource + ?Sized>(
    source: &S,
    r: &ObjectRef,
) -> Result<ObjectRead, NodeError> {
    let mut out = Vec::new();
    for group in r.0.chunks(READ_GROUP) {
        for (id, piece) in group.iter().zip(source.read(group)?) {
            let Some(piece) = piece else {
                return Ok(ObjectRead::Missing(*id));
            };
            if (out.len() + piece.len()) as u64 > MAX_TREE_BYTES {
                return Ok(ObjectRead::TooLarge);
            }
            out.extend_from_slice(&piece);
        }
    }
    Ok(ObjectRead::Whole(out))
}

/// The base's version of a directory, read lazily; anything unreadable about it just means
/// no base (the new side is then checked in full).
enum BaseDir {
    None,
    Tree(Tree),
    Index {
        index: TreeIndex,
        /// The part loaded last (entries are looked up in name order, so each part once).
        loaded: Option<(usize, Tree)>,
    },
}

impl BaseDir {
    fn load<S: ChunkSource + ?Sized>(source: &S, r: &ObjectRef) -> Result<BaseDir, NodeError> {
        let ObjectRead::Whole(bytes) = read_object(source, r)? else {
            return Ok(BaseDir::None);
        };
        Ok(match decode_dir(&bytes) {
            Ok(DirObject::Tree(t)) => BaseDir::Tree(t),
            Ok(DirObject::Index(index)) => BaseDir::Index {
                index,
                loaded: None,
            },
            Err(_) => BaseDir::None,
        })
    }

    /// Whether the base holds this very part (same object, same names and count).
    fn has_part(&self, part: &TreePart) -> bool {
        match self {
            BaseDir::Index { index, .. } => index.part_for(&part.first_name) == Some(part),
            _ => false,
        }
    }

    fn lookup<S: ChunkSource + ?Sized>(
        &mut self,
        source: &S,
        name: &[u8],
    ) -> Result<Option<&Entry>, NodeError> {
        match self {
            BaseDir::None => Ok(None),
            BaseDir::Tree(t) => Ok(t.get(name)),
            BaseDir::Index { index, loaded } => {
                let i = index
                    .parts
                    .partition_point(|p| p.last_name.as_slice() < name);
                let Some(part) = index.parts.get(i).filter(|p| p.may_hold(name)) else {
                    return Ok(None);
                };
                if loaded.as_ref().map(|(j, _)| *j) != Some(i) {
                    let tree = match read_object(source, &part.object)? {
                        ObjectRead::Whole(b) => Tree::decode(&b)
                            .ok()
                            .filter(|t| part.check(t).is_ok())
                            .unwrap_or_default(),
                        _ => Tree::default(),
                    };
                    *loaded = Some((i, tree));
                }
                Ok(loaded.as_ref().and_then(|(_, t)| t.get(name)))
            }
        }
    }
}

enum Step {
    Enter {
        dir: ObjectRef,
        base: Option<ObjectRef>,
        depth: usize,
    },
    /// All of `key`'s references have been checked: was anything missing under it?
    Exit { key: [u8; 32], mark: u64 },
}

/// One walk over one snapshot (or several sharing `whole`).
pub struct Walker<'a, S: ChunkSource + ?Sized> {
    source: &'a S,
    whole: Option<&'a mut WholeSet>,
    visited: HashSet<[u8; 32]>,
    /// Objects under which something was missing, so a later visit counts against its
    /// enclosing objects too.
    damaged: HashSet<[u8; 32]>,
    /// Visits of already damaged objects: they make their enclosing objects damaged without
    /// adding to `missing` again.
    taint: u64,
    pending: Vec<ChunkId>,
    pub missing: Missing,
    pub stats: WalkStats,
}

impl<'a, S: ChunkSource + ?Sized> Walker<'a, S> {
    /// A walker; `whole` carries objects found whole between walks (verify).
    pub fn new(source: &'a S, whole: Option<&'a mut WholeSet>) -> Self {
        Walker {
            source,
            whole,
            visited: HashSet::new(),
            damaged: HashSet::new(),
            taint: 0,
            pending: Vec::new(),
            missing: Missing::default(),
            stats: WalkStats::default(),
        }
    }

    /// Checks every chunk `root` references, except what stands on `base` unchanged.
    /// Missing chunks are counted in [`Walker::missing`]; an invalid manifest is an error.
    pub fn walk(&mut self, root: &ObjectRef, base: Option<&ObjectRef>) -> Result<(), NodeError> {
        let mut stack = vec![Step::Enter {
            dir: root.clone(),
            base: base.cloned(),
            depth: 0,
        }];
        while let Some(step) = stack.pop() {
            match step {
                Step::Enter { dir, base, depth } => self.enter(&dir, base, depth, &mut stack)?,
                Step::Exit { key, mark } => self.exit(key, mark)?,
            }
        }
        self.flush()
    }

    fn mark(&self) -> u64 {
        self.missing.count + self.taint
    }

    /// Was this object handled already (in this walk, or whole in an earlier one)?
    fn already(&mut self, key: &[u8; 32]) -> bool {
        if self.whole.as_ref().is_some_and(|w| w.contains(key)) {
            self.stats.skipped += 1;
            return true;
        }
        if self.damaged.contains(key) {
            self.taint += 1;
            return true;
        }
        if self.visited.contains(key) {
            return true;
        }
        if self.visited.len() < MAX_REMEMBERED {
            self.visited.insert(*key);
        }
        false
    }

    fn exit(&mut self, key: [u8; 32], mark: u64) -> Result<(), NodeError> {
        self.flush()?;
        if self.mark() > mark {
            if self.damaged.len() < MAX_REMEMBERED {
                self.damaged.insert(key);
            }
        } else if let Some(w) = self.whole.as_mut() {
            w.insert(key);
        }
        Ok(())
    }

    /// Checks that an object's chunks are present, then reads it; `None` when some are
    /// missing (counted).
    fn load(&mut self, r: &ObjectRef) -> Result<Option<Vec<u8>>, NodeError> {
        let present = self.source.present(&r.0)?;
        self.stats.chunks += r.0.len() as u64;
        let mut complete = true;
        for (id, p) in r.0.iter().zip(present) {
            if !p {
                self.missing.add(*id);
                complete = false;
            }
        }
        if !complete {
            return Ok(None);
        }
        self.stats.objects += 1;
        match read_object(self.source, r)? {
            ObjectRead::Whole(b) => Ok(Some(b)),
            ObjectRead::Missing(id) => {
                self.missing.add(id);
                Ok(None)
            }
            ObjectRead::TooLarge => Err(ManifestError::TooLarge {
                object: first_id(r),
                limit: MAX_TREE_BYTES,
            }
            .into()),
        }
    }

    fn enter(
        &mut self,
        dir: &ObjectRef,
        base: Option<ObjectRef>,
        depth: usize,
        stack: &mut Vec<Step>,
    ) -> Result<(), NodeError> {
        if depth > MAX_WALK_DEPTH {
            return Err(ManifestError::TooDeep {
                limit: MAX_WALK_DEPTH,
            }
            .into());
        }
        let key = key_of(dir);
        if self.already(&key) {
            return Ok(());
        }
        stack.push(Step::Exit {
            key,
            mark: self.mark(),
        });
        let Some(bytes) = self.load(dir)? else {
            return Ok(());
        };
        let invalid = |source| ManifestError::Decode {
            object: first_id(dir),
            source,
        };
        let object = decode_dir(&bytes).map_err(invalid)?;
        drop(bytes);
        let source = self.source;
        let mut base_dir = match &base {
            Some(b) => BaseDir::load(source, b)?,
            None => BaseDir::None,
        };
        match object {
            DirObject::Tree(tree) => {
                for e in &tree.entries {
                    let b = base_dir.lookup(source, &e.name)?;
                    self.entry(e, b, depth, stack)?;
                }
            }
            DirObject::Index(index) => {
                for part in &index.parts {
                    if base_dir.has_part(part) {
                        self.stats.skipped += 1;
                        continue;
                    }
                    let Some(bytes) = self.load(&part.object)? else {
                        continue;
                    };
                    let invalid = |source| ManifestError::Decode {
                        object: first_id(&part.object),
                        source,
                    };
                    let tree = Tree::decode(&bytes).map_err(invalid)?;
                    part.check(&tree).map_err(invalid)?;
                    for e in &tree.entries {
                        let b = base_dir.lookup(source, &e.name)?;
                        self.entry(e, b, depth, stack)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        e: &Entry,
        base: Option<&Entry>,
        depth: usize,
        stack: &mut Vec<Step>,
    ) -> Result<(), NodeError> {
        let base = base.map(|b| &b.kind);
        match &e.kind {
            EntryKind::Dir { subtree } => {
                let base = match base {
                    Some(EntryKind::Dir { subtree: b }) if b == subtree => {
                        self.stats.skipped += 1;
                        return Ok(());
                    }
                    Some(EntryKind::Dir { subtree: b }) => Some(b.clone()),
                    _ => None,
                };
                stack.push(Step::Enter {
                    dir: subtree.clone(),
                    base,
                    depth: depth + 1,
                });
            }
            EntryKind::File { content, .. } => {
                if let Some(EntryKind::File { content: b, .. }) = base {
                    if b == content {
                        self.stats.skipped += 1;
                        return Ok(());
                    }
                }
                match content {
                    Content::Inline(extents) => {
                        for x in extents {
                            if let Extent::Chunk { id, .. } = x {
                                self.want(*id)?;
                            }
                        }
                    }
                    Content::List { list, .. } => self.chunk_list(list)?,
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Streams a chunk-list object and checks the chunks it names.
    fn chunk_list(&mut self, list: &ObjectRef) -> Result<(), NodeError> {
        let key = key_of(list);
        if self.already(&key) {
            return Ok(());
        }
        let mark = self.mark();
        self.read_list(list)?;
        self.exit(key, mark)
    }

    fn read_list(&mut self, list: &ObjectRef) -> Result<(), NodeError> {
        let present = self.source.present(&list.0)?;
        self.stats.chunks += list.0.len() as u64;
        let mut complete = true;
        for (id, p) in list.0.iter().zip(present) {
            if !p {
                self.missing.add(*id);
                complete = false;
            }
        }
        if !complete {
            return Ok(());
        }
        self.stats.objects += 1;
        let invalid = |source| ManifestError::Decode {
            object: first_id(list),
            source,
        };
        let mut decoder = ChunkListDecoder::new();
        for group in list.0.chunks(READ_GROUP) {
            for (id, piece) in group.iter().zip(self.source.read(group)?) {
                let Some(piece) = piece else {
                    self.missing.add(*id);
                    return Ok(());
                };
                decoder.push(&piece);
            }
            while let Some(x) = decoder.next_extent().map_err(invalid)? {
                if let Extent::Chunk { id, .. } = x {
                    self.want(id)?;
                }
            }
        }
        decoder.finish().map_err(invalid)?;
        Ok(())
    }

    fn want(&mut self, id: ChunkId) -> Result<(), NodeError> {
        self.pending.push(id);
        if self.pending.len() >= PRESENCE_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), NodeError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let present = self.source.present(&self.pending)?;
        self.stats.chunks += self.pending.len() as u64;
        for (id, p) in self.pending.iter().zip(present) {
            if !p {
                self.missing.add(*id);
            }
        }
        self.pending.clear();
        Ok(())
    }
}

//! The file-tree walk: lists directories in name order, compares every file with the parent
//! snapshot's entry of the same name, reads only what changed, and writes one tree object per
//! directory once its children are done. Children are processed concurrently (bounded), so
//! small files from many directories keep every core busy.
//!
//! Nothing is reached by path: directories through [`DirHandle`]s (opened relative to their
//! parent, checked, within a fixed descriptor budget), files relative to their directory's
//! descriptor and checked against the listing before they are read ([`super::source`]).
//! Every subdirectory is a task of its own, so depth costs tasks, never stack frames.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::num::NonZeroU64;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use hashgrid_proto::limits::MAX_TREE_BYTES;
use hashgrid_proto::manifest::{
    Content, Entry, EntryKind, Metadata, ObjectRef, Tree, TreeIndex, TreePart, Xattr,
};
use rustix::fs::FileType;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::content::read_content;
use super::dir_handle::{Descriptors, DirHandle, DIR_DESCRIPTORS};
use super::source::{list_dir, list_names, open_file_at, Listed, Listing, SourceError, SourceStat};
use super::xattrs;
use crate::chunker::Chunker;
use crate::error::{ClientError, Result};
use crate::memory::{cores, Sizing};
use crate::objects::{ObjectReader, ObjectWriter};
use crate::progress::Progress;
use crate::upload::Uploader;

/// Children of one directory processed at once.
const DIR_WIDTH: usize = 32;
/// Files up to this size are read in groups of up to `SMALL_GROUP_FILES` files or
/// `SMALL_GROUP_BYTES` bytes.
const SMALL_FILE: u64 = 256 * 1024;
const SMALL_GROUP_FILES: usize = 64;
const SMALL_GROUP_BYTES: u64 = 4 << 20;

/// Entries of a directory with their positions in its listing (`None`: skipped) and whether
/// each is identical to the parent's.
type Placed = Vec<(usize, Option<Entry>, bool)>;

/// A changed file waiting to be read.
struct ChangedFile {
    index: usize,
    name: Vec<u8>,
    st: SourceStat,
}

/// What [`Walker::settle`] made of an entry.
enum Settled {
    /// The entry (`None`: left out with a warning) and whether it equals the parent's.
    Done(Option<Entry>, bool),
    /// A changed file, to be read.
    Read(ChangedFile),
}

/// A directory once backed up: its tree object, whether that is exactly the parent
/// snapshot's, and the directory's own extended attributes (for its entry in its parent).
pub struct DirDone {
    pub subtree: ObjectRef,
    pub same: bool,
    pub xattrs: Vec<Xattr>,
}

/// Which part of a directory to back up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    All,
    Only(BTreeMap<Vec<u8>, Selection>),
}

impl Selection {
    /// The selection for absolute `paths`: their ancestors hold only the way down to them.
    pub fn of_paths(paths: &[PathBuf]) -> Selection {
        let mut root = Selection::Only(BTreeMap::new());
        for p in paths {
            let comps: Vec<Vec<u8>> = p
                .components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(n) => Some(n.as_bytes().to_vec()),
                    _ => None,
                })
                .collect();
            let mut node = &mut root;
            for c in comps {
                node = match node {
                    Selection::All => break,
                    Selection::Only(children) => children
                        .entry(c)
                        .or_insert_with(|| Selection::Only(BTreeMap::new())),
                };
            }
            *node = Selection::All;
        }
        root
    }
}

#[derive(Default)]
pub struct WalkCounters {
    pub files: AtomicU64,
    pub dirs: AtomicU64,
    pub reused_files: AtomicU64,
    pub logical_bytes: AtomicU64,
    pub chunks: AtomicU64,
    /// Entries left out because the name led elsewhere when read ([`SourceError::Replaced`]).
    pub replaced: AtomicU64,
}

pub struct Walker {
    pub chunker: Chunker,
    pub uploader: Uploader,
    pub reader: ObjectReader,
    pub progress: Progress,
    pub counters: WalkCounters,
    pub warnings: Mutex<Vec<String>>,
    pub descriptors: Descriptors,
    /// Changed files being read at once.
    files: Semaphore,
    /// Directories being listed at once (each holds its descriptor meanwhile).
    listings: Semaphore,
    /// Subdirectories in flight beyond one per directory (see [`Walker::dir_slot`]).
    open_dirs: Arc<Semaphore>,
    /// Largest encoded tree object; a directory beyond it is split (see [`Walker::write_tree`]).
    tree_part_bytes: usize,
    /// Bytes read from a file per call.
    pub read_buf: usize,
}

/// Directories of at most this many entries, in the parent snapshot and now, are listed on
/// the runtime's own thread (see [`Walker::list`]).
const INLINE_LISTING: usize = 256;

impl Walker {
    pub fn new(
        chunker: Chunker,
        uploader: Uploader,
        reader: ObjectReader,
        progress: Progress,
        tree_part_bytes: usize,
        sizing: &Sizing,
    ) -> Self {
        Walker {
            chunker,
            uploader,
            reader,
            progress,
            counters: WalkCounters::default(),
            warnings: Mutex::new(Vec::new()),
            descriptors: Descriptors::new(DIR_DESCRIPTORS),
            files: Semaphore::new(sizing.file_readers),
            listings: Semaphore::new(cores() * 2),
            open_dirs: Arc::new(Semaphore::new(sizing.open_dirs)),
            tree_part_bytes,
            read_buf: sizing.read_buf,
        }
    }

    /// Warns that the entry `e` concerns was left out, counting one replaced while read.
    fn skip(&self, e: SourceError) {
        if matches!(e, SourceError::Replaced { .. }) {
            self.counters.replaced.fetch_add(1, Ordering::Relaxed);
        }
        self.warn(format!("skipped {e}"));
    }

    fn warn(&self, msg: String) {
        tracing::warn!("{msg}");
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(msg);
    }

    /// A place for one more subdirectory in flight: the parent's own lane (every directory may
    /// walk one subdirectory whatever the budget, so the walk always moves on, depth first)
    /// or one of the walk's open directories. A directory's listing, its parent snapshot's
    /// tree and its entries are held from here until its tree is written: bounding the
    /// directories in flight bounds the walk's memory whatever the tree's breadth.
    async fn dir_slot(&self, lane: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit> {
        tokio::select! {
            biased;
            p = lane.clone().acquire_owned() => p,
            p = self.open_dirs.clone().acquire_owned() => p,
        }
        .map_err(|_| ClientError::Internal("directory limiter closed".into()))
    }

    /// Lists `dir` (restricted to `selection`): on a blocking thread, or on this one when
    /// it was small in the parent snapshot (`small`) and still is.
    ///
    /// Why: an unchanged re-backup is all listing, and most directories hold a few dozen
    /// entries; handing each to a blocking thread and back cost more than listing it (the
    /// 69,000-file tree's 1,800 directories: 290 ms with every listing handed off, 190 ms
    /// with the small ones listed here). A directory that grew past [`INLINE_LISTING`]
    /// since is read here (one `getdents64` call or a few) and its entries are looked at
    /// on a blocking thread, so the runtime's threads never stat thousands of entries.
    async fn list(
        self: &Arc<Self>,
        dir: &Arc<DirHandle>,
        selection: &Selection,
        small: bool,
    ) -> Result<Result<Listing, SourceError>> {
        let mut names = match selection {
            Selection::All => None,
            Selection::Only(m) => Some(m.keys().cloned().collect::<Vec<_>>()),
        };
        if small {
            let fd = match self.descriptors.fd(dir) {
                Ok(fd) => fd,
                Err(e) => return Ok(Err(e)),
            };
            let listed = match names.take() {
                Some(n) => n,
                None => match list_names(&fd, &dir.path()) {
                    Ok(n) => n,
                    Err(e) => return Ok(Err(e)),
                },
            };
            if listed.len() <= INLINE_LISTING {
                return Ok(list_dir(&fd, Some(listed), &dir.path()));
            }
            names = Some(listed);
        }
        let _permit = self
            .listings
            .acquire()
            .await
            .map_err(|_| ClientError::Internal("listing limiter closed".into()))?;
        let walker = self.clone();
        let dir = dir.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let fd = walker.descriptors.fd(&dir)?;
            list_dir(&fd, names, &dir.path())
        })
        .await?)
    }

    /// Backs up directory `dir` (restricted to `selection`) and returns its tree object,
    /// and whether it is exactly the parent's (`parent`: the parent snapshot's tree for this
    /// directory and its reference). An unchanged directory reuses the parent's reference
    /// without encoding or sending anything. `None`: the directory was replaced since its
    /// parent was listed and is left out (a warning says so).
    pub fn backup_dir(
        self: Arc<Self>,
        dir: Arc<DirHandle>,
        parent: Option<(Tree, ObjectRef)>,
        selection: Selection,
    ) -> BoxFuture<'static, Result<Option<DirDone>>> {
        async move {
            let small = parent
                .as_ref()
                .is_some_and(|(tree, _)| tree.entries.len() <= INLINE_LISTING);
            let listing = match self.list(&dir, &selection, small).await? {
                Ok(l) => l,
                Err(e @ SourceError::Replaced { .. }) => {
                    self.skip(e);
                    self.descriptors.release(&dir);
                    return Ok(None);
                }
                Err(e) if e.is_not_found() => {
                    self.descriptors.release(&dir);
                    return Ok(None);
                }
                Err(e) => {
                    self.warn(format!("{e}; recorded as an empty directory"));
                    Listing::default()
                }
            };
            for e in listing.skipped {
                self.skip(e);
            }
            let (parent_tree, parent_ref) = match parent {
                Some((t, r)) => (t, Some(r)),
                None => (Tree::default(), None),
            };
            // Both lists are sorted by name: walk them together, moving each parent entry
            // to the child of the same name.
            let mut same =
                parent_ref.is_some() && parent_tree.entries.len() == listing.entries.len();
            let mut parent_entries = parent_tree.entries.into_iter().peekable();
            let count = listing.entries.len();
            // Changed small files are read in groups, one blocking task per group: for
            // trees of many small files the hand-off per task costs more than the reading.
            let mut tasks: Vec<BoxFuture<'static, Result<Placed>>> = Vec::new();
            let mut group: Vec<ChangedFile> = Vec::new();
            let mut group_bytes = 0u64;
            let mut slots: Vec<Option<Entry>> = vec![None; count];
            let lane = Arc::new(Semaphore::new(1));
            for (index, listed) in listing.entries.into_iter().enumerate() {
                let name = &listed.name;
                while parent_entries.next_if(|p| &p.name < name).is_some() {
                    same = false;
                }
                let parent_entry = parent_entries.next_if(|p| &p.name == name);
                if listed.st.is_dir() {
                    let child_sel = match &selection {
                        Selection::All => Selection::All,
                        Selection::Only(m) => m.get(name).cloned().unwrap_or(Selection::All),
                    };
                    let walker = self.clone();
                    let dir = dir.clone();
                    let lane = lane.clone();
                    tasks.push(
                        async move {
                            let _slot = walker.dir_slot(&lane).await?;
                            let (entry, same) = walker
                                .backup_subdir(dir, listed, parent_entry, child_sel)
                                .await?;
                            Ok(vec![(index, entry, same)])
                        }
                        .boxed(),
                    );
                    continue;
                }
                // Everything but directories and changed files is settled here and now: a
                // task per entry would cost more than the entry (and, for a million
                // unchanged files, gigabytes).
                let file = match self.settle(&dir, index, listed, parent_entry) {
                    Settled::Done(entry, entry_same) => {
                        same &= entry_same && entry.is_some();
                        slots[index] = entry;
                        continue;
                    }
                    Settled::Read(file) => file,
                };
                if file.st.size > SMALL_FILE {
                    tasks.push(self.clone().read_files(dir.clone(), vec![file]).boxed());
                    continue;
                }
                group_bytes += file.st.size;
                group.push(file);
                if group.len() >= SMALL_GROUP_FILES || group_bytes >= SMALL_GROUP_BYTES {
                    let files = std::mem::take(&mut group);
                    tasks.push(self.clone().read_files(dir.clone(), files).boxed());
                    group_bytes = 0;
                }
            }
            // The parent's entries were all moved or passed over: free their table now, not
            // after the children and the tree write (200 MB for a million entries).
            drop(parent_entries);
            if !group.is_empty() {
                tasks.push(self.clone().read_files(dir.clone(), group).boxed());
            }
            let mut done = futures::stream::iter(tasks).buffer_unordered(DIR_WIDTH);
            while let Some(results) = done.next().await {
                for (index, entry, entry_same) in results? {
                    same &= entry_same && entry.is_some();
                    slots[index] = entry;
                }
            }
            self.descriptors.release(&dir);
            self.counters.dirs.fetch_add(1, Ordering::Relaxed);
            let xattrs = listing.xattrs;
            if let (true, Some(subtree)) = (same, parent_ref) {
                return Ok(Some(DirDone {
                    subtree,
                    same: true,
                    xattrs,
                }));
            }
            let tree = Tree {
                entries: slots.into_iter().flatten().collect(),
            };
            let walker = self.clone();
            let subtree = tokio::task::spawn_blocking(move || walker.write_tree(tree)).await??;
            Ok(Some(DirDone {
                subtree,
                same: false,
                xattrs,
            }))
        }
        .boxed()
    }

    /// Writes a directory's tree: one object, or, when its encoding exceeds the part size,
    /// parts of at most that size in name order under a tree index, so no reader ever has to
    /// hold more than one part (design: a directory of any size restores and serves as a
    /// parent).
    fn write_tree(&self, tree: Tree) -> Result<ObjectRef> {
        let cache = self.reader.tree_cache().map(|c| &**c);
        let write =
            |bytes: &[u8]| ObjectWriter::write_tree(&self.chunker, &self.uploader, cache, bytes);
        // Most directories are small: encode once and be done.
        if tree.entries.len() <= 1024 {
            let bytes = tree.encode();
            if bytes.len() <= self.tree_part_bytes {
                return write(&bytes);
            }
        }
        let parts = tree.split(self.tree_part_bytes);
        if let [whole] = parts.as_slice() {
            return write(&whole.encode());
        }
        let mut index = TreeIndex::default();
        for part in &parts {
            index
                .parts
                .push(TreePart::describe(write(&part.encode())?, part));
        }
        let bytes = index.encode();
        if bytes.len() as u64 > MAX_TREE_BYTES {
            return Err(ClientError::Config(format!(
                "a directory of {} entries needs a tree index of {} bytes, over the {MAX_TREE_BYTES}-byte bound: raise the tree part size",
                index.entries(),
                bytes.len()
            )));
        }
        write(&bytes)
    }

    /// Subdirectory `listed` of `dir` (`None` when it was left out; a warning says why),
    /// and whether its entry is exactly the parent snapshot's.
    async fn backup_subdir(
        self: Arc<Self>,
        dir: Arc<DirHandle>,
        listed: Listed,
        parent: Option<Entry>,
        selection: Selection,
    ) -> Result<(Option<Entry>, bool)> {
        let Listed { name, st, .. } = listed;
        let mut meta = st.metadata();
        let (parent_sub, parent_meta) = match parent {
            Some(Entry {
                kind: EntryKind::Dir { subtree },
                meta,
                ..
            }) => (
                Some((self.reader.load_tree(&subtree).await?, subtree)),
                Some(meta),
            ),
            _ => (None, None),
        };
        let child = DirHandle::child(&dir, name.clone(), &st);
        drop(dir);
        // A task of its own, so subtrees are walked on every worker thread (and a deep
        // tree nests tasks, not stack frames).
        let Some(done) =
            tokio::spawn(self.clone().backup_dir(child, parent_sub, selection)).await??
        else {
            return Ok((None, false));
        };
        meta.xattrs = done.xattrs;
        let same = done.same && parent_meta.as_ref() == Some(&meta);
        Ok((
            Some(Entry {
                name,
                meta,
                kind: EntryKind::Dir {
                    subtree: done.subtree,
                },
            }),
            same,
        ))
    }

    /// A non-directory entry of `dir` at `index` of its listing: an unchanged file (taken
    /// over from the parent snapshot) or any other kind is done at once; a changed file is
    /// to be read.
    fn settle(
        &self,
        dir: &DirHandle,
        index: usize,
        listed: Listed,
        parent: Option<Entry>,
    ) -> Settled {
        let Listed {
            name,
            st,
            xattrs,
            target,
        } = listed;
        let mut meta = st.metadata();
        let kind = match st.kind() {
            FileType::RegularFile => {
                let link_key = file_link_key(&st);
                let Some(reused) = parent.and_then(|p| reuse(p, &st, &meta, link_key)) else {
                    return Settled::Read(ChangedFile { index, name, st });
                };
                self.counters.files.fetch_add(1, Ordering::Relaxed);
                self.counters.reused_files.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .chunks
                    .fetch_add(reused.content.chunk_count(), Ordering::Relaxed);
                self.counters
                    .logical_bytes
                    .fetch_add(st.size, Ordering::Relaxed);
                self.progress.add_bytes(st.size);
                meta.size = st.size;
                meta.xattrs = reused.xattrs;
                let entry = Entry {
                    name,
                    meta,
                    kind: EntryKind::File {
                        content: reused.content,
                        link_key,
                    },
                };
                return Settled::Done(Some(entry), reused.same);
            }
            FileType::Symlink => {
                meta.size = target.len() as u64;
                EntryKind::Symlink { target }
            }
            FileType::Fifo => EntryKind::Fifo,
            FileType::Socket => EntryKind::Socket,
            FileType::CharacterDevice => EntryKind::CharDevice { rdev: st.rdev },
            FileType::BlockDevice => EntryKind::BlockDevice { rdev: st.rdev },
            FileType::Directory | FileType::Unknown => {
                let path = dir.path().join(OsStr::from_bytes(&name));
                self.warn(format!("skipped {}: unknown file type", path.display()));
                return Settled::Done(None, false);
            }
        };
        meta.xattrs = xattrs;
        let entry = Entry { name, meta, kind };
        let same = parent.as_ref() == Some(&entry);
        Settled::Done(Some(entry), same)
    }

    /// Reads changed files of `dir` (one large one, or a group of small ones) on one
    /// blocking thread. Each is opened relative to the directory's descriptor and checked
    /// against its listing before it is read.
    async fn read_files(
        self: Arc<Self>,
        dir: Arc<DirHandle>,
        files: Vec<ChangedFile>,
    ) -> Result<Placed> {
        let _permit = self
            .files
            .acquire()
            .await
            .map_err(|_| ClientError::Internal("file limiter closed".into()))?;
        let walker = self.clone();
        tokio::task::spawn_blocking(move || {
            let dir_path = dir.path();
            files
                .into_iter()
                .map(|f| {
                    let path = dir_path.join(OsStr::from_bytes(&f.name));
                    let opened = walker.descriptors.fd(&dir).and_then(|fd| {
                        open_file_at(&*fd, &f.name, &f.st).map_err(|e| e.at(path.clone()))
                    });
                    let file = match opened {
                        Ok(file) => file,
                        Err(e) => {
                            if !e.is_not_found() {
                                walker.skip(e);
                            }
                            return Ok((f.index, None, false));
                        }
                    };
                    let mut meta = f.st.metadata();
                    meta.xattrs = match xattrs::of_fd(&file) {
                        Ok(x) => x,
                        Err(e) => {
                            let e = ClientError::io(&path, e.into());
                            walker.warn(format!("skipped {e} (reading extended attributes)"));
                            return Ok((f.index, None, false));
                        }
                    };
                    let read = read_content(
                        &file,
                        &path,
                        &walker.chunker,
                        &walker.uploader,
                        &walker.progress,
                        walker.read_buf,
                    )
                    .map(|c| (c.content, c.size, c.chunks));
                    Ok((
                        f.index,
                        walker.file_entry(f.name, &f.st, meta, read)?,
                        false,
                    ))
                })
                .collect()
        })
        .await?
    }

    /// The entry for a regular file once its content is known; a file that could not be
    /// read is skipped with a warning.
    fn file_entry(
        &self,
        name: Vec<u8>,
        st: &SourceStat,
        mut meta: Metadata,
        read: Result<(Content, u64, u64)>,
    ) -> Result<Option<Entry>> {
        let (content, size, chunks) = match read {
            Ok(r) => r,
            Err(ClientError::Io { path, error }) => {
                self.warn(format!("skipped {}: {error}", path.display()));
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        self.counters.files.fetch_add(1, Ordering::Relaxed);
        self.counters
            .logical_bytes
            .fetch_add(size, Ordering::Relaxed);
        self.counters.chunks.fetch_add(chunks, Ordering::Relaxed);
        meta.size = size;
        Ok(Some(Entry {
            name,
            meta,
            kind: EntryKind::File {
                content,
                link_key: file_link_key(st),
            },
        }))
    }
}

/// Does a regular file look unchanged since the parent snapshot: same size, mtime, ctime
/// and inode? (Any chmod, chown, xattr or link count change moves ctime too.)
pub fn looks_unchanged(parent: &Entry, st: &SourceStat) -> bool {
    matches!(parent.kind, EntryKind::File { .. })
        && parent.meta.size == st.size
        && parent.meta.mtime == st.mtime
        && parent.meta.ctime == st.ctime
        && parent.meta.inode == st.ino
}

/// A parent file entry's content, taken over for an unchanged file.
pub struct Reused {
    pub content: Content,
    /// Unchanged ctime means unchanged extended attributes: the parent's stand.
    pub xattrs: Vec<Xattr>,
    /// The new entry will be identical to the parent's.
    pub same: bool,
}

/// Takes the parent entry's content if the file looks unchanged (`meta`: the file's
/// metadata from `st`).
pub fn reuse(
    parent: Entry,
    st: &SourceStat,
    meta: &Metadata,
    link_key: Option<NonZeroU64>,
) -> Option<Reused> {
    if !looks_unchanged(&parent, st) {
        return None;
    }
    let mut new_meta = meta.clone();
    new_meta.size = st.size;
    new_meta.xattrs = parent.meta.xattrs.clone();
    match parent.kind {
        EntryKind::File {
            content,
            link_key: parent_key,
        } => Some(Reused {
            content,
            same: parent.meta == new_meta && parent_key == link_key,
            xattrs: new_meta.xattrs,
        }),
        _ => None,
    }
}

/// The hard-link group key of a regular file with more than one name.
fn file_link_key(st: &SourceStat) -> Option<NonZeroU64> {
    (st.nlink > 1).then(|| link_key(st.dev, st.ino)).flatten()
}

/// A stable key for the hard-link group of (device, inode).
fn link_key(dev: u64, ino: u64) -> Option<NonZeroU64> {
    let mut h = blake3::Hasher::new();
    h.update(&dev.to_le_bytes());
    h.update(&ino.to_le_bytes());
    let b = h.finalize();
    NonZeroU64::new(u64::from_le_bytes(
        b.as_bytes()[..8].try_into().expect("8 bytes"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_of_paths() {
        let s = Selection::of_paths(&[
            PathBuf::from("/a/b"),
            PathBuf::from("/a/c/d"),
            PathBuf::from("/a/b/e"),
        ]);
        let Selection::Only(root) = s else { panic!() };
        let Selection::Only(a) = &root[&b"a".to_vec()] else {
            panic!()
        };
        assert_eq!(a[&b"b".to_vec()], Selection::All);
        let Selection::Only(c) = &a[&b"c".to_vec()] else {
            panic!()
        };
        assert_eq!(c[&b"d".to_vec()], Selection::All);
        assert_eq!(Selection::of_paths(&[PathBuf::from("/")]), Selection::All);
    }
}

//! The file-tree walk: lists directories in name order, compares every file with the parent
//! snapshot's entry of the same name, reads only what changed, and writes one tree object per
//! directory once its children are done. Children are processed concurrently (bounded), so
//! small files from many directories keep every core busy.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::Metadata as FsMetadata;
use std::num::NonZeroU64;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use hashgrid_proto::manifest::{Content, Entry, EntryKind, Metadata, ObjectRef, Timestamp, Tree};
use tokio::sync::Semaphore;

use super::content::read_content;
use crate::chunker::Chunker;
use crate::error::{ClientError, Result};
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
    path: PathBuf,
    name: Vec<u8>,
    st: FsMetadata,
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
}

pub struct Walker {
    pub chunker: Chunker,
    pub uploader: Uploader,
    pub reader: ObjectReader,
    pub progress: Progress,
    pub counters: WalkCounters,
    pub warnings: Mutex<Vec<String>>,
    files: Semaphore,
}

impl Walker {
    pub fn new(
        chunker: Chunker,
        uploader: Uploader,
        reader: ObjectReader,
        progress: Progress,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Walker {
            chunker,
            uploader,
            reader,
            progress,
            counters: WalkCounters::default(),
            warnings: Mutex::new(Vec::new()),
            files: Semaphore::new(cores * 4),
        }
    }

    fn warn(&self, msg: String) {
        tracing::warn!("{msg}");
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(msg);
    }

    /// Backs up directory `path` (restricted to `selection`) and returns its tree object,
    /// and whether it is exactly the parent's (`parent`: the parent snapshot's tree for this
    /// directory and its reference). An unchanged directory reuses the parent's reference
    /// without encoding or sending anything.
    pub fn backup_dir(
        self: Arc<Self>,
        path: PathBuf,
        parent: Option<(Tree, ObjectRef)>,
        selection: Selection,
    ) -> BoxFuture<'static, Result<(ObjectRef, bool)>> {
        async move {
            let listing = {
                let path = path.clone();
                let selection = selection.clone();
                tokio::task::spawn_blocking(move || list_dir(&path, &selection)).await?
            };
            let listing = match listing {
                Ok(l) => l,
                Err(e) => {
                    self.warn(format!("{e}; recorded as an empty directory"));
                    Vec::new()
                }
            };
            let (parent_tree, parent_ref) = match parent {
                Some((t, r)) => (t, Some(r)),
                None => (Tree::default(), None),
            };
            // Both lists are sorted by name: walk them together, moving each parent entry
            // to the child of the same name.
            let mut same = parent_ref.is_some() && parent_tree.entries.len() == listing.len();
            let mut parent_entries = parent_tree.entries.into_iter().peekable();
            let count = listing.len();
            // Changed small files are read in groups, one blocking task per group: for
            // trees of many small files the hand-off per task costs more than the reading.
            let mut tasks: Vec<BoxFuture<'static, Result<Placed>>> = Vec::new();
            let mut group: Vec<ChangedFile> = Vec::new();
            let mut group_bytes = 0u64;
            for (index, (name, st)) in listing.into_iter().enumerate() {
                while parent_entries.next_if(|p| p.name < name).is_some() {
                    same = false;
                }
                let parent_entry = parent_entries.next_if(|p| p.name == name);
                let child_path = path.join(OsStr::from_bytes(&name));
                let small_and_changed = st.is_file()
                    && st.len() <= SMALL_FILE
                    && !parent_entry
                        .as_ref()
                        .is_some_and(|p| looks_unchanged(p, &st, &metadata_of(&st)));
                if small_and_changed {
                    group_bytes += st.len();
                    group.push(ChangedFile {
                        index,
                        path: child_path,
                        name,
                        st,
                    });
                    if group.len() >= SMALL_GROUP_FILES || group_bytes >= SMALL_GROUP_BYTES {
                        tasks.push(self.clone().read_files(std::mem::take(&mut group)).boxed());
                        group_bytes = 0;
                    }
                    continue;
                }
                let child_sel = match &selection {
                    Selection::All => Selection::All,
                    Selection::Only(m) => m.get(&name).cloned().unwrap_or(Selection::All),
                };
                let walker = self.clone();
                tasks.push(
                    async move {
                        let (entry, same) = walker
                            .backup_entry(child_path, name, st, parent_entry, child_sel)
                            .await?;
                        Ok(vec![(index, entry, same)])
                    }
                    .boxed(),
                );
            }
            if !group.is_empty() {
                tasks.push(self.clone().read_files(group).boxed());
            }
            let mut slots: Vec<Option<Entry>> = vec![None; count];
            let mut done = futures::stream::iter(tasks).buffer_unordered(DIR_WIDTH);
            while let Some(results) = done.next().await {
                for (index, entry, entry_same) in results? {
                    same &= entry_same && entry.is_some();
                    slots[index] = entry;
                }
            }
            self.counters.dirs.fetch_add(1, Ordering::Relaxed);
            if let (true, Some(r)) = (same, parent_ref) {
                return Ok((r, true));
            }
            let tree = Tree {
                entries: slots.into_iter().flatten().collect(),
            };
            let walker = self.clone();
            let r = tokio::task::spawn_blocking(move || {
                ObjectWriter::write_all(&walker.chunker, &walker.uploader, &tree.encode())
            })
            .await??;
            Ok((r, false))
        }
        .boxed()
    }

    /// One entry (`None` when it could not be read; a warning says why), and whether it is
    /// exactly the parent's entry of the same name.
    async fn backup_entry(
        self: Arc<Self>,
        path: PathBuf,
        name: Vec<u8>,
        st: FsMetadata,
        parent: Option<Entry>,
        selection: Selection,
    ) -> Result<(Option<Entry>, bool)> {
        let mut meta = metadata_of(&st);
        let ft = st.file_type();
        let kind = if ft.is_dir() {
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
            // A task of its own, so subtrees are walked on every worker thread.
            let (subtree, sub_same) =
                tokio::spawn(self.clone().backup_dir(path, parent_sub, selection)).await??;
            let same = sub_same && parent_meta.as_ref() == Some(&meta);
            return Ok((
                Some(Entry {
                    name,
                    meta,
                    kind: EntryKind::Dir { subtree },
                }),
                same,
            ));
        } else if ft.is_file() {
            let link_key = file_link_key(&st);
            if let Some(reused) = parent.and_then(|p| reuse(p, &st, &meta, link_key)) {
                self.counters.files.fetch_add(1, Ordering::Relaxed);
                self.counters.reused_files.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .chunks
                    .fetch_add(reused.content.chunk_count(), Ordering::Relaxed);
                self.counters
                    .logical_bytes
                    .fetch_add(st.len(), Ordering::Relaxed);
                self.progress.add_bytes(st.len());
                meta.size = st.len();
                let entry = Entry {
                    name,
                    meta,
                    kind: EntryKind::File {
                        content: reused.content,
                        link_key,
                    },
                };
                return Ok((Some(entry), reused.same));
            }
            let file = ChangedFile {
                index: 0,
                path,
                name,
                st,
            };
            let entry = self
                .read_files(vec![file])
                .await?
                .pop()
                .and_then(|(_, e, _)| e);
            return Ok((entry, false));
        } else if ft.is_symlink() {
            match std::fs::read_link(&path) {
                Ok(target) => {
                    let target = target.into_os_string().into_vec();
                    meta.size = target.len() as u64;
                    EntryKind::Symlink { target }
                }
                Err(e) => {
                    self.warn(format!("skipped {}: {e}", path.display()));
                    return Ok((None, false));
                }
            }
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else if ft.is_socket() {
            EntryKind::Socket
        } else if ft.is_char_device() {
            EntryKind::CharDevice { rdev: st.rdev() }
        } else if ft.is_block_device() {
            EntryKind::BlockDevice { rdev: st.rdev() }
        } else {
            self.warn(format!("skipped {}: unknown file type", path.display()));
            return Ok((None, false));
        };
        let entry = Entry { name, meta, kind };
        let same = parent.as_ref() == Some(&entry);
        Ok((Some(entry), same))
    }

    /// Reads changed files (one large one, or a group of small ones) on one blocking thread.
    async fn read_files(self: Arc<Self>, files: Vec<ChangedFile>) -> Result<Placed> {
        let _permit = self
            .files
            .acquire()
            .await
            .map_err(|_| ClientError::Internal("file limiter closed".into()))?;
        let walker = self.clone();
        tokio::task::spawn_blocking(move || {
            files
                .into_iter()
                .map(|f| {
                    let read =
                        read_content(&f.path, &walker.chunker, &walker.uploader, &walker.progress)
                            .map(|c| (c.content, c.size, c.chunks));
                    let meta = metadata_of(&f.st);
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
        st: &FsMetadata,
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
        let link_key = (st.nlink() > 1)
            .then(|| link_key(st.dev(), st.ino()))
            .flatten();
        Ok(Some(Entry {
            name,
            meta,
            kind: EntryKind::File { content, link_key },
        }))
    }
}

/// Does a regular file look unchanged since the parent snapshot: same size, mtime, ctime
/// and inode? (Any chmod, chown or link count change moves ctime too.)
pub fn looks_unchanged(parent: &Entry, st: &FsMetadata, meta: &Metadata) -> bool {
    matches!(parent.kind, EntryKind::File { .. })
        && parent.meta.size == st.len()
        && parent.meta.mtime == meta.mtime
        && parent.meta.ctime == meta.ctime
        && parent.meta.inode == meta.inode
}

/// A parent file entry's content, taken over for an unchanged file.
pub struct Reused {
    pub content: Content,
    /// The new entry will be identical to the parent's.
    pub same: bool,
}

/// Takes the parent entry's content if the file looks unchanged.
pub fn reuse(
    parent: Entry,
    st: &FsMetadata,
    meta: &Metadata,
    link_key: Option<NonZeroU64>,
) -> Option<Reused> {
    if !looks_unchanged(&parent, st, meta) {
        return None;
    }
    let mut new_meta = meta.clone();
    new_meta.size = st.len();
    match parent.kind {
        EntryKind::File {
            content,
            link_key: parent_key,
        } => Some(Reused {
            content,
            same: parent.meta == new_meta && parent_key == link_key,
        }),
        _ => None,
    }
}

/// The hard-link group key of a regular file with more than one name.
fn file_link_key(st: &FsMetadata) -> Option<NonZeroU64> {
    (st.nlink() > 1)
        .then(|| link_key(st.dev(), st.ino()))
        .flatten()
}

/// Lists a directory (or the selected names in it), sorted by name bytes, with `lstat` data.
fn list_dir(path: &Path, selection: &Selection) -> Result<Vec<(Vec<u8>, FsMetadata)>> {
    let mut out = Vec::new();
    match selection {
        Selection::All => {
            let rd = std::fs::read_dir(path).map_err(|e| ClientError::io(path, e))?;
            for item in rd {
                let item = item.map_err(|e| ClientError::io(path, e))?;
                match item.metadata() {
                    Ok(st) => out.push((item.file_name().into_vec(), st)),
                    // Vanished between listing and lstat: nothing to back up.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(ClientError::io(item.path(), e)),
                }
            }
        }
        Selection::Only(names) => {
            for name in names.keys() {
                let p = path.join(OsStr::from_bytes(name));
                let st = std::fs::symlink_metadata(&p).map_err(|e| ClientError::io(&p, e))?;
                out.push((name.clone(), st));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub fn metadata_of(st: &FsMetadata) -> Metadata {
    Metadata {
        mode: st.mode() & 0o7777,
        uid: st.uid(),
        gid: st.gid(),
        mtime: Timestamp {
            sec: st.mtime(),
            nsec: st.mtime_nsec() as u32,
        },
        size: 0,
        xattrs: Vec::new(),
        ctime: Timestamp {
            sec: st.ctime(),
            nsec: st.ctime_nsec() as u32,
        },
        inode: st.ino(),
    }
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

//! The planner: walks the snapshot's directory tree and creates what it names, queueing one
//! write job per data chunk for the fetch stage ([`super::write`]).
//!
//! The walk is a loop over an explicit stack of directories, never a recursion, so no depth
//! of nesting can overflow the agent's stack. Its descriptors are bounded whatever the
//! snapshot: the stack keeps at most `dir_fds` directories open (the deepest ones; an
//! ancestor whose descriptor was let go is reopened through its child's `..` when the walk
//! climbs back, and checked to be the same directory), files being written are bounded by a
//! semaphore, and a hard link reopens the directory of its first name by walking down from
//! the target name by name (`O_NOFOLLOW`) instead of holding it open. Trees held on the
//! stack are bounded in bytes too ([`MAX_HELD_TREE_BYTES`]): a snapshot nesting huge
//! directories deeper than that fails with a clear error rather than exhausting memory.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::num::NonZeroU64;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hashgrid_proto::manifest::{
    decode_dir, Content, DirObject, Entry, EntryKind, Extent, Metadata, ObjectRef, Tree, TreePart,
};
use hashgrid_proto::pb::ChunkFault;
use hashgrid_proto::{ChunkId, DecodeError};
use rustix::fs::FileType;
use rustix::io::Errno;
use tokio::sync::{mpsc, Semaphore};

use super::fs::{self, Dir, Identity};
use super::write::{FileTarget, WriteJob};
use super::{meta, RestoreSummary, Shared};
use crate::backup::walk::Selection;
use crate::error::{ClientError, Result};
use crate::objects::ObjectReader;
use crate::progress::Progress;

/// Most bytes of decoded trees the stack may hold at once (counted as encoded bytes plus the
/// fixed size of each decoded entry). A real tree nests a few large directories at most;
/// only a hostile one comes near this.
pub const MAX_HELD_TREE_BYTES: u64 = 256 * 1024 * 1024;

/// One directory being restored.
struct Frame {
    /// Held while the directory is among the deepest `dir_fds`; otherwise let go.
    fd: Option<Dir>,
    id: Identity,
    /// Its name in its parent (empty for the target).
    name: Vec<u8>,
    path: PathBuf,
    snap: PathBuf,
    /// Applied when the walk leaves it (none for the target itself).
    meta: Option<Metadata>,
    selection: Selection,
    entries: std::vec::IntoIter<Entry>,
    /// Parts of a split directory not loaded yet.
    parts: std::vec::IntoIter<TreePart>,
    held: u64,
}

pub(super) struct Planner {
    pub reader: ObjectReader,
    pub rt: tokio::runtime::Handle,
    pub jobs: mpsc::Sender<WriteJob>,
    pub shared: Arc<Shared>,
    pub open_files: Arc<Semaphore>,
    /// Most directory descriptors the stack holds.
    pub dir_fds: usize,
    /// First restored name of each hard-link group: its names from the target down.
    pub links: HashMap<NonZeroU64, Vec<Vec<u8>>>,
    pub summary: RestoreSummary,
    /// Snapshot paths (absolute) where a selection ended, to report unmatched ones.
    pub matched: Vec<PathBuf>,
    pub progress: Arc<Progress>,
    stack: Vec<Frame>,
    held: u64,
}

fn errno_at(path: &Path, what: &str, e: Errno) -> ClientError {
    let msg = if e == Errno::STALE {
        "the directory changed under the restore".to_string()
    } else {
        std::io::Error::from(e).to_string()
    };
    ClientError::io(path, std::io::Error::other(format!("{what}: {msg}")))
}

/// What a decoded tree costs to hold.
fn cost(encoded: usize, tree: &Tree) -> u64 {
    (encoded + tree.entries.len() * std::mem::size_of::<Entry>()) as u64
}

impl Planner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reader: ObjectReader,
        rt: tokio::runtime::Handle,
        jobs: mpsc::Sender<WriteJob>,
        shared: Arc<Shared>,
        open_files: usize,
        dir_fds: usize,
        progress: Arc<Progress>,
    ) -> Self {
        Planner {
            reader,
            rt,
            jobs,
            shared,
            open_files: Arc::new(Semaphore::new(open_files)),
            dir_fds,
            links: HashMap::new(),
            summary: RestoreSummary::default(),
            matched: Vec::new(),
            progress,
            stack: Vec::new(),
            held: 0,
        }
    }

    /// Restores the tree `root` into `target` (at `path` on disk).
    pub fn run(
        &mut self,
        target: Dir,
        path: &Path,
        root: &ObjectRef,
        selection: Selection,
    ) -> Result<()> {
        let id = fs::identity(&target).map_err(|e| errno_at(path, "reading the target", e))?;
        self.push(
            target,
            id,
            Vec::new(),
            path.to_path_buf(),
            PathBuf::from("/"),
            None,
            selection,
            root,
        )?;
        while let Some(top) = self.stack.len().checked_sub(1) {
            match self.next_entry(top)? {
                Some((entry, sel)) => self.restore_entry(entry, sel)?,
                None => self.leave_dir()?,
            }
        }
        Ok(())
    }

    /// Loads a directory object: its entries, or the first part of a split directory and
    /// the parts after it. A chunk the cluster cannot serve leaves the directory empty and
    /// named as damaged.
    fn load(&mut self, r: &ObjectRef, path: &Path) -> Result<(Tree, Vec<TreePart>, u64)> {
        let bytes = match self.rt.block_on(self.reader.read_object(r)) {
            Ok(b) => b,
            Err(ClientError::ChunkFault { id, fault }) => {
                self.damaged(path, id, fault);
                return Ok((Tree::default(), Vec::new(), 0));
            }
            Err(e) => return Err(e),
        };
        match decode_dir(&bytes)? {
            DirObject::Tree(t) => {
                let c = cost(bytes.len(), &t);
                Ok((t, Vec::new(), c))
            }
            DirObject::Index(index) => Ok((Tree::default(), index.parts, bytes.len() as u64)),
        }
    }

    fn damaged(&self, path: &Path, id: ChunkId, fault: ChunkFault) {
        self.shared.damage.record(path, id, fault);
    }

    fn account(&mut self, add: u64, remove: u64) -> Result<()> {
        self.held = self.held.saturating_sub(remove) + add;
        if self.held > MAX_HELD_TREE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "directory trees held at once along one path",
                size: self.held,
                limit: MAX_HELD_TREE_BYTES,
            }
            .into());
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        fd: Dir,
        id: Identity,
        name: Vec<u8>,
        path: PathBuf,
        snap: PathBuf,
        meta: Option<Metadata>,
        selection: Selection,
        subtree: &ObjectRef,
    ) -> Result<()> {
        let (tree, parts, held) = self.load(subtree, &path)?;
        self.account(held, 0)?;
        self.stack.push(Frame {
            fd: Some(fd),
            id,
            name,
            path,
            snap,
            meta,
            selection,
            entries: tree.entries.into_iter(),
            parts: parts.into_iter(),
            held,
        });
        // Let go of the shallowest descriptors past the budget (never the target's, which
        // anchors hard links, nor the top's).
        let mut open = self.stack.iter().filter(|f| f.fd.is_some()).count();
        let top = self.stack.len() - 1;
        for f in self.stack.iter_mut().take(top).skip(1) {
            if open <= self.dir_fds {
                break;
            }
            if f.fd.take().is_some() {
                open -= 1;
            }
        }
        Ok(())
    }

    /// The next selected entry of the directory at `top`, loading its next part when one is
    /// used up.
    fn next_entry(&mut self, top: usize) -> Result<Option<(Entry, Selection)>> {
        loop {
            let frame = &mut self.stack[top];
            if let Some(e) = frame.entries.next() {
                let sel = match &frame.selection {
                    Selection::All => Selection::All,
                    Selection::Only(names) => match names.get(&e.name) {
                        Some(s) => {
                            if *s == Selection::All {
                                self.matched
                                    .push(frame.snap.join(OsStr::from_bytes(&e.name)));
                            }
                            s.clone()
                        }
                        None => continue,
                    },
                };
                return Ok(Some((e, sel)));
            }
            let Some(part) = frame.parts.next() else {
                return Ok(None);
            };
            let path = frame.path.clone();
            let old = std::mem::take(&mut frame.held);
            let bytes = match self.rt.block_on(self.reader.read_object(&part.object)) {
                Ok(b) => b,
                Err(ClientError::ChunkFault { id, fault }) => {
                    self.damaged(&path, id, fault);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let tree = Tree::decode(&bytes)?;
            part.check(&tree)?;
            let c = cost(bytes.len(), &tree);
            self.account(c, old)?;
            let frame = &mut self.stack[top];
            frame.held = c;
            frame.entries = tree.entries.into_iter();
        }
    }

    /// Finishes the directory on top: reopens its parent if its descriptor was let go, then
    /// applies the directory's own metadata (after everything inside it exists).
    fn leave_dir(&mut self) -> Result<()> {
        let frame = self.stack.pop().expect("a directory to leave");
        let fd = frame.fd.expect("the top directory holds its descriptor");
        if let Some(parent) = self.stack.last_mut() {
            if parent.fd.is_none() {
                parent.fd = Some(
                    fs::open_parent(&fd, parent.id)
                        .map_err(|e| errno_at(&parent.path, "reopening directory", e))?,
                );
            }
        }
        self.held = self.held.saturating_sub(frame.held);
        if let Some(m) = &frame.meta {
            meta::apply_fd(
                &fd,
                m,
                &frame.path,
                &self.shared.policy,
                &self.shared.warnings,
            )
            .map_err(|e| errno_at(&frame.path, "setting directory metadata", e))?;
            self.summary.dirs += 1;
        }
        Ok(())
    }

    fn top_dir(&self) -> &Dir {
        self.stack
            .last()
            .and_then(|f| f.fd.as_ref())
            .expect("the top directory holds its descriptor")
    }

    /// Names of the top directory from the target down.
    fn top_names(&self) -> Vec<Vec<u8>> {
        self.stack[1..].iter().map(|f| f.name.clone()).collect()
    }

    /// Opens the directory at `names` (from the target down): from the deepest directory on
    /// the stack that is an ancestor of it and still open.
    fn open_dir_at(&self, names: &[Vec<u8>]) -> std::result::Result<Dir, Errno> {
        let common = self.stack[1..]
            .iter()
            .zip(names)
            .take_while(|(f, n)| &f.name == *n)
            .count();
        let (depth, fd) = (0..=common)
            .rev()
            .find_map(|d| self.stack[d].fd.as_ref().map(|fd| (d, fd)))
            .expect("the target stays open");
        fs::open_beneath(fd, &names[depth..])
    }

    fn restore_entry(&mut self, entry: Entry, sel: Selection) -> Result<()> {
        let top = self.stack.last().expect("a directory");
        let path = top.path.join(OsStr::from_bytes(&entry.name));
        let snap = top.snap.join(OsStr::from_bytes(&entry.name));
        let shared = self.shared.clone();
        let (policy, warnings) = (&shared.policy, &shared.warnings);
        match entry.kind {
            EntryKind::Dir { subtree } => {
                let child = fs::make_dir(self.top_dir(), &entry.name)
                    .map_err(|e| errno_at(&path, "creating directory", e))?;
                let id =
                    fs::identity(&child).map_err(|e| errno_at(&path, "creating directory", e))?;
                self.push(
                    child,
                    id,
                    entry.name,
                    path,
                    snap,
                    Some(entry.meta),
                    sel,
                    &subtree,
                )?;
            }
            EntryKind::File {
                ref content,
                link_key,
            } => {
                if let Some(first) = link_key.and_then(|k| self.links.get(&k)) {
                    let (name, dir) = first.split_last().expect("a name");
                    let linked = self
                        .open_dir_at(dir)
                        .and_then(|from| fs::hard_link(&from, name, self.top_dir(), &entry.name));
                    linked.map_err(|e| errno_at(&path, "creating hard link", e))?;
                    self.summary.links += 1;
                    return Ok(());
                }
                self.restore_file(&path, &entry, content)?;
                if let Some(key) = link_key {
                    let mut names = self.top_names();
                    names.push(entry.name.clone());
                    self.links.insert(key, names);
                }
                self.summary.files += 1;
            }
            EntryKind::Symlink { ref target } => {
                let dir = self.top_dir();
                fs::symlink(dir, &entry.name, target)
                    .map_err(|e| errno_at(&path, "creating symlink", e))?;
                meta::apply_symlink(dir, &entry.name, &entry.meta, &path, policy, warnings)
                    .map_err(|e| errno_at(&path, "setting symlink metadata", e))?;
            }
            EntryKind::Fifo => self.restore_node(&path, &entry, FileType::Fifo, 0)?,
            EntryKind::Socket => self.restore_node(&path, &entry, FileType::Socket, 0)?,
            EntryKind::CharDevice { rdev } => {
                self.restore_node(&path, &entry, FileType::CharacterDevice, rdev)?
            }
            EntryKind::BlockDevice { rdev } => {
                self.restore_node(&path, &entry, FileType::BlockDevice, rdev)?
            }
        }
        Ok(())
    }

    fn restore_node(
        &mut self,
        path: &Path,
        entry: &Entry,
        kind: FileType,
        rdev: u64,
    ) -> Result<()> {
        let s = &self.shared;
        let device = matches!(kind, FileType::CharacterDevice | FileType::BlockDevice);
        if device && !s.policy.devices {
            s.warnings
                .note("device nodes (--no-devices)", path, "not created");
            return Ok(());
        }
        match fs::make_node(self.top_dir(), &entry.name, kind, rdev) {
            Ok(fd) => meta::apply_node(&fd, &entry.meta, path, &s.policy, &s.warnings)
                .map_err(|e| errno_at(path, "setting metadata", e)),
            Err(Errno::PERM) if device => {
                s.warnings.note(
                    "device nodes (creating them needs root)",
                    path,
                    "not created",
                );
                Ok(())
            }
            Err(e) => Err(errno_at(path, "creating special file", e)),
        }
    }

    fn restore_file(&mut self, path: &Path, entry: &Entry, content: &Content) -> Result<()> {
        let permit = self
            .rt
            .block_on(self.open_files.clone().acquire_owned())
            .map_err(|_| ClientError::Internal("file limiter closed".into()))?;
        let file = fs::create_file(self.top_dir(), &entry.name)
            .map_err(|e| errno_at(path, "creating file", e))?;
        let target = Arc::new(FileTarget {
            file,
            meta: entry.meta.clone(),
            path: path.to_path_buf(),
            shared: self.shared.clone(),
            write_lock: Mutex::new(()),
            _permit: permit,
        });
        let mut offset = 0u64;
        // Where the last chunk ends: the writes make the file this long.
        let mut data_end = 0u64;
        let progress = &self.progress;
        let size = entry.meta.size;
        let mut emit = |e: Extent, jobs: &mpsc::Sender<WriteJob>| -> Result<()> {
            // Checked as the extents come, so a hostile list cannot write past the size.
            if offset + e.len() > size {
                return Err(ClientError::Manifest(format!(
                    "{}: extents add up to more than the entry's {size} bytes",
                    path.display()
                )));
            }
            if let Extent::Hole { len } = e {
                progress.add_bytes(len);
            }
            if let Extent::Chunk { id, len } = e {
                data_end = offset + u64::from(len);
                jobs.blocking_send(WriteJob {
                    target: target.clone(),
                    offset,
                    id,
                    len,
                })
                .map_err(|_| ClientError::Internal("restore writer stopped".into()))?;
            }
            offset += e.len();
            Ok(())
        };
        let mut damaged = false;
        match content {
            Content::Inline(extents) => {
                for e in extents {
                    emit(*e, &self.jobs)?;
                }
            }
            Content::List { list, extents, .. } => {
                self.reader.check_chunk_list(list, *extents)?;
                let mut extents = self.reader.chunk_list(list);
                loop {
                    match self.rt.block_on(extents.next()) {
                        Ok(Some(e)) => emit(e, &self.jobs)?,
                        Ok(None) => break,
                        // The rest of the file's extents are unknown: it stays sparse past
                        // what was read, and is named as damaged.
                        Err(ClientError::ChunkFault { id, fault }) => {
                            self.shared.damage.record(path, id, fault);
                            damaged = true;
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if !damaged && offset != entry.meta.size {
            return Err(ClientError::Manifest(format!(
                "{}: extents add up to {offset} bytes, the entry says {}",
                path.display(),
                entry.meta.size
            )));
        }
        // A file whose chunks reach its end gets its length from the writes; one that ends
        // in a hole (or whose tail's extents could not be read: it stays sparse there) is
        // extended here, while `target` still holds off the metadata (its mtime comes last).
        // Most files need no `ftruncate`: a system call less for each.
        if data_end < entry.meta.size {
            target
                .file
                .set_len(entry.meta.size)
                .map_err(|e| ClientError::io(path, e))?;
        }
        self.summary.bytes += offset;
        Ok(())
    }
}

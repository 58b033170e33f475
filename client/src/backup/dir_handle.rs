//! Directories of the walk and the descriptors that reach them.
//!
//! A [`DirHandle`] names a directory by its parent handle and its name, plus the device and
//! inode its parent's listing saw. Its descriptor is opened relative to the parent's
//! (`O_DIRECTORY|O_NOFOLLOW`) and checked against that device and inode, so no path is ever
//! resolved whole: depth is unlimited and a directory swapped mid-walk is never entered.
//!
//! Descriptors are a fixed budget, not one per level: [`Descriptors`] keeps at most its
//! capacity of directories open and closes the least recently used beyond that. A handle
//! whose descriptor was closed is reopened from its nearest open ancestor, one checked
//! `openat` per level. Every [`ANCHOR_EVERY`]th level is closed last, so a reopen deep in a
//! tall tree climbs a bounded number of levels even when recent work was elsewhere.

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::source::{open_dir_at, open_root, SourceError, SourceStat};

/// Levels between anchors (directories kept open in preference to others).
pub const ANCHOR_EVERY: usize = 32;

/// Directory descriptors a walk keeps open (besides those in use by a listing or a file
/// open at that moment, which the walk's own limiters bound).
pub const DIR_DESCRIPTORS: usize = 128;

/// One directory of the walk.
pub struct DirHandle {
    parent: Option<Arc<DirHandle>>,
    /// The name within the parent; for the walk's root, its path.
    name: Vec<u8>,
    dev: u64,
    ino: u64,
    depth: usize,
    fd: Mutex<Option<Arc<OwnedFd>>>,
    last_used: AtomicU64,
}

impl DirHandle {
    /// The handle of directory `name` in `parent`, as `st` (its `lstat`) describes it. Not
    /// opened until first used.
    pub fn child(parent: &Arc<DirHandle>, name: Vec<u8>, st: &SourceStat) -> Arc<DirHandle> {
        Arc::new(DirHandle {
            parent: Some(parent.clone()),
            name,
            dev: st.dev,
            ino: st.ino,
            depth: parent.depth + 1,
            fd: Mutex::new(None),
            last_used: AtomicU64::new(0),
        })
    }

    /// The directory's path, for messages.
    pub fn path(&self) -> PathBuf {
        let mut names = vec![self.name.as_slice()];
        let mut up = self.parent.as_deref();
        while let Some(d) = up {
            names.push(&d.name);
            up = d.parent.as_deref();
        }
        let mut path = PathBuf::new();
        for n in names.into_iter().rev() {
            path.push(std::ffi::OsStr::from_bytes(n));
        }
        path
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<OwnedFd>>> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_anchor(&self) -> bool {
        self.depth.is_multiple_of(ANCHOR_EVERY)
    }
}

impl Drop for DirHandle {
    /// Releases a chain of ancestors one at a time: dropping the last handle of a tree
    /// thousands of levels deep must not recurse once per level.
    fn drop(&mut self) {
        let mut up = self.parent.take();
        while let Some(p) = up {
            up = match Arc::try_unwrap(p) {
                Ok(mut d) => d.parent.take(),
                Err(_) => None,
            };
        }
    }
}

/// The walk's budget of open directory descriptors.
pub struct Descriptors {
    capacity: usize,
    /// Handles holding a descriptor (the root excepted: it is never closed).
    open: Mutex<Vec<Arc<DirHandle>>>,
    clock: AtomicU64,
}

impl Descriptors {
    pub fn new(capacity: usize) -> Self {
        Descriptors {
            capacity: capacity.max(1),
            open: Mutex::new(Vec::new()),
            clock: AtomicU64::new(1),
        }
    }

    /// Opens the directory a walk starts from; its descriptor stays open while the handle
    /// lives.
    pub fn root(&self, path: &Path) -> Result<Arc<DirHandle>, SourceError> {
        let (fd, st) = open_root(path)?;
        Ok(Arc::new(DirHandle {
            parent: None,
            name: path.as_os_str().as_bytes().to_vec(),
            dev: st.dev,
            ino: st.ino,
            depth: 0,
            fd: Mutex::new(Some(Arc::new(fd))),
            last_used: AtomicU64::new(0),
        }))
    }

    /// The directory's descriptor, reopened from its nearest open ancestor if it was closed.
    /// Fails if any directory on the way is no longer the one the walk listed.
    pub fn fd(&self, dir: &Arc<DirHandle>) -> Result<Arc<OwnedFd>, SourceError> {
        if let Some(fd) = self.cached(dir) {
            return Ok(fd);
        }
        let mut chain = vec![dir.clone()];
        let mut base = loop {
            let top = chain.last().expect("never empty");
            let Some(parent) = top.parent.clone() else {
                // Only the root has no parent, and its descriptor is never closed.
                return Err(SourceError::Io {
                    path: top.path(),
                    error: std::io::Error::other("the walk's root directory was closed"),
                });
            };
            match self.cached(&parent) {
                Some(fd) => break fd,
                None => chain.push(parent),
            }
        };
        for d in chain.iter().rev() {
            let fd = open_dir_at(&*base, &d.name, d.dev, d.ino).map_err(|f| f.at(d.path()))?;
            base = self.keep(d, fd);
        }
        Ok(base)
    }

    /// Closes the directory's descriptor: the walk is done with it.
    pub fn release(&self, dir: &Arc<DirHandle>) {
        if dir.parent.is_none() {
            return;
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = open.iter().position(|d| Arc::ptr_eq(d, dir)) {
            open.swap_remove(i);
        }
        *dir.slot() = None;
    }

    /// Directory descriptors currently kept open (the root's excepted).
    pub fn open_count(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn cached(&self, dir: &DirHandle) -> Option<Arc<OwnedFd>> {
        let fd = dir.slot().clone()?;
        dir.last_used.store(self.tick(), Ordering::Relaxed);
        Some(fd)
    }

    /// Keeps `fd` as `dir`'s descriptor, closing the least recently used others (anchors
    /// last) beyond the capacity.
    fn keep(&self, dir: &Arc<DirHandle>, fd: OwnedFd) -> Arc<OwnedFd> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let fd = {
            let mut slot = dir.slot();
            if let Some(existing) = &*slot {
                // Another task reopened it meanwhile; ours closes on drop.
                return existing.clone();
            }
            let fd = Arc::new(fd);
            *slot = Some(fd.clone());
            fd
        };
        dir.last_used.store(self.tick(), Ordering::Relaxed);
        open.push(dir.clone());
        while open.len() > self.capacity {
            let victim = open
                .iter()
                .enumerate()
                .filter(|(_, d)| !Arc::ptr_eq(d, dir))
                .min_by_key(|(_, d)| (d.is_anchor(), d.last_used.load(Ordering::Relaxed)))
                .map(|(i, _)| i);
            let Some(i) = victim else { break };
            let d = open.swap_remove(i);
            *d.slot() = None;
        }
        fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::source::list_dir;

    /// A chain `root/d/d/.../d` of `depth` directories; returns the handles top down.
    fn chain(tmp: &Path, depth: usize, budget: &Descriptors) -> Vec<Arc<DirHandle>> {
        let mut p = tmp.to_path_buf();
        for _ in 0..depth {
            p.push("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        let mut handles = vec![budget.root(tmp).unwrap()];
        for _ in 0..depth {
            let top = handles.last().unwrap().clone();
            let fd = budget.fd(&top).unwrap();
            let listing = list_dir(&fd, None, &top.path()).unwrap();
            let d = &listing.entries[0];
            handles.push(DirHandle::child(&top, d.name.clone(), &d.st));
        }
        handles
    }

    #[test]
    fn descriptors_stay_within_budget_and_reopen_from_an_ancestor() {
        let tmp = tempfile::tempdir().unwrap();
        let budget = Descriptors::new(8);
        let handles = chain(tmp.path(), 100, &budget);
        assert!(budget.open_count() <= 8, "{}", budget.open_count());
        // A shallow directory closed long ago reopens, checked, from the root.
        let fd = budget.fd(&handles[3]).unwrap();
        let st = rustix::fs::fstat(&*fd).unwrap();
        assert_eq!(SourceStat::from(&st).ino, handles[3].ino);
        assert!(budget.open_count() <= 8);
        let deepest = handles.last().unwrap();
        assert_eq!(
            deepest.path(),
            tmp.path().join(["d"; 100].join("/")),
            "paths are only for messages"
        );
        budget.fd(deepest).unwrap();
        for h in &handles {
            budget.release(h);
        }
        assert_eq!(budget.open_count(), 0);
    }

    #[test]
    fn a_reopen_through_a_swapped_ancestor_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let budget = Descriptors::new(2);
        let handles = chain(tmp.path(), 6, &budget);
        for h in &handles {
            budget.release(h);
        }
        // Replace level 1 by a copy of the same shape: names resolve, inodes differ.
        std::fs::rename(tmp.path().join("d"), tmp.path().join("old")).unwrap();
        std::fs::create_dir_all(tmp.path().join("d/d/d/d/d/d")).unwrap();
        let err = budget.fd(&handles[5]).unwrap_err();
        assert!(
            matches!(err, SourceError::Replaced { ref path, .. } if path.ends_with("d")),
            "{err}"
        );
    }

    #[test]
    fn dropping_a_very_deep_chain_does_not_recurse() {
        let root = Descriptors::new(1).root(Path::new("/")).unwrap();
        let st = SourceStat::from(&rustix::fs::stat("/").unwrap());
        let mut leaf = root;
        for _ in 0..1_000_000 {
            leaf = DirHandle::child(&leaf, b"d".to_vec(), &st);
        }
        drop(leaf);
    }
}

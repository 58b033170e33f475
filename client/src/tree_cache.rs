//! The agent's local copy of a dataset's trees: the manifest chunks of its latest snapshot,
//! so that an unchanged re-backup fetches no tree from the cluster (like borg's files cache
//! or bupstash's send log, but holding only what the walk compares against).
//!
//! Safe by construction, with nothing to invalidate by hand:
//! - The file names the root (the ids of the root tree object) of the snapshot it
//!   describes, and is used only when that is the root of the parent the cluster's catalog
//!   gave this backup. Trees are addressed by content, so that root pins every tree below it:
//!   the cached trees are exactly the trees the cluster's parent snapshot is made of, and
//!   reusing their references stands on that snapshot's commit as much as fetching them
//!   would. A parent deleted, marked damaged or replaced by another backup (from another
//!   host, say) has another root or is not chosen: the file is ignored and rewritten.
//! - Every chunk is checked against its id before use; a damaged one is fetched instead.
//! - The file is written only after the snapshot committed: replaced atomically (written
//!   beside, then renamed), or, when the backup changed few trees, appended to (the new
//!   trees, then the new root; see [`TreeCache::save`]). Only chunks before the file's last
//!   complete root record count, and a file that does not parse is ignored. It is not
//!   synced: after a crash it may be empty or partly written, which those checks make
//!   harmless (the next backup fetches its parent's trees and rewrites the file).
//!
//! The file: `HGTREES2`, then records, each a tag byte: `C` a chunk (id, u32 length, bytes),
//! `R` a root (u32 count, ids), which says the chunks before it are the trees of the snapshot
//! with that root. Chunks of older roots left in the file are never asked for (the walk asks
//! only for the trees under the parent's root); they are dropped when the file is rewritten,
//! which happens once they are a quarter of what the backup used.
//!
//! Bounded: a cache is loaded and kept only while it fits in its byte cap (a share of the
//! agent's memory budget); a dataset whose trees are larger fetches them as before.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use hashgrid_proto::manifest::ObjectRef;
use hashgrid_proto::ChunkId;

const MAGIC: &[u8; 8] = b"HGTREES2";
const ID_LEN: usize = 32;
const TAG_CHUNK: u8 = b'C';
const TAG_ROOT: u8 = b'R';

/// Bytes a chunk of `len` bytes takes in the file (and counts against the cap).
fn record_len(len: usize) -> usize {
    1 + ID_LEN + 4 + len
}

/// Where the agent keeps its caches when not told: `$XDG_CACHE_HOME/hashgrid`, else
/// `$HOME/.cache/hashgrid`; `None` when neither is set.
pub fn default_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty());
    let base = xdg.map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(|h| PathBuf::from(h).join(".cache"))
    })?;
    Some(base.join("hashgrid"))
}

/// Figures of one backup's use of the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TreeCacheStats {
    /// Tree chunks served from the local copy.
    pub hits: u64,
    /// Tree chunks fetched from the cluster (not cached, or failed their check).
    pub fetched: u64,
}

pub struct TreeCache {
    path: PathBuf,
    /// The loaded chunks (empty unless the file describes the parent's root).
    loaded: HashMap<ChunkId, Bytes>,
    /// The root the file describes, when it was loaded.
    loaded_root: Option<ObjectRef>,
    /// Where the loaded file's last complete root record ends (what an append keeps).
    loaded_len: u64,
    /// A loaded chunk failed its check: the file must be rewritten.
    damaged: AtomicBool,
    /// The chunks of the trees this backup used or wrote: the next file.
    kept: Mutex<Kept>,
    cap: usize,
    hits: AtomicU64,
    fetched: AtomicU64,
}

#[derive(Default)]
struct Kept {
    chunks: HashMap<ChunkId, Bytes>,
    bytes: usize,
    /// Over the cap: no file is written for this backup.
    overflow: bool,
}

impl TreeCache {
    /// The cache of one dataset (`key` names it: cluster, client, dataset, kind) in `dir`,
    /// loaded when it describes `parent_root`. Never fails: a missing, unreadable or foreign
    /// file is an empty cache.
    pub fn open(dir: &Path, key: &str, parent_root: Option<&ObjectRef>, cap: usize) -> Self {
        let name = blake3::hash(key.as_bytes()).to_hex();
        let path = dir.join("trees").join(&name[..32]);
        let (loaded, loaded_root, loaded_len) =
            match parent_root.map(|root| (load(&path, root, cap), root)) {
                Some((Ok((chunks, len)), root)) => (chunks, Some(root.clone()), len),
                Some((Err(why), _)) => {
                    tracing::debug!(path = %path.display(), why, "tree cache not used");
                    (HashMap::new(), None, 0)
                }
                None => (HashMap::new(), None, 0),
            };
        tracing::debug!(path = %path.display(), chunks = loaded.len(), "tree cache");
        TreeCache {
            path,
            loaded,
            loaded_root,
            loaded_len,
            damaged: AtomicBool::new(false),
            kept: Mutex::new(Kept::default()),
            cap,
            hits: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A cached chunk, checked against its id (and kept for the next file).
    pub fn get(&self, id: &ChunkId) -> Option<Bytes> {
        let plain = self.loaded.get(id)?;
        if ChunkId::of(plain) != *id {
            self.damaged.store(true, Ordering::Relaxed);
            tracing::warn!(path = %self.path.display(), %id, "a cached tree chunk is damaged; fetching it");
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.keep(*id, plain.clone());
        Some(plain.clone())
    }

    /// Counts a tree chunk fetched from the cluster and keeps it.
    pub fn fetched(&self, id: ChunkId, plain: Bytes) {
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.keep(id, plain);
    }

    /// Keeps a chunk of a tree this backup uses or writes, within the cap.
    pub fn keep(&self, id: ChunkId, plain: Bytes) {
        let mut kept = self.kept();
        if kept.overflow || kept.chunks.contains_key(&id) {
            return;
        }
        kept.bytes += record_len(plain.len());
        if kept.bytes > self.cap {
            tracing::debug!(cap = self.cap, "trees over the cache's cap; not cached");
            kept.overflow = true;
            kept.chunks = HashMap::new();
            return;
        }
        kept.chunks.insert(id, plain);
    }

    pub fn stats(&self) -> TreeCacheStats {
        TreeCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            fetched: self.fetched.load(Ordering::Relaxed),
        }
    }

    /// Writes what this backup kept as the cache of the snapshot with `root` (call after it
    /// committed). Over the cap, the old file is removed instead: it no longer describes the
    /// latest snapshot. When the file already holds exactly these trees (an unchanged
    /// re-backup: the same root, every tree served from the file and none damaged), it is
    /// only touched, not rewritten: on a 69,000-file tree that is 8 MiB written less per
    /// unchanged backup. When it holds most of them (a backup that changed a few files, or
    /// only the metadata of a directory above the backed-up path), the new trees and the
    /// new root are appended to it, so the write tracks the change, not the tree's size.
    pub fn save(&self, root: &ObjectRef) -> std::io::Result<()> {
        let kept = std::mem::take(&mut *self.kept());
        if kept.overflow {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let same_file = self.loaded_root.as_ref() == Some(root)
            && !self.damaged.load(Ordering::Relaxed)
            && kept.chunks.len() == self.loaded.len()
            && kept.chunks.keys().all(|id| self.loaded.contains_key(id));
        if same_file {
            // Its modification time says it is in use (see `prune`).
            return std::fs::File::options()
                .write(true)
                .open(&self.path)?
                .set_modified(std::time::SystemTime::now());
        }
        if self.appendable(&kept, root) {
            return self.append(&kept, root);
        }
        let dir = self
            .path
            .parent()
            .expect("the cache file is in a directory");
        std::fs::create_dir_all(dir)?;
        // Not synced: a file left empty or partly written by a crash is harmless (one that
        // does not parse is ignored, and every chunk is checked against its id before use),
        // and a sync would add a disk flush of the whole file to every backup.
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
            out.write_all(MAGIC)?;
            write_records(&mut out, kept.chunks.iter(), root)?;
            out.flush()?;
        }
        tmp.persist(&self.path).map_err(|e| e.error)?;
        prune(dir);
        Ok(())
    }

    /// Whether this backup's trees can be appended to the loaded file: it was loaded (it
    /// described the parent) and nothing in it was damaged, the chunks in it this backup
    /// did not use are at most a quarter of what it used, and it stays within the cap.
    fn appendable(&self, kept: &Kept, root: &ObjectRef) -> bool {
        if self.loaded_root.is_none() || self.damaged.load(Ordering::Relaxed) {
            return false;
        }
        let unused = bytes_not_in(&self.loaded, &kept.chunks);
        let added = bytes_not_in(&kept.chunks, &self.loaded);
        let root_len = 1 + 4 + root.0.len() * ID_LEN;
        unused <= kept.bytes / 4 && self.loaded_len as usize + added + root_len <= self.cap
    }

    /// Appends the trees this backup kept that the file lacks, then `root`, after the
    /// loaded file's last root record (anything after it, left by a crash, is cut off).
    fn append(&self, kept: &Kept, root: &ObjectRef) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::File::options().write(true).open(&self.path)?;
        file.set_len(self.loaded_len)?;
        file.seek(SeekFrom::End(0))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let added = kept
            .chunks
            .iter()
            .filter(|(id, _)| !self.loaded.contains_key(*id));
        write_records(&mut out, added, root)?;
        out.flush()?;
        if let Some(dir) = self.path.parent() {
            prune(dir);
        }
        Ok(())
    }
}

/// The bytes the chunks of `a` that `b` lacks take in the file.
fn bytes_not_in(a: &HashMap<ChunkId, Bytes>, b: &HashMap<ChunkId, Bytes>) -> usize {
    a.iter()
        .filter(|(id, _)| !b.contains_key(*id))
        .map(|(_, plain)| record_len(plain.len()))
        .sum()
}

/// Chunk records for `chunks`, then the record of `root`.
fn write_records<'a>(
    out: &mut impl Write,
    chunks: impl Iterator<Item = (&'a ChunkId, &'a Bytes)>,
    root: &ObjectRef,
) -> std::io::Result<()> {
    for (id, plain) in chunks {
        out.write_all(&[TAG_CHUNK])?;
        out.write_all(id.as_bytes())?;
        out.write_all(&(plain.len() as u32).to_le_bytes())?;
        out.write_all(plain)?;
    }
    out.write_all(&[TAG_ROOT])?;
    out.write_all(&(root.0.len() as u32).to_le_bytes())?;
    for id in &root.0 {
        out.write_all(id.as_bytes())?;
    }
    Ok(())
}

/// Files of datasets not backed up for this long are removed (a dataset, server address
/// or client that is no longer used would otherwise leave its file forever).
const UNUSED_FOR: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > UNUSED_FOR));
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The chunks of the file at `path`, and where its last complete root record ends, when
/// that root is `root`; why not otherwise. Records after the last root (a crash in an
/// append) are left out.
fn load(
    path: &Path,
    root: &ObjectRef,
    cap: usize,
) -> Result<(HashMap<ChunkId, Bytes>, u64), String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len > cap as u64 {
        return Err(format!("{len} bytes, over the cap of {cap}"));
    }
    let data = Bytes::from(std::fs::read(path).map_err(|e| e.to_string())?);
    let mut r = Reader { data, at: 0 };
    if r.take(MAGIC.len())? != MAGIC[..] {
        return Err("not a tree cache".into());
    }
    let mut chunks = HashMap::new();
    // The chunks read since the last root record, and that root's end and ids.
    let mut since_root: Vec<(ChunkId, Bytes)> = Vec::new();
    let mut last: Option<(u64, Vec<Bytes>)> = None;
    while r.at < r.data.len() {
        let Ok(record) = read_record(&mut r) else {
            break;
        };
        match record {
            Record::Chunk(id, plain) => since_root.push((id, plain)),
            Record::Root(ids) => {
                chunks.extend(since_root.drain(..));
                last = Some((r.at as u64, ids));
            }
        }
    }
    let (end, ids) = last.ok_or("no complete root record")?;
    let same = ids.len() == root.0.len()
        && ids
            .iter()
            .zip(&root.0)
            .all(|(a, b)| a[..] == b.as_bytes()[..]);
    if !same {
        return Err("describes another snapshot".into());
    }
    Ok((chunks, end))
}

enum Record {
    Chunk(ChunkId, Bytes),
    Root(Vec<Bytes>),
}

fn read_record(r: &mut Reader) -> Result<Record, String> {
    let tag = r.take(1)?[0];
    match tag {
        TAG_CHUNK => {
            let id = ChunkId::from_slice(&r.take(ID_LEN)?).map_err(|e| e.to_string())?;
            let n = r.u32()? as usize;
            Ok(Record::Chunk(id, r.take(n)?))
        }
        TAG_ROOT => {
            let n = r.u32()? as usize;
            if n > r.data.len() / ID_LEN {
                return Err("truncated".into());
            }
            let ids = (0..n)
                .map(|_| r.take(ID_LEN))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Record::Root(ids))
        }
        other => Err(format!("unknown record {other}")),
    }
}

struct Reader {
    data: Bytes,
    at: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("truncated")?;
        let out = self.data.slice(self.at..end);
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(text: &str) -> (ChunkId, Bytes) {
        let b = Bytes::from(text.as_bytes().to_vec());
        (ChunkId::of(&b), b)
    }

    /// Flips a bit 3 bytes before the last root record (of one id) of the file at `path`
    /// (inside the chunk before it) and returns the damaged bytes.
    fn flip_near_end(path: &Path) -> Vec<u8> {
        let mut bytes = std::fs::read(path).unwrap();
        let at = bytes.len() - (1 + 4 + ID_LEN) - 3;
        bytes[at] ^= 1;
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    /// Saves trees `ta` (the root) and `tb` as the cache of key "k" in `dir`.
    fn save_two(dir: &Path, ta: &str, tb: &str) -> ((ChunkId, Bytes), (ChunkId, Bytes), ObjectRef) {
        let (a, b) = (chunk(ta), chunk(tb));
        let root = ObjectRef(vec![a.0]);
        let first = TreeCache::open(dir, "k", None, 1 << 20);
        first.keep(a.0, a.1.clone());
        first.keep(b.0, b.1.clone());
        first.save(&root).unwrap();
        (a, b, root)
    }

    #[test]
    fn a_saved_cache_serves_the_snapshot_it_describes_only() {
        let dir = tempfile::tempdir().unwrap();
        let ((a, pa), (b, pb), root) = save_two(dir.path(), "tree a", "tree b");

        let same = TreeCache::open(dir.path(), "k", Some(&root), 1 << 20);
        assert_eq!(same.get(&a), Some(pa));
        assert_eq!(same.get(&b), Some(pb));
        assert_eq!(same.stats().hits, 2);

        let other = TreeCache::open(dir.path(), "k", Some(&ObjectRef(vec![b])), 1 << 20);
        assert_eq!(other.get(&a), None, "a cache of another root is not used");
        let other_key = TreeCache::open(dir.path(), "k2", Some(&root), 1 << 20);
        assert_eq!(other_key.get(&a), None);
    }

    #[test]
    fn a_damaged_chunk_is_not_served_and_a_damaged_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (a, pa) = chunk("tree a, long enough to find");
        let root = ObjectRef(vec![a]);
        let c = TreeCache::open(dir.path(), "k", None, 1 << 20);
        c.keep(a, pa);
        c.save(&root).unwrap();
        let path = c.path.clone();
        let mut bytes = flip_near_end(&path);
        let damaged = TreeCache::open(dir.path(), "k", Some(&root), 1 << 20);
        assert_eq!(damaged.loaded.len(), 1, "the file parses");
        assert_eq!(damaged.get(&a), None);
        // Cut inside the root record: no complete root, nothing used.
        bytes.truncate(bytes.len() - 10);
        std::fs::write(&path, &bytes).unwrap();
        let truncated = TreeCache::open(dir.path(), "k", Some(&root), 1 << 20);
        assert!(truncated.loaded.is_empty());
    }

    #[test]
    fn an_unchanged_backup_touches_the_file_and_one_that_used_few_of_its_trees_rewrites_it() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let ((a, pa), (b, _), root) = save_two(dir.path(), "tree a, long enough to find", "b");
        let path = TreeCache::open(dir.path(), "k", None, 1).path;
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
        let age = |p: &Path| std::fs::metadata(p).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let ino = age(&path).ino();

        // Every tree served from the file, the same root: touched in place.
        let same = TreeCache::open(dir.path(), "k", Some(&root), 1 << 20);
        assert!(same.get(&a).is_some() && same.get(&b).is_some());
        same.save(&root).unwrap();
        assert_eq!(age(&path).ino(), ino, "not rewritten");
        assert!(age(&path).modified().unwrap() > old, "touched");

        // A tree fewer (or another root): rewritten.
        let fewer = TreeCache::open(dir.path(), "k", Some(&root), 1 << 20);
        assert!(fewer.get(&a).is_some());
        fewer.save(&root).unwrap();
        assert_ne!(age(&path).ino(), ino);
        let reread = TreeCache::open(dir.path(), "k", Some(&root), 1 << 20);
        assert_eq!(reread.loaded.len(), 1);

        // A damaged tree, fetched again: the file is rewritten with the good bytes.
        flip_near_end(&path);
        let damaged = TreeCache::open(dir.path(), "k", Some(&root), 1 << 20);
        assert_eq!(damaged.get(&a), None);
        damaged.fetched(a, pa.clone());
        damaged.save(&root).unwrap();
        let healed = TreeCache::open(dir.path(), "k", Some(&root), 1 << 20);
        assert_eq!(healed.get(&a), Some(pa));
    }

    /// Trees of `n` bytes each, named by `seed` and their index.
    fn trees(seed: &str, count: usize, n: usize) -> Vec<(ChunkId, Bytes)> {
        (0..count)
            .map(|i| chunk(&format!("{seed} {i} {}", "x".repeat(n))))
            .collect()
    }

    #[test]
    fn a_backup_that_changed_few_trees_appends_them_and_a_crash_in_an_append_is_harmless() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let cap = 1 << 20;
        let base = trees("tree", 20, 100);
        let root1 = ObjectRef(vec![base[0].0]);
        let first = TreeCache::open(dir.path(), "k", None, cap);
        for (id, plain) in &base {
            first.keep(*id, plain.clone());
        }
        first.save(&root1).unwrap();
        let path = first.path.clone();
        let ino = std::fs::metadata(&path).unwrap().ino();
        let len1 = std::fs::metadata(&path).unwrap().len();

        // One tree changed (and so the root): the new one and the new root are appended.
        let changed = chunk("the changed root tree");
        let root2 = ObjectRef(vec![changed.0]);
        let second = TreeCache::open(dir.path(), "k", Some(&root1), cap);
        for (id, _) in &base[1..] {
            assert!(second.get(id).is_some());
        }
        second.keep(changed.0, changed.1.clone());
        second.save(&root2).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.ino(), ino, "appended, not rewritten");
        let appended = meta.len() - len1;
        assert_eq!(
            appended as usize,
            record_len(changed.1.len()) + 1 + 4 + ID_LEN
        );
        let third = TreeCache::open(dir.path(), "k", Some(&root2), cap);
        assert_eq!(third.get(&changed.0), Some(changed.1.clone()));
        for (id, plain) in &base[1..] {
            assert_eq!(third.get(id).as_ref(), Some(plain));
        }
        let old = TreeCache::open(dir.path(), "k", Some(&root1), cap);
        assert!(
            old.loaded.is_empty(),
            "the file now describes the second snapshot"
        );

        // An append cut short by a crash: the records after the last root are ignored, and
        // the next append writes over them.
        let mut f = std::fs::File::options().append(true).open(&path).unwrap();
        f.write_all(&[TAG_CHUNK, 1, 2, 3]).unwrap();
        drop(f);
        let after_crash = TreeCache::open(dir.path(), "k", Some(&root2), cap);
        assert_eq!(after_crash.loaded.len(), base.len() + 1);
        assert_eq!(after_crash.loaded_len, len1 + appended);
        for (id, _) in base[1..].iter().chain([&changed]) {
            assert!(after_crash.get(id).is_some());
        }
        let again = chunk("another root tree");
        let root3 = ObjectRef(vec![again.0]);
        after_crash.keep(again.0, again.1.clone());
        after_crash.save(&root3).unwrap();
        let fourth = TreeCache::open(dir.path(), "k", Some(&root3), cap);
        assert_eq!(fourth.get(&again.0), Some(again.1));
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);

        // A backup that used few of the file's trees rewrites it without the others.
        let fifth = TreeCache::open(dir.path(), "k", Some(&root3), cap);
        assert!(fifth.get(&base[1].0).is_some());
        fifth.save(&root3).unwrap();
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), ino, "rewritten");
        let sixth = TreeCache::open(dir.path(), "k", Some(&root3), cap);
        assert_eq!(sixth.loaded.len(), 1);
    }

    #[test]
    fn trees_over_the_cap_remove_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, pa) = chunk("a");
        let root = ObjectRef(vec![a]);
        let c = TreeCache::open(dir.path(), "k", None, 1 << 20);
        c.keep(a, pa);
        c.save(&root).unwrap();
        assert!(c.path.exists());
        let small = TreeCache::open(dir.path(), "k", Some(&root), 40);
        assert!(small.loaded.is_empty(), "the file is over this cap");
        small.keep(a, Bytes::from(vec![0u8; 100]));
        small.save(&root).unwrap();
        assert!(!small.path.exists());
    }
}

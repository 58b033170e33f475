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
//! - The file is replaced atomically (written beside, then renamed) and only after the
//!   snapshot committed; a file that does not parse is ignored. It is not synced: after a
//!   crash it may be empty or partly written, which those two checks make harmless.
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

const MAGIC: &[u8; 8] = b"HGTREES1";
const ID_LEN: usize = 32;

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
        let (loaded, loaded_root) = match parent_root.map(|root| (load(&path, root, cap), root)) {
            Some((Ok(chunks), root)) => (chunks, Some(root.clone())),
            Some((Err(why), _)) => {
                tracing::debug!(path = %path.display(), why, "tree cache not used");
                (HashMap::new(), None)
            }
            None => (HashMap::new(), None),
        };
        tracing::debug!(path = %path.display(), chunks = loaded.len(), "tree cache");
        TreeCache {
            path,
            loaded,
            loaded_root,
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
        kept.bytes += ID_LEN + 4 + plain.len();
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
    /// only touched, not rewritten: on a 69,000-file tree that is 8 MiB written and synced
    /// less per unchanged backup.
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
            out.write_all(&(root.0.len() as u32).to_le_bytes())?;
            for id in &root.0 {
                out.write_all(id.as_bytes())?;
            }
            out.write_all(&(kept.chunks.len() as u32).to_le_bytes())?;
            for (id, plain) in &kept.chunks {
                out.write_all(id.as_bytes())?;
                out.write_all(&(plain.len() as u32).to_le_bytes())?;
                out.write_all(plain)?;
            }
            out.flush()?;
        }
        tmp.persist(&self.path).map_err(|e| e.error)?;
        prune(dir);
        Ok(())
    }
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

/// The chunks of the file at `path` when it describes `root`; why not otherwise.
fn load(path: &Path, root: &ObjectRef, cap: usize) -> Result<HashMap<ChunkId, Bytes>, String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len > cap as u64 {
        return Err(format!("{len} bytes, over the cap of {cap}"));
    }
    let data = Bytes::from(std::fs::read(path).map_err(|e| e.to_string())?);
    let mut r = Reader { data, at: 0 };
    if r.take(MAGIC.len())? != MAGIC[..] {
        return Err("not a tree cache".into());
    }
    let pieces = r.u32()? as usize;
    if pieces != root.0.len() {
        return Err("describes another snapshot".into());
    }
    for id in &root.0 {
        if r.take(ID_LEN)? != id.as_bytes()[..] {
            return Err("describes another snapshot".into());
        }
    }
    let count = r.u32()? as usize;
    let mut chunks = HashMap::with_capacity(count.min(len as usize / (ID_LEN + 4)));
    for _ in 0..count {
        let id = ChunkId::from_slice(&r.take(ID_LEN)?).map_err(|e| e.to_string())?;
        let n = r.u32()? as usize;
        chunks.insert(id, r.take(n)?);
    }
    Ok(chunks)
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

    /// Flips a bit 3 bytes from the end of the file at `path` (inside its last chunk) and
    /// returns the damaged bytes.
    fn flip_near_end(path: &Path) -> Vec<u8> {
        let mut bytes = std::fs::read(path).unwrap();
        let at = bytes.len() - 3;
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
        assert_eq!(damaged.get(&a), None);
        bytes.truncate(bytes.len() - 10);
        std::fs::write(&path, &bytes).unwrap();
        let truncated = TreeCache::open(dir.path(), "k", Some(&root), 1 << 20);
        assert!(truncated.loaded.is_empty());
    }

    #[test]
    fn an_unchanged_backup_touches_the_file_and_any_other_rewrites_it() {
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

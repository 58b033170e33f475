//! What a restore reports besides its counts: damaged paths and warnings, collected from the
//! planner and the writer threads.
//!
//! Warnings are aggregated by kind (one line for "user xattrs could not be set on 10,000
//! files", not 10,000 lines), and the damage list is bounded, so a hostile or badly damaged
//! snapshot cannot grow either without limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hashgrid_proto::pb::ChunkFault;
use hashgrid_proto::ChunkId;
use serde::{Serialize, Serializer};

/// Damaged paths named one by one; more are only counted.
const MAX_NAMED: usize = 10_000;
/// Chunks named per damaged path.
const MAX_CHUNKS_PER_PATH: usize = 8;

/// A file or directory that could not be restored whole because chunks it needs are lost.
/// A damaged file is restored with the unreadable ranges left as holes (reading as zeros),
/// with its metadata; a damaged directory is restored with the entries that could be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DamagedPath {
    pub path: PathBuf,
    pub chunks: Vec<DamagedChunk>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DamagedChunk {
    #[serde(serialize_with = "hex_id")]
    pub id: ChunkId,
    /// Missing: no copy is stored. Damaged: every copy failed verification.
    #[serde(serialize_with = "fault_name")]
    pub fault: ChunkFault,
}

fn hex_id<S: Serializer>(id: &ChunkId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

fn fault_name<S: Serializer>(f: &ChunkFault, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match f {
        ChunkFault::Missing => "missing",
        _ => "damaged",
    })
}

impl std::fmt::Display for DamagedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.path.display())?;
        for c in &self.chunks {
            let what = match c.fault {
                ChunkFault::Missing => "missing",
                _ => "damaged",
            };
            write!(f, " chunk {} ({what})", c.id)?;
        }
        Ok(())
    }
}

#[derive(Default)]
pub(crate) struct DamageLog {
    inner: Mutex<(BTreeMap<PathBuf, Vec<DamagedChunk>>, u64)>,
}

impl DamageLog {
    pub fn record(&self, path: &Path, id: ChunkId, fault: ChunkFault) {
        tracing::warn!(path = %path.display(), chunk = %id, ?fault, "restoring a damaged path");
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (named, unnamed) = &mut *g;
        if let Some(chunks) = named.get_mut(path) {
            if chunks.len() < MAX_CHUNKS_PER_PATH && !chunks.iter().any(|c| c.id == id) {
                chunks.push(DamagedChunk { id, fault });
            }
        } else if named.len() < MAX_NAMED {
            named.insert(path.to_path_buf(), vec![DamagedChunk { id, fault }]);
        } else {
            *unnamed += 1;
        }
    }

    /// The damaged paths (sorted) and how many more were left unnamed.
    pub fn take(&self) -> (Vec<DamagedPath>, u64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (named, unnamed) = std::mem::take(&mut *g);
        (
            named
                .into_iter()
                .map(|(path, chunks)| DamagedPath { path, chunks })
                .collect(),
            unnamed,
        )
    }
}

/// Warnings counted by kind: the first occurrence is kept as an example.
#[derive(Default)]
pub(crate) struct Warnings {
    kinds: Mutex<BTreeMap<&'static str, (u64, String)>>,
}

impl Warnings {
    pub fn note(&self, kind: &'static str, path: &Path, cause: impl std::fmt::Display) {
        let mut g = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let e = g.entry(kind).or_insert_with(|| {
            tracing::debug!(kind, path = %path.display(), %cause, "first of its kind");
            (0, format!("{}: {cause}", path.display()))
        });
        e.0 += 1;
    }

    /// One line per kind.
    pub fn lines(&self) -> Vec<String> {
        let g = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        g.iter()
            .map(|(kind, (n, first))| {
                let entries = if *n == 1 { "entry" } else { "entries" };
                format!("{kind}: skipped on {n} {entries} (first: {first})")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_one_line_per_kind_however_many_entries() {
        let w = Warnings::default();
        for i in 0..1000 {
            w.note(
                "user xattrs",
                Path::new(&format!("/t/f{i}")),
                "Operation not permitted",
            );
            w.note(
                "file capabilities",
                Path::new(&format!("/t/f{i}")),
                "denied",
            );
        }
        let lines = w.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0]
            .starts_with("file capabilities: skipped on 1000 entries (first: /t/f0: denied)"));
        assert!(lines[1].starts_with("user xattrs: skipped on 1000 entries"));
    }

    #[test]
    fn damage_is_bounded_and_named_once_per_path() {
        let log = DamageLog::default();
        let id = ChunkId::of(b"x");
        for _ in 0..3 {
            log.record(Path::new("/a"), id, ChunkFault::Damaged);
        }
        for i in 0..(MAX_NAMED + 5) {
            log.record(Path::new(&format!("/many/{i}")), id, ChunkFault::Missing);
        }
        let (named, unnamed) = log.take();
        assert_eq!(named.len(), MAX_NAMED);
        assert_eq!(unnamed, 6);
        assert_eq!(named[0].path, Path::new("/a"));
        assert_eq!(named[0].chunks.len(), 1);
        assert!(named[0]
            .to_string()
            .contains(&format!("chunk {id} (damaged)")));
    }
}

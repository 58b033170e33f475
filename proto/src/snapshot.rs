//! The snapshot record kept in the Raft catalog, and the labels (client, dataset, tags) that
//! name snapshots.

use serde::{Deserialize, Serialize};

use crate::limits::{
    MAX_HOSTNAME_BYTES, MAX_LABEL_BYTES, MAX_ROOT_IDS, MAX_SOURCE_PATHS, MAX_SOURCE_PATH_BYTES,
    MAX_TAGS,
};
use crate::manifest::ObjectRef;
use crate::{pb, DecodeError, SnapshotId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// File level: a tree of directories and files.
    Files,
    /// Image level: the root tree holds one file, the disk image or device.
    Image,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStats {
    pub logical_bytes: u64,
    pub new_bytes: u64,
    pub sent_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub reused_files: u64,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub client: String,
    pub dataset: String,
    pub kind: SnapshotKind,
    pub time_unix_ms: i64,
    pub root: ObjectRef,
    pub stats: SnapshotStats,
    pub tags: Vec<String>,
    pub parent: Option<SnapshotId>,
    pub hostname: String,
    pub paths: Vec<Vec<u8>>,
    pub manifest_version: u32,
    /// Set by the catalog when a verify run found chunks this snapshot references bad or
    /// missing. Catalog state, not part of the committed record: never stored with it.
    #[serde(skip)]
    pub damage: Option<SnapshotDamage>,
}

/// What verify found wrong with a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDamage {
    /// Referenced chunks with no good copy.
    pub missing_chunks: u64,
    /// Some of them, for the operator (at most [`SnapshotDamage::MAX_EXAMPLES`]).
    pub examples: Vec<crate::ChunkId>,
    /// When the verify run that found it started.
    pub found_unix_ms: i64,
}

impl SnapshotDamage {
    pub const MAX_EXAMPLES: usize = 16;
}

/// Client names, datasets and tags: printable, no spaces, at most 128 bytes, so they can be
/// typed on a command line and used in file names.
pub fn validate_label(what: &'static str, label: &str) -> Result<(), DecodeError> {
    let ok = !label.is_empty()
        && label.len() <= MAX_LABEL_BYTES
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:@/+=".contains(&b))
        && !label.starts_with(['-', '/'])
        && !label.contains("..");
    if ok {
        Ok(())
    } else {
        Err(DecodeError::invalid(
            what,
            format!(
                "{label:?}: use 1-128 of A-Z a-z 0-9 . _ - : @ / + =, not starting with - or /"
            ),
        ))
    }
}

impl From<SnapshotStats> for pb::SnapshotStats {
    fn from(s: SnapshotStats) -> Self {
        pb::SnapshotStats {
            logical_bytes: s.logical_bytes,
            new_bytes: s.new_bytes,
            sent_bytes: s.sent_bytes,
            files: s.files,
            dirs: s.dirs,
            chunks: s.chunks,
            new_chunks: s.new_chunks,
            reused_files: s.reused_files,
            duration_ms: s.duration_ms,
        }
    }
}

impl From<pb::SnapshotStats> for SnapshotStats {
    fn from(s: pb::SnapshotStats) -> Self {
        SnapshotStats {
            logical_bytes: s.logical_bytes,
            new_bytes: s.new_bytes,
            sent_bytes: s.sent_bytes,
            files: s.files,
            dirs: s.dirs,
            chunks: s.chunks,
            new_chunks: s.new_chunks,
            reused_files: s.reused_files,
            duration_ms: s.duration_ms,
        }
    }
}

impl From<&SnapshotRecord> for pb::Snapshot {
    fn from(s: &SnapshotRecord) -> Self {
        pb::Snapshot {
            id: s.id.0,
            client: s.client.clone(),
            dataset: s.dataset.clone(),
            kind: match s.kind {
                SnapshotKind::Files => pb::SnapshotKind::Files,
                SnapshotKind::Image => pb::SnapshotKind::Image,
            } as i32,
            time_unix_ms: s.time_unix_ms,
            root: s.root.to_wire(),
            stats: Some(s.stats.into()),
            tags: s.tags.clone(),
            parent: s.parent.map_or(0, |p| p.0),
            hostname: s.hostname.clone(),
            paths: s.paths.clone(),
            manifest_version: s.manifest_version,
            damage: s.damage.as_ref().map(|d| pb::SnapshotDamage {
                missing_chunks: d.missing_chunks,
                examples: d.examples.iter().map(|id| id.as_bytes().to_vec()).collect(),
                found_unix_ms: d.found_unix_ms,
            }),
        }
    }
}

impl TryFrom<pb::Snapshot> for SnapshotRecord {
    type Error = DecodeError;
    fn try_from(s: pb::Snapshot) -> Result<Self, DecodeError> {
        validate_label("client name", &s.client)?;
        validate_label("dataset", &s.dataset)?;
        for tag in &s.tags {
            validate_label("tag", tag)?;
        }
        let too_large = |what: &'static str, size: usize, limit: usize| {
            Err(DecodeError::TooLarge {
                what,
                size: size as u64,
                limit: limit as u64,
            })
        };
        if s.hostname.len() > MAX_HOSTNAME_BYTES {
            return too_large("hostname", s.hostname.len(), MAX_HOSTNAME_BYTES);
        }
        if s.tags.len() > MAX_TAGS {
            return too_large("tag list", s.tags.len(), MAX_TAGS);
        }
        if s.paths.len() > MAX_SOURCE_PATHS {
            return too_large("source path list", s.paths.len(), MAX_SOURCE_PATHS);
        }
        if let Some(p) = s.paths.iter().find(|p| p.len() > MAX_SOURCE_PATH_BYTES) {
            return too_large("source path", p.len(), MAX_SOURCE_PATH_BYTES);
        }
        if s.root.len() > MAX_ROOT_IDS {
            return too_large("snapshot root reference", s.root.len(), MAX_ROOT_IDS);
        }
        let damage = match s.damage {
            None => None,
            Some(d) => Some(SnapshotDamage {
                missing_chunks: d.missing_chunks,
                examples: d
                    .examples
                    .iter()
                    .take(SnapshotDamage::MAX_EXAMPLES)
                    .map(|b| crate::ChunkId::from_slice(b))
                    .collect::<Result<_, _>>()?,
                found_unix_ms: d.found_unix_ms,
            }),
        };
        let kind = match pb::SnapshotKind::try_from(s.kind) {
            Ok(pb::SnapshotKind::Files) => SnapshotKind::Files,
            Ok(pb::SnapshotKind::Image) => SnapshotKind::Image,
            Err(_) => return Err(DecodeError::invalid("snapshot", format!("kind {}", s.kind))),
        };
        if s.manifest_version != u32::from(crate::manifest::FORMAT_VERSION) {
            return Err(DecodeError::UnsupportedVersion(
                u8::try_from(s.manifest_version).unwrap_or(u8::MAX),
            ));
        }
        Ok(SnapshotRecord {
            id: SnapshotId(s.id),
            client: s.client,
            dataset: s.dataset,
            kind,
            time_unix_ms: s.time_unix_ms,
            root: ObjectRef::from_wire(&s.root, "snapshot root")?,
            stats: s.stats.unwrap_or_default().into(),
            tags: s.tags,
            parent: (s.parent != 0).then_some(SnapshotId(s.parent)),
            hostname: s.hostname,
            paths: s.paths,
            manifest_version: s.manifest_version,
            damage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChunkId;

    #[test]
    fn labels() {
        for ok in ["web-01", "vm/db.example.com", "a", "host:dataset@x"] {
            validate_label("t", ok).unwrap();
        }
        for bad in [
            "",
            "-rf",
            "/abs",
            "../etc",
            "a/../b",
            "with space",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate_label("t", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wire_round_trip() {
        let rec = SnapshotRecord {
            id: SnapshotId(9),
            client: "c".into(),
            dataset: "d".into(),
            kind: SnapshotKind::Image,
            time_unix_ms: 123,
            root: ObjectRef(vec![ChunkId::of(b"r")]),
            stats: SnapshotStats {
                logical_bytes: 5,
                ..Default::default()
            },
            tags: vec!["t".into()],
            parent: Some(SnapshotId(3)),
            hostname: "h".into(),
            paths: vec![b"/x".to_vec()],
            manifest_version: 1,
            damage: Some(SnapshotDamage {
                missing_chunks: 2,
                examples: vec![ChunkId::of(b"m")],
                found_unix_ms: 5,
            }),
        };
        assert_eq!(
            SnapshotRecord::try_from(pb::Snapshot::from(&rec)).unwrap(),
            rec
        );
    }
}

#[cfg(test)]
mod bounds {
    use super::*;

    fn pb_record() -> pb::Snapshot {
        pb::Snapshot {
            client: "c".into(),
            dataset: "d".into(),
            root: vec![vec![7; 32]],
            manifest_version: 1,
            ..Default::default()
        }
    }

    #[test]
    fn oversized_fields_are_refused() {
        SnapshotRecord::try_from(pb_record()).unwrap();
        let cases: [fn(&mut pb::Snapshot); 6] = [
            |s| s.hostname = "h".repeat(MAX_HOSTNAME_BYTES + 1),
            |s| s.tags = vec!["t".into(); MAX_TAGS + 1],
            |s| s.paths = vec![b"/p".to_vec(); MAX_SOURCE_PATHS + 1],
            |s| s.paths = vec![vec![b'a'; MAX_SOURCE_PATH_BYTES + 1]],
            |s| s.root = vec![vec![7; 32]; MAX_ROOT_IDS + 1],
            |s| s.root = vec![],
        ];
        for (i, tweak) in cases.iter().enumerate() {
            let mut s = pb_record();
            tweak(&mut s);
            assert!(SnapshotRecord::try_from(s).is_err(), "case {i}");
        }
    }
}

//! The cluster secret: what node-to-node calls carry to prove they come from a member.
//!
//! A new cluster makes one (256 random bits, hex) and writes it to
//! `<data-dir>/cluster.secret` (0600, synced with its directory before the cluster is
//! initialized). A joining node is given a copy with `--cluster-secret-file` and keeps it in
//! its own data directory, so a restarted member needs no flag. Nodes compare the secret in
//! constant time; it never travels to or from agents.

use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};

use crate::durable::write_private;

/// gRPC metadata key carrying the secret on `Peer` calls.
pub const METADATA_KEY: &str = hashgrid_proto::auth::CLUSTER_SECRET_KEY;
/// The secret's file in the data directory.
pub const FILE: &str = hashgrid_proto::data_dir::CLUSTER_SECRET_FILE;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the cluster secret {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster secret {path} is not 64 hex digits")]
    Malformed { path: PathBuf },
    #[error("storing the cluster secret in {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "joining needs the cluster secret: pass --cluster-secret-file (a copy of \
         <data-dir>/cluster.secret of any member)"
    )]
    Missing,
    #[error("{given} differs from the secret this node already keeps in {kept}")]
    Mismatch { given: PathBuf, kept: PathBuf },
}

#[derive(Clone)]
pub struct ClusterSecret {
    hex: String,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    fn generate() -> Self {
        ClusterSecret {
            hex: hex::encode(rand::random::<[u8; 32]>()),
        }
    }

    fn read(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let hex = text.trim().to_string();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SecretError::Malformed {
                path: path.to_path_buf(),
            });
        }
        Ok(ClusterSecret { hex })
    }

    /// The secret kept in `data_dir`, else the one in `given` (stored into `data_dir`),
    /// else a new one when `may_create` (a node that creates a cluster).
    pub fn load_or_create(
        data_dir: &Path,
        given: Option<&Path>,
        may_create: bool,
    ) -> Result<Self, SecretError> {
        let kept = data_dir.join(FILE);
        let stored = match std::fs::metadata(&kept) {
            Ok(_) => Some(Self::read(&kept)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(SecretError::Read { path: kept, source }),
        };
        let secret = match (stored, given) {
            (Some(s), Some(g)) => {
                if Self::read(g)?.matches(&s.hex) {
                    return Ok(s);
                }
                return Err(SecretError::Mismatch {
                    given: g.to_path_buf(),
                    kept,
                });
            }
            (Some(s), None) => return Ok(s),
            (None, Some(g)) => Self::read(g)?,
            (None, None) if may_create => Self::generate(),
            (None, None) => return Err(SecretError::Missing),
        };
        write_private(&kept, format!("{}\n", secret.hex).as_bytes())
            .map_err(|source| SecretError::Write { path: kept, source })?;
        Ok(secret)
    }

    /// The metadata value peers send.
    pub fn metadata_value(&self) -> MetadataValue<Ascii> {
        MetadataValue::try_from(self.hex.as_str()).expect("hex is valid ASCII metadata")
    }

    /// Does `presented` equal the secret? Constant time in the secret's content.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.hex.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused_and_copied_by_joiners() {
        let a = tempfile::tempdir().unwrap();
        let s = ClusterSecret::load_or_create(a.path(), None, true).unwrap();
        let again = ClusterSecret::load_or_create(a.path(), None, false).unwrap();
        assert!(again.matches(&s.hex));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(a.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let b = tempfile::tempdir().unwrap();
        assert!(matches!(
            ClusterSecret::load_or_create(b.path(), None, false),
            Err(SecretError::Missing)
        ));
        let joined =
            ClusterSecret::load_or_create(b.path(), Some(&a.path().join(FILE)), false).unwrap();
        assert!(joined.matches(&s.hex));
        assert!(!joined.matches("00"));

        let c = tempfile::tempdir().unwrap();
        let other = ClusterSecret::load_or_create(c.path(), None, true).unwrap();
        assert!(!other.matches(&s.hex));
        assert!(matches!(
            ClusterSecret::load_or_create(b.path(), Some(&c.path().join(FILE)), false),
            Err(SecretError::Mismatch { .. })
        ));
    }
}

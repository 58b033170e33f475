//! Decoding errors for everything that arrives from another process: ids, manifests, maps,
//! snapshot records. Each says what was wrong so an operator can tell a bug from an attack.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("a chunk id must be 32 bytes, got {0}")]
    IdLength(usize),
    #[error("packed chunk ids must be a multiple of 32 bytes, got {0}")]
    PackedIdsLength(usize),
    #[error("invalid hex id {0:?}")]
    IdHex(String),
    #[error("not a hashgrid manifest object (bad magic)")]
    BadMagic,
    #[error("manifest object kind {found:?} where {expected:?} was expected")]
    WrongKind { expected: char, found: char },
    #[error("manifest format version {0} is not supported by this build (knows 1)")]
    UnsupportedVersion(u8),
    #[error("protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("invalid entry name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("tree entries are not strictly sorted at {0:?} (duplicate or out of order)")]
    Unsorted(String),
    #[error("{what} is too large: {size} > {limit}")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

impl DecodeError {
    pub fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

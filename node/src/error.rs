//! Node errors and their one mapping to gRPC status codes. Each variant is a kind the code
//! matches on (never the text): retryable conditions (`NotReady`, `Unavailable`) map to
//! `UNAVAILABLE` so agents back off and try again elsewhere, a stale map epoch to
//! `FAILED_PRECONDITION` with the `x-hashgrid-refresh` metadata so agents know to refresh
//! the map (and not to give up as they would on a missing chunk), and everything else names
//! what was wrong.

use hashgrid_proto::codec::ChunkError;
use hashgrid_proto::{ChunkId, DecodeError};
use thiserror::Error;
use tonic::Status;

use crate::chunk_store::StoreError;
use crate::manifest_walk::ManifestError;

pub use hashgrid_proto::status_meta::REFRESH as REFRESH_METADATA;
use hashgrid_proto::status_meta::{RETRY, RETRY_STARTING, RETRY_UNAVAILABLE};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A snapshot manifest is invalid (hostile or corrupt), whatever is stored.
    #[error("invalid snapshot manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// A commit references chunks that are not stored.
    #[error(
        "{count} chunk(s) the snapshot references are not stored (one is {example}); \
         upload every chunk before committing"
    )]
    MissingChunks { example: ChunkId, count: u64 },
    #[error("node is starting (catalog not ready yet); retry shortly")]
    NotReady,
    #[error("request routed with cluster-map epoch {sent}, current is {current}: refresh the map")]
    StaleEpoch { sent: u64, current: u64 },
    #[error("too many {what} in one request: {count} > {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Precondition(String),
    /// The cluster cannot serve this now (no catalog leader or quorum within the deadline,
    /// fewer reachable owners than the write quorum); retrying later or elsewhere may work.
    #[error("{0}")]
    Unavailable(String),
    /// The catalog's rules refused the change (deterministic: retrying will not help).
    #[error("{0}")]
    Rejected(String),
    /// Another node refused what this one sent it as invalid (INVALID_ARGUMENT): an owner
    /// that verified a chunk a coordinator forwarded without verifying it. The request's
    /// fault, not the owner's: retrying or asking another owner will not help.
    #[error("{0}")]
    Invalid(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl NodeError {
    /// Whether the same request may succeed later without change.
    pub fn is_retryable(&self) -> bool {
        matches!(self, NodeError::NotReady | NodeError::Unavailable(_))
    }

    /// Whether the request itself is at fault (a malformed or corrupt chunk, a hostile
    /// manifest, too much in one call), here or at a node it was sent on to.
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            NodeError::Chunk(_)
                | NodeError::Decode(_)
                | NodeError::Manifest(_)
                | NodeError::TooMany { .. }
                | NodeError::Invalid(_)
        )
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let msg = e.to_string();
        if e.is_retryable() {
            let why = match e {
                NodeError::NotReady => RETRY_STARTING,
                _ => RETRY_UNAVAILABLE,
            };
            let mut s = Status::unavailable(msg);
            s.metadata_mut()
                .insert(RETRY, tonic::metadata::MetadataValue::from_static(why));
            return s;
        }
        match &e {
            NodeError::NotReady | NodeError::Unavailable(_) => Status::unavailable(msg),
            NodeError::StaleEpoch { current, .. } => {
                let mut s = Status::failed_precondition(msg);
                if let Ok(v) = current.to_string().parse() {
                    s.metadata_mut().insert(REFRESH_METADATA, v);
                }
                s
            }
            NodeError::Precondition(_)
            | NodeError::Rejected(_)
            | NodeError::MissingChunks { .. } => Status::failed_precondition(msg),
            NodeError::Chunk(_)
            | NodeError::Decode(_)
            | NodeError::Manifest(_)
            | NodeError::TooMany { .. }
            | NodeError::Invalid(_) => Status::invalid_argument(msg),
            NodeError::NotFound(_) => Status::not_found(msg),
            NodeError::PermissionDenied(_) => Status::permission_denied(msg),
            NodeError::Store(StoreError::NoSpace(_)) => Status::resource_exhausted(msg),
            NodeError::Store(_) | NodeError::Internal(_) => Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_errors_are_unavailable() {
        for (e, why) in [
            (NodeError::NotReady, RETRY_STARTING),
            (NodeError::Unavailable("x".into()), RETRY_UNAVAILABLE),
        ] {
            assert!(e.is_retryable());
            let s = Status::from(e);
            assert_eq!(s.code(), tonic::Code::Unavailable);
            assert_eq!(s.metadata().get(RETRY).unwrap(), why);
        }
        let e = NodeError::StaleEpoch {
            sent: 1,
            current: 2,
        };
        assert!(!e.is_retryable());
        let s = Status::from(e);
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.metadata().get(REFRESH_METADATA).unwrap(), "2");
        let s = Status::from(NodeError::Precondition("missing".into()));
        assert!(s.metadata().get(REFRESH_METADATA).is_none());
    }
}

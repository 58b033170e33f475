//! Node errors and their one mapping to gRPC status codes. Retryable conditions map to
//! `UNAVAILABLE` so agents back off and try again; everything else names what was wrong.

use hashgrid_proto::codec::ChunkError;
use hashgrid_proto::DecodeError;
use thiserror::Error;
use tonic::Status;

use crate::chunk_store::StoreError;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
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
    #[error("catalog replication: {0}")]
    Raft(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl NodeError {
    /// Whether the same request may succeed later without change.
    pub fn is_retryable(&self) -> bool {
        matches!(self, NodeError::NotReady | NodeError::Raft(_))
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let msg = e.to_string();
        if e.is_retryable() {
            return Status::unavailable(msg);
        }
        match &e {
            NodeError::NotReady | NodeError::Raft(_) => Status::unavailable(msg),
            NodeError::StaleEpoch { .. } | NodeError::Precondition(_) => {
                Status::failed_precondition(msg)
            }
            NodeError::Chunk(_) | NodeError::Decode(_) | NodeError::TooMany { .. } => {
                Status::invalid_argument(msg)
            }
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
        for e in [NodeError::NotReady, NodeError::Raft("x".into())] {
            assert!(e.is_retryable());
            assert_eq!(Status::from(e).code(), tonic::Code::Unavailable);
        }
        let e = NodeError::StaleEpoch {
            sent: 1,
            current: 2,
        };
        assert!(!e.is_retryable());
        assert_eq!(Status::from(e).code(), tonic::Code::FailedPrecondition);
    }
}

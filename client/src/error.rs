//! Client library errors. Each variant says which step failed and carries the cause, so the
//! CLI can print one clear line and scripts can tell a bad argument from a cluster problem.

use std::path::PathBuf;

use hashgrid_proto::codec::ChunkError;
use hashgrid_proto::pb::ChunkFault;
use hashgrid_proto::{ChunkId, DecodeError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{0}")]
    Config(String),
    /// Printed as the node's message and the code's name, without tonic's metadata dump.
    #[error("{context}: {} ({:?})", .status.message(), .status.code())]
    Rpc {
        context: String,
        status: Box<tonic::Status>,
    },
    /// The cause is part of the message rather than a `source`, so a printed error chain
    /// does not repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// The node could not serve a chunk: nothing else can bring its bytes back.
    #[error("chunk {id}: {} (data loss)", match .fault {
        ChunkFault::Damaged => "every stored copy failed verification",
        ChunkFault::Missing | ChunkFault::None => "no copy is stored",
    })]
    ChunkFault { id: ChunkId, fault: ChunkFault },
    #[error("{0}")]
    Manifest(String),
    /// A restore that finished everything it could, but chunks some paths need are lost:
    /// those paths are listed (with their chunks), the rest of the snapshot is restored.
    #[error("restore incomplete: {} path(s) could not be restored whole because chunks they need are lost{}", .damaged.len() as u64 + .unnamed, match .damaged.first() {
        Some(first) => format!(" (first: {first})"),
        None => String::new(),
    })]
    RestoreIncomplete {
        damaged: Vec<crate::restore::DamagedPath>,
        /// Damaged paths past the named ones, only counted.
        unnamed: u64,
        summary: Box<crate::restore::RestoreSummary>,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unsafe(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl ClientError {
    pub fn rpc(context: impl Into<String>, status: tonic::Status) -> Self {
        ClientError::Rpc {
            context: context.into(),
            status: Box::new(status),
        }
    }

    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        ClientError::Io {
            path: path.into(),
            error,
        }
    }
}

impl From<tokio::task::JoinError> for ClientError {
    fn from(e: tokio::task::JoinError) -> Self {
        ClientError::Internal(format!("worker task: {e}"))
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

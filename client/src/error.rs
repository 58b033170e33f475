//! Client library errors. Each variant says which step failed and carries the cause, so the
//! CLI can print one clear line and scripts can tell a bad argument from a cluster problem.

use std::path::PathBuf;

use hashgrid_proto::codec::ChunkError;
use hashgrid_proto::DecodeError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{0}")]
    Config(String),
    #[error("{context}: {status}")]
    Rpc {
        context: String,
        status: Box<tonic::Status>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("{0}")]
    Manifest(String),
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

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ClientError::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<tokio::task::JoinError> for ClientError {
    fn from(e: tokio::task::JoinError) -> Self {
        ClientError::Internal(format!("worker task: {e}"))
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

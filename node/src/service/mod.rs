//! gRPC services. Client-facing: `Chunks`, `Catalog`, `Admin`, each wrapped by the auth
//! interceptor ([`auth`]), so no RPC runs without an authenticated principal.

pub mod admin;
pub mod auth;
pub mod catalog;
pub mod chunks;
pub mod peer;

use tokio::task::JoinError;

use crate::error::NodeError;

/// Runs blocking work (RocksDB, hashing) off the async workers.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, NodeError>
where
    F: FnOnce() -> Result<T, NodeError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e: JoinError| NodeError::Internal(format!("worker task: {e}")))?
}

//! The coordinator as a [`ChunkSource`], for the manifest walks that must see the cluster
//! rather than this node's store: the commit check counts a chunk present only when W
//! owners hold it, and reads manifest objects from whichever owner serves a good copy.
//!
//! The walks are synchronous (they run on the blocking pool), so each call enters the
//! runtime with [`Handle::block_on`]; that is allowed there, never on a runtime thread.

use bytes::Bytes;
use hashgrid_proto::codec::{decode_verified, ChunkError};
use hashgrid_proto::pb::ChunkFault;
use hashgrid_proto::ChunkId;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::{lookup, read, Route};
use crate::chunk_store::Check;
use crate::error::NodeError;
use crate::manifest_walk::ChunkSource;

pub struct ClusterChunks {
    pub route: Route,
    pub runtime: Handle,
    /// The cluster's largest chunk.
    pub max_plain_len: u32,
}

impl ChunkSource for ClusterChunks {
    fn present(&self, ids: &[ChunkId]) -> Result<Vec<bool>, NodeError> {
        self.runtime.block_on(lookup::lookup(
            &self.route,
            ids.to_vec(),
            lookup::Presence::Strict,
        ))
    }

    /// Reads with each owner checking its copy against its stored checksum; when a piece's
    /// bytes fail verification here, reads again with every copy read in full, so a copy
    /// that went bad before its checksum was taken is dropped and another owner's read.
    fn read(&self, ids: &[ChunkId]) -> Result<Vec<Option<Bytes>>, NodeError> {
        match self.read_checked(ids, Check::Stored)? {
            Ok(out) => Ok(out),
            Err(e) => {
                tracing::warn!(error = %e, "a manifest piece failed verification; reading again with copies read in full");
                Ok(self.read_checked(ids, Check::Full)??)
            }
        }
    }
}

impl ClusterChunks {
    /// One reply per id (`None`: no owner served it), or the first piece whose bytes failed
    /// verification.
    fn read_checked(
        &self,
        ids: &[ChunkId],
        check: Check,
    ) -> Result<Result<Vec<Option<Bytes>>, ChunkError>, NodeError> {
        let (tx, mut rx) = mpsc::channel(4);
        let route = self.route.clone();
        let wanted = ids.to_vec();
        self.runtime.block_on(async move {
            let reader = tokio::spawn(read::read(route, wanted, check, tx));
            let mut out = Vec::with_capacity(ids.len());
            let mut bad = None;
            while let Some(reply) = rx.recv().await {
                let reply = reply.map_err(|s| {
                    NodeError::Unavailable(format!("reading manifest objects: {}", s.message()))
                })?;
                for chunk in reply.chunks {
                    if chunk.fault != ChunkFault::None as i32 {
                        out.push(None);
                        continue;
                    }
                    match decode_verified(&chunk, self.max_plain_len) {
                        Ok((_, plain)) => out.push(Some(plain)),
                        Err(e) => {
                            bad.get_or_insert(e);
                            out.push(None);
                        }
                    }
                }
            }
            reader
                .await
                .map_err(|e| NodeError::Internal(format!("reading manifest objects: {e}")))?;
            if out.len() != ids.len() {
                return Err(NodeError::Internal(format!(
                    "asked for {} chunks, got {} replies",
                    ids.len(),
                    out.len()
                )));
            }
            Ok(bad.map_or(Ok(out), Err))
        })
    }
}

//! The coordinator as a [`ChunkSource`], for the manifest walks that must see the cluster
//! rather than this node's store: the commit check counts a chunk present only when W
//! owners hold it, and reads manifest objects from whichever owner serves a good copy.
//!
//! The walks are synchronous (they run on the blocking pool), so each call enters the
//! runtime with [`Handle::block_on`]; that is allowed there, never on a runtime thread.

use bytes::Bytes;
use hashgrid_proto::codec::decode_verified;
use hashgrid_proto::pb::ChunkFault;
use hashgrid_proto::ChunkId;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::{lookup, read, Route};
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

    fn read(&self, ids: &[ChunkId]) -> Result<Vec<Option<Bytes>>, NodeError> {
        let (tx, mut rx) = mpsc::channel(4);
        let route = self.route.clone();
        let wanted = ids.to_vec();
        self.runtime.block_on(async move {
            let reader = tokio::spawn(read::read(route, wanted, tx));
            let mut out = Vec::with_capacity(ids.len());
            while let Some(reply) = rx.recv().await {
                let reply = reply.map_err(|s| {
                    NodeError::Unavailable(format!("reading manifest objects: {}", s.message()))
                })?;
                for chunk in reply.chunks {
                    if chunk.fault != ChunkFault::None as i32 {
                        out.push(None);
                        continue;
                    }
                    out.push(Some(decode_verified(&chunk, self.max_plain_len)?.1));
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
            Ok(out)
        })
    }
}

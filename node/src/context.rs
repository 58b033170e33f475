//! What every service needs: the chunk store, the Raft handle, the shared catalog, and the
//! placement of the current cluster-map epoch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hashgrid_proto::chunker::ChunkerParams;
use hashgrid_proto::placement::{ClusterMap, Placement};
use hashgrid_proto::NodeId;

use crate::catalog::ClusterConfig;
use crate::chunk_store::ChunkStore;
use crate::error::NodeError;
use crate::raft::state_machine::SharedCatalog;
use crate::raft::Raft;

pub struct NodeContext {
    pub node_id: NodeId,
    pub store: Arc<ChunkStore>,
    pub raft: Raft,
    pub catalog: SharedCatalog,
    ready: AtomicBool,
    placement: Mutex<Option<Arc<Placement>>>,
}

impl NodeContext {
    pub fn new(
        node_id: NodeId,
        store: Arc<ChunkStore>,
        raft: Raft,
        catalog: SharedCatalog,
    ) -> Self {
        NodeContext {
            node_id,
            store,
            raft,
            catalog,
            ready: AtomicBool::new(false),
            placement: Mutex::new(None),
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The cluster config, or `NotReady` before the catalog has been initialized.
    pub fn config(&self) -> Result<ClusterConfig, NodeError> {
        if !self.is_ready() {
            return Err(NodeError::NotReady);
        }
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .clone()
            .ok_or(NodeError::NotReady)
    }

    pub fn chunker(&self) -> Result<ChunkerParams, NodeError> {
        Ok(self.config()?.chunker)
    }

    pub fn map(&self) -> Result<ClusterMap, NodeError> {
        Ok(self.config()?.map)
    }

    /// Placement for the current epoch, rebuilt only when the epoch changes.
    pub fn placement(&self) -> Result<Arc<Placement>, NodeError> {
        let map = self.map()?;
        let mut cached = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cached.as_ref().filter(|p| p.epoch() == map.epoch) {
            return Ok(p.clone());
        }
        let p = Arc::new(Placement::new(&map)?);
        *cached = Some(p.clone());
        Ok(p)
    }

    /// Refuses requests routed by an older map (agents refresh and retry). Epoch 0 means the
    /// caller does not route by the map (it sends everything to this node as coordinator).
    pub fn check_epoch(&self, sent: u64) -> Result<(), NodeError> {
        let current = self.placement()?.epoch();
        if sent != 0 && sent < current {
            return Err(NodeError::StaleEpoch { sent, current });
        }
        Ok(())
    }
}

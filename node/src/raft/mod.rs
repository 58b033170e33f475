//! The catalog's Raft group (openraft 0.9, storage v2) on RocksDB.
//!
//! One RocksDB instance (`<data>/raft`) holds the log (`raft_log`, `raft_meta`) and the state
//! machine (`sm_meta`, `sm_snapshots`, `sm_damage`). Log appends and state-machine applies are synced
//! writes, and `last_applied` is written in the same batch as the state it covers, so a
//! kill -9 at any point restarts into a consistent catalog. Our stores pass openraft's own
//! storage test suite (`store_tests`). Peers talk over the internal gRPC service
//! ([`network`], served by `service::peer`).

// The storage traits return openraft's `StorageError`, which is large; boxing it is not ours
// to choose.
#![allow(clippy::result_large_err)]

pub(crate) mod codec;
pub mod log_store;
pub mod network;
pub mod state_machine;
#[cfg(test)]
mod store_tests;

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use openraft::BasicNode;
use rocksdb::{ColumnFamilyDescriptor, Options, DB};

use crate::catalog::{Command, CommandResult};
use crate::config::NodeConfig;
pub use log_store::LogStore;
pub use state_machine::StateMachine;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        Node = BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;

const CF_LOG: &str = "raft_log";
const CF_META: &str = "raft_meta";
const CF_SM_META: &str = "sm_meta";
const CF_SM_SNAPSHOTS: &str = "sm_snapshots";
/// Verify's damage marks, by snapshot id: catalog state kept beside the immutable records.
const CF_SM_DAMAGE: &str = "sm_damage";

/// Opens the Raft database in `path`.
pub fn open_db(path: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs = [CF_LOG, CF_META, CF_SM_META, CF_SM_SNAPSHOTS, CF_SM_DAMAGE]
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    Ok(Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?))
}

/// This node's id: made once at first start and kept with the Raft state it belongs to.
pub fn node_id(db: &DB) -> Result<NodeId, rocksdb::Error> {
    let cf = db.cf_handle(CF_META).expect("cf opened in open_db");
    if let Some(v) = db.get_cf(cf, b"node_id")? {
        if let Ok(bytes) = <[u8; 8]>::try_from(v.as_slice()) {
            return Ok(u64::from_be_bytes(bytes));
        }
    }
    // Non-zero and below 2^53 so it survives JSON tooling unharmed.
    let id = rand::random::<u64>() % ((1 << 53) - 1) + 1;
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(cf, b"node_id", id.to_be_bytes());
    db.write_opt(batch, &sync)?;
    Ok(id)
}

/// Raft settings from the node's configuration. Heartbeat and election timeout are settings
/// because six nodes sharing two cores see heartbeats delayed by hundreds of milliseconds,
/// and an election timeout below that means spurious elections; snapshot transfers share the
/// peer deadline.
pub fn config(node: &NodeConfig) -> openraft::Config {
    openraft::Config {
        cluster_name: "hashgrid".into(),
        heartbeat_interval: node.raft_heartbeat_ms,
        // A follower of a known leader first waits out the leader's lease, which openraft
        // 0.9 makes as long as the longest election timeout, then a random timeout in this
        // range: a stopped leader is replaced after 2.5 to 3 times `raft_election_ms` (with
        // twice the minimum as the maximum it was 3 to 4 times, ~5 s in the tests). Half the
        // minimum of spread is ample to keep voters from splitting the vote.
        election_timeout_min: node.raft_election_ms,
        election_timeout_max: node.raft_election_ms * 3 / 2,
        install_snapshot_timeout: node.peer_timeout_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5000),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    }
}

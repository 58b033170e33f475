//! `hashgrid-node`: a storage node of a hashgrid cluster.
//!
//! Layers, bottom up: [`chunk_store`] (chunk metadata in RocksDB, bytes in [`pack`] files), [`catalog`] + [`raft`] (cluster
//! metadata replicated by openraft), [`context`] (what services share), [`owner`] (the
//! chunks this node owns) under [`coordinator`] (agent calls routed to the owners through
//! the one [`quorum`] helper), [`service`] (gRPC,
//! behind the auth hook), [`server`] (start, bootstrap, stop). [`config`] is the single source
//! of settings and defaults.

pub mod anti_entropy;
pub mod catalog;
pub mod chunk_store;
pub mod cluster_map;
pub mod commit_check;
pub mod commit_queue;
pub mod config;
pub mod context;
pub mod coordinator;
pub mod durable;
pub mod error;
pub mod manifest_walk;
pub mod membership;
pub mod metrics;
pub mod owner;
pub mod pack;
pub mod peer;
pub mod quorum;
pub mod raft;
pub mod server;
pub mod service;
pub mod verify;

pub use config::NodeConfig;
pub use server::run;

//! `hashgrid`: the backup agent and admin CLI, as a library the binary and tests share.
//!
//! Data path of a backup: [`backup`] walks and reads ([`backup::content`]), cuts with
//! [`chunker`], and hands chunks to [`upload`]; manifest objects go through [`objects`].
//! A restore ([`restore`]) reads manifests with [`objects`] and writes only through
//! [`restore::fs`]. [`connection`] holds the gRPC clients and fails over between seeds under the one retry
//! policy of [`retry`]; [`commands`] is the CLI.

pub mod arenas;
pub mod backup;
pub mod catalog;
pub mod chunker;
pub mod commands;
pub mod connection;
pub mod error;
pub mod local_node;
pub mod memory;
pub mod objects;
pub mod progress;
pub mod restore;
pub mod retry;
pub mod sample_data;
pub mod tree_cache;
pub mod treediff;
pub mod upload;
pub mod verify;

pub use connection::{ConnectOptions, Connection};
pub use error::{ClientError, Result};

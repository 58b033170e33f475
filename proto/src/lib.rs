//! The shared language of hashgrid agents and nodes.
//!
//! Everything two processes must agree on lives here and only here: the gRPC services and
//! messages ([`pb`]), chunk and snapshot ids ([`id`]), the manifest format ([`manifest`]), the
//! cluster map and the placement function ([`placement`]), the snapshot record kept in the
//! catalog ([`snapshot`]), how a bearer token is carried and hashed ([`auth`]), the chunker
//! parameters ([`chunker`]), the size bounds every request is checked against ([`limits`])
//! and the names of the files in a node's data directory that other programs read ([`data_dir`]).

pub mod auth;
pub mod chunker;
pub mod codec;
pub mod data_dir;
#[cfg(test)]
mod decode_props;
pub mod error;
pub mod id;
pub mod limits;
pub mod manifest;
pub mod placement;
pub mod snapshot;
pub mod status_meta;

pub use error::DecodeError;
pub use id::{ChunkId, NodeId, SnapshotId};

/// Generated code, nested as the protobuf packages are so that references between packages
/// (`hashgrid.peer.v1` uses `hashgrid.v1` messages) resolve.
mod generated {
    pub mod hashgrid {
        pub mod v1 {
            tonic::include_proto!("hashgrid.v1");
        }
        pub mod manifest {
            pub mod v1 {
                tonic::include_proto!("hashgrid.manifest.v1");
            }
        }
        pub mod peer {
            pub mod v1 {
                tonic::include_proto!("hashgrid.peer.v1");
            }
        }
    }
}

/// Generated protobuf and gRPC types. Convert to domain types at the edge with the `TryFrom`
/// impls in the modules above; nothing past the service layer should handle these directly.
pub mod pb {
    pub use crate::generated::hashgrid::v1::*;

    /// Manifest object messages (the on-chunk format, not a service).
    pub mod manifest {
        pub use crate::generated::hashgrid::manifest::v1::*;
    }

    /// The internal node-to-node service (see `proto/peer.proto` for its trust boundary).
    pub mod peer {
        pub use crate::generated::hashgrid::peer::v1::*;
    }
}

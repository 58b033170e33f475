//! The node's configuration: one struct, one source of defaults, printed by `--help`. With no
//! flags a node starts a one-node cluster on localhost with its data in `./hashgrid-data`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Clone, Debug, Parser)]
#[command(name = "hashgrid-node", version, about = "hashgrid storage node")]
pub struct NodeConfig {
    /// Where the node keeps its chunk store, Raft state and admin token.
    #[arg(long, env = "HASHGRID_DATA_DIR", default_value = "./hashgrid-data")]
    pub data_dir: PathBuf,

    /// Address the gRPC API listens on (port 0 picks a free port).
    #[arg(long, env = "HASHGRID_LISTEN", default_value = "127.0.0.1:7420")]
    pub listen: SocketAddr,

    /// Address other processes use to reach this node; defaults to the bound address.
    #[arg(long, env = "HASHGRID_ADVERTISE")]
    pub advertise: Option<String>,

    /// Prometheus metrics listener, or "off".
    #[arg(
        long,
        env = "HASHGRID_METRICS_LISTEN",
        default_value = "127.0.0.1:7421"
    )]
    pub metrics_listen: String,

    /// Failure zone of this node (rack, room, site); placement spreads replicas over zones.
    #[arg(long, env = "HASHGRID_ZONE", default_value = "default")]
    pub zone: String,

    /// Block cache for chunk metadata and indexes, in MiB.
    #[arg(long, env = "HASHGRID_CACHE_MIB", default_value_t = 256)]
    pub cache_mib: usize,
}

impl NodeConfig {
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, std::net::AddrParseError> {
        if self.metrics_listen == "off" {
            Ok(None)
        } else {
            self.metrics_listen.parse().map(Some)
        }
    }

    /// A config for tests and embedding: the defaults with another data dir and port 0.
    pub fn for_dir(data_dir: PathBuf) -> Self {
        let mut c = NodeConfig::parse_from(["hashgrid-node"]);
        c.data_dir = data_dir;
        c.listen = "127.0.0.1:0".parse().expect("literal address");
        c.metrics_listen = "off".into();
        c
    }
}

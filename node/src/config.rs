//! The node's configuration: one struct, one source of defaults, printed by `--help`. With no
//! flags a node starts a one-node cluster on localhost with its data in `./hashgrid-data`.
//!
//! Every setting can come from a flag, an environment variable (`HASHGRID_<NAME>`) or a TOML
//! file given with `--config` (keys are the flag names, `data-dir = "/srv/hashgrid"`), in
//! that order of precedence.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser};

#[derive(Clone, Debug, Parser)]
#[command(
    name = "hashgrid-node",
    version,
    about = "hashgrid storage node",
    args_override_self = true
)]
pub struct NodeConfig {
    /// TOML file with settings (keys are flag names); flags and environment win over it.
    #[arg(long, env = "HASHGRID_CONFIG")]
    pub config: Option<PathBuf>,

    /// Where the node keeps its chunk store, Raft state and admin token.
    #[arg(long, env = "HASHGRID_DATA_DIR", default_value = "./hashgrid-data")]
    pub data_dir: PathBuf,

    /// Address the gRPC API listens on (port 0 picks a free port).
    #[arg(long, env = "HASHGRID_LISTEN", default_value = "127.0.0.1:7420")]
    pub listen: SocketAddr,

    /// Address other processes use to reach this node; defaults to the bound address.
    #[arg(long, env = "HASHGRID_ADVERTISE")]
    pub advertise: Option<String>,

    /// Local address this node's calls to other members leave from (their source address);
    /// by default the system picks one. Useful on multi-homed hosts, and how the test
    /// harness tells the nodes apart behind a fault-injecting proxy.
    #[arg(long, env = "HASHGRID_DIAL_FROM")]
    pub dial_from: Option<IpAddr>,

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

    /// This node's share of the data relative to others (capacity).
    #[arg(long, env = "HASHGRID_WEIGHT", default_value_t = 1)]
    pub weight: u32,

    /// Block cache for chunk metadata and indexes, in MiB.
    #[arg(long, env = "HASHGRID_CACHE_MIB", default_value_t = 256)]
    pub cache_mib: usize,

    /// Join the cluster through these members (host:port, comma-separated) instead of
    /// creating a new one. Needed only on a node's first start: a member that restarts
    /// rejoins from its data directory.
    #[arg(long, env = "HASHGRID_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,

    /// File holding the cluster secret that authenticates node-to-node calls. A new cluster
    /// writes it to `<data-dir>/cluster.secret`; joiners must be given that file.
    #[arg(long, env = "HASHGRID_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,

    /// With `--join`: join as a standby that owns no data until `hashgrid node add ID`
    /// activates it (to add several nodes and move data once).
    #[arg(long, env = "HASHGRID_STANDBY")]
    pub standby: bool,

    /// Copies of every chunk (R), set when the cluster is created; change it later with
    /// `hashgrid cluster set`.
    #[arg(long, env = "HASHGRID_REPLICAS", default_value_t = 1)]
    pub replicas: u8,

    /// Copies a write waits for before it is acknowledged (W <= R), set when the cluster is
    /// created.
    #[arg(long, env = "HASHGRID_WRITE_QUORUM", default_value_t = 1)]
    pub write_quorum: u8,

    /// Raft heartbeat interval in milliseconds.
    #[arg(long, env = "HASHGRID_RAFT_HEARTBEAT_MS", default_value_t = 150)]
    pub raft_heartbeat_ms: u64,

    /// Raft election timeout in milliseconds: a follower that hears no leader starts an
    /// election after 2.5 to 3 times this (the leader's lease, 1.5 times this, then a random
    /// time between this and 1.5 times this), so a stopped leader is replaced in about 3 s
    /// by default. Keep it well above the heartbeat and above the worst scheduling delay of
    /// a busy machine.
    #[arg(long, env = "HASHGRID_RAFT_ELECTION_MS", default_value_t = 1000)]
    pub raft_election_ms: u64,

    /// Deadline of one node-to-node call in milliseconds; a peer that does not answer in
    /// time is treated as unreachable for that call.
    #[arg(long, env = "HASHGRID_PEER_TIMEOUT_MS", default_value_t = 5000)]
    pub peer_timeout_ms: u64,

    /// Most node-to-node calls this node has under way to a peer that is lagging (a call to
    /// it unanswered for a quarter of the peer timeout); further calls to it fail at once
    /// (and go to another member) until some end. Bounds what a peer that stopped answering
    /// holds of this node's memory until its calls run out of time.
    #[arg(long, env = "HASHGRID_PEER_MAX_CALLS", default_value_t = crate::peer::MAX_CALLS_PER_PEER)]
    pub peer_max_calls: usize,

    /// Seconds between repair passes, in which this node compares each partition it owns
    /// with the partition's other owners and copies what it lacks. A pass also runs soon
    /// after the node starts. 0 turns repair off (for tests of other mechanisms; a node
    /// without repair does not heal).
    #[arg(long, env = "HASHGRID_REPAIR_INTERVAL_SECS", default_value_t = 600)]
    pub repair_interval_secs: u64,

    /// Most chunk data, in MiB per second (fractions allowed), that this node's background
    /// workers move: the partitions it pulls while the cluster rebalances or repairs, and
    /// the copies it hands off, together. 0 (the default) sets no limit. Copies a backup or
    /// restore waits on (a lookup or commit check repairing a chunk) are never held back.
    #[arg(long, env = "HASHGRID_MOVE_MIB_PER_SEC", default_value_t = 0.0)]
    pub move_mib_per_sec: f64,
}

/// The smallest move limit taken: 1 KiB/s.
const MIN_MOVE_MIB_PER_SEC: f64 = 1.0 / 1024.0;

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error(transparent)]
    Args(#[from] clap::Error),
}

impl NodeConfig {
    /// Parses flags, environment and the `--config` file, in that order of precedence.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    pub fn load_from(args: impl IntoIterator<Item = OsString>) -> Result<Self, ConfigError> {
        let args: Vec<OsString> = args.into_iter().collect();
        let first = NodeConfig::try_parse_from(&args)?;
        let Some(path) = first.config.clone() else {
            return first.validate();
        };
        // File settings become leading flags, so later (real) flags override them; a key
        // given as a flag, or whose environment variable is set, is left out, so flags and
        // the environment win for lists too (a `--join` replaces the file's `join` list
        // rather than adding to it).
        let given = flags_given(&args);
        let mut merged = vec![args
            .first()
            .cloned()
            .unwrap_or_else(|| "hashgrid-node".into())];
        merged.extend(file_args(&path, &given)?);
        merged.extend(args.into_iter().skip(1));
        NodeConfig::try_parse_from(merged)?.validate()
    }

    fn validate(self) -> Result<Self, ConfigError> {
        let bad = |msg: String| {
            Err(ConfigError::Args(
                NodeConfig::command().error(clap::error::ErrorKind::ValueValidation, msg),
            ))
        };
        if self.replicas == 0 || self.write_quorum == 0 || self.write_quorum > self.replicas {
            return bad(format!(
                "need 1 <= --write-quorum ({}) <= --replicas ({})",
                self.write_quorum, self.replicas
            ));
        }
        if self.weight == 0 {
            return bad("--weight must be at least 1".into());
        }
        // A limit below MIN_MOVE_MIB_PER_SEC is refused rather than rounded: it would stall a
        // move for days (or, rounded to 0 bytes, lift the limit altogether).
        let m = self.move_mib_per_sec;
        if !(m.is_finite() && (m == 0.0 || m >= MIN_MOVE_MIB_PER_SEC)) {
            return bad(format!(
                "--move-mib-per-sec must be 0 (no limit) or at least {MIN_MOVE_MIB_PER_SEC} \
                 (1 KiB/s), not {m}"
            ));
        }
        if self.raft_election_ms < 3 * self.raft_heartbeat_ms {
            return bad(format!(
                "--raft-election-ms ({}) must be at least three heartbeats ({} ms each)",
                self.raft_election_ms, self.raft_heartbeat_ms
            ));
        }
        Ok(self)
    }

    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, std::net::AddrParseError> {
        if self.metrics_listen == "off" {
            Ok(None)
        } else {
            self.metrics_listen.parse().map(Some)
        }
    }

    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }

    /// The workers' move limit in bytes per second (0: none).
    pub fn move_limit(&self) -> u64 {
        (self.move_mib_per_sec * 1024.0 * 1024.0) as u64
    }

    /// `None` when repair is off.
    pub fn repair_interval(&self) -> Option<Duration> {
        (self.repair_interval_secs > 0).then(|| Duration::from_secs(self.repair_interval_secs))
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

/// The long flags on the command line (`--join a --join=b` gives `join` twice).
fn flags_given(args: &[OsString]) -> Vec<String> {
    args.iter()
        .skip(1)
        .filter_map(|a| a.to_str()?.strip_prefix("--"))
        .map(|flag| flag.split('=').next().unwrap_or(flag).to_string())
        .collect()
}

/// The settings of the TOML file at `path` as `--key value` flags, leaving out the keys in
/// `given` (set by flags) and those whose environment variable is set.
fn file_args(path: &Path, given: &[String]) -> Result<Vec<OsString>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Invalid {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    let known: Vec<String> = NodeConfig::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let mut out = Vec::new();
    for (key, value) in table {
        if !known.contains(&key) || key == "config" {
            return Err(ConfigError::Invalid {
                path: shown,
                reason: format!("unknown setting {key:?} (use the flag names of --help)"),
            });
        }
        let env = format!("HASHGRID_{}", key.to_uppercase().replace('-', "_"));
        if given.contains(&key) || std::env::var_os(&env).is_some() {
            continue;
        }
        let values: Vec<String> = match value {
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Option<_>>(),
            other => scalar(&other).map(|v| vec![v]),
        }
        .ok_or_else(|| ConfigError::Invalid {
            path: shown.clone(),
            reason: format!("{key}: expected a string, number, boolean or a list of them"),
        })?;
        for v in values {
            out.push(format!("--{key}").into());
            out.push(v.into());
        }
    }
    Ok(out)
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<NodeConfig, ConfigError> {
        NodeConfig::load_from(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults_are_a_one_node_cluster() {
        let c = load(&["hashgrid-node"]).unwrap();
        assert!(c.join.is_empty());
        assert_eq!((c.replicas, c.write_quorum), (1, 1));
    }

    #[test]
    fn config_file_fills_in_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "join = [\"a:7420\", \"b:7420\"]\nzone = \"rack-2\"\ncache-mib = 64\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = load(&["hashgrid-node", "--config", f, "--zone", "rack-9"]).unwrap();
        assert_eq!(c.join, vec!["a:7420", "b:7420"]);
        assert_eq!(c.zone, "rack-9");
        assert_eq!(c.cache_mib, 64);
        // A list given by flags replaces the file's, as a single value does.
        let c = load(&["hashgrid-node", "--config", f, "--join", "c:7420"]).unwrap();
        assert_eq!(c.join, vec!["c:7420"]);
        let c = load(&["hashgrid-node", "--join=d:7420", "--config", f]).unwrap();
        assert_eq!(c.join, vec!["d:7420"]);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(load(&["hashgrid-node", "--replicas", "2", "--write-quorum", "3"]).is_err());
        assert!(load(&["hashgrid-node", "--raft-heartbeat-ms", "500"]).is_err());
        assert!(load(&["hashgrid-node", "--move-mib-per-sec=-1"]).is_err());
        assert!(load(&["hashgrid-node", "--move-mib-per-sec", "NaN"]).is_err());
        assert!(load(&["hashgrid-node", "--move-mib-per-sec", "0.0000001"]).is_err());
        let c = load(&["hashgrid-node", "--move-mib-per-sec", "0.0009765625"]).unwrap();
        assert_eq!(c.move_limit(), 1024);
        let c = load(&["hashgrid-node", "--move-mib-per-sec", "0.5"]).unwrap();
        assert_eq!(c.move_limit(), 512 * 1024);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "no-such-setting = 1\n").unwrap();
        assert!(matches!(
            load(&["hashgrid-node", "--config", file.to_str().unwrap()]),
            Err(ConfigError::Invalid { .. })
        ));
    }
}

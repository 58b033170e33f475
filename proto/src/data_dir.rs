//! Files a node keeps in its data directory that other programs read: the agent's and the
//! admin CLI's defaults, the test harness, the demo and the benchmarks find a local node's
//! address, token and secret through these names, so the node and its readers share them here.

/// The address the node serves gRPC on, written (by rename) once the node is ready.
pub const ADDR_FILE: &str = "node.addr";
/// The address the node serves Prometheus metrics on, written before [`ADDR_FILE`] when
/// `--metrics-listen` is on: `--metrics-listen 127.0.0.1:0` picks a free port, and this file
/// says which (a port found free by another process and then released can be taken before
/// the node binds it).
pub const METRICS_ADDR_FILE: &str = "metrics.addr";
/// The admin token made when the node created its cluster (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The cluster secret node-to-node calls carry (mode 0600); joiners are given a copy.
pub const CLUSTER_SECRET_FILE: &str = "cluster.secret";

//! Several `hashgrid-node` processes forming one cluster, for the multi-node tests.
//!
//! Settings fit six nodes on two cores: small caches and Raft timeouts well above the
//! scheduling delays a loaded machine shows, so no test sees a spurious election. Tests that
//! start clusters hold [`Cluster::serial`]'s lock, so they run one at a time even when the
//! test harness runs tests in parallel threads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashgrid::Connection;
use hashgrid_proto::pb::{self, StatusRequest, StatusResponse};
use hashgrid_proto::NodeId;

use crate::fault_proxy::FaultNet;
use crate::{Node, NodeOpts};

/// Settings every cluster-test node gets.
pub const TEST_NODE_ARGS: [&str; 8] = [
    "--cache-mib",
    "32",
    "--raft-heartbeat-ms",
    "200",
    "--raft-election-ms",
    "1500",
    "--peer-timeout-ms",
    "3000",
];

/// The peer deadline [`TEST_NODE_ARGS`] gives the nodes.
pub fn test_peer_timeout() -> Duration {
    let at = TEST_NODE_ARGS
        .iter()
        .position(|a| *a == "--peer-timeout-ms")
        .expect("a peer deadline in the test flags");
    Duration::from_millis(TEST_NODE_ARGS[at + 1].parse().expect("milliseconds"))
}

static SERIAL: Mutex<()> = Mutex::new(());

pub struct Cluster {
    pub root: PathBuf,
    pub nodes: Vec<Node>,
    /// Flags every node of this cluster gets after [`TEST_NODE_ARGS`].
    extra: Vec<String>,
    /// The fault proxies between the nodes, for a cluster made by [`Cluster::start_proxied`].
    pub net: Option<FaultNet>,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Holds the one-cluster-at-a-time lock (a failed test poisons nothing for the others).
    fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `n` nodes under `root`: the first creates the cluster with R = `replicas`
    /// and W = `write_quorum`, the others join through it at once; returns when every
    /// node is ready.
    pub fn start(root: &Path, n: usize, replicas: u8, write_quorum: u8) -> Cluster {
        Self::launch(root, n, replicas, write_quorum, &[], None)
    }

    /// [`Cluster::start`] with more flags for every node (now and added later), e.g. a
    /// short `--repair-interval-secs`.
    pub fn start_with(
        root: &Path,
        n: usize,
        replicas: u8,
        write_quorum: u8,
        extra: &[&str],
    ) -> Cluster {
        Self::launch(root, n, replicas, write_quorum, extra, None)
    }

    /// [`Cluster::start`] with every node behind its own fault proxy ([`FaultNet`], in
    /// [`Cluster::net`]), so the test can partition the nodes. Agents still reach every
    /// node: `Node::addr` is the proxy's address, and the test's connections are never cut.
    /// Each node serves Prometheus metrics on its own loopback address.
    pub fn start_proxied(root: &Path, n: usize, replicas: u8, write_quorum: u8) -> Cluster {
        let net = FaultNet::new().expect("fault proxy runtime");
        Self::launch(root, n, replicas, write_quorum, &[], Some(net))
    }

    fn launch(
        root: &Path,
        n: usize,
        replicas: u8,
        write_quorum: u8,
        extra: &[&str],
        net: Option<FaultNet>,
    ) -> Cluster {
        let mut cluster = Cluster {
            root: root.to_path_buf(),
            nodes: vec![],
            extra: extra.iter().map(|s| s.to_string()).collect(),
            net,
            _serial: Self::serial(),
        };
        let first = NodeOpts {
            replicas: Some(replicas),
            write_quorum: Some(write_quorum),
            ..cluster.node_opts()
        };
        let first = Node::start_with(&root.join("n1"), first);
        cluster.nodes.push(first);
        let mut joiners: Vec<Node> = (2..=n).map(|i| cluster.spawn_joiner(i, &[])).collect();
        for j in &mut joiners {
            j.wait_ready();
        }
        cluster.nodes.extend(joiners);
        cluster
    }

    /// The settings of the next node: the test settings and this cluster's extra flags,
    /// and its addresses when the cluster runs behind fault proxies.
    fn node_opts(&mut self) -> NodeOpts {
        let mut extra = TEST_NODE_ARGS.map(String::from).to_vec();
        extra.extend(self.extra.iter().cloned());
        let mut opts = NodeOpts {
            extra,
            ..Default::default()
        };
        if let Some(net) = &mut self.net {
            let addrs = net.add_node().expect("fault proxy for a node");
            opts.listen = Some(addrs.listen);
            opts.advertise = Some(addrs.advertise);
            opts.dial_from = Some(addrs.ip);
            // On the node's own loopback address; the node picks the port.
            opts.metrics_listen = Some(SocketAddr::new(addrs.ip, 0));
        } else {
            opts.metrics_listen = Some(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)));
        }
        opts
    }

    fn spawn_joiner(&mut self, i: usize, more: &[&str]) -> Node {
        // Through a running member (the first may have been stopped by the test).
        let seed = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a running member to join through")
            .addr
            .clone();
        let mut opts = NodeOpts {
            join: vec![seed],
            secret_file: Some(self.nodes[0].secret_file()),
            ..self.node_opts()
        };
        opts.extra.extend(more.iter().map(|a| a.to_string()));
        Node::spawn_with(&self.root.join(format!("n{i}")), opts)
    }

    /// Starts one more node that joins through a running member, without waiting for it
    /// (it is admitted while the test goes on); [`Cluster::nodes`] lists it at once.
    pub fn spawn_node(&mut self) -> usize {
        let node = self.spawn_joiner(self.nodes.len() + 1, &[]);
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Starts one more node that joins through a running member; returns its index once
    /// it is ready.
    pub fn add_node(&mut self) -> usize {
        self.add_node_with(&[])
    }

    /// [`Cluster::add_node`] with more flags for the new node only (`--standby`).
    pub fn add_node_with(&mut self, more: &[&str]) -> usize {
        let mut node = self.spawn_joiner(self.nodes.len() + 1, more);
        node.wait_ready();
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    pub async fn connect(&self, i: usize) -> Connection {
        Connection::connect(&self.nodes[i].connect_options_with(self.token()))
            .await
            .expect("connect")
    }

    /// The admin token (made by the first node).
    pub fn token(&self) -> String {
        self.nodes[0].token()
    }

    /// Runs the CLI through node `i` with the admin token.
    pub fn cli(&self, i: usize, args: &[&str]) -> std::process::Output {
        self.nodes[i].cli_as(&self.nodes[0].token_file(), args, |_| {})
    }

    /// [`Cluster::cli`] with `--json`: asserts success and parses the output.
    pub fn cli_json(&self, i: usize, args: &[&str]) -> serde_json::Value {
        self.nodes[i].cli_json_as(&self.nodes[0].token_file(), args)
    }

    /// Node `i`'s status, or `None` when it does not answer within 3 s.
    pub async fn status(&self, i: usize) -> Option<StatusResponse> {
        let conn = tokio::time::timeout(Duration::from_secs(3), self.connect_quick(i)).await;
        let mut admin = conn.ok()??.admin;
        tokio::time::timeout(Duration::from_secs(3), admin.status(StatusRequest {}))
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner())
    }

    pub async fn connect_quick(&self, i: usize) -> Option<Connection> {
        Connection::connect(&self.nodes[i].connect_options_with(self.token()))
            .await
            .ok()
    }

    /// The node id of node `i` (from its status).
    pub async fn node_id(&self, i: usize) -> NodeId {
        self.status(i).await.expect("status").node_id
    }

    /// The node ids of every node, in order.
    pub async fn node_ids(&self) -> Vec<NodeId> {
        let mut ids = Vec::with_capacity(self.nodes.len());
        for i in 0..self.nodes.len() {
            ids.push(self.node_id(i).await);
        }
        ids
    }

    /// The index of the node that leads the catalog group, as the running nodes agree.
    pub async fn leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_running() {
                ids.push((i, self.status(i).await));
            }
        }
        let leader = ids
            .iter()
            .find_map(|(_, s)| s.as_ref().map(|s| s.raft_leader))?;
        for (i, s) in &ids {
            if s.as_ref().is_some_and(|s| s.node_id == leader) {
                return Some(*i);
            }
        }
        None
    }

    /// Polls `cond` (with the status of every running node that answers) until it holds,
    /// or panics after `timeout` with the node logs' tails.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&[StatusResponse]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = Vec::new();
            for i in 0..self.nodes.len() {
                if self.nodes[i].is_running() {
                    if let Some(s) = self.status(i).await {
                        all.push(s);
                    }
                }
            }
            if cond(&all) {
                return;
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("{what}: not reached within {timeout:?}; last statuses: {all:#?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Prints the tail of every node's log (for a failing test).
    pub fn dump_logs(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            let log = n.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "----- node {} ({}) -----\n{}",
                i + 1,
                n.addr,
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
    }
}

/// Extra node flags for tests that wait for repair: a pass every 2 s, not every 600.
pub const FAST_REPAIR: [&str; 2] = ["--repair-interval-secs", "2"];

/// The members of a `cluster status --json`.
pub fn status_members(s: &serde_json::Value) -> &Vec<serde_json::Value> {
    s["members"].as_array().expect("members")
}

impl Cluster {
    /// `hashgrid cluster status --json` through node `via`.
    pub fn status_json(&self, via: usize) -> serde_json::Value {
        self.cli_json(via, &["cluster", "status"])
    }

    /// Waits (up to `within`) until the cluster is quiet, as `cluster status --json` through
    /// node `via` shows it: no partition moving, nothing under-replicated or awaiting
    /// hand-off, every member that should answer answering with idle workers that have run
    /// a pass (a repair worker owed a pass shows `due`, not idle), and `cond` true of the
    /// status. Returns that status; panics with the nodes' logs when it does not come.
    pub fn wait_quiet(
        &self,
        via: usize,
        what: &str,
        within: Duration,
        mut cond: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_status(via, what, within, |s| {
            let quiet = s["moving"] == 0
                && s["under_replicated"] == 0
                && s["hand_off_pending"] == 0
                && status_members(s).iter().all(|m| {
                    m["map_state"] == "removed"
                        || (m["state"] != "down"
                            && m["workers"].as_array().is_some_and(|w| {
                                w.iter()
                                    .all(|w| w["state"] == "idle" && w["passes"].as_u64() > Some(0))
                            }))
                });
            quiet && cond(s)
        })
    }

    /// Waits (up to `within`) until `cond` is true of `cluster status --json` through node
    /// `via`, asking every 500 ms; returns that status, or panics with the nodes' logs.
    pub fn wait_status(
        &self,
        via: usize,
        what: &str,
        within: Duration,
        mut cond: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status_json(via);
            if cond(&s) {
                return s;
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("{what}: not reached within {within:?}; last status:\n{s:#}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Members of a status's map in `state`.
pub fn members_in(status: &StatusResponse, state: pb::MemberState) -> Vec<NodeId> {
    status
        .map
        .as_ref()
        .map(|m| {
            m.members
                .iter()
                .filter(|x| x.state == state as i32)
                .map(|x| x.id)
                .collect()
        })
        .unwrap_or_default()
}

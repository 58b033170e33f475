//! Harness for tests against real processes: `hashgrid-node` servers in temporary
//! directories on free ports, the `hashgrid` CLI, and generators for test data.
//!
//! Binaries are taken from `HASHGRID_BIN_DIR`, or from the Cargo target directory this test
//! runs from (`cargo test --workspace` builds them). Each node keeps its log in its directory;
//! a failing test prints it.

pub mod cluster;
pub mod damage;
pub mod data;
pub mod fault_proxy;
pub mod manifests;

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use hashgrid::backup::{BackupOptions, ParentChoice};
use hashgrid::local_node::LocalNode;
use hashgrid::restore::{restore, RestoreOptions, RestoreSummary};
use hashgrid::treediff::{diff_trees, Compare};
use hashgrid::{ConnectOptions, Connection};
use hashgrid_proto::SnapshotId;

/// Directory holding `hashgrid-node` and `hashgrid`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HASHGRID_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary under target/<profile>/deps")
        .to_path_buf();
    for b in ["hashgrid-node", "hashgrid"] {
        assert!(
            dir.join(b).is_file(),
            "{} not found in {}: run `cargo build --workspace` (or `cargo test --workspace`), or set HASHGRID_BIN_DIR",
            b,
            dir.display()
        );
    }
    dir
}

/// How to start a node. `Default` is a node that creates its own one-node cluster.
#[derive(Clone, Debug, Default)]
pub struct NodeOpts {
    /// Members to join through (their `host:port`); empty creates a new cluster.
    pub join: Vec<String>,
    /// The cluster secret file joiners need (a member's `data/cluster.secret`).
    pub secret_file: Option<PathBuf>,
    pub replicas: Option<u8>,
    pub write_quorum: Option<u8>,
    pub zone: Option<String>,
    /// Anything else, e.g. `["--cache-mib", "32"]`.
    pub extra: Vec<String>,
    /// The umask the node process (and its restarts) starts with, when not the harness's.
    pub umask: Option<u32>,
    /// Where the node listens, when not a free port on 127.0.0.1 (restarts keep it).
    pub listen: Option<SocketAddr>,
    /// The address the node gives the others (`--advertise`), e.g. its fault proxy's.
    pub advertise: Option<SocketAddr>,
    /// The local address its calls to other nodes leave from (`--dial-from`).
    pub dial_from: Option<IpAddr>,
    /// Where it serves Prometheus metrics (`--metrics-listen`, port 0 for one the node picks:
    /// [`Node::metric`] reads which); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
}

impl NodeOpts {
    fn args(&self, listen: &str) -> Vec<OsString> {
        let mut a: Vec<String> = vec![
            "--listen".into(),
            listen.into(),
            "--metrics-listen".into(),
            self.metrics_listen
                .map_or_else(|| "off".into(), |a| a.to_string()),
        ];
        for seed in &self.join {
            a.extend(["--join".into(), seed.clone()]);
        }
        if let Some(f) = &self.secret_file {
            a.extend(["--cluster-secret-file".into(), f.display().to_string()]);
        }
        if let Some(r) = self.replicas {
            a.extend(["--replicas".into(), r.to_string()]);
        }
        if let Some(w) = self.write_quorum {
            a.extend(["--write-quorum".into(), w.to_string()]);
        }
        if let Some(z) = &self.zone {
            a.extend(["--zone".into(), z.clone()]);
        }
        if let Some(addr) = self.advertise {
            a.extend(["--advertise".into(), addr.to_string()]);
        }
        if let Some(ip) = self.dial_from {
            a.extend(["--dial-from".into(), ip.to_string()]);
        }
        a.extend(self.extra.iter().cloned());
        a.into_iter().map(OsString::from).collect()
    }
}

/// A `hashgrid-node` process with its own data directory (`<dir>/data`) and log
/// (`<dir>/node.log`), started through the one harness every test, the demo and the
/// benchmarks use ([`hashgrid::local_node`]).
pub struct Node {
    pub dir: PathBuf,
    pub addr: String,
    opts: NodeOpts,
    process: LocalNode,
}

/// How long a node may take to become ready (join included) before a test fails.
const READY: Duration = Duration::from_secs(90);

impl Node {
    /// Starts a node in `dir` on a free port and waits until it is ready.
    pub fn start(dir: &Path) -> Node {
        Node::start_with(dir, NodeOpts::default())
    }

    /// [`Node::start`] with the node process (and its restarts) under `umask`.
    pub fn start_with_umask(dir: &Path, umask: u32) -> Node {
        Node::start_with(
            dir,
            NodeOpts {
                umask: Some(umask),
                ..Default::default()
            },
        )
    }

    /// Starts a node with `opts` and waits until it is ready.
    pub fn start_with(dir: &Path, opts: NodeOpts) -> Node {
        let mut node = Node::spawn_with(dir, opts);
        node.wait_ready();
        node
    }

    /// Starts a node without waiting (several joiners at once); call [`Node::wait_ready`].
    pub fn spawn_with(dir: &Path, opts: NodeOpts) -> Node {
        std::fs::create_dir_all(dir).expect("node dir");
        let listen = opts
            .listen
            .map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
        let process = LocalNode::spawn(
            &bin_dir().join("hashgrid-node"),
            &dir.join("data"),
            &dir.join("node.log"),
            opts.args(&listen),
            opts.umask,
        )
        .expect("spawn hashgrid-node");
        Node {
            dir: dir.to_path_buf(),
            addr: String::new(),
            opts,
            process,
        }
    }

    pub fn wait_ready(&mut self) {
        match self.process.wait_ready(READY) {
            Ok(addr) => self.addr = addr.to_string(),
            Err(e) => panic!("{e}"),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.join("data/admin.token")
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.token_file())
            .expect("admin token")
            .trim()
            .to_string()
    }

    pub fn server(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn secret_file(&self) -> PathBuf {
        self.process.cluster_secret_file()
    }

    /// The cluster secret this node holds.
    pub fn secret(&self) -> String {
        std::fs::read_to_string(self.secret_file())
            .expect("cluster secret")
            .trim()
            .to_string()
    }

    /// Which of `ids` this node's own store holds (not the cluster's answer: no other owner
    /// is asked), through the node-to-node service, presenting `secret` as the cluster
    /// secret (none when `None`) and `token` as an agent's bearer token (none when `None`).
    /// Asked [`MAX_IDS_PER_REQUEST`](hashgrid_proto::limits::MAX_IDS_PER_REQUEST) ids per
    /// call, the most the node accepts in one.
    pub async fn owner_has(
        &self,
        ids: &[hashgrid_proto::ChunkId],
        secret: Option<&str>,
        token: Option<&str>,
    ) -> Result<Vec<bool>, tonic::Status> {
        use hashgrid_proto::auth;
        use hashgrid_proto::limits::MAX_IDS_PER_REQUEST;
        use hashgrid_proto::pb::peer::peer_client::PeerClient;
        let mut peer = PeerClient::connect(self.server())
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?
            .max_decoding_message_size(usize::MAX);
        let mut held = Vec::with_capacity(ids.len());
        // At least one call, so that an empty list still tests the credentials.
        let parts: Vec<&[hashgrid_proto::ChunkId]> = if ids.is_empty() {
            vec![ids]
        } else {
            ids.chunks(MAX_IDS_PER_REQUEST).collect()
        };
        for part in parts {
            let mut req = tonic::Request::new(hashgrid_proto::pb::HasRequest {
                epoch: 0,
                ids: part.iter().flat_map(|id| *id.as_bytes()).collect(),
            });
            if let Some(s) = secret {
                req.metadata_mut()
                    .insert(auth::CLUSTER_SECRET_KEY, s.parse().expect("ascii secret"));
            }
            if let Some(t) = token {
                let bearer = auth::bearer_value(t);
                req.metadata_mut()
                    .insert(auth::METADATA_KEY, bearer.parse().expect("ascii token"));
            }
            let present = peer.owner_has(req).await?.into_inner().present;
            held.extend(
                (0..part.len())
                    .map(|i| present.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)),
            );
        }
        Ok(held)
    }

    pub fn pid(&self) -> i32 {
        self.process.pid().expect("running")
    }

    /// The sum of every series of the Prometheus metric `name` the node serves (all label
    /// sets), `None` when it serves none. Needs [`NodeOpts::metrics_listen`].
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metric_with(name, "")
    }

    /// As [`Self::metric`], over the series whose labels include `label` (`state="active"`).
    pub fn metric_with(&self, name: &str, label: &str) -> Option<f64> {
        assert!(
            self.opts.metrics_listen.is_some(),
            "a node with a metrics listener"
        );
        let addr = self
            .process
            .metrics_addr()
            .expect("the node's metrics address (is it ready?)");
        let text = scrape(addr).unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
        metric_sum(&text, name, label)
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// kill -9, then wait for the process to be gone.
    pub fn kill9(&mut self) {
        self.process.kill().expect("kill node");
    }

    /// SIGSTOP: the process hangs (holds its sockets, answers nothing).
    pub fn pause(&self) {
        self.process
            .signal(rustix::process::Signal::STOP)
            .expect("SIGSTOP");
    }

    pub fn resume(&self) {
        self.process
            .signal(rustix::process::Signal::CONT)
            .expect("SIGCONT");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        let status = self.process.stop().expect("stop node");
        assert!(
            status.is_none_or(|s| s.success()),
            "node exited with {status:?}:\n{}",
            self.log()
        );
    }

    /// Starts the node again on the same address with the same data; waits until ready.
    pub fn restart(&mut self) {
        assert!(!self.process.is_running(), "stop or kill the node first");
        // `addr` is the advertised address, the listening one unless a proxy stands between.
        let listen = self
            .opts
            .listen
            .map_or_else(|| self.addr.clone(), |a| a.to_string());
        let args = self.opts.args(&listen);
        self.process.restart(Some(args)).expect("restart node");
        self.wait_ready();
    }

    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions::new(self.server(), self.token())
    }

    /// Options for this node with a token from elsewhere (joiners keep no admin token).
    pub fn connect_options_with(&self, token: String) -> ConnectOptions {
        ConnectOptions::new(self.server(), token)
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.connect_options())
            .await
            .expect("connect to node")
    }

    /// Runs the `hashgrid` CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with(args, |_| {})
    }

    pub fn cli_with(&self, args: &[&str], tweak: impl FnOnce(&mut Command)) -> Output {
        self.cli_as(&self.token_file(), args, tweak)
    }

    /// Runs the CLI against this node with the token in `token_file` (a joiner has no
    /// token file of its own: pass the first node's).
    pub fn cli_as(
        &self,
        token_file: &Path,
        args: &[&str],
        tweak: impl FnOnce(&mut Command),
    ) -> Output {
        let mut cmd = Command::new(bin_dir().join("hashgrid"));
        cmd.args(["--server", &self.server()])
            .arg("--token-file")
            .arg(token_file)
            .args(args)
            .env_remove("HASHGRID_TOKEN")
            // The agent's tree cache stays with the node's files, not in $HOME.
            .env("HASHGRID_CACHE_DIR", self.dir.join("agent-cache"));
        tweak(&mut cmd);
        cmd.output().expect("run hashgrid")
    }

    /// Runs the CLI with `--json`, asserts success, and parses the last stdout line.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        self.cli_json_as(&self.token_file(), args)
    }

    /// [`Node::cli_json`] with the token in `token_file`.
    pub fn cli_json_as(&self, token_file: &Path, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli_as(token_file, &all, |_| {});
        assert_success(&out, &format!("hashgrid {args:?}"));
        let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
        serde_json::from_str(stdout.lines().last().expect("some output")).expect("json output")
    }
}

/// Asserts that a CLI run succeeded; prints its output when it did not.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A multi-thread Tokio runtime for one test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Bytes actually allocated on disk for `path`.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Backup options for tests: the parent is the latest snapshot, no progress display.
pub fn backup_opts(paths: &[&Path], image: bool, client: &str, dataset: &str) -> BackupOptions {
    BackupOptions {
        paths: paths.iter().map(|p| p.to_path_buf()).collect(),
        image,
        client: client.into(),
        dataset: dataset.into(),
        tags: vec![],
        parent: ParentChoice::Latest,
        hostname: "test-host".into(),
        zstd_level: hashgrid_proto::codec::DEFAULT_ZSTD_LEVEL,
        progress: false,
        tree_part_bytes: hashgrid_proto::limits::TREE_PART_BYTES,
        memory: Default::default(),
        tree_cache: None,
    }
}

/// Restores snapshot `id` (all of it) into `target`.
pub async fn restore_all(conn: &Connection, id: SnapshotId, target: &Path) -> RestoreSummary {
    let snap = hashgrid::catalog::get(conn, id).await.expect("snapshot");
    restore(
        conn,
        &snap,
        &RestoreOptions {
            target: target.to_path_buf(),
            paths: vec![],
            progress: false,
            ..Default::default()
        },
    )
    .await
    .expect("restore")
}

/// Where a backed-up source directory lands inside a restore target (file-level snapshots
/// keep absolute paths).
pub fn restored(target: &Path, src: &Path) -> PathBuf {
    target.join(src.strip_prefix("/").expect("absolute source"))
}

/// Asserts that two trees are identical in content and metadata.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let diffs = diff_trees(expected, actual, Compare::ALL).expect("compare trees");
    assert!(
        diffs.is_empty(),
        "{} differs from {}:\n{}",
        actual.display(),
        expected.display(),
        diffs.join("\n")
    );
}

/// The cluster's statistics (chunks, bytes, snapshots).
pub async fn cluster_stats(conn: &Connection) -> hashgrid_proto::pb::StatsResponse {
    conn.admin
        .clone()
        .stats(hashgrid_proto::pb::StatsRequest::default())
        .await
        .expect("stats")
        .into_inner()
}

/// Sends `chunks` in one `Put` batch and returns the node's reply to it.
pub async fn put_chunks(
    conn: &Connection,
    chunks: Vec<hashgrid_proto::pb::Chunk>,
) -> Result<hashgrid_proto::pb::PutResponse, tonic::Status> {
    let mut replies = conn
        .chunks
        .clone()
        .put(futures::stream::iter(vec![
            hashgrid_proto::pb::PutRequest {
                epoch: conn.epoch(),
                chunks,
            },
        ]))
        .await?
        .into_inner();
    replies
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("no reply"))
}

/// Asks the node behind `conn` which of `ids` are present (the agent's `Has`).
pub async fn has_chunks(
    conn: &Connection,
    ids: &[hashgrid_proto::ChunkId],
) -> Result<Vec<bool>, tonic::Status> {
    let reply = conn
        .chunks
        .clone()
        .has(hashgrid_proto::pb::HasRequest {
            epoch: conn.epoch(),
            ids: hashgrid_proto::id::pack_ids(ids),
        })
        .await?
        .into_inner();
    Ok(hashgrid_proto::id::from_bitmap(&reply.present, ids.len()))
}

/// Every chunk of one `Get` of `ids` through the node behind `conn`, as it answers them.
pub async fn get_chunks(
    conn: &Connection,
    ids: &[hashgrid_proto::ChunkId],
) -> Result<Vec<hashgrid_proto::pb::Chunk>, tonic::Status> {
    let mut stream = conn
        .chunks
        .clone()
        .get(hashgrid_proto::pb::GetRequest {
            epoch: conn.epoch(),
            ids: hashgrid_proto::id::pack_ids(ids),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend(msg.chunks);
    }
    Ok(out)
}

/// A size-limited tmpfs mounted for a test (a disk that fills up), unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts `size_mib` MiB at `path` (created if missing). `None` when not root: mounting
    /// needs it, and the caller says the test was skipped.
    pub fn mount(path: &Path, size_mib: u64) -> Option<Tmpfs> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        std::fs::create_dir_all(path).expect("mount point");
        run_mount(
            &["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"],
            path,
        );
        Some(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Grows (or shrinks) the filesystem in place, as an operator adding capacity would.
    pub fn resize(&self, size_mib: u64) {
        run_mount(&["-o", &format!("remount,size={size_mib}m")], &self.path);
    }
}

fn run_mount(args: &[&str], path: &Path) {
    let status = Command::new("mount")
        .args(args)
        .arg(path)
        .status()
        .expect("run mount");
    assert!(status.success(), "mount {args:?} {} failed", path.display());
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A finished process watched while it ran: its output and its peaks.
pub struct Watched {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Peak resident memory (VmHWM), in bytes.
    pub peak_rss: u64,
    /// Most descriptors open at once, as seen by polling `/proc/<pid>/fd`.
    pub peak_fds: u64,
}

/// Peak resident memory (VmHWM) of a running process, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time a running process has used so far (user and system), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the fields after its
    // last ')' are fixed: state is the 3rd field of the line, utime and stime the 14th
    // and 15th.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Descriptors a running process has open.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

impl Node {
    /// Runs the `hashgrid` CLI against this node through `wrapper` (a command that execs
    /// the rest, such as `prlimit --nofile=256:256 --` or `setpriv --reuid=65534 ...`, so
    /// the watched process is the agent itself), reading the admin token from `token_file`,
    /// and polls its memory and descriptors until it exits. Output goes through files in
    /// `dir`, so a chatty process never blocks on a full pipe.
    pub fn cli_watched(
        &self,
        wrapper: &[&str],
        token_file: &Path,
        args: &[&str],
        dir: &Path,
    ) -> Watched {
        std::fs::create_dir_all(dir).expect("output dir");
        let out = dir.join("stdout");
        let err = dir.join("stderr");
        let (cmd, pre) = match wrapper.split_first() {
            Some((c, rest)) => (PathBuf::from(c), rest.to_vec()),
            None => (bin_dir().join("hashgrid"), vec![]),
        };
        let mut command = Command::new(cmd);
        command.args(pre);
        if !wrapper.is_empty() {
            command.arg(bin_dir().join("hashgrid"));
        }
        let mut child = command
            .args(["--server", &self.server()])
            .arg("--token-file")
            .arg(token_file)
            .args(args)
            .env_remove("HASHGRID_TOKEN")
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("run hashgrid");
        let (mut peak_rss, mut peak_fds) = (0, 0);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            peak_rss = peak_rss.max(self::peak_rss(child.id()).unwrap_or(0));
            peak_fds = peak_fds.max(open_fds(child.id()).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(5));
        };
        Watched {
            status,
            stdout: std::fs::read_to_string(out).unwrap_or_default(),
            stderr: std::fs::read_to_string(err).unwrap_or_default(),
            peak_rss,
            peak_fds,
        }
    }
}

/// The body of `GET /metrics` from a Prometheus listener.
fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other(format!(
            "not a metrics page: {:.200}",
            response
        ))),
    }
}

/// The sum of the samples of metric `name` in a Prometheus text page, over the series whose
/// labels include `label` (all of them when it is empty).
fn metric_sum(text: &str, name: &str, label: &str) -> Option<f64> {
    let samples: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                let (labels, value) = rest.rsplit_once('}')?;
                if !labels.contains(label) {
                    return None;
                }
                value
            } else if label.is_empty() && rest.starts_with(' ') {
                rest
            } else {
                return None; // another metric whose name starts with this one
            };
            value.split_whitespace().next()?.parse().ok()
        })
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::metric_sum;

    #[test]
    fn a_metric_is_summed_over_its_label_sets_and_not_confused_with_a_longer_name() {
        let page = "# HELP x_total y\n# TYPE x_total counter\nx_total{a=\"1\"} 2\n\
                    x_total{a=\"}\"} 3.5\nx_total_more 100\nx 7\n";
        assert_eq!(metric_sum(page, "x_total", ""), Some(5.5));
        assert_eq!(metric_sum(page, "x_total", "a=\"1\""), Some(2.0));
        assert_eq!(metric_sum(page, "x_total", "a=\"2\""), None);
        assert_eq!(metric_sum(page, "x", ""), Some(7.0));
        assert_eq!(metric_sum(page, "x", "a=\"1\""), None);
        assert_eq!(metric_sum(page, "y", ""), None);
    }
}

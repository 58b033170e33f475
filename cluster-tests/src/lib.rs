//! Harness for tests against real processes: `hashgrid-node` servers in temporary
//! directories on free ports, the `hashgrid` CLI, and generators for test data.
//!
//! Binaries are taken from `HASHGRID_BIN_DIR`, or from the Cargo target directory this test
//! runs from (`cargo test --workspace` builds them). Each node keeps its log in its directory;
//! a failing test prints it.

pub mod data;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hashgrid::backup::{BackupOptions, ParentChoice};
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

/// A `hashgrid-node` process with its own data directory.
pub struct Node {
    pub dir: PathBuf,
    /// Address to listen on at the next start (port fixed after the first start, so
    /// clients keep working across restarts).
    listen: String,
    pub addr: String,
    child: Option<Child>,
    /// The umask the node process starts with, when not the harness's own.
    umask: Option<u32>,
}

impl Node {
    /// Starts a node in `dir` on a free port and waits until it is ready.
    pub fn start(dir: &Path) -> Node {
        Self::launch(dir, None)
    }

    /// [`Node::start`] with the node process (and its restarts) under `umask`.
    pub fn start_with_umask(dir: &Path, umask: u32) -> Node {
        Self::launch(dir, Some(umask))
    }

    fn launch(dir: &Path, umask: Option<u32>) -> Node {
        let mut node = Node {
            dir: dir.to_path_buf(),
            listen: "127.0.0.1:0".into(),
            addr: String::new(),
            child: None,
            umask,
        };
        node.spawn();
        node.listen = node.addr.clone();
        node
    }

    fn spawn(&mut self) {
        let data = self.dir.join("data");
        std::fs::create_dir_all(&self.dir).expect("node dir");
        let _ = std::fs::remove_file(data.join("node.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .expect("node log");
        let bin = bin_dir().join("hashgrid-node");
        let mut cmd = match self.umask {
            None => Command::new(bin),
            // The shell sets the umask and `exec`s, so the node keeps the shell's pid.
            Some(mask) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("umask {mask:03o} && exec \"$0\" \"$@\""))
                    .arg(bin);
                sh
            }
        };
        let child = cmd
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &self.listen, "--metrics-listen", "off"])
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hashgrid-node");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(a) = std::fs::read_to_string(data.join("node.addr")) {
                self.addr = a.trim().to_string();
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("hashgrid-node exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "node not ready in 60s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
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

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid()).expect("pid");
        rustix::process::kill_process(pid, sig).expect("signal node");
    }

    /// kill -9, then wait for the process to be gone.
    pub fn kill9(&mut self) {
        self.signal(rustix::process::Signal::KILL);
        self.child.take().expect("running").wait().expect("wait");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        self.signal(rustix::process::Signal::TERM);
        let status = self.child.take().expect("running").wait().expect("wait");
        assert!(
            status.success(),
            "node exited with {status}:\n{}",
            self.log()
        );
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the node first");
        self.spawn();
    }

    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions::new(self.server(), self.token())
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
        let mut cmd = Command::new(bin_dir().join("hashgrid"));
        cmd.args(["--server", &self.server()])
            .arg("--token-file")
            .arg(self.token_file())
            .args(args)
            .env_remove("HASHGRID_TOKEN");
        tweak(&mut cmd);
        cmd.output().expect("run hashgrid")
    }

    /// Runs the CLI with `--json`, asserts success, and parses the last stdout line.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "hashgrid {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
        serde_json::from_str(stdout.lines().last().expect("some output")).expect("json output")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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
        .stats(hashgrid_proto::pb::StatsRequest {})
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

//! Starting a `hashgrid-node` process on this machine and waiting until it serves: the one
//! way the demo, the tests and the benchmarks run a node.
//!
//! Readiness is the node's own signal: it writes its address to `<data-dir>/node.addr` once
//! it serves (after creating or joining its cluster), so waiting needs no sleep guesses; a
//! node that exits first is reported with the tail of its log.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

pub use hashgrid_proto::data_dir::{
    ADDR_FILE, ADMIN_TOKEN_FILE, CLUSTER_SECRET_FILE, METRICS_ADDR_FILE,
};

#[derive(Debug, thiserror::Error)]
pub enum LocalNodeError {
    #[error("hashgrid-node not found next to {beside} or on PATH; build it with `cargo build --release`")]
    NoBinary { beside: String },
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("hashgrid-node exited ({status}) before it was ready; log {log}:\n{tail}")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
        tail: String,
    },
    #[error("hashgrid-node not ready after {timeout:?}; log {log}:\n{tail}")]
    NotReady {
        timeout: Duration,
        log: String,
        tail: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// `hashgrid-node` from next to this executable (or its parent directory, for test
/// binaries under `deps/`), else from PATH.
pub fn node_binary() -> Result<PathBuf, LocalNodeError> {
    let me = std::env::current_exe()?;
    let mut candidates: Vec<PathBuf> = me
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("hashgrid-node"))
        .collect();
    candidates.extend(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join("hashgrid-node")),
    );
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| LocalNodeError::NoBinary {
            beside: me.display().to_string(),
        })
}

/// A `hashgrid-node` child process with its data directory and log file.
pub struct LocalNode {
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// `host:port` the node announced, once ready.
    pub addr: String,
    binary: PathBuf,
    args: Vec<OsString>,
    umask: Option<u32>,
    child: Option<Child>,
}

impl LocalNode {
    /// Starts `binary --data-dir DATA_DIR ARGS...` with stderr appended to `log` (under
    /// `umask` when given, else this process's). Returns at once; call
    /// [`LocalNode::wait_ready`].
    pub fn spawn(
        binary: &Path,
        data_dir: &Path,
        log: &Path,
        args: Vec<OsString>,
        umask: Option<u32>,
    ) -> Result<LocalNode, LocalNodeError> {
        let mut node = LocalNode {
            data_dir: data_dir.to_path_buf(),
            log: log.to_path_buf(),
            addr: String::new(),
            binary: binary.to_path_buf(),
            args,
            umask,
            child: None,
        };
        node.start()?;
        Ok(node)
    }

    fn start(&mut self) -> Result<(), LocalNodeError> {
        std::fs::create_dir_all(&self.data_dir)?;
        let _ = std::fs::remove_file(self.data_dir.join(ADDR_FILE));
        let _ = std::fs::remove_file(self.data_dir.join(METRICS_ADDR_FILE));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match self.umask {
            None => Command::new(&self.binary),
            // The shell sets the umask and `exec`s, so the node keeps the shell's pid.
            Some(mask) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("umask {mask:03o} && exec \"$0\" \"$@\""))
                    .arg(&self.binary);
                sh
            }
        };
        // An error the node returns from `main` is a report, not a crash: with
        // RUST_BACKTRACE set (CI sets it), anyhow would append a backtrace of ~60 lines and
        // push the error out of the log tail an early exit is reported with. Panics keep
        // their backtraces (RUST_BACKTRACE still governs those).
        let child = cmd
            .env("RUST_LIB_BACKTRACE", "0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| LocalNodeError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the node has written its address, or fails when it exits first or
    /// `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<&str, LocalNodeError> {
        let deadline = Instant::now() + timeout;
        let addr_file = self.data_dir.join(ADDR_FILE);
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                // The node writes the file by rename, so it is never seen half written.
                self.addr = a.trim().to_string();
                return Ok(&self.addr);
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(LocalNodeError::Exited {
                    status,
                    log: self.log.display().to_string(),
                    tail: self.log_tail(40),
                });
            }
            if Instant::now() > deadline {
                return Err(LocalNodeError::NotReady {
                    timeout,
                    log: self.log.display().to_string(),
                    tail: self.log_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The exit status once the process has ended, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Sends `sig` to the process (by the pid this handle started, never by name).
    pub fn signal(&self, sig: Signal) -> std::io::Result<()> {
        match self.pid().and_then(Pid::from_raw) {
            Some(pid) => kill_process(pid, sig).map_err(std::io::Error::from),
            None => Ok(()),
        }
    }

    /// `kill -9`, then reaps the process.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.signal(Signal::KILL)?;
        if let Some(mut c) = self.child.take() {
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.signal(Signal::TERM)?;
        match self.child.take() {
            Some(mut c) => c.wait().map(Some),
            None => Ok(None),
        }
    }

    /// Starts the process again with the same data directory and arguments (after a stop
    /// or kill); call [`LocalNode::wait_ready`].
    pub fn restart(&mut self, args: Option<Vec<OsString>>) -> Result<(), LocalNodeError> {
        if self.child.is_some() {
            self.kill()?;
        }
        if let Some(a) = args {
            self.args = a;
        }
        self.start()
    }

    pub fn admin_token_file(&self) -> PathBuf {
        self.data_dir.join(ADMIN_TOKEN_FILE)
    }

    pub fn cluster_secret_file(&self) -> PathBuf {
        self.data_dir.join(CLUSTER_SECRET_FILE)
    }

    /// Where the node serves Prometheus metrics, once it is ready; `None` when it serves none
    /// (`--metrics-listen off`).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        std::fs::read_to_string(self.data_dir.join(METRICS_ADDR_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = Pid::from_raw(c.id() as i32) {
                let _ = kill_process(pid, Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

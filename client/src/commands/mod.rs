//! The command line: one subcommand per module, each parsing its own arguments and calling
//! the library. Errors end up here and become one line on stderr and a non-zero exit code.

mod backup;
mod cluster;
mod demo;
mod ls;
mod node;
mod restore;
mod snapshots;
mod stats;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::connection::{ConnectOptions, Connection, Timeouts, DEFAULT_SERVER};
use crate::retry::RetryPolicy;

#[derive(Debug, Parser)]
#[command(
    name = "hashgrid",
    version,
    about = "hashgrid backup agent and admin tool"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct Global {
    /// Nodes to talk to, comma-separated (any node coordinates): the first that answers is
    /// used, the others (and the members its map names) are fallbacks when it fails.
    #[arg(long, global = true, env = "HASHGRID_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Deadline of a chunk lookup (a coordinator waits up to its peer timeout per owner).
    #[arg(long, global = true, env = "HASHGRID_LOOKUP_TIMEOUT", default_value_t = Timeouts::default().lookup.into())]
    pub lookup_timeout: humantime::Duration,
    /// Deadline of calls that move data or wait for the catalog: an upload batch's
    /// acknowledgement, the start of a download, a commit.
    #[arg(long, global = true, env = "HASHGRID_TRANSFER_TIMEOUT", default_value_t = Timeouts::default().transfer.into())]
    pub transfer_timeout: humantime::Duration,
    /// How long the coordinator may leave a keepalive ping (sent every second)
    /// unanswered before the agent takes it for hung and moves to another; raise it on
    /// links whose send queue takes longer to drain.
    #[arg(long, global = true, env = "HASHGRID_KEEPALIVE_TIMEOUT", default_value_t = Timeouts::default().keepalive_timeout.into())]
    pub keepalive_timeout: humantime::Duration,
    /// Longest a call keeps retrying (other coordinators, an election, a stale map) before
    /// the command fails.
    #[arg(long, global = true, env = "HASHGRID_RETRY_BUDGET", default_value_t = RetryPolicy::default().budget.into())]
    pub retry_budget: humantime::Duration,
    /// Access token (prefer HASHGRID_TOKEN or --token-file: arguments are visible in ps).
    #[arg(long, global = true, env = "HASHGRID_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the access token [default: ./hashgrid-data/admin.token].
    #[arg(long, global = true, env = "HASHGRID_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print results as JSON on stdout (for scripts); no progress bars.
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging (-v, -vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Global {
    pub fn connect_options(&self) -> ConnectOptions {
        let defaults = ConnectOptions::new(self.server.clone(), "");
        ConnectOptions {
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            timeouts: Timeouts {
                lookup: self.lookup_timeout.into(),
                transfer: self.transfer_timeout.into(),
                keepalive_timeout: self.keepalive_timeout.into(),
                ..defaults.timeouts
            },
            retry: RetryPolicy {
                budget: self.retry_budget.into(),
                ..defaults.retry
            },
            ..defaults
        }
    }

    pub async fn connect(&self) -> anyhow::Result<Connection> {
        Ok(Connection::connect(&self.connect_options()).await?)
    }
}

/// Which snapshots a command looks at; for a SNAPSHOT argument of `latest`, whose latest.
#[derive(Debug, clap::Args)]
pub struct SnapshotFilter {
    /// Only this client's snapshots [default: any].
    #[arg(long, default_value = "")]
    pub client: String,
    /// Only this dataset's snapshots [default: any].
    #[arg(long, default_value = "")]
    pub dataset: String,
}

impl SnapshotFilter {
    /// The snapshot a SNAPSHOT argument names: a numeric id, or `latest` within this filter.
    pub async fn resolve(
        &self,
        conn: &Connection,
        snapshot: &str,
    ) -> anyhow::Result<hashgrid_proto::snapshot::SnapshotRecord> {
        Ok(crate::catalog::resolve(conn, snapshot, &self.client, &self.dataset).await?)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Back up files and directories, or a disk image with --image.
    Backup(backup::Args),
    /// Restore a snapshot, or paths in it, into a directory.
    Restore(restore::Args),
    /// List snapshots.
    Snapshots(snapshots::Args),
    /// List the contents of a snapshot.
    Ls(ls::Args),
    /// Logical vs stored bytes and the dedup ratio, per client and for the cluster.
    Stats(stats::Args),
    /// Start a local node, back up sample data twice, restore, verify, print dedup figures.
    Demo(demo::Args),
    /// Re-read every stored chunk and mark the snapshots that reference bad or missing ones
    /// damaged (exit code 4 when anything is bad).
    Verify(verify::Args),
    /// The cluster: members and what they hold, the catalog leader, the map epoch, data
    /// moving and under-replicated; `cluster set` changes R and W.
    Cluster(cluster::Args),
    /// Add (activate), drain or remove a member.
    Node(node::Args),
}

/// The client name used when --client is not given: this host's name.
pub fn default_client() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().into_owned();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// Runs the CLI; the exit code is 0 on success, 3 for a backup that skipped unreadable
/// files or a restore that found damaged ones, 4 for a verify that found damage, 1 for
/// any error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Backup(_) | Command::Restore(_)) {
        crate::arenas::bound();
    }
    let level = match cli.global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Backup(a) => backup::run(&cli.global, a).await,
            Command::Restore(a) => restore::run(&cli.global, a).await,
            Command::Snapshots(a) => snapshots::run(&cli.global, a)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Ls(a) => ls::run(&cli.global, a).await.map(|()| ExitCode::SUCCESS),
            Command::Stats(a) => stats::run(&cli.global, a).await.map(|()| ExitCode::SUCCESS),
            Command::Demo(a) => demo::run(a).await.map(|()| ExitCode::SUCCESS),
            Command::Verify(a) => verify::run(&cli.global, a).await,
            Command::Cluster(a) => cluster::run(&cli.global, a)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Node(a) => node::run(&cli.global, a).await.map(|()| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes one line to stdout. When stdout is a closed pipe (`hashgrid snapshots | head`),
/// the program ends quietly instead of panicking, as Unix tools do; the work whose result
/// was being printed is already done.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing output: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`write_line`].
macro_rules! outln {
    () => { $crate::commands::write_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::commands::write_line(format_args!($($arg)*)) };
}
pub(crate) use outln;

/// Prints a value as one line of JSON.
pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// `unix ms` as an RFC 3339 UTC time, to the second.
pub fn format_time(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

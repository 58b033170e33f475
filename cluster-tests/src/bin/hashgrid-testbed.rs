//! `hashgrid-testbed`: the test harness and data generators for scripts. The benchmarks in
//! `bench/` are shell scripts that drive other tools too; they make their data and run their
//! node through this binary, so scripts, tests and the demo share one way to start and await
//! a node (`hashgrid::local_node`) and one set of generators (`hashgrid::sample_data`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hashgrid::local_node::{node_binary, LocalNode};
use hashgrid::sample_data::{self, ChangeSpec, ImageSpec, TreeSpec};

#[derive(Parser)]
#[command(
    version,
    about = "test harness and data generators for hashgrid's scripts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a file server's tree (log-normal sizes, half text-like); prints JSON stats.
    Tree {
        dir: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        files: usize,
        /// Total bytes over all files.
        #[arg(long)]
        bytes: u64,
        /// Largest file in bytes.
        #[arg(long, default_value_t = 4 << 20)]
        max_file: u64,
    },
    /// Make a sparse raw disk image (holes, zeros, text, random, duplicated regions); prints
    /// JSON stats.
    Image {
        file: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Apparent size in bytes.
        #[arg(long)]
        bytes: u64,
        /// Share of the image holding non-zero data.
        #[arg(long, default_value_t = 0.64)]
        data_fraction: f64,
    },
    /// Make a sparse image with incompressible islands of `--island` bytes every `--every`
    /// bytes, the rest holes.
    Islands {
        file: PathBuf,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        island: u64,
        #[arg(long)]
        every: u64,
    },
    /// Apply a day's churn to a tree and/or an image in place; prints JSON stats.
    Change {
        #[arg(long)]
        tree: Option<PathBuf>,
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Percent of the tree's files modified.
        #[arg(long, default_value_t = 2.0)]
        files_percent: f64,
        /// Percent of the image overwritten in place.
        #[arg(long, default_value_t = 1.0)]
        image_percent: f64,
    },
    /// Start `hashgrid-node --data-dir DATA_DIR ARGS...`, wait until it serves, print its
    /// address and pid on one line, and keep it running until this process gets SIGTERM or SIGINT
    /// (then stop the node cleanly). Exits non-zero if the node dies first.
    Node {
        data_dir: PathBuf,
        /// The node's log (stderr).
        #[arg(long)]
        log: PathBuf,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
        /// Arguments for hashgrid-node after `--`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Tree {
            dir,
            seed,
            files,
            bytes,
            max_file,
        } => {
            let spec = TreeSpec {
                seed,
                files,
                bytes,
                max_file,
            };
            let stats = sample_data::fleet_tree(&dir, &spec)
                .with_context(|| format!("writing the tree under {}", dir.display()))?;
            println!("{}", serde_json::to_string(&stats)?);
        }
        Command::Image {
            file,
            seed,
            bytes,
            data_fraction,
        } => {
            let spec = ImageSpec {
                seed,
                bytes,
                data_fraction,
            };
            let stats = sample_data::fleet_image(&file, &spec)
                .with_context(|| format!("writing the image {}", file.display()))?;
            println!("{}", serde_json::to_string(&stats)?);
        }
        Command::Islands {
            file,
            bytes,
            island,
            every,
        } => {
            anyhow::ensure!(
                island > 0 && every >= island,
                "--every must be at least --island"
            );
            let islands: Vec<(u64, usize, u64)> = (0..bytes)
                .step_by(every as usize)
                .enumerate()
                .map(|(i, off)| (off, island.min(bytes - off) as usize, 2 * i as u64))
                .collect();
            sample_data::sparse_image(&file, bytes, &islands)
                .with_context(|| format!("writing the image {}", file.display()))?;
        }
        Command::Change {
            tree,
            image,
            seed,
            files_percent,
            image_percent,
        } => {
            let spec = ChangeSpec {
                seed,
                files_percent,
                image_percent,
            };
            let stats = sample_data::fleet_change(tree.as_deref(), image.as_deref(), &spec)
                .context("applying the change")?;
            println!("{}", serde_json::to_string(&stats)?);
        }
        Command::Node {
            data_dir,
            log,
            timeout_secs,
            args,
        } => run_node(data_dir, log, timeout_secs, args)?,
    }
    Ok(())
}

fn run_node(
    data_dir: PathBuf,
    log: PathBuf,
    timeout_secs: u64,
    args: Vec<OsString>,
) -> anyhow::Result<()> {
    let mut node = LocalNode::spawn(&node_binary()?, &data_dir, &log, args, None)?;
    let addr = node
        .wait_ready(Duration::from_secs(timeout_secs))?
        .to_string();
    println!("{addr} {}", node.pid().unwrap_or(0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let died = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = term.recv() => return Ok::<bool, std::io::Error>(false),
                _ = int.recv() => return Ok(false),
                _ = tick.tick() => if node.try_wait()?.is_some() { return Ok(true) },
            }
        }
    })?;
    if died {
        anyhow::bail!(
            "hashgrid-node exited; log {}:\n{}",
            log.display(),
            node.log_tail(30)
        );
    }
    let status = node.stop()?;
    anyhow::ensure!(
        status.is_none_or(|s| s.success()),
        "hashgrid-node stopped with {status:?}; log {}",
        log.display()
    );
    Ok(())
}

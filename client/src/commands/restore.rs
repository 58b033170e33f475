//! `hashgrid restore SNAPSHOT [PATH...] --target DIR`.

use std::path::PathBuf;

use indicatif::HumanBytes;

use super::{outln, print_json, Global, SnapshotFilter};
use crate::restore::{restore, RestoreOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Snapshot id, or `latest` (of --client / --dataset).
    pub snapshot: String,
    /// Paths inside the snapshot to restore (default: everything).
    pub paths: Vec<PathBuf>,
    /// Directory to restore into (created if missing); files keep their snapshot paths.
    #[arg(long)]
    pub target: PathBuf,
    #[command(flatten)]
    pub filter: SnapshotFilter,
}

pub async fn run(global: &Global, args: &Args) -> anyhow::Result<()> {
    let conn = global.connect().await?;
    let snapshot = args.filter.resolve(&conn, &args.snapshot).await?;
    let started = std::time::Instant::now();
    let summary = restore(
        &conn,
        &snapshot,
        &RestoreOptions {
            target: args.target.clone(),
            paths: args.paths.clone(),
            progress: !global.json,
        },
    )
    .await?;
    for w in &summary.warnings {
        eprintln!("warning: {w}");
    }
    if global.json {
        print_json(&serde_json::json!({
            "snapshot": snapshot.id,
            "target": args.target,
            "summary": summary,
            "duration_ms": started.elapsed().as_millis() as u64,
        }))?;
    } else {
        outln!(
            "restored snapshot {} to {}: {} files, {} dirs, {} hard links, {} ({} fetched) in {:.2}s",
            snapshot.id,
            args.target.display(),
            summary.files,
            summary.dirs,
            summary.links,
            HumanBytes(summary.bytes),
            HumanBytes(summary.bytes_fetched),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

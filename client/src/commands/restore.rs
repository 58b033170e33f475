//! `hashgrid restore SNAPSHOT [PATH...] --target DIR`.

use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::HumanBytes;

use super::{outln, print_json, Global, SnapshotFilter};
use crate::error::ClientError;
use crate::restore::{restore, RestoreOptions, RestorePolicy, RestoreSummary};

/// Exit code of a restore that restored everything it could but found damaged paths (as
/// `backup` uses it for skipped files).
const EXIT_INCOMPLETE: u8 = 3;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Snapshot id, or `latest` (of --client / --dataset).
    pub snapshot: String,
    /// Paths inside the snapshot to restore (default: everything).
    pub paths: Vec<PathBuf>,
    /// Directory to restore into (created if missing); files keep their snapshot paths.
    #[arg(long)]
    pub target: PathBuf,
    /// Do not apply the snapshot's owners (as root, files then belong to root).
    #[arg(long)]
    pub no_owner: bool,
    /// Strip setuid and setgid bits.
    #[arg(long)]
    pub no_setid: bool,
    /// Do not create character and block device nodes.
    #[arg(long)]
    pub no_devices: bool,
    /// Do not restore extended attributes (ACLs and file capabilities included).
    #[arg(long)]
    pub no_xattrs: bool,
    #[command(flatten)]
    pub filter: SnapshotFilter,
}

pub async fn run(global: &Global, args: &Args) -> anyhow::Result<ExitCode> {
    let conn = global.connect().await?;
    let snapshot = args.filter.resolve(&conn, &args.snapshot).await?;
    let started = std::time::Instant::now();
    let result = restore(
        &conn,
        &snapshot,
        &RestoreOptions {
            target: args.target.clone(),
            paths: args.paths.clone(),
            progress: !global.json,
            policy: RestorePolicy {
                owners: !args.no_owner,
                setid: !args.no_setid,
                devices: !args.no_devices,
                xattrs: !args.no_xattrs,
                ..RestorePolicy::default()
            },
        },
    )
    .await;
    let (summary, damaged, code) = match result {
        Ok(summary) => (summary, Vec::new(), ExitCode::SUCCESS),
        Err(ClientError::RestoreIncomplete {
            damaged,
            unnamed,
            summary,
        }) => {
            for d in &damaged {
                eprintln!("damaged: {d}");
            }
            if unnamed > 0 {
                eprintln!("damaged: {unnamed} more paths");
            }
            eprintln!(
                "error: restore incomplete: {} path(s) could not be restored whole (lost chunks); everything else is restored",
                damaged.len() as u64 + unnamed
            );
            (*summary, damaged, ExitCode::from(EXIT_INCOMPLETE))
        }
        Err(e) => return Err(e.into()),
    };
    report(global, args, &snapshot.id, &summary, &damaged, started)?;
    Ok(code)
}

fn report(
    global: &Global,
    args: &Args,
    snapshot: &hashgrid_proto::SnapshotId,
    summary: &RestoreSummary,
    damaged: &[crate::restore::DamagedPath],
    started: std::time::Instant,
) -> anyhow::Result<()> {
    for w in &summary.warnings {
        eprintln!("warning: {w}");
    }
    if global.json {
        print_json(&serde_json::json!({
            "snapshot": snapshot,
            "target": args.target,
            "summary": summary,
            "damaged": damaged,
            "duration_ms": started.elapsed().as_millis() as u64,
        }))?;
    } else {
        outln!(
            "restored snapshot {} to {}: {} files, {} dirs, {} hard links, {} ({} fetched) in {:.2}s",
            snapshot,
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

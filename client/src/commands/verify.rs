//! `hashgrid verify`: re-read every stored chunk, find the snapshots that reference bad or
//! missing chunks, and mark them damaged (or clear the marks of snapshots whole again).
//! Exits with 4 when anything is bad, so scripts and schedulers notice.

use std::io::IsTerminal;
use std::process::ExitCode;

use hashgrid_proto::ChunkId;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{outln, print_json, Global};
use crate::verify::{found_damage, verify};

/// Exit code of a verify that found damage.
pub const EXIT_DAMAGE: u8 = 4;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Report only; leave the catalog's damage marks as they are.
    #[arg(long)]
    pub dry_run: bool,
}

fn hex_ids(ids: &[Vec<u8>]) -> Vec<String> {
    ids.iter()
        .map(|b| ChunkId::from_slice(b).map_or_else(|_| hex::encode(b), |id| id.to_string()))
        .collect()
}

pub async fn run(global: &Global, args: &Args) -> anyhow::Result<ExitCode> {
    let conn = global.connect().await?;
    let bar = ProgressBar::no_length();
    bar.set_draw_target(if !global.json && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr_with_hz(4)
    } else {
        ProgressDrawTarget::hidden()
    });
    bar.set_style(ProgressStyle::with_template(
        "verify {wide_bar} {pos}/{len} {msg}",
    )?);
    let report = verify(&conn, args.dry_run, |p| {
        if p.snapshots_total == 0 {
            bar.set_length(p.chunks_total);
            bar.set_position(p.chunks_checked);
            bar.set_message(format!("chunks, {} bad", p.bad_chunks));
        } else {
            bar.set_length(p.snapshots_total);
            bar.set_position(p.snapshots_checked);
            bar.set_message(format!("snapshots, {} chunks missing", p.missing_chunks));
        }
    })
    .await;
    bar.finish_and_clear();
    let report = report?;
    let bad = found_damage(&report);
    if global.json {
        print_json(&serde_json::json!({
            "chunks_checked": report.chunks_checked,
            "bad_chunks": report.bad_chunks,
            "missing_chunks": report.missing_chunks,
            "snapshots_checked": report.snapshots_checked,
            "damaged": report.damaged.iter().map(|d| serde_json::json!({
                "id": d.id, "client": d.client, "dataset": d.dataset,
                "missing_chunks": d.missing_chunks,
            })).collect::<Vec<_>>(),
            "healed_snapshots": report.healed_snapshots,
            "bad_ids": hex_ids(&report.bad_ids),
            "missing_ids": hex_ids(&report.missing_ids),
            "dry_run": args.dry_run,
            "ok": !bad,
        }))?;
    } else {
        outln!(
            "checked {} chunks: {} bad (dropped from the index)",
            report.chunks_checked,
            report.bad_chunks
        );
        for id in hex_ids(&report.bad_ids) {
            outln!("  bad chunk {id}");
        }
        outln!(
            "checked {} snapshots: {} referenced chunks have no good copy",
            report.snapshots_checked,
            report.missing_chunks
        );
        for id in hex_ids(&report.missing_ids) {
            outln!("  missing chunk {id}");
        }
        for d in &report.damaged {
            outln!(
                "  snapshot {} ({} / {}) is damaged: {} chunks missing",
                d.id,
                d.client,
                d.dataset,
                d.missing_chunks
            );
        }
        if report.healed_snapshots > 0 {
            outln!(
                "{} snapshots previously marked damaged are whole again",
                report.healed_snapshots
            );
        }
        let marks = if args.dry_run {
            "dry run: damage marks left unchanged"
        } else {
            "damage marks recorded"
        };
        outln!("{}; {marks}", if bad { "DAMAGE FOUND" } else { "all good" });
    }
    Ok(if bad {
        ExitCode::from(EXIT_DAMAGE)
    } else {
        ExitCode::SUCCESS
    })
}

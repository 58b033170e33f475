//! `hashgrid snapshots`: the catalog, oldest first.

use hashgrid_proto::snapshot::SnapshotKind;
use indicatif::HumanBytes;

use super::{format_time, outln, print_json, Global, SnapshotFilter};
use crate::catalog::list;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub filter: SnapshotFilter,
}

pub async fn run(global: &Global, args: &Args) -> anyhow::Result<()> {
    let conn = global.connect().await?;
    let snaps = list(&conn, &args.filter.client, &args.filter.dataset).await?;
    if global.json {
        let rows: Vec<_> = snaps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id,
                    "time": format_time(s.time_unix_ms),
                    "client": s.client,
                    "dataset": s.dataset,
                    "kind": match s.kind { SnapshotKind::Files => "files", SnapshotKind::Image => "image" },
                    "paths": s.paths.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>(),
                    "tags": s.tags,
                    "parent": s.parent,
                    "stats": s.stats,
                })
            })
            .collect();
        return print_json(&rows);
    }
    outln!(
        "{:>6}  {:<20}  {:<16}  {:<16}  {:<5}  {:>10}  {:>10}  paths",
        "id",
        "time",
        "client",
        "dataset",
        "kind",
        "size",
        "new"
    );
    for s in &snaps {
        outln!(
            "{:>6}  {:<20}  {:<16}  {:<16}  {:<5}  {:>10}  {:>10}  {}",
            s.id.to_string(),
            format_time(s.time_unix_ms),
            s.client,
            s.dataset,
            match s.kind {
                SnapshotKind::Files => "files",
                SnapshotKind::Image => "image",
            },
            HumanBytes(s.stats.logical_bytes).to_string(),
            HumanBytes(s.stats.new_bytes).to_string(),
            s.paths
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    outln!("{} snapshots", snaps.len());
    Ok(())
}

//! `hashgrid snapshots`: the catalog, oldest first, read page by page. Snapshots verify
//! found damaged are flagged.

use hashgrid_proto::snapshot::{SnapshotKind, SnapshotRecord};
use indicatif::HumanBytes;

use super::{format_time, outln, print_json, Global, SnapshotFilter};
use crate::catalog::{for_each_page, ListQuery};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub filter: SnapshotFilter,
    /// Newest first.
    #[arg(long)]
    pub newest_first: bool,
}

fn kind(s: &SnapshotRecord) -> &'static str {
    match s.kind {
        SnapshotKind::Files => "files",
        SnapshotKind::Image => "image",
    }
}

fn json_row(s: &SnapshotRecord) -> serde_json::Value {
    serde_json::json!({
        "id": s.id,
        "time": format_time(s.time_unix_ms),
        "client": s.client,
        "dataset": s.dataset,
        "kind": kind(s),
        "paths": s.paths.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>(),
        "tags": s.tags,
        "parent": s.parent,
        "stats": s.stats,
        "damaged": s.damage.is_some(),
        "damage": s.damage.as_ref().map(|d| serde_json::json!({
            "missing_chunks": d.missing_chunks,
            "examples": d.examples.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
            "found": format_time(d.found_unix_ms),
        })),
    })
}

pub async fn run(global: &Global, args: &Args) -> anyhow::Result<()> {
    let conn = global.connect().await?;
    let query = ListQuery {
        client: args.filter.client.clone(),
        dataset: args.filter.dataset.clone(),
        newest_first: args.newest_first,
        ..Default::default()
    };
    if global.json {
        let mut rows = Vec::new();
        for_each_page(&conn, &query, |page| {
            rows.extend(page.iter().map(json_row));
            Ok(())
        })
        .await?;
        return print_json(&rows);
    }
    outln!(
        "{:>6}  {:<20}  {:<16}  {:<16}  {:<5}  {:>10}  {:>10}  {:<7}  paths",
        "id",
        "time",
        "client",
        "dataset",
        "kind",
        "size",
        "new",
        "state"
    );
    let mut count = 0u64;
    let mut damaged = 0u64;
    for_each_page(&conn, &query, |page| {
        for s in &page {
            count += 1;
            damaged += u64::from(s.damage.is_some());
            outln!(
                "{:>6}  {:<20}  {:<16}  {:<16}  {:<5}  {:>10}  {:>10}  {:<7}  {}",
                s.id.to_string(),
                format_time(s.time_unix_ms),
                s.client,
                s.dataset,
                kind(s),
                HumanBytes(s.stats.logical_bytes).to_string(),
                HumanBytes(s.stats.new_bytes).to_string(),
                if s.damage.is_some() { "DAMAGED" } else { "ok" },
                s.paths
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        Ok(())
    })
    .await?;
    if damaged > 0 {
        outln!("{count} snapshots, {damaged} damaged (see `hashgrid verify`)");
    } else {
        outln!("{count} snapshots");
    }
    Ok(())
}

//! `hashgrid stats`: what the snapshots describe (logical) vs what the cluster stores.

use hashgrid_proto::pb::StatsRequest;
use indicatif::HumanBytes;

use super::{outln, print_json, Global};

#[derive(Debug, clap::Args)]
pub struct Args {}

fn ratio(logical: u64, stored: u64) -> f64 {
    if stored == 0 {
        0.0
    } else {
        logical as f64 / stored as f64
    }
}

pub async fn run(global: &Global, _args: &Args) -> anyhow::Result<()> {
    let conn = global.connect().await?;
    let s = conn
        .admin
        .clone()
        .stats(StatsRequest::default())
        .await?
        .into_inner();
    if global.json {
        let clients: Vec<_> = s
            .clients
            .iter()
            .map(|c| {
                serde_json::json!({
                    "client": c.client, "snapshots": c.snapshots, "logical_bytes": c.logical_bytes,
                    "new_bytes": c.new_bytes, "sent_bytes": c.sent_bytes,
                    "dedup_ratio": ratio(c.logical_bytes, c.new_bytes),
                })
            })
            .collect();
        return print_json(&serde_json::json!({
            "snapshots": s.snapshots,
            "chunks": s.chunks,
            "logical_bytes": s.logical_bytes,
            "stored_bytes": s.stored_bytes,
            "plain_bytes": s.plain_bytes,
            "dedup_ratio": ratio(s.logical_bytes, s.stored_bytes),
            "clients": clients,
        }));
    }
    outln!("cluster: {} snapshots, {} chunks", s.snapshots, s.chunks);
    outln!(
        "  logical {}  unique {}  stored {}  dedup+compression ratio {:.2}x",
        HumanBytes(s.logical_bytes),
        HumanBytes(s.plain_bytes),
        HumanBytes(s.stored_bytes),
        ratio(s.logical_bytes, s.stored_bytes)
    );
    if !s.clients.is_empty() {
        outln!(
            "{:<24} {:>9} {:>12} {:>12} {:>12} {:>8}",
            "client",
            "snapshots",
            "logical",
            "new",
            "sent",
            "ratio"
        );
        for c in &s.clients {
            outln!(
                "{:<24} {:>9} {:>12} {:>12} {:>12} {:>7.2}x",
                c.client,
                c.snapshots,
                HumanBytes(c.logical_bytes).to_string(),
                HumanBytes(c.new_bytes).to_string(),
                HumanBytes(c.sent_bytes).to_string(),
                ratio(c.logical_bytes, c.new_bytes)
            );
        }
    }
    Ok(())
}

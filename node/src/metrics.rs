//! Prometheus metrics of the node, served over HTTP when `--metrics-listen` is set. Names are
//! `hashgrid_<subsystem>_<what>`; the recording calls live next to the code they measure.

use std::net::SocketAddr;

use metrics::{describe_counter, describe_gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

pub const HAS_IDS: &str = "hashgrid_chunk_has_ids_total";
pub const PUT_CHUNKS: &str = "hashgrid_chunk_put_total";
pub const PUT_BYTES: &str = "hashgrid_chunk_put_stored_bytes_total";
pub const REJECTED: &str = "hashgrid_chunk_rejected_total";
pub const GET_CHUNKS: &str = "hashgrid_chunk_get_total";
pub const GET_BYTES: &str = "hashgrid_chunk_get_bytes_total";
pub const REPAIRED_ON_LOOKUP: &str = "hashgrid_chunk_repaired_on_lookup_total";
pub const SNAPSHOTS_COMMITTED: &str = "hashgrid_catalog_snapshots_committed_total";
pub const STORE_CHUNKS: &str = "hashgrid_store_chunks";
pub const STORE_BYTES: &str = "hashgrid_store_stored_bytes";
pub const STORE_DAMAGED: &str = "hashgrid_store_damaged_chunks_total";

/// Starts the exporter's HTTP listener on the current Tokio runtime.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| anyhow::anyhow!("metrics listener on {addr}: {e}"))?;
    describe_counter!(HAS_IDS, "Chunk ids looked up, by result (present/absent)");
    describe_counter!(PUT_CHUNKS, "Chunks received, by result (stored/existing)");
    describe_counter!(PUT_BYTES, "Encoded bytes newly stored");
    describe_counter!(REJECTED, "Chunks refused, by reason");
    describe_counter!(
        GET_CHUNKS,
        "Chunks asked for, by result (served/missing/damaged)"
    );
    describe_counter!(GET_BYTES, "Encoded bytes served");
    describe_counter!(
        REPAIRED_ON_LOOKUP,
        "Copies of under-replicated chunks written to their owners when a lookup found them"
    );
    describe_counter!(SNAPSHOTS_COMMITTED, "Snapshots committed through this node");
    describe_gauge!(STORE_CHUNKS, "Distinct chunks held by this node");
    describe_gauge!(STORE_BYTES, "Encoded bytes of the chunks held by this node");
    describe_counter!(
        STORE_DAMAGED,
        "Stored chunk copies that failed verification on a read and left the index"
    );
    Ok(())
}

//! Prometheus metrics of the node, served over HTTP when `--metrics-listen` is set. Names are
//! `hashgrid_<subsystem>_<what>`; the recording calls live next to the code they measure.
//!
//! The node binds the listener itself rather than leaving it to the exporter's own HTTP
//! listener, so that `--metrics-listen 127.0.0.1:0` works: the exporter's listener does not
//! say which port it bound, and picking a "free" port beforehand races every other socket on
//! the host (a test harness saw a node refuse to start with "Address already in use").

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::{describe_counter, describe_gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

pub const HAS_IDS: &str = "hashgrid_chunk_has_ids_total";
pub const PUT_CHUNKS: &str = "hashgrid_chunk_put_total";
pub const PUT_BYTES: &str = "hashgrid_chunk_put_stored_bytes_total";
pub const REJECTED: &str = "hashgrid_chunk_rejected_total";
pub const GET_CHUNKS: &str = "hashgrid_chunk_get_total";
pub const GET_BYTES: &str = "hashgrid_chunk_get_bytes_total";
pub const REPAIRED_ON_LOOKUP: &str = "hashgrid_chunk_repaired_on_lookup_total";
pub const FALLBACK_COPIES: &str = "hashgrid_chunk_fallback_copies_total";
pub const HEDGED_CALLS: &str = "hashgrid_peer_calls_hedged_total";
pub const PEER_CALLS_SHED: &str = "hashgrid_peer_calls_shed_total";
pub const OWNER_CALLS: &str = "hashgrid_owner_calls_total";
pub const SNAPSHOTS_COMMITTED: &str = "hashgrid_catalog_snapshots_committed_total";
pub const STORE_CHUNKS: &str = "hashgrid_store_chunks";
pub const STORE_BYTES: &str = "hashgrid_store_stored_bytes";
pub const STORE_DAMAGED: &str = "hashgrid_store_damaged_chunks_total";
pub const STORE_RECLAIMABLE: &str = "hashgrid_store_reclaimable_bytes";
pub const STORE_UPGRADED: &str = "hashgrid_store_entries_upgraded_total";
pub const PARTITIONS_MOVING: &str = "hashgrid_cluster_partitions_moving";
pub const CLUSTER_EPOCH: &str = "hashgrid_cluster_epoch";
pub const CLUSTER_LEADER: &str = "hashgrid_cluster_leader";
pub const CLUSTER_MEMBERS: &str = "hashgrid_cluster_members";
pub const RAFT_TERM: &str = "hashgrid_raft_term";
pub const PEERS_OUT_OF_CONTACT: &str = "hashgrid_peers_out_of_contact";
pub const HAND_OFF_PENDING: &str = "hashgrid_hand_off_pending_chunks";
pub const WORKER_UNDER_REPLICATED: &str = "hashgrid_worker_under_replicated_chunks";
pub const UNDER_REPLICATED: &str = "hashgrid_under_replicated_chunks";
pub const WORKER_RUNNING: &str = "hashgrid_worker_running";
pub const WORKER_STATE: &str = "hashgrid_worker_state";
pub const WORKER_COPIED: &str = "hashgrid_worker_copied_chunks_total";
pub const WORKER_COPIED_BYTES: &str = "hashgrid_worker_copied_bytes_total";
pub const WORKER_RELEASED: &str = "hashgrid_worker_released_chunks_total";
/// Ids other owners listed to this node because a range's digests differed.
pub const ANTI_ENTROPY_LISTED: &str = "hashgrid_anti_entropy_listed_ids_total";

/// How long a scraper may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often histograms and idle series are tidied (the exporter's own default).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the recorder and serves `GET /metrics` on `addr` from the current Tokio runtime;
/// returns the address bound (its port chosen by the system when `addr`'s is 0).
pub async fn serve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics listener on {addr}"))?;
    let bound = listener.local_addr()?;
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(accept(listener, handle, HEADER_TIMEOUT));
    Ok(bound)
}

/// Serves each connection on its own task; one that has not sent its request headers within
/// `header_timeout` is closed.
async fn accept(listener: TcpListener, handle: PrometheusHandle, header_timeout: Duration) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: the node goes on, a scrape waits.
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                std::future::ready(Ok::<_, Infallible>(respond(&handle, &req)))
            });
            // A client that sends no request within the timeout (or holds an idle
            // connection open) is dropped rather than keeping a task forever.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// The Prometheus text for `GET /metrics` (and `/`); 404 for other paths, 405 for other
/// methods.
fn respond(handle: &PrometheusHandle, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics" | "/") => (StatusCode::OK, handle.render()),
        (&Method::GET | &Method::HEAD, _) => (StatusCode::NOT_FOUND, "try /metrics\n".into()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Help text for every series, shown by Prometheus and on the page.
fn describe() {
    describe_counter!(HAS_IDS, "Chunk ids looked up, by result (present/absent)");
    describe_counter!(PUT_CHUNKS, "Chunks received, by result (stored/existing)");
    describe_counter!(PUT_BYTES, "Encoded bytes newly stored");
    describe_counter!(REJECTED, "Chunks refused, by reason");
    describe_counter!(
        STORE_UPGRADED,
        "Index entries written before checksums were kept that a read decoded and hashed, then gave a checksum"
    );
    describe_counter!(
        GET_CHUNKS,
        "Chunks asked for, by result (served/missing/damaged)"
    );
    describe_counter!(GET_BYTES, "Encoded bytes served");
    describe_counter!(
        FALLBACK_COPIES,
        "Chunk copies written to a fallback member because too few owners could take them \
         (held there until handed to the owners)"
    );
    describe_counter!(
        HEDGED_CALLS,
        "Peer calls not answered within a quarter of the peer deadline, for which another member \
         was asked beside the slow one, by call (lookup, read: the next owner; write: an owner \
         slow to store, its copy written to a fallback beside it; write to a fallback: the next \
         fallback)"
    );
    describe_counter!(
        PEER_CALLS_SHED,
        "Peer calls not sent because the peer was lagging and already had its cap of calls \
         from this node unanswered (--peer-max-calls): it is slow or hung, and another member \
         was asked"
    );
    describe_counter!(
        OWNER_CALLS,
        "Owner calls this node served for coordinators on other nodes, by call (has, put, get)"
    );
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
    describe_gauge!(
        STORE_RECLAIMABLE,
        "Pack bytes no index entry points at (moved away or damaged), until compaction"
    );
    describe_gauge!(
        PARTITIONS_MOVING,
        "Partitions whose owners are still changing after a map change"
    );
    describe_gauge!(
        CLUSTER_EPOCH,
        "Epoch of the newest cluster map this node has applied"
    );
    describe_gauge!(
        CLUSTER_LEADER,
        "Node id of the catalog's Raft leader as this node knows it (0: none known)"
    );
    describe_gauge!(
        CLUSTER_MEMBERS,
        "Members of the cluster map this node has applied, by state (joining, active, draining, removed)"
    );
    describe_gauge!(RAFT_TERM, "The catalog's Raft term as this node knows it");
    describe_gauge!(
        HAND_OFF_PENDING,
        "Chunks held in partitions this node does not own (fallback copies, partitions moved away) until handed to their owners"
    );
    describe_gauge!(
        PEERS_OUT_OF_CONTACT,
        "Members a call lost contact with and that have not answered since (a repair pass runs when one does)"
    );
    describe_gauge!(
        WORKER_UNDER_REPLICATED,
        "Chunk copies a worker found missing and has not restored, by worker"
    );
    describe_gauge!(
        UNDER_REPLICATED,
        "Chunks this node counts as short of a copy, each once (its under_replicated in cluster status)"
    );
    describe_gauge!(WORKER_RUNNING, "1 while a worker's pass runs, by worker");
    describe_gauge!(
        WORKER_STATE,
        "1 for a worker's state (idle, running, due, error, off), 0 for the others, by worker and state"
    );
    describe_counter!(WORKER_COPIED, "Chunks copied from other owners, by worker");
    describe_counter!(
        WORKER_COPIED_BYTES,
        "Encoded bytes copied from other owners, by worker"
    );
    describe_counter!(
        WORKER_RELEASED,
        "Index entries released after their partition moved to other owners"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A scraper that connects and says nothing is disconnected at the header timeout (not at
    /// hyper's own default of 30 s, nor never), and does not hold up the scrapes beside it.
    #[tokio::test]
    async fn a_client_that_sends_no_request_is_dropped_at_the_header_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let timeout = Duration::from_millis(300);
        tokio::spawn(accept(listener, handle, timeout));

        let started = std::time::Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut scrape = TcpStream::connect(addr).await.unwrap();
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut page = String::new();
        scrape.read_to_string(&mut page).await.unwrap();
        assert!(page.starts_with("HTTP/1.1 200"), "{page:.300}");

        // The server closes the silent connection: the read ends (EOF, or a reset, or the 408
        // some servers write first) well before hyper's default header timeout would.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut rest))
            .await
            .is_ok();
        let after = started.elapsed();
        assert!(
            ended,
            "a client that sent nothing is still connected after {after:?}"
        );
        assert!(
            after >= timeout,
            "closed after {after:?}, before the timeout"
        );
        assert!(
            rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

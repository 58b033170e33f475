//! The two named background workers built on [`super::pull`] and [`super::hand_off`], and
//! the status they show (`hashgrid cluster status`, Admin `Stats`, Prometheus).
//!
//! - **rebalance** runs while an older map is still in transition: this node pulls the
//!   moving partitions it now owns from every node that owned them under any map still
//!   known, then reports to the catalog that it holds everything it owns under the current
//!   epoch. When every active member has, the older maps are retired; then it hands off
//!   the partitions it holds but no longer owns and releases their index entries. It hands
//!   off again whenever this node stored copies as a fallback for unreachable owners, and
//!   every few seconds while an owner is still unreachable; until then those copies count
//!   as under-replicated.
//! - **repair** runs a full pass over the partitions this node owns, comparing with their
//!   other current owners, soon after the node starts (a restarted node catches up), then
//!   every `--repair-interval-secs`, and as soon as a member this node lost contact with
//!   answers again, or another member that lost contact with it asks (`RepairSoon`): a
//!   healed partition, a node back from a crash.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashgrid_proto::pb::peer::RepairSoonRequest;
use hashgrid_proto::pb::WorkerStatus;
use hashgrid_proto::placement::{MemberState, Partition};
use hashgrid_proto::ChunkId;

use super::pacer::Pacer;
use super::{hand_off, is_removed, pull, PullReport, MISSING_IDS_KEPT};
use crate::catalog::Command;
use crate::context::NodeContext;
use crate::coordinator::Route;
use crate::error::NodeError;
use crate::metrics as m;

/// How often the rebalance worker looks for a map change to act on.
const REBALANCE_POLL: Duration = Duration::from_millis(500);
/// The pause after a hand-off pass that found an owner unreachable.
const HAND_OFF_RETRY: Duration = Duration::from_secs(2);
/// How often the repair worker looks for a reason to run before its interval is up.
const REPAIR_PROBE: Duration = Duration::from_secs(2);
/// The first repair pass after the node is ready.
const FIRST_REPAIR: Duration = Duration::from_secs(1);

/// The states a worker shows: between passes, in one, owed a pass (repair), after a pass
/// that failed, turned off.
const WORKER_STATES: [&str; 5] = ["idle", "running", "due", "error", "off"];

/// The state a worker shows.
#[derive(Clone, Debug, Default)]
struct Status {
    state: &'static str,
    passes: u64,
    done: u32,
    total: u32,
    chunks_copied: u64,
    bytes_copied: u64,
    chunks_released: u64,
    /// Ids other owners listed to this worker, where range digests differed.
    ids_listed: u64,
    last_error: String,
    last_pass_unix: u64,
    short: Shortfall,
}

/// What a pass left short: copies this node lacks and could not pull (`missing`, the first
/// [`MISSING_IDS_KEPT`] of their ids in `ids`), and chunks it counts for another
/// reason, without ids (`other`: its chunks in partitions with an owner it could not reach,
/// or copies it could not hand off).
#[derive(Clone, Debug, Default)]
pub struct Shortfall {
    pub missing: u64,
    pub ids: Vec<ChunkId>,
    pub other: u64,
}

impl Shortfall {
    /// Copies this node lacks, `ids` (distinct) being those of them listed.
    pub fn missing(count: u64, mut ids: Vec<ChunkId>) -> Self {
        ids.truncate(MISSING_IDS_KEPT);
        Shortfall {
            missing: count.max(ids.len() as u64),
            ids,
            other: 0,
        }
    }

    /// Chunks counted without ids.
    pub fn other(count: u64) -> Self {
        Shortfall {
            other: count,
            ..Default::default()
        }
    }

    fn total(&self) -> u64 {
        self.missing + self.other
    }
}

/// A worker's running totals before a pass, which the pass's report adds to.
#[derive(Clone, Copy)]
struct Totals {
    chunks: u64,
    bytes: u64,
    listed: u64,
}

/// One named worker's status, shared between the worker and the services that report it.
pub struct Worker {
    name: &'static str,
    status: Mutex<Status>,
}

impl Worker {
    fn new(name: &'static str) -> Self {
        Worker {
            name,
            status: Mutex::new(Status {
                state: "idle",
                ..Default::default()
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        metrics::gauge!(m::WORKER_UNDER_REPLICATED, "worker" => self.name)
            .set(s.short.total() as f64);
        metrics::gauge!(m::WORKER_RUNNING, "worker" => self.name)
            .set(f64::from(u8::from(s.state == "running")));
    }

    fn begin(&self, total: usize) {
        self.update(|s| {
            s.state = "running";
            s.done = 0;
            s.total = total as u32;
        });
    }

    fn progress(&self, done: usize, report: &PullReport, before: Totals) {
        self.update(|s| {
            s.done = done as u32;
            s.chunks_copied = before.chunks + report.copied;
            s.bytes_copied = before.bytes + report.copied_bytes;
            s.ids_listed = before.listed + report.listed;
        });
    }

    fn totals(&self) -> Totals {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        Totals {
            chunks: s.chunks_copied,
            bytes: s.bytes_copied,
            listed: s.ids_listed,
        }
    }

    /// Ends a pass: `Ok` with what it left short, or the error that stopped it.
    fn finish(&self, outcome: Result<Shortfall, String>, copied: (u64, u64), released: u64) {
        metrics::counter!(m::WORKER_COPIED, "worker" => self.name).increment(copied.0);
        metrics::counter!(m::WORKER_COPIED_BYTES, "worker" => self.name).increment(copied.1);
        metrics::counter!(m::WORKER_RELEASED, "worker" => self.name).increment(released);
        self.update(|s| {
            s.chunks_released += released;
            match outcome {
                Ok(short) => {
                    s.state = "idle";
                    s.last_error.clear();
                    s.short = short;
                }
                Err(e) => {
                    s.state = "error";
                    s.last_error = e;
                }
            }
            s.passes += 1;
            s.last_pass_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
        });
    }

    /// A pass that ended with errors it works around (a source down): still a pass, and
    /// the errors show.
    fn note_errors(&self, errors: &[String]) {
        if let Some(first) = errors.first() {
            let more = errors.len() - 1;
            let text = if more > 0 {
                format!("{first} (and {more} more)")
            } else {
                first.clone()
            };
            self.update(|s| s.last_error = text);
        }
    }

    fn to_pb(&self) -> WorkerStatus {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        WorkerStatus {
            name: self.name.into(),
            state: s.state.into(),
            passes: s.passes,
            partitions_done: s.done,
            partitions_total: s.total,
            chunks_copied: s.chunks_copied,
            bytes_copied: s.bytes_copied,
            chunks_released: s.chunks_released,
            ids_listed: s.ids_listed,
            last_error: s.last_error.clone(),
            last_pass_unix: s.last_pass_unix,
            under_replicated: s.short.total(),
            waiting_for: Vec::new(),
        }
    }

    fn shortfall(&self) -> Shortfall {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .short
            .clone()
    }
}

/// The node's background workers.
pub struct Workers {
    pub rebalance: Worker,
    pub repair: Worker,
    /// The node's limit on the chunk bytes both workers move (`--move-mib-per-sec`).
    pub pacer: Pacer,
    /// Set when this node stored a copy of a chunk it does not own (as a fallback): the
    /// rebalance worker runs a hand-off pass even though the map did not change.
    hand_off_due: AtomicBool,
    /// Reasons for a repair pass so far (another member's `RepairSoon`, or a member this
    /// node lost contact with answering again), counted: a pass that starts after the n-th
    /// covers the first n.
    repair_asked: AtomicU64,
    /// The `repair_asked` count the repair loop has acted on (it stops waiting when behind).
    repair_seen: AtomicU64,
    /// The `repair_asked` count as of the start of the last repair pass that completed.
    repair_covered: AtomicU64,
}

impl Default for Workers {
    fn default() -> Self {
        Workers {
            rebalance: Worker::new("rebalance"),
            repair: Worker::new("repair"),
            pacer: Pacer::default(),
            hand_off_due: AtomicBool::new(false),
            repair_asked: AtomicU64::new(0),
            repair_seen: AtomicU64::new(0),
            repair_covered: AtomicU64::new(0),
        }
    }
}

impl Workers {
    /// Asks for a hand-off pass: this node stored copies that belong to other owners.
    pub fn hand_off_due(&self) {
        self.hand_off_due.store(true, Ordering::Release);
    }

    /// Whether a hand-off pass was asked for since the last call.
    fn take_hand_off_due(&self) -> bool {
        self.hand_off_due.swap(false, Ordering::AcqRel)
    }

    /// Asks for a repair pass soon (another member lost contact with this one, or this
    /// node regained contact with a member).
    pub fn repair_due(&self) {
        self.repair_asked.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a repair pass was asked for since the last call.
    fn take_repair_due(&self) -> bool {
        let asked = self.repair_asked.load(Ordering::Acquire);
        self.repair_seen.swap(asked, Ordering::AcqRel) != asked
    }

    /// Whether a repair pass was asked for that no completed pass has covered yet.
    fn repair_pending(&self) -> bool {
        self.repair_asked.load(Ordering::Acquire) > self.repair_covered.load(Ordering::Acquire)
    }

    /// Every worker's status. `out_of_contact` are the members this node lost contact with
    /// ([`crate::peer::PeerPool::lost_contact`]): an idle repair worker shows `due` while
    /// there are any, or while a pass was asked for and has not completed, because copies
    /// written while they were apart are only pulled by that pass; until it ends, the
    /// worker's under-replicated figure is from before the loss, and a status that read it
    /// as settled would be wrong.
    pub fn to_pb(&self, out_of_contact: Vec<String>) -> Vec<WorkerStatus> {
        let mut all: Vec<WorkerStatus> = self.all().iter().map(|w| w.to_pb()).collect();
        let repair = all
            .iter_mut()
            .find(|w| w.name == self.repair.name)
            .expect("the repair worker is listed");
        if repair.state != "off" {
            if repair.state == "idle" && (self.repair_pending() || !out_of_contact.is_empty()) {
                repair.state = "due".into();
            }
            repair.waiting_for = out_of_contact;
        }
        all
    }

    pub fn all(&self) -> [&Worker; 2] {
        [&self.rebalance, &self.repair]
    }

    /// Chunks this node counts as short of a copy, each once: a repair pass covers every
    /// partition this node owns, the moving ones the rebalance pulls included, so both
    /// workers may find the same copy missing; their ids are merged. Beyond the ids kept,
    /// the larger of the two remainders is taken (an estimate). Counts without ids add up:
    /// the repair's are chunks of partitions this node owns, the rebalance's (hand-off)
    /// of partitions it does not.
    /// With the ids of the copies it counts that this node lacks (as far as they are kept),
    /// sorted: what `Stats` reports.
    pub fn shortfall(&self) -> (u64, Vec<ChunkId>) {
        let (rebalance, repair) = (self.rebalance.shortfall(), self.repair.shortfall());
        let beyond = |s: &Shortfall| s.missing - s.ids.len() as u64;
        let mut ids: Vec<ChunkId> = rebalance.ids.iter().chain(&repair.ids).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        let count = ids.len() as u64
            + beyond(&rebalance).max(beyond(&repair))
            + rebalance.other
            + repair.other;
        (count, ids)
    }

    pub fn under_replicated(&self) -> u64 {
        self.shortfall().0
    }
}

/// Starts the workers on the current runtime (repair only with an interval), moving at most
/// `move_limit` bytes per second between them (0: no limit).
pub fn spawn(ctx: Arc<NodeContext>, repair_every: Option<Duration>, move_limit: u64) {
    ctx.workers.pacer.set_limit(move_limit);
    tokio::spawn(run_rebalance(ctx.clone()));
    match repair_every {
        Some(every) => {
            tokio::spawn(run_repair(ctx, every));
        }
        None => ctx.workers.repair.update(|s| s.state = "off"),
    }
}

/// The cluster's state as this node knows it, for Prometheus: the map's epoch and members
/// by state, the catalog's leader and term, the workers' states (what `cluster status`
/// shows).
fn record_cluster(ctx: &NodeContext) {
    for w in ctx.workers.to_pb(ctx.peers.lost_contact()) {
        for state in WORKER_STATES {
            metrics::gauge!(m::WORKER_STATE, "worker" => w.name.clone(), "state" => state)
                .set(f64::from(u8::from(w.state == state)));
        }
    }
    metrics::gauge!(m::UNDER_REPLICATED).set(ctx.workers.under_replicated() as f64);
    let raft = ctx.raft.metrics().borrow().clone();
    metrics::gauge!(m::CLUSTER_LEADER).set(raft.current_leader.unwrap_or(0) as f64);
    metrics::gauge!(m::RAFT_TERM).set(raft.current_term as f64);
    let Ok(config) = ctx.config() else {
        return;
    };
    metrics::gauge!(m::CLUSTER_EPOCH).set(config.map.epoch as f64);
    for state in [
        MemberState::Joining,
        MemberState::Active,
        MemberState::Draining,
        MemberState::Removed,
    ] {
        let count = config
            .map
            .members
            .iter()
            .filter(|m| m.state == state)
            .count();
        metrics::gauge!(m::CLUSTER_MEMBERS, "state" => state.as_str()).set(count as f64);
    }
}

/// The rebalance worker's loop (see the module doc).
async fn run_rebalance(ctx: Arc<NodeContext>) {
    // The epochs this node has reported synced at and handed off at; in memory, so a
    // restarted node does both once more (both are idempotent).
    let mut synced: Option<u64> = None;
    let mut handed_off: Option<u64> = None;
    loop {
        tokio::time::sleep(REBALANCE_POLL).await;
        record_cluster(&ctx);
        let Ok(route) = Route::new(&ctx) else {
            continue;
        };
        let epoch = route.epoch();
        metrics::gauge!(m::PARTITIONS_MOVING).set(route.placement.moving().count() as f64);
        let pending = super::hand_off_pending(&ctx.store, route.placement.current(), ctx.node_id);
        metrics::gauge!(m::HAND_OFF_PENDING).set(pending as f64);
        let worker = &ctx.workers.rebalance;
        if !route.placement.older().is_empty() {
            let active = route.member_state(ctx.node_id) == Some(MemberState::Active);
            if synced == Some(epoch) || !active {
                continue;
            }
            match rebalance_pass(&ctx, &route).await {
                Ok(true) => synced = Some(epoch),
                Ok(false) => tokio::time::sleep(REBALANCE_POLL).await,
                Err(e) => {
                    tracing::warn!(error = %e, "rebalance pass failed");
                    tokio::time::sleep(REBALANCE_POLL * 4).await;
                }
            }
        } else {
            let due = ctx.workers.take_hand_off_due();
            if handed_off == Some(epoch) && !due {
                continue;
            }
            worker.begin(0);
            match hand_off(&route).await {
                Ok(r) => {
                    if r.released > 0 || r.handed > 0 {
                        tracing::info!(
                            released = r.released,
                            handed = r.handed,
                            handed_bytes = r.handed_bytes,
                            epoch,
                            "handed off partitions this node no longer owns"
                        );
                    }
                    let done = r.incomplete == 0;
                    worker.update(|s| {
                        s.chunks_copied += r.handed;
                        s.bytes_copied += r.handed_bytes;
                    });
                    worker.finish(
                        Ok(Shortfall::other(r.pending)),
                        (r.handed, r.handed_bytes),
                        r.released,
                    );
                    worker.note_errors(&r.errors);
                    crate::owner::publish_store_gauges(&ctx.store);
                    if done {
                        handed_off = Some(epoch);
                    } else {
                        // An owner is unreachable: pass again a little later, not every poll
                        // (and not never: an earlier complete pass of this epoch must not
                        // stand for this one).
                        handed_off = None;
                        tokio::time::sleep(HAND_OFF_RETRY).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "hand-off failed");
                    worker.finish(Err(e.to_string()), (0, 0), 0);
                    handed_off = None;
                    tokio::time::sleep(HAND_OFF_RETRY).await;
                }
            }
        }
    }
}

/// Pulls the moving partitions this node owns; reports synced when nothing is left.
/// Returns whether it reported.
async fn rebalance_pass(ctx: &Arc<NodeContext>, route: &Route) -> Result<bool, NodeError> {
    let worker = &ctx.workers.rebalance;
    let current = route.placement.current();
    let parts: Vec<Partition> = route
        .placement
        .moving()
        .filter(|&p| current.owners(p).contains(&ctx.node_id))
        .collect();
    let report = tracked_pull(worker, route, &parts, |p| route.placement.read_owners(p)).await?;
    let blocking_sources = report
        .unreachable
        .values()
        .flatten()
        .any(|&n| !is_removed(route, n));
    let short = Shortfall::missing(report.not_copied, report.missing);
    worker.finish(Ok(short), (report.copied, report.copied_bytes), 0);
    worker.note_errors(&report.errors);
    if report.copied > 0 {
        tracing::info!(
            chunks = report.copied,
            bytes = report.copied_bytes,
            partitions = parts.len(),
            epoch = route.epoch(),
            "pulled moving partitions"
        );
    }
    if blocking_sources {
        return Ok(false);
    }
    ctx.write(Command::Synced {
        node: ctx.node_id,
        epoch: route.epoch(),
    })
    .await?;
    tracing::info!(epoch = route.epoch(), "holds every partition it owns");
    Ok(true)
}

/// [`pull`] with `worker` showing its progress; a pass that fails ends in the error state.
async fn tracked_pull(
    worker: &Worker,
    route: &Route,
    parts: &[Partition],
    sources_of: impl Fn(Partition) -> Vec<hashgrid_proto::NodeId>,
) -> Result<PullReport, NodeError> {
    worker.begin(parts.len());
    let before = worker.totals();
    pull(route, parts, sources_of, |done, r| {
        worker.progress(done, r, before)
    })
    .await
    .inspect_err(|e| worker.finish(Err(e.to_string()), (0, 0), 0))
}

/// The repair worker's loop (see the module doc).
async fn run_repair(ctx: Arc<NodeContext>, every: Duration) {
    tokio::time::sleep(FIRST_REPAIR).await;
    loop {
        if let Err(e) = repair_pass(&ctx).await {
            tracing::warn!(error = %e, "repair pass failed");
        }
        until_next_repair(&ctx, every).await;
    }
}

/// Waits out the repair interval, or less: every [`REPAIR_PROBE`] it checks whether another
/// member asked for a pass (`RepairSoon`), and probes the members a call of this node lost
/// contact with ([`crate::peer::PeerPool::lost_contact`]) with a `RepairSoon` of its own.
/// The first that answers ends the wait, and has been asked for a pass too. So after a
/// partition heals, or a node comes back, both sides pull the copies they missed within
/// seconds, rather than at the next interval.
async fn until_next_repair(ctx: &Arc<NodeContext>, every: Duration) {
    let until = tokio::time::Instant::now() + every;
    loop {
        let now = tokio::time::Instant::now();
        if now >= until {
            return;
        }
        tokio::time::sleep(REPAIR_PROBE.min(until - now)).await;
        if ctx.workers.take_repair_due() {
            tracing::info!("a member asked for a repair pass");
            return;
        }
        let Ok(map) = ctx.map() else {
            continue;
        };
        let mut regained = false;
        for addr in ctx.peers.lost_contact() {
            let member = map.members.iter().find(|m| m.addr == addr);
            if member.is_none_or(|m| m.state == MemberState::Removed) {
                ctx.peers.regained(&addr);
                continue;
            }
            let probe = ctx
                .peers
                .call(&addr, None, |mut c| async move {
                    c.repair_soon(RepairSoonRequest {}).await
                })
                .await;
            if probe.is_ok() {
                // Asked before the member leaves the lost set, so that the status shows
                // the pass as due without a gap.
                ctx.workers.repair_due();
                ctx.workers.take_repair_due();
                ctx.peers.regained(&addr);
                tracing::info!(%addr, "a member this node had lost contact with answers again");
                regained = true;
            }
        }
        metrics::gauge!(m::PEERS_OUT_OF_CONTACT).set(ctx.peers.lost_contact().len() as f64);
        if regained {
            return;
        }
    }
}

/// One pass over every partition this node owns, against its other current owners.
async fn repair_pass(ctx: &Arc<NodeContext>) -> Result<(), NodeError> {
    let asked = ctx.workers.repair_asked.load(Ordering::Acquire);
    let route = Route::new(ctx)?;
    let worker = &ctx.workers.repair;
    let current = route.placement.current();
    let parts: Vec<Partition> = (0..current.partitions())
        .map(Partition)
        .filter(|&p| current.owners(p).contains(&ctx.node_id))
        .collect();
    let report = tracked_pull(worker, &route, &parts, |p| current.owners(p).to_vec()).await?;
    // Copies this node could not restore, plus, for partitions with an owner out of reach,
    // this node's chunks there (counted by the first reachable owner only, so each chunk
    // is counted once across the survivors).
    let mut short = Shortfall::missing(report.not_copied, report.missing);
    for (p, down) in &report.unreachable {
        let first_up = current
            .owners(*p)
            .iter()
            .copied()
            .find(|n| !down.contains(n));
        if first_up == Some(ctx.node_id) {
            short.other += report.local_counts.get(p).copied().unwrap_or(0);
        }
    }
    if report.copied > 0 {
        tracing::info!(
            chunks = report.copied,
            bytes = report.copied_bytes,
            listed = report.listed,
            "repair copied missing chunks"
        );
    }
    ctx.workers
        .repair_covered
        .fetch_max(asked, Ordering::AcqRel);
    worker.finish(Ok(short), (report.copied, report.copied_bytes), 0);
    worker.note_errors(&report.errors);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(range: std::ops::Range<u8>) -> Vec<ChunkId> {
        range.map(|i| ChunkId::of(&[i])).collect()
    }

    #[test]
    fn a_copy_both_workers_found_missing_counts_once() {
        let workers = Workers::default();
        assert_eq!(workers.under_replicated(), 0);
        // The rebalance pull missed 0..3, the repair pass 1..6 (the same moving partitions
        // and more): six chunks, not eight, and six ids.
        workers
            .rebalance
            .finish(Ok(Shortfall::missing(3, ids(0..3))), (0, 0), 0);
        workers
            .repair
            .finish(Ok(Shortfall::missing(5, ids(1..6))), (0, 0), 0);
        assert_eq!(workers.under_replicated(), 6);
        let mut expected = ids(0..6);
        expected.sort_unstable();
        assert_eq!(workers.shortfall().1, expected);
        // Partitions with an owner out of reach add their chunks; a hand-off's copies add.
        let mut short = Shortfall::missing(5, ids(1..6));
        short.other = 10;
        workers.repair.finish(Ok(short), (0, 0), 0);
        workers.rebalance.finish(Ok(Shortfall::other(4)), (0, 0), 0);
        assert_eq!(workers.under_replicated(), 19);
        assert_eq!(workers.shortfall().1.len(), 5);
        // Beyond the ids kept, the larger remainder counts.
        workers
            .repair
            .finish(Ok(Shortfall::missing(100, ids(1..6))), (0, 0), 0);
        workers
            .rebalance
            .finish(Ok(Shortfall::missing(40, ids(0..3))), (0, 0), 0);
        assert_eq!(workers.under_replicated(), 6 + 95);
        workers.repair.finish(Ok(Shortfall::default()), (0, 0), 0);
        workers
            .rebalance
            .finish(Ok(Shortfall::default()), (0, 0), 0);
        assert_eq!(workers.under_replicated(), 0);
        assert!(workers.shortfall().1.is_empty());
    }

    fn repair_state(workers: &Workers, out_of_contact: &[&str]) -> String {
        let all = workers.to_pb(out_of_contact.iter().map(|a| a.to_string()).collect());
        all.into_iter().find(|w| w.name == "repair").unwrap().state
    }

    #[test]
    fn repair_is_due_while_a_member_is_out_of_contact_and_until_a_pass_after_it_answers() {
        let workers = Workers::default();
        assert_eq!(repair_state(&workers, &[]), "idle");
        assert_eq!(repair_state(&workers, &["10.0.0.2:7421"]), "due");
        let all = workers.to_pb(vec!["10.0.0.2:7421".into()]);
        assert_eq!(all[1].waiting_for, ["10.0.0.2:7421"]);
        assert!(all[0].waiting_for.is_empty(), "only repair waits");

        // The member answered (or asked): due until a pass that started after it ends.
        workers.repair_due();
        assert!(workers.take_repair_due());
        assert!(!workers.take_repair_due(), "one ask wakes the loop once");
        assert_eq!(repair_state(&workers, &[]), "due");
        let started = workers.repair_asked.load(Ordering::Acquire);
        workers.repair_due(); // asked again while the pass runs
        workers.repair_covered.fetch_max(started, Ordering::AcqRel);
        workers.repair.finish(Ok(Shortfall::default()), (0, 0), 0);
        assert_eq!(
            repair_state(&workers, &[]),
            "due",
            "the second ask is not covered"
        );
        let started = workers.repair_asked.load(Ordering::Acquire);
        workers.repair_covered.fetch_max(started, Ordering::AcqRel);
        assert_eq!(repair_state(&workers, &[]), "idle");

        // A pass that is running or failed shows that, not due; an off worker stays off.
        workers.repair_due();
        workers.repair.begin(4);
        assert_eq!(repair_state(&workers, &[]), "running");
        workers.repair.update(|s| s.state = "off");
        assert_eq!(repair_state(&workers, &["10.0.0.2:7421"]), "off");
    }
}

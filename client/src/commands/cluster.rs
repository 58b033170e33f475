//! `hashgrid cluster status|nodes|set`: the cluster as its members report it. The answering
//! node gives the map (epoch, R, W, members and their states) and the catalog group's
//! leader; every member is then asked for its own figures (chunks and bytes it holds,
//! bytes reclaimable, chunk copies under-replicated, its workers), and a member that does
//! not answer within [`MEMBER_DEADLINE`] is shown `down`.

use std::time::Duration;

use hashgrid_proto::pb::{SetReplicationRequest, StatsRequest, StatsResponse};
use hashgrid_proto::placement::{Member, MemberState};
use hashgrid_proto::ChunkId;
use indicatif::HumanBytes;

use super::{outln, print_json, Global};
use crate::connection::Connection;

/// How long a member has to answer for its figures before it is shown as down.
const MEMBER_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Epoch, replication, the catalog leader, data moving or under-replicated, the members.
    Status,
    /// One line per member, with what it holds.
    Nodes,
    /// Changes the replication factor and write quorum; chunks re-replicate in the background.
    Set(SetArgs),
}

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// Copies of every chunk (R).
    #[arg(long)]
    pub replicas: u32,
    /// Copies a write waits for (W <= R).
    #[arg(long)]
    pub write_quorum: u32,
}

/// A member's place in the catalog's Raft group, as the answering node knows it.
fn raft_role(id: u64, leader: u64, voters: &[u64], learners: &[u64]) -> &'static str {
    if id == leader {
        "leader"
    } else if voters.contains(&id) {
        "voter"
    } else if learners.contains(&id) {
        "learner"
    } else {
        "none"
    }
}

/// Asks every member that is not removed for its own figures, all at once.
async fn member_stats(global: &Global, members: &[Member]) -> Vec<Option<StatsResponse>> {
    let asks = members.iter().map(|m| async move {
        if m.state == MemberState::Removed {
            return None;
        }
        let mut opts = global.connect_options();
        opts.server = m.addr.clone();
        let ask = async {
            let conn = Connection::connect(&opts).await.ok()?;
            let ask = StatsRequest { missing_ids: true };
            let s = conn.admin.clone().stats(ask).await.ok()?;
            // The connection may fail over to another member: only the member's own answer
            // counts.
            Some(s.into_inner()).filter(|s| s.node_id == m.id)
        };
        tokio::time::timeout(MEMBER_DEADLINE, ask)
            .await
            .ok()
            .flatten()
    });
    futures::future::join_all(asks).await
}

/// Chunks short of a copy across the cluster, each counted once: every node counts its
/// own (`under_replicated`), and lists the ids of those it lacks, which another owner may
/// lack too; those lists are merged, the rest (counted by one node only, or beyond the ids
/// a node keeps) added.
fn chunks_under_replicated<'a>(stats: impl Iterator<Item = &'a StatsResponse>) -> u64 {
    let mut ids: Vec<&[u8]> = Vec::new();
    let mut rest = 0u64;
    for s in stats {
        let listed: Vec<&[u8]> = s.missing_ids.chunks_exact(ChunkId::LEN).collect();
        rest += s.under_replicated.saturating_sub(listed.len() as u64);
        ids.extend(listed);
    }
    ids.sort_unstable();
    ids.dedup();
    ids.len() as u64 + rest
}

/// The state shown for a member: its map state, or `down` when a member that should
/// answer did not.
fn shown_state(m: &Member, stats: Option<&StatsResponse>) -> &'static str {
    match (m.state, stats) {
        (MemberState::Removed, _) => "removed",
        (_, None) => "down",
        (s, Some(_)) => s.as_str(),
    }
}

pub async fn run(global: &Global, args: &Args) -> anyhow::Result<()> {
    let conn = global.connect().await?;
    if let What::Set(set) = &args.what {
        let map = conn
            .admin
            .clone()
            .set_replication(SetReplicationRequest {
                replication: set.replicas,
                write_quorum: set.write_quorum,
            })
            .await?
            .into_inner()
            .map
            .unwrap_or_default();
        if global.json {
            return print_json(&serde_json::json!({
                "epoch": map.epoch, "replicas": map.replication, "write_quorum": map.write_quorum,
            }));
        }
        outln!(
            "epoch {}: R={} W={}; chunks re-replicate in the background (see `hashgrid cluster status`)",
            map.epoch,
            map.replication,
            map.write_quorum
        );
        return Ok(());
    }
    let s = &conn.status;
    let map = &conn.map;
    let role = |m: &Member| raft_role(m.id, s.raft_leader, &s.raft_voters, &s.raft_learners);
    let stats = member_stats(global, &map.members).await;
    let answered = || stats.iter().flatten();
    let under_replicated = chunks_under_replicated(answered());
    let missing_copies: u64 = answered().map(|x| x.under_replicated).sum();
    let reclaimable: u64 = answered().map(|x| x.reclaimable_bytes).sum();
    let hand_off_pending: u64 = answered().map(|x| x.hand_off_pending).sum();
    let moving = answered().map(|x| x.moving).max().unwrap_or(0);
    if global.json {
        let members: Vec<_> = map
            .members
            .iter()
            .zip(&stats)
            .map(|(m, st)| {
                let workers: Vec<_> = st
                    .iter()
                    .flat_map(|x| &x.workers)
                    .map(|w| {
                        serde_json::json!({
                            "name": w.name, "state": w.state, "passes": w.passes,
                            "partitions_done": w.partitions_done,
                            "partitions_total": w.partitions_total,
                            "chunks_copied": w.chunks_copied, "bytes_copied": w.bytes_copied,
                            "chunks_released": w.chunks_released, "ids_listed": w.ids_listed,
                            "under_replicated": w.under_replicated,
                            "last_error": w.last_error, "last_pass_unix": w.last_pass_unix,
                            "waiting_for": w.waiting_for,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "id": m.id, "addr": m.addr, "zone": m.zone, "weight": m.weight,
                    "state": shown_state(m, st.as_ref()), "map_state": m.state.as_str(),
                    "raft": role(m),
                    "chunks": st.as_ref().map(|x| x.chunks),
                    "stored_bytes": st.as_ref().map(|x| x.stored_bytes),
                    "reclaimable_bytes": st.as_ref().map(|x| x.reclaimable_bytes),
                    "under_replicated": st.as_ref().map(|x| x.under_replicated),
                    "hand_off_pending": st.as_ref().map(|x| x.hand_off_pending),
                    "move_limit_bytes_per_sec": st.as_ref().map(|x| x.move_limit_bytes_per_sec),
                    "workers": workers,
                })
            })
            .collect();
        return print_json(&serde_json::json!({
            "answered_by": s.node_id,
            "leader": s.raft_leader,
            "epoch": map.epoch,
            "replicas": map.replication,
            "write_quorum": map.write_quorum,
            "moving": moving,
            "under_replicated": under_replicated,
            "under_replicated_copies": missing_copies,
            "hand_off_pending": hand_off_pending,
            "reclaimable_bytes": reclaimable,
            "members": members,
        }));
    }
    if matches!(args.what, What::Status) {
        outln!(
            "epoch {}, R={} W={}, catalog leader {}, answered by node {}",
            map.epoch,
            map.replication,
            map.write_quorum,
            s.raft_leader,
            s.node_id
        );
        outln!(
            "partitions moving {moving}, chunks under-replicated {under_replicated}, \
             chunks awaiting hand-off {hand_off_pending}, reclaimable {}",
            HumanBytes(reclaimable)
        );
    }
    outln!(
        "{:>20}  {:<22} {:<10} {:>6}  {:<9} {:<8} {:>10} {:>10}  workers",
        "id",
        "addr",
        "zone",
        "weight",
        "state",
        "raft",
        "chunks",
        "stored"
    );
    for (m, st) in map.members.iter().zip(&stats) {
        let workers: Vec<String> = st
            .iter()
            .flat_map(|x| &x.workers)
            .map(|w| match w.state.as_str() {
                "running" => format!("{} {}/{}", w.name, w.partitions_done, w.partitions_total),
                "due" if !w.waiting_for.is_empty() => format!(
                    "{} due (out of contact with {})",
                    w.name,
                    w.waiting_for.join(" ")
                ),
                state => format!("{} {state}", w.name),
            })
            .chain(
                st.iter()
                    .filter(|x| x.move_limit_bytes_per_sec > 0)
                    .map(|x| {
                        format!(
                            "moving at most {}/s",
                            HumanBytes(x.move_limit_bytes_per_sec)
                        )
                    }),
            )
            .collect();
        outln!(
            "{:>20}  {:<22} {:<10} {:>6}  {:<9} {:<8} {:>10} {:>10}  {}",
            m.id,
            m.addr,
            m.zone,
            m.weight,
            shown_state(m, st.as_ref()),
            role(m),
            st.as_ref().map_or("-".into(), |x| x.chunks.to_string()),
            st.as_ref()
                .map_or("-".into(), |x| HumanBytes(x.stored_bytes).to_string()),
            workers.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use hashgrid_proto::id::pack_ids;

    use super::*;

    fn node(under: u64, missing: &[u8]) -> StatsResponse {
        let ids: Vec<ChunkId> = missing.iter().map(|i| ChunkId::of(&[*i])).collect();
        StatsResponse {
            under_replicated: under,
            missing_ids: pack_ids(&ids),
            ..Default::default()
        }
    }

    #[test]
    fn a_chunk_two_owners_lack_counts_once() {
        // Two owners both lack chunks 1 and 2; one lacks 3 too; a third counts 4 chunks of
        // partitions with an owner it cannot reach (no ids).
        let nodes = [node(2, &[1, 2]), node(3, &[1, 2, 3]), node(4, &[])];
        assert_eq!(chunks_under_replicated(nodes.iter()), 3 + 4);
        // A node that kept fewer ids than it counts: the rest adds as counted.
        let nodes = [node(2, &[1, 2]), node(10, &[1, 2, 3])];
        assert_eq!(chunks_under_replicated(nodes.iter()), 3 + 7);
        assert_eq!(chunks_under_replicated([].iter()), 0);
        // Without ids (a node of an earlier version): the sum, as before.
        let nodes = [node(2, &[]), node(3, &[])];
        assert_eq!(chunks_under_replicated(nodes.iter()), 5);
    }
}

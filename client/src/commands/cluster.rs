//! `hashgrid cluster status|nodes`: the cluster as the answering node knows it: the map's
//! epoch, replication factor and write quorum, the catalog group's leader, and every member
//! with its address, zone, weight, state and role in the catalog group.

use hashgrid_proto::placement::Member;

use super::{outln, print_json, Global};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Epoch, replication, the catalog leader, and the members.
    Status,
    /// One line per member.
    Nodes,
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

pub async fn run(global: &Global, args: &Args) -> anyhow::Result<()> {
    let conn = global.connect().await?;
    let s = &conn.status;
    let map = &conn.map;
    let role = |m: &Member| raft_role(m.id, s.raft_leader, &s.raft_voters, &s.raft_learners);
    if global.json {
        let members: Vec<_> = map
            .members
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id, "addr": m.addr, "zone": m.zone, "weight": m.weight,
                    "state": m.state.as_str(), "raft": role(m),
                })
            })
            .collect();
        return print_json(&serde_json::json!({
            "answered_by": s.node_id,
            "leader": s.raft_leader,
            "epoch": map.epoch,
            "replicas": map.replication,
            "write_quorum": map.write_quorum,
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
    }
    outln!(
        "{:>20}  {:<22} {:<10} {:>6}  {:<9} raft",
        "id",
        "addr",
        "zone",
        "weight",
        "state"
    );
    for m in &map.members {
        outln!(
            "{:>20}  {:<22} {:<10} {:>6}  {:<9} {}",
            m.id,
            m.addr,
            m.zone,
            m.weight,
            m.state.as_str(),
            role(m)
        );
    }
    Ok(())
}

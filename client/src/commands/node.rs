//! `hashgrid node add|drain|remove ID`: changes a member's state through any node (the
//! catalog leader applies it). Data moves in the background; `hashgrid cluster status`
//! shows the partitions still moving.

use hashgrid_proto::pb::{self, ChangeMemberRequest};
use hashgrid_proto::placement::ClusterMap;

use super::{outln, print_json, Global};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Makes a member active: one that joined with `--standby`, or a draining one that
    /// should stay. It takes its share of the partitions.
    Add { id: u64 },
    /// Moves a member's data to the others; it stays reachable until removed.
    Drain { id: u64 },
    /// Takes a member out for good: a drained one, or a dead one (its copies are
    /// re-replicated from the survivors). A removed node's id cannot rejoin.
    Remove { id: u64 },
}

pub async fn run(global: &Global, args: &Args) -> anyhow::Result<()> {
    let (id, state, verb) = match args.what {
        What::Add { id } => (id, pb::MemberState::Active, "active"),
        What::Drain { id } => (id, pb::MemberState::Draining, "draining"),
        What::Remove { id } => (id, pb::MemberState::Removed, "removed"),
    };
    let conn = global.connect().await?;
    let map = conn
        .admin
        .clone()
        .change_member(ChangeMemberRequest {
            node_id: id,
            state: state as i32,
        })
        .await?
        .into_inner()
        .map
        .unwrap_or_default();
    let map = ClusterMap::try_from(map)?;
    if global.json {
        return print_json(&serde_json::json!({ "node": id, "state": verb, "epoch": map.epoch }));
    }
    outln!(
        "node {id} is {verb} (map epoch {}); data moves in the background: `hashgrid cluster status` shows progress",
        map.epoch
    );
    Ok(())
}

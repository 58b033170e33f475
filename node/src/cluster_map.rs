//! Changes to the cluster map and the history of maps whose partitions are still moving.
//!
//! Every change makes a new map with the next epoch. When the change moves data (the set of
//! active members, their zones or weights, or R changed), the map it replaces is kept as an
//! *older* map: writes go to the new owners while reads and lookups also try the older
//! owners (see `hashgrid_proto::placement::PlacementHistory`). Each active member reports,
//! through the catalog, when it holds every chunk of the partitions it owns under the
//! current map (its rebalance pass is done); once all have, the older maps are retired and
//! the nodes that no longer own a partition may drop its index entries.
//!
//! Pure functions over plain data: the catalog applies them inside the Raft state machine,
//! so every replica reaches the same map.

use std::collections::BTreeMap;

use hashgrid_proto::placement::{ClusterMap, Member, MemberState};
use hashgrid_proto::NodeId;
use serde::{Deserialize, Serialize};

/// Most replicas a cluster may keep of each chunk.
pub const MAX_REPLICATION: u8 = 7;

/// One change to the map. Serialized inside Raft entries: variants are only ever appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapChange {
    /// Adds a member (as `Joining`), or updates the address, zone and weight of a member
    /// that is already listed (a restarted node that moved).
    Upsert {
        id: NodeId,
        addr: String,
        zone: String,
        weight: u32,
    },
    SetState {
        id: NodeId,
        state: MemberState,
    },
    SetReplication {
        replication: u8,
        write_quorum: u8,
    },
}

/// Why a change was refused. The catalog answers it as a rejected command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapChangeError {
    #[error("node {0} is not a member")]
    UnknownMember(NodeId),
    #[error("node {0} was removed; a replacement must join with a new data directory")]
    Removed(NodeId),
    #[error("node {id} cannot go from {from} to {to}")]
    Transition {
        id: NodeId,
        from: &'static str,
        to: &'static str,
    },
    #[error("the cluster needs at least one active member")]
    NoActiveMember,
    #[error("need 1 <= write quorum ({w}) <= replicas ({r}) <= {MAX_REPLICATION}")]
    Replication { r: u8, w: u8 },
    #[error("a member's weight must be at least 1")]
    ZeroWeight,
}

/// The map after `change`, with the next epoch.
pub fn apply_change(map: &ClusterMap, change: &MapChange) -> Result<ClusterMap, MapChangeError> {
    let mut next = map.clone();
    next.epoch = map.epoch + 1;
    match change {
        MapChange::Upsert {
            id,
            addr,
            zone,
            weight,
        } => {
            if *weight == 0 {
                return Err(MapChangeError::ZeroWeight);
            }
            match next.members.iter_mut().find(|m| m.id == *id) {
                Some(m) if m.state == MemberState::Removed => {
                    return Err(MapChangeError::Removed(*id))
                }
                Some(m) => {
                    m.addr.clone_from(addr);
                    m.zone.clone_from(zone);
                    m.weight = *weight;
                }
                None => next.members.push(Member {
                    id: *id,
                    addr: addr.clone(),
                    zone: zone.clone(),
                    weight: *weight,
                    state: MemberState::Joining,
                }),
            }
        }
        MapChange::SetState { id, state } => {
            let m = next
                .members
                .iter_mut()
                .find(|m| m.id == *id)
                .ok_or(MapChangeError::UnknownMember(*id))?;
            use MemberState::*;
            let allowed = matches!(
                (m.state, *state),
                (Joining, Active)
                    | (Active, Draining)
                    | (Draining, Active)
                    | (Draining, Removed)
                    | (Active, Removed)
                    | (Joining, Removed)
            ) || m.state == *state;
            if m.state == Removed && *state != Removed {
                return Err(MapChangeError::Removed(*id));
            }
            if !allowed {
                return Err(MapChangeError::Transition {
                    id: *id,
                    from: m.state.as_str(),
                    to: state.as_str(),
                });
            }
            m.state = *state;
        }
        MapChange::SetReplication {
            replication,
            write_quorum,
        } => {
            let (r, w) = (*replication, *write_quorum);
            if w == 0 || w > r || r > MAX_REPLICATION {
                return Err(MapChangeError::Replication { r, w });
            }
            next.replication = r;
            next.write_quorum = w;
        }
    }
    if !next
        .members
        .iter()
        .any(|m| m.state == MemberState::Active && m.weight > 0)
    {
        return Err(MapChangeError::NoActiveMember);
    }
    Ok(next)
}

/// Would `a` and `b` place chunks differently? (Addresses and non-owning members do not
/// matter; the epoch does not either.)
pub fn places_differently(a: &ClusterMap, b: &ClusterMap) -> bool {
    let owners = |m: &ClusterMap| {
        let mut v: Vec<(NodeId, String, u32)> = m
            .members
            .iter()
            .filter(|x| x.state == MemberState::Active && x.weight > 0)
            .map(|x| (x.id, x.zone.clone(), x.weight))
            .collect();
        v.sort();
        v
    };
    a.replication != b.replication || a.partition_bits != b.partition_bits || owners(a) != owners(b)
}

/// Maps still in transition and who has caught up with the current one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapHistory {
    /// Older maps whose partitions are still moving, newest first.
    pub older: Vec<ClusterMap>,
    /// Per member: the newest epoch at which it held every chunk of the partitions it owns.
    pub synced: BTreeMap<NodeId, u64>,
}

impl MapHistory {
    /// Records that `current` replaced `previous`.
    pub fn changed(&mut self, previous: &ClusterMap, current: &ClusterMap) {
        if places_differently(previous, current) {
            self.older.insert(0, previous.clone());
        }
        self.synced.retain(|id, _| {
            current
                .member(*id)
                .is_some_and(|m| m.state != MemberState::Removed)
        });
        self.retire_if_done(current);
    }

    /// Records that `node` holds everything it owns under the map of `epoch`.
    pub fn report_synced(&mut self, node: NodeId, epoch: u64, current: &ClusterMap) {
        let e = self.synced.entry(node).or_default();
        *e = (*e).max(epoch);
        self.retire_if_done(current);
    }

    /// Drops the older maps once every active member has synced to the current epoch.
    fn retire_if_done(&mut self, current: &ClusterMap) {
        if self.older.is_empty() {
            return;
        }
        let done = current
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .all(|m| self.synced.get(&m.id).is_some_and(|&e| e >= current.epoch));
        if done {
            self.older.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(n: u64) -> ClusterMap {
        let mut m = ClusterMap::single(1, "a:1".into());
        for id in 2..=n {
            m.members.push(Member {
                id,
                addr: format!("n{id}:1"),
                zone: "default".into(),
                weight: 1,
                state: MemberState::Active,
            });
        }
        m
    }

    fn upsert(id: NodeId) -> MapChange {
        MapChange::Upsert {
            id,
            addr: format!("n{id}:1"),
            zone: "default".into(),
            weight: 1,
        }
    }

    #[test]
    fn join_then_activate_moves_data_and_retires_once_everyone_synced() {
        let m1 = map(2);
        let mut h = MapHistory::default();
        let m2 = apply_change(&m1, &upsert(3)).unwrap();
        assert_eq!(m2.epoch, m1.epoch + 1);
        assert_eq!(m2.member(3).unwrap().state, MemberState::Joining);
        h.changed(&m1, &m2);
        assert!(h.older.is_empty(), "a joining member owns nothing yet");

        let m3 = apply_change(
            &m2,
            &MapChange::SetState {
                id: 3,
                state: MemberState::Active,
            },
        )
        .unwrap();
        h.changed(&m2, &m3);
        assert_eq!(h.older, vec![m2.clone()]);
        h.report_synced(1, m3.epoch, &m3);
        h.report_synced(2, m3.epoch, &m3);
        assert_eq!(h.older.len(), 1);
        h.report_synced(3, m3.epoch - 1, &m3);
        assert_eq!(h.older.len(), 1, "an older epoch does not count");
        h.report_synced(3, m3.epoch, &m3);
        assert!(h.older.is_empty());
    }

    #[test]
    fn address_updates_do_not_move_data() {
        let m1 = map(3);
        let m2 = apply_change(
            &m1,
            &MapChange::Upsert {
                id: 2,
                addr: "elsewhere:9".into(),
                zone: "default".into(),
                weight: 1,
            },
        )
        .unwrap();
        assert_eq!(m2.member(2).unwrap().addr, "elsewhere:9");
        assert!(!places_differently(&m1, &m2));
        let m3 = apply_change(
            &m2,
            &MapChange::SetReplication {
                replication: 3,
                write_quorum: 2,
            },
        )
        .unwrap();
        assert!(places_differently(&m2, &m3));
    }

    #[test]
    fn illegal_changes_are_refused() {
        let m = map(2);
        let set = |id, state| MapChange::SetState { id, state };
        assert_eq!(
            apply_change(&m, &set(9, MemberState::Active)),
            Err(MapChangeError::UnknownMember(9))
        );
        let removed = apply_change(&m, &set(2, MemberState::Removed)).unwrap();
        assert_eq!(
            apply_change(&removed, &set(2, MemberState::Active)),
            Err(MapChangeError::Removed(2))
        );
        assert_eq!(
            apply_change(&removed, &upsert(2)),
            Err(MapChangeError::Removed(2))
        );
        let only = map(1);
        assert_eq!(
            apply_change(&only, &set(1, MemberState::Draining)),
            Err(MapChangeError::NoActiveMember)
        );
        assert!(matches!(
            apply_change(
                &m,
                &MapChange::SetReplication {
                    replication: 2,
                    write_quorum: 3
                }
            ),
            Err(MapChangeError::Replication { .. })
        ));
        assert!(matches!(
            apply_change(&m, &set(2, MemberState::Joining)),
            Err(MapChangeError::Transition { .. })
        ));
    }

    #[test]
    fn removed_members_leave_the_sync_table() {
        let m1 = map(3);
        let mut h = MapHistory::default();
        h.report_synced(3, 1, &m1);
        let m2 = apply_change(
            &m1,
            &MapChange::SetState {
                id: 3,
                state: MemberState::Removed,
            },
        )
        .unwrap();
        h.changed(&m1, &m2);
        assert!(!h.synced.contains_key(&3));
        assert_eq!(h.older, vec![m1]);
    }
}

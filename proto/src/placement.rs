//! The cluster map and the placement function: which nodes own a chunk.
//!
//! A chunk id maps to one of `2^partition_bits` partitions by its top bits; a partition's
//! owners are the first `replication` distinct active members clockwise from the partition on
//! a consistent-hash ring (virtual nodes in proportion to weight), preferring members in zones
//! not yet used while unused zones remain. Partitions, not chunks, are the unit of
//! rebalancing, repair, scrub and GC sweeps. Agents, nodes and tests all compute owners here,
//! from the same map, so they agree.

use consistent_hash::{DefaultHash, Node, StaticHashRing};
use serde::{Deserialize, Serialize};

use crate::{pb, ChunkId, DecodeError, NodeId};

/// Virtual nodes per unit of weight. A member of weight 1 gets this many points on the ring.
pub const VNODES_PER_WEIGHT: usize = 64;

/// Partition count used by `hashgrid-node` when it creates a cluster (2^12 = 4096).
pub const DEFAULT_PARTITION_BITS: u8 = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Owns partitions.
    Active,
    /// Leaving: owns nothing in this map; its chunks are moving to the new owners.
    Draining,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    /// Address agents and peers dial (`host:port`).
    pub addr: String,
    pub zone: String,
    pub weight: u32,
    pub state: MemberState,
}

/// The cluster's membership at one epoch. Every change makes a new map with a higher epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub epoch: u64,
    pub partition_bits: u8,
    pub replication: u8,
    pub write_quorum: u8,
    pub members: Vec<Member>,
}

impl ClusterMap {
    /// The map of a new one-node cluster (R = W = 1).
    pub fn single(id: NodeId, addr: String) -> Self {
        ClusterMap {
            epoch: 1,
            partition_bits: DEFAULT_PARTITION_BITS,
            replication: 1,
            write_quorum: 1,
            members: vec![Member {
                id,
                addr,
                zone: "default".into(),
                weight: 1,
                state: MemberState::Active,
            }],
        }
    }

    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn validate(&self) -> Result<(), DecodeError> {
        let bad = |reason: String| Err(DecodeError::invalid("cluster map", reason));
        if !(1..=16).contains(&self.partition_bits) {
            return bad(format!(
                "partition_bits {} not in 1..=16",
                self.partition_bits
            ));
        }
        if self.replication == 0 || self.write_quorum == 0 || self.write_quorum > self.replication {
            return bad(format!(
                "need 1 <= W ({}) <= R ({})",
                self.write_quorum, self.replication
            ));
        }
        let mut ids: Vec<_> = self.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.members.len() {
            return bad("duplicate member id".into());
        }
        if !self
            .members
            .iter()
            .any(|m| m.state == MemberState::Active && m.weight > 0)
        {
            return bad("no active member with weight > 0".into());
        }
        Ok(())
    }
}

/// A partition number, `0..2^partition_bits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition(pub u32);

/// Owners of every partition under one map epoch, computed once when the epoch is adopted.
#[derive(Clone, Debug)]
pub struct Placement {
    epoch: u64,
    partition_bits: u8,
    replication: usize,
    write_quorum: usize,
    /// `owners[p]` lists partition p's owners, preferred first.
    owners: Vec<Vec<NodeId>>,
}

impl Placement {
    pub fn new(map: &ClusterMap) -> Result<Self, DecodeError> {
        map.validate()?;
        let active: Vec<&Member> = map
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active && m.weight > 0)
            .collect();
        let ring = StaticHashRing::new(
            DefaultHash,
            active.iter().map(|m| {
                Node::new(m.id)
                    .value(m.zone.as_str())
                    .quantity(m.weight as usize * VNODES_PER_WEIGHT)
            }),
        );
        let replication = usize::from(map.replication);
        let owners = (0..1u32 << map.partition_bits)
            .map(|p| {
                let candidates: Vec<(NodeId, &str)> =
                    ring.calc_candidates(&p).map(|n| (n.key, n.value)).collect();
                spread_over_zones(&candidates, replication)
            })
            .collect();
        Ok(Placement {
            epoch: map.epoch,
            partition_bits: map.partition_bits,
            replication,
            write_quorum: usize::from(map.write_quorum),
            owners,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn partitions(&self) -> u32 {
        1 << self.partition_bits
    }

    pub fn replication(&self) -> usize {
        self.replication
    }

    pub fn write_quorum(&self) -> usize {
        self.write_quorum
    }

    /// The partition holding `id`: its top `partition_bits` bits.
    pub fn partition_of(&self, id: &ChunkId) -> Partition {
        Partition((id.prefix_u64() >> (64 - u32::from(self.partition_bits))) as u32)
    }

    pub fn owners(&self, partition: Partition) -> &[NodeId] {
        &self.owners[partition.0 as usize]
    }

    pub fn owners_of(&self, id: &ChunkId) -> &[NodeId] {
        self.owners(self.partition_of(id))
    }
}

/// Takes `r` owners from ring-ordered candidates, preferring zones not used yet.
fn spread_over_zones(candidates: &[(NodeId, &str)], r: usize) -> Vec<NodeId> {
    let mut chosen: Vec<(NodeId, &str)> = Vec::with_capacity(r);
    for &(id, zone) in candidates {
        if chosen.len() == r {
            break;
        }
        if !chosen.iter().any(|&(_, z)| z == zone) {
            chosen.push((id, zone));
        }
    }
    for &(id, zone) in candidates {
        if chosen.len() == r {
            break;
        }
        if !chosen.iter().any(|&(c, _)| c == id) {
            chosen.push((id, zone));
        }
    }
    // Keep ring order among the chosen, so the first owner is the one clockwise-nearest.
    let mut owners: Vec<NodeId> = Vec::with_capacity(chosen.len());
    for &(id, _) in candidates {
        if chosen.iter().any(|&(c, _)| c == id) {
            owners.push(id);
        }
    }
    owners
}

impl From<&Member> for pb::Member {
    fn from(m: &Member) -> Self {
        pb::Member {
            id: m.id,
            addr: m.addr.clone(),
            zone: m.zone.clone(),
            weight: m.weight,
            state: match m.state {
                MemberState::Active => pb::MemberState::Active,
                MemberState::Draining => pb::MemberState::Draining,
            } as i32,
        }
    }
}

impl From<&ClusterMap> for pb::ClusterMap {
    fn from(m: &ClusterMap) -> Self {
        pb::ClusterMap {
            epoch: m.epoch,
            partition_bits: u32::from(m.partition_bits),
            replication: u32::from(m.replication),
            write_quorum: u32::from(m.write_quorum),
            members: m.members.iter().map(pb::Member::from).collect(),
        }
    }
}

impl TryFrom<pb::ClusterMap> for ClusterMap {
    type Error = DecodeError;
    fn try_from(m: pb::ClusterMap) -> Result<Self, DecodeError> {
        let small = |v: u32, what: &'static str| {
            u8::try_from(v).map_err(|_| DecodeError::invalid("cluster map", format!("{what} {v}")))
        };
        let members = m
            .members
            .into_iter()
            .map(|pm| {
                let state = match pb::MemberState::try_from(pm.state) {
                    Ok(pb::MemberState::Active) => MemberState::Active,
                    Ok(pb::MemberState::Draining) => MemberState::Draining,
                    Err(_) => {
                        return Err(DecodeError::invalid(
                            "cluster map",
                            format!("member state {}", pm.state),
                        ))
                    }
                };
                Ok(Member {
                    id: pm.id,
                    addr: pm.addr,
                    zone: pm.zone,
                    weight: pm.weight,
                    state,
                })
            })
            .collect::<Result<_, _>>()?;
        let map = ClusterMap {
            epoch: m.epoch,
            partition_bits: small(m.partition_bits, "partition_bits")?,
            replication: small(m.replication, "replication")?,
            write_quorum: small(m.write_quorum, "write_quorum")?,
            members,
        };
        map.validate()?;
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    fn map(n: u64, zones: usize, r: u8) -> ClusterMap {
        ClusterMap {
            epoch: 7,
            partition_bits: 12,
            replication: r,
            write_quorum: r.min(2),
            members: (1..=n)
                .map(|id| Member {
                    id,
                    addr: format!("10.0.0.{id}:7420"),
                    zone: format!("z{}", id as usize % zones),
                    weight: 1,
                    state: MemberState::Active,
                })
                .collect(),
        }
    }

    #[test]
    fn one_member_owns_everything() {
        let p = Placement::new(&ClusterMap::single(42, "127.0.0.1:7420".into())).unwrap();
        assert_eq!(p.partitions(), 4096);
        for i in 0..100u8 {
            assert_eq!(p.owners_of(&ChunkId::of(&[i])), &[42]);
        }
    }

    #[test]
    fn partition_is_the_top_bits() {
        let p = Placement::new(&map(3, 3, 3)).unwrap();
        let mut id = [0u8; 32];
        id[0] = 0xAB;
        id[1] = 0xCD;
        assert_eq!(p.partition_of(&ChunkId::from_bytes(id)), Partition(0xABC));
    }

    #[test]
    fn owners_are_distinct_deterministic_and_r_long() {
        let m = map(5, 5, 3);
        let a = Placement::new(&m).unwrap();
        let b = Placement::new(&m).unwrap();
        for part in 0..a.partitions() {
            let owners = a.owners(Partition(part));
            assert_eq!(owners, b.owners(Partition(part)));
            assert_eq!(owners.len(), 3);
            assert_eq!(owners.iter().collect::<HashSet<_>>().len(), 3);
        }
    }

    #[test]
    fn owners_spread_over_zones_when_there_are_enough() {
        // 6 nodes in 3 zones, R = 3: every partition has one owner per zone.
        let m = map(6, 3, 3);
        let p = Placement::new(&m).unwrap();
        for part in 0..p.partitions() {
            let zones: HashSet<_> = p
                .owners(Partition(part))
                .iter()
                .map(|id| m.member(*id).unwrap().zone.clone())
                .collect();
            assert_eq!(zones.len(), 3, "partition {part}");
        }
    }

    #[test]
    fn load_is_roughly_even() {
        let p = Placement::new(&map(4, 4, 1)).unwrap();
        let mut count: HashMap<NodeId, u32> = HashMap::new();
        for part in 0..p.partitions() {
            *count.entry(p.owners(Partition(part))[0]).or_default() += 1;
        }
        for (&node, &c) in &count {
            assert!((700..=1350).contains(&c), "node {node} owns {c} of 4096");
        }
    }

    #[test]
    fn adding_a_node_moves_about_one_nth() {
        let before = Placement::new(&map(4, 4, 1)).unwrap();
        let after = Placement::new(&map(5, 5, 1)).unwrap();
        let moved = (0..before.partitions())
            .filter(|&p| before.owners(Partition(p)) != after.owners(Partition(p)))
            .count();
        // Ideal is 1/5 = 819 of 4096; consistent hashing keeps it near that.
        assert!((500..=1300).contains(&moved), "moved {moved}");
    }

    #[test]
    fn fewer_members_than_r_gives_all_members() {
        let p = Placement::new(&map(2, 2, 3)).unwrap();
        assert_eq!(p.owners(Partition(0)).len(), 2);
    }

    #[test]
    fn draining_members_own_nothing() {
        let mut m = map(3, 3, 1);
        m.members[0].state = MemberState::Draining;
        let p = Placement::new(&m).unwrap();
        assert!((0..p.partitions()).all(|part| !p.owners(Partition(part)).contains(&1)));
    }

    #[test]
    fn invalid_maps_are_rejected() {
        let mut m = map(3, 3, 3);
        m.write_quorum = 4;
        assert!(Placement::new(&m).is_err());
        let mut m = map(3, 3, 3);
        m.members[1].id = 1;
        assert!(Placement::new(&m).is_err());
    }

    #[test]
    fn wire_round_trip() {
        let m = map(3, 2, 3);
        let back = ClusterMap::try_from(pb::ClusterMap::from(&m)).unwrap();
        assert_eq!(back, m);
    }
}

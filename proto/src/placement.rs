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
/// 256 keeps every member's share within about ±15% of its weight's share at 4096
/// partitions (64 gave up to ±35%, which made a joining node take up to 1.4x its share).
pub const VNODES_PER_WEIGHT: usize = 256;

/// Partition count used by `hashgrid-node` when it creates a cluster (2^12 = 4096).
pub const DEFAULT_PARTITION_BITS: u8 = 12;

/// A member's place in the cluster's life cycle. Only `Active` members own partitions; the
/// others are kept in the map so every node knows where they are (a draining member still
/// serves reads as an owner under an older map until its partitions have moved).
///
/// Serialized by postcard inside Raft entries: variants are only ever appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemberState {
    /// Owns partitions.
    Active,
    /// Leaving: owns nothing in this map; its chunks are moving to the new owners.
    Draining,
    /// Has joined the catalog group and is catching up; owns nothing yet.
    Joining,
    /// Gone for good (drained, or declared dead by an operator); owns nothing.
    Removed,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Draining => "draining",
            MemberState::Joining => "joining",
            MemberState::Removed => "removed",
        }
    }
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
    /// `fallbacks[p]`: the next active members clockwise after p's owners, at most
    /// `replication` of them (see [`Placement::fallbacks`]).
    fallbacks: Vec<Vec<NodeId>>,
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
        let (owners, fallbacks) = (0..1u32 << map.partition_bits)
            .map(|p| {
                let candidates: Vec<(NodeId, &str)> =
                    ring.calc_candidates(&p).map(|n| (n.key, n.value)).collect();
                let owners = spread_over_zones(&candidates, replication);
                let fallbacks = candidates
                    .iter()
                    .map(|&(id, _)| id)
                    .filter(|id| !owners.contains(id))
                    .take(replication)
                    .collect();
                (owners, fallbacks)
            })
            .unzip();
        Ok(Placement {
            epoch: map.epoch,
            partition_bits: map.partition_bits,
            replication,
            write_quorum: usize::from(map.write_quorum),
            owners,
            fallbacks,
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

    /// Bits of the id that name its partition (fixed at cluster init).
    pub fn partition_bits(&self) -> u8 {
        self.partition_bits
    }

    pub fn owners(&self, partition: Partition) -> &[NodeId] {
        &self.owners[partition.0 as usize]
    }

    pub fn owners_of(&self, id: &ChunkId) -> &[NodeId] {
        self.owners(self.partition_of(id))
    }

    /// Where copies of `partition`'s chunks go when too few of its owners can take them
    /// (a sloppy quorum, as in Dynamo): the active members that follow the owners on the
    /// ring, in ring order, none of them an owner, at most R. A copy on a fallback counts
    /// toward W until the fallback has handed it to the owners; empty when every active
    /// member is an owner.
    pub fn fallbacks(&self, partition: Partition) -> &[NodeId] {
        &self.fallbacks[partition.0 as usize]
    }
}

/// The ids of `partition` under `partition_bits`: from `start` (inclusive) up to `end`
/// (exclusive; `None` after the last partition). A partition is the ids sharing their top
/// bits, so in id order it is one contiguous range: stores keyed by id scan a partition as
/// one range.
pub fn partition_range(partition_bits: u8, partition: Partition) -> ([u8; 32], Option<[u8; 32]>) {
    let shift = 64 - u32::from(partition_bits);
    let key = |p: u64| {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(p << shift).to_be_bytes());
        k
    };
    let p = u64::from(partition.0);
    let end = (p + 1 < 1u64 << partition_bits).then(|| key(p + 1));
    (key(p), end)
}

/// The placements of the current map and of the older maps whose partitions are still
/// moving (Garage's layout history): writes go to the current owners; reads and lookups try
/// the current owners, then the older ones, until every partition has reached its new
/// owners and the older maps are retired.
#[derive(Clone, Debug)]
pub struct PlacementHistory {
    current: std::sync::Arc<Placement>,
    /// Newest first.
    older: Vec<std::sync::Arc<Placement>>,
}

impl PlacementHistory {
    /// `older` newest first; every map must have the same partition count (fixed at init).
    pub fn new(
        current: std::sync::Arc<Placement>,
        older: Vec<std::sync::Arc<Placement>>,
    ) -> Result<Self, DecodeError> {
        if let Some(p) = older
            .iter()
            .find(|p| p.partition_bits != current.partition_bits)
        {
            return Err(DecodeError::invalid(
                "map history",
                format!(
                    "epoch {} has {} partition bits, epoch {} has {}",
                    p.epoch, p.partition_bits, current.epoch, current.partition_bits
                ),
            ));
        }
        Ok(PlacementHistory { current, older })
    }

    pub fn current(&self) -> &Placement {
        &self.current
    }

    pub fn older(&self) -> &[std::sync::Arc<Placement>] {
        &self.older
    }

    pub fn epoch(&self) -> u64 {
        self.current.epoch
    }

    /// Where new copies of `id` go.
    pub fn write_owners(&self, id: &ChunkId) -> &[NodeId] {
        self.current.owners_of(id)
    }

    /// Every node that may hold a copy of a chunk in `partition`: current owners first (in
    /// preference order), then owners under older maps not already listed.
    pub fn read_owners(&self, partition: Partition) -> Vec<NodeId> {
        let mut out = self.current.owners(partition).to_vec();
        for p in &self.older {
            for &n in p.owners(partition) {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        out
    }

    /// Is `partition` moving: do its owners under some older map differ from the current ones?
    pub fn is_moving(&self, partition: Partition) -> bool {
        let now = self.current.owners(partition);
        self.older
            .iter()
            .any(|p| !same_set(p.owners(partition), now))
    }

    /// Partitions whose owners differ between the current map and some older one.
    pub fn moving(&self) -> impl Iterator<Item = Partition> + '_ {
        (0..self.current.partitions())
            .map(Partition)
            .filter(|&p| self.is_moving(p))
    }
}

fn same_set(a: &[NodeId], b: &[NodeId]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

/// One partition replica that changes hands between two placements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub partition: Partition,
    /// `None` when the partition gains a replica (R grew, or fewer members than R before).
    pub from: Option<NodeId>,
    /// `None` when the partition loses a replica.
    pub to: Option<NodeId>,
}

/// The replicas that move from `before` to `after`: for each partition, the owners that leave
/// paired with the owners that arrive.
pub fn moves(before: &Placement, after: &Placement) -> Vec<Move> {
    let mut out = Vec::new();
    for p in 0..before.partitions().min(after.partitions()) {
        let part = Partition(p);
        let (old, new) = (before.owners(part), after.owners(part));
        let leaving: Vec<NodeId> = old.iter().copied().filter(|n| !new.contains(n)).collect();
        let arriving: Vec<NodeId> = new.iter().copied().filter(|n| !old.contains(n)).collect();
        for i in 0..leaving.len().max(arriving.len()) {
            out.push(Move {
                partition: part,
                from: leaving.get(i).copied(),
                to: arriving.get(i).copied(),
            });
        }
    }
    out
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
                MemberState::Joining => pb::MemberState::Joining,
                MemberState::Removed => pb::MemberState::Removed,
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
                    Ok(pb::MemberState::Joining) => MemberState::Joining,
                    Ok(pb::MemberState::Removed) => MemberState::Removed,
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
    fn partition_ranges_cover_exactly_their_ids() {
        let placement = Placement::new(&map(3, 1, 1)).unwrap();
        let bits = placement.partition_bits();
        let last = Partition(placement.partitions() - 1);
        assert_eq!(partition_range(bits, Partition(0)).0, [0u8; 32]);
        assert_eq!(partition_range(bits, last).1, None);
        for seed in 0..2000u32 {
            let id = ChunkId::of(&seed.to_le_bytes());
            let p = placement.partition_of(&id);
            let (start, end) = partition_range(bits, p);
            assert!(id.as_bytes()[..] >= start[..]);
            assert!(end.is_none_or(|e| id.as_bytes()[..] < e[..]));
            if p.0 > 0 {
                assert_eq!(partition_range(bits, Partition(p.0 - 1)).1, Some(start));
            }
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
    fn fallbacks_follow_the_owners_and_are_none_of_them() {
        let m = map(5, 5, 3);
        let p = Placement::new(&m).unwrap();
        let mut as_fallback: HashMap<NodeId, u32> = HashMap::new();
        for part in (0..p.partitions()).map(Partition) {
            let (owners, fallbacks) = (p.owners(part), p.fallbacks(part));
            assert_eq!(fallbacks.len(), 2, "5 members, 3 owners: the other 2");
            assert!(fallbacks.iter().all(|f| !owners.contains(f)));
            assert_ne!(fallbacks[0], fallbacks[1]);
            for &f in fallbacks {
                *as_fallback.entry(f).or_default() += 1;
            }
        }
        // Every member stands in for others: hinted copies spread over the cluster.
        assert_eq!(as_fallback.len(), 5);
        // Deterministic, like the owners: every node picks the same fallbacks.
        let again = Placement::new(&m).unwrap();
        assert!((0..p.partitions())
            .map(Partition)
            .all(|part| p.fallbacks(part) == again.fallbacks(part)));
        // Ten members, R = 3: at most R fallbacks, enough to stand in for every owner.
        let big = Placement::new(&map(10, 10, 3)).unwrap();
        assert!((0..big.partitions())
            .map(Partition)
            .all(|part| big.fallbacks(part).len() == 3));
        // No member beyond the owners: no fallback.
        let three = Placement::new(&map(3, 3, 3)).unwrap();
        assert!(three.fallbacks(Partition(0)).is_empty());
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

    /// The acceptance bound of the cluster issue: adding a 6th node to 5 at R = 3 moves at
    /// most 1.5x the ideal number of partition replicas (3 x 4096 / 6), every one of them onto
    /// the new node; draining one of 6 moves at most as many, every one off the drained node.
    #[test]
    fn five_to_six_nodes_moves_at_most_one_and_a_half_times_the_ideal() {
        let ideal = 3 * 4096 / 6;
        for zones in [1, 6] {
            let before = Placement::new(&map(5, zones, 3)).unwrap();
            let after = Placement::new(&map(6, zones, 3)).unwrap();
            let moved = moves(&before, &after);
            assert!(
                moved.len() * 2 <= ideal * 3,
                "{zones} zones: {} replicas moved, ideal {ideal}",
                moved.len()
            );
            assert!(moved.iter().all(|m| m.to == Some(6) && m.from.is_some()));

            let mut drained = map(6, zones, 3);
            drained.members[2].state = MemberState::Draining;
            let after_drain = Placement::new(&drained).unwrap();
            let moved = moves(&after, &after_drain);
            assert!(
                moved.len() * 2 <= ideal * 3,
                "{zones} zones: {} replicas moved by the drain, ideal {ideal}",
                moved.len()
            );
            assert!(moved
                .iter()
                .all(|m| m.from == Some(3) && m.to.is_some_and(|t| t != 3)));
        }
    }

    #[test]
    fn history_reads_new_owners_first_then_old_ones() {
        let old = std::sync::Arc::new(Placement::new(&map(5, 5, 3)).unwrap());
        let mut m6 = map(6, 6, 3);
        m6.epoch = 8;
        let new = std::sync::Arc::new(Placement::new(&m6).unwrap());
        let h = PlacementHistory::new(new.clone(), vec![old.clone()]).unwrap();
        let mut moving = 0;
        for p in (0..4096).map(Partition) {
            let reads = h.read_owners(p);
            assert_eq!(&reads[..3], new.owners(p));
            for n in old.owners(p) {
                assert!(reads.contains(n));
            }
            if h.is_moving(p) {
                moving += 1;
                assert_eq!(reads.len(), 4);
            } else {
                assert_eq!(reads.len(), 3);
            }
        }
        assert_eq!(moving, h.moving().count());
        assert_eq!(moving, moves(&old, &new).len());
        let mut other_bits = map(3, 3, 3);
        other_bits.partition_bits = 10;
        let odd = std::sync::Arc::new(Placement::new(&other_bits).unwrap());
        assert!(PlacementHistory::new(new, vec![odd]).is_err());
    }

    #[test]
    fn joining_and_removed_members_own_nothing() {
        let mut m = map(4, 4, 2);
        m.members[0].state = MemberState::Joining;
        m.members[1].state = MemberState::Removed;
        let p = Placement::new(&m).unwrap();
        assert!((0..p.partitions()).all(|part| p.owners(Partition(part)).iter().all(|&n| n > 2)));
        let back = ClusterMap::try_from(pb::ClusterMap::from(&m)).unwrap();
        assert_eq!(back, m);
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

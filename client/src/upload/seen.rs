//! The ids a backup session already offered, so a chunk met again (a duplicate block, the
//! same small file twice) is neither looked up nor sent again.
//!
//! The set is bounded: two generations of at most `generation` ids each; when the newer
//! fills, the older is dropped and the newer takes its place. Recently offered ids (the
//! last `generation` at least) are always remembered, which is where repeats cluster; an id
//! that aged out is only looked up once more, and the cluster answers "present". So a
//! 2 TiB image (about 32 million chunks) costs the same memory as a 30 GiB one.

use std::collections::HashSet;

use hashgrid_proto::ChunkId;

/// The ids per generation come from the memory budget ([`crate::memory::Sizing`]): 7/8 of a
/// power of two, the most a table of that many slots holds before it doubles.
pub struct SeenIds {
    generation: usize,
    newer: HashSet<ChunkId>,
    older: HashSet<ChunkId>,
}

impl SeenIds {
    pub fn new(generation: usize) -> Self {
        SeenIds {
            generation: generation.max(1),
            newer: HashSet::new(),
            older: HashSet::new(),
        }
    }

    /// Records `id`; true if it was not remembered (offer it), false if it was (skip it).
    pub fn insert(&mut self, id: ChunkId) -> bool {
        if self.newer.contains(&id) {
            return false;
        }
        // Met again: keep it with the recent ones.
        let fresh = !self.older.remove(&id);
        self.newer.insert(id);
        if self.newer.len() >= self.generation {
            // The tables keep their capacity: memory stays at two generations' worth.
            std::mem::swap(&mut self.newer, &mut self.older);
            self.newer.clear();
        }
        fresh
    }

    /// Ids remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.newer.len() + self.older.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    #[test]
    fn memory_is_bounded_whatever_the_number_of_ids() {
        let mut seen = SeenIds::new(1000);
        for n in 0..100_000 {
            assert!(seen.insert(id(n)));
            assert!(seen.len() <= 2000, "{} ids after {n}", seen.len());
        }
    }

    #[test]
    fn recently_offered_ids_are_still_skipped() {
        let mut seen = SeenIds::new(1000);
        for n in 0..10_000 {
            assert!(seen.insert(id(n)));
        }
        // The last generation's worth is remembered at least.
        for n in 9_000..10_000 {
            assert!(!seen.insert(id(n)), "{n} offered again");
        }
        // Long gone ids are offered again (the cluster will answer "present").
        assert!(seen.insert(id(0)));
    }

    #[test]
    fn an_id_met_again_stays_remembered() {
        let mut seen = SeenIds::new(100);
        assert!(seen.insert(id(0)));
        for n in 1..1000 {
            seen.insert(id(n));
            // A hot id (a zero-like block met all the time) never ages out.
            assert!(!seen.insert(id(0)));
        }
    }
}

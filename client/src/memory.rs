//! The agent's memory budget: one figure (`hashgrid backup --memory-budget`) from which every
//! buffer and queue of a backup is sized, in this one place.
//!
//! The agent runs on the machines it protects, so its peak memory must not depend on the size
//! of the tree or image it reads. Every structure whose size would otherwise grow with the
//! input is bounded here: chunk bytes between read and acknowledgement, read buffers, the set
//! of ids already offered, and the directories walked at once. The budget is a target for the
//! whole process; what is not handed out here is left for the walk's listings, the runtime,
//! the connection and the allocator's slack. A larger budget keeps more in flight, for links
//! with a long round trip (on loopback 512M measured no faster than the default); the default
//! keeps the agent's peak RSS under 150 MB.

use std::fmt;
use std::str::FromStr;

use hashgrid_proto::limits::TARGET_BATCH_BYTES;

/// The default budget: with it the agent's peak RSS stays under 150 MB (measured on a
/// 69,000-file, 2.7 GB tree and on 3 GiB images; see bench/README.md).
pub const DEFAULT_BUDGET: u64 = 64 << 20;
/// Below this the pipeline cannot keep one upload batch in flight per stream.
pub const MIN_BUDGET: u64 = 32 << 20;

/// Bytes of one entry of the seen set's hash table: a 32-byte id and its control byte.
const SEEN_SLOT_BYTES: u64 = 33;
/// Bytes read per call: large enough that hashing fans out over all cores, small enough that
/// a buffer kept alive by one unacknowledged chunk wastes little.
const READ_BUF_MIN: usize = 1 << 20;
const READ_BUF_MAX: usize = 8 << 20;
/// Smaller `Put` requests cost round trips without saving memory that matters.
const PUT_BATCH_MIN: usize = 1 << 20;

/// A memory budget in bytes, parsed from `64M`, `1G`, `512MiB` or a plain byte count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget(u64);

impl MemoryBudget {
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// The sizes this budget gives a backup on a machine with `cores` cores.
    pub fn sizing(self, cores: usize) -> Sizing {
        Sizing::for_budget(self.0, cores)
    }
}

impl Default for MemoryBudget {
    fn default() -> Self {
        MemoryBudget(DEFAULT_BUDGET)
    }
}

impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1 << 30) {
            write!(f, "{}G", self.0 >> 30)
        } else if self.0.is_multiple_of(1 << 20) {
            write!(f, "{}M", self.0 >> 20)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// Why a budget was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    #[error("{0:?} is not a size: give bytes or a number with K, M or G (e.g. 64M, 1G)")]
    Unparsable(String),
    #[error("a memory budget of {given} bytes is below the {min}-byte minimum")]
    TooSmall { given: u64, min: u64 },
}

impl FromStr for MemoryBudget {
    type Err = BudgetError;

    fn from_str(s: &str) -> Result<Self, BudgetError> {
        let bad = || BudgetError::Unparsable(s.to_string());
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits);
        let num: u64 = num.parse().map_err(|_| bad())?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            _ => return Err(bad()),
        };
        let bytes = num.checked_mul(1 << shift).ok_or_else(bad)?;
        if bytes < MIN_BUDGET {
            return Err(BudgetError::TooSmall {
                given: bytes,
                min: MIN_BUDGET,
            });
        }
        Ok(MemoryBudget(bytes))
    }
}

/// Every size a backup derives from its memory budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    /// Chunk bytes held between read and acknowledgement (plaintext, compressed copies and
    /// the read buffers they are cut from), across the whole upload pipeline.
    pub upload_bytes: usize,
    /// Bytes read from a file per call.
    pub read_buf: usize,
    /// Changed files (or groups of small ones) read at once.
    pub file_readers: usize,
    /// Encoded bytes per `Put` request: every stream holds a request's encoding, and the
    /// transport a copy of it, besides the chunks themselves.
    pub put_batch_bytes: usize,
    /// Ids per generation of the set of ids already offered (two generations are kept).
    pub seen_per_generation: usize,
    /// Directories being walked at once (each holds its listing, its parent snapshot's tree
    /// and its entries until written).
    pub open_dirs: usize,
    /// Largest local copy of a dataset's trees ([`crate::tree_cache`]): loaded at the start
    /// of a backup and written at its end.
    pub tree_cache_bytes: usize,
}

impl Default for Sizing {
    /// The default budget's sizes on this machine.
    fn default() -> Self {
        MemoryBudget::default().sizing(cores())
    }
}

/// Cores this process may run on (2 when that cannot be known).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl Sizing {
    /// The rule: 3/8 of the budget for chunk bytes in flight, 1/8 for read buffers, 1/8 for
    /// the seen set, the rest (3/8) for the walk, the runtime and the allocator. The tree
    /// cache may take 1/4 (a backup that fills it keeps the trees it writes, which it would
    /// otherwise have dropped; one that reads it fetches none, so holds fewer in flight).
    pub fn for_budget(budget: u64, cores: usize) -> Sizing {
        let budget = budget.max(MIN_BUDGET);
        let cores = cores.max(1);
        let upload_bytes = usize::try_from(budget / 8 * 3).unwrap_or(usize::MAX);
        let read_share = usize::try_from(budget / 8).unwrap_or(usize::MAX);
        let put_batch_bytes = (upload_bytes / 32).clamp(PUT_BATCH_MIN, TARGET_BATCH_BYTES);
        // Up to four files per core are read at once (while some wait on the disk, others
        // hash), as many as the share allows with a buffer of at least READ_BUF_MIN each,
        // two at least; what is left of the share widens the buffers.
        let file_readers = (read_share / READ_BUF_MIN).clamp(2, cores * 4);
        let read_buf = (read_share / file_readers).clamp(READ_BUF_MIN, READ_BUF_MAX);
        // The seen set's two tables: the largest power-of-two slot count that fits, filled
        // to 7/8 (hashbrown's load factor) before a generation turns over.
        let seen_share = budget / 8 / 2;
        let slots = 1u64 << (63 - (seen_share / SEEN_SLOT_BYTES).max(16).leading_zeros());
        let seen_per_generation = usize::try_from(slots / 8 * 7).unwrap_or(usize::MAX);
        // 1/8 of the budget at about 256 KiB per directory in flight (its listing, entries and
        // parent tree, for a directory of about a thousand entries).
        let open_dirs = usize::try_from((budget / 8) >> 18)
            .unwrap_or(usize::MAX)
            .max(cores * 4);
        Sizing {
            upload_bytes,
            put_batch_bytes,
            read_buf,
            file_readers,
            seen_per_generation,
            open_dirs,
            tree_cache_bytes: usize::try_from(budget / 4).unwrap_or(usize::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_with_units_and_refuse_nonsense() {
        assert_eq!("96M".parse(), Ok(MemoryBudget(96 << 20)));
        assert_eq!(MemoryBudget::default().to_string(), "64M");
        assert_eq!("1G".parse(), Ok(MemoryBudget(1 << 30)));
        assert_eq!("512MiB".parse(), Ok(MemoryBudget(512 << 20)));
        assert_eq!("65536k".parse(), Ok(MemoryBudget(64 << 20)));
        assert_eq!("134217728".parse(), Ok(MemoryBudget(128 << 20)));
        assert!(matches!(
            "lots".parse::<MemoryBudget>(),
            Err(BudgetError::Unparsable(_))
        ));
        assert!(matches!(
            "12T".parse::<MemoryBudget>(),
            Err(BudgetError::Unparsable(_))
        ));
        assert!(matches!(
            "99999999999999G".parse::<MemoryBudget>(),
            Err(BudgetError::Unparsable(_))
        ));
        assert_eq!(
            "1M".parse::<MemoryBudget>(),
            Err(BudgetError::TooSmall {
                given: 1 << 20,
                min: MIN_BUDGET
            })
        );
        assert_eq!(MemoryBudget(96 << 20).to_string(), "96M");
        assert_eq!(MemoryBudget(2 << 30).to_string(), "2G");
    }

    #[test]
    fn the_handed_out_shares_stay_within_the_budget() {
        for budget in [MIN_BUDGET, DEFAULT_BUDGET, 256 << 20, 1 << 30, 16 << 30] {
            for cores in [1, 2, 8, 64] {
                let s = Sizing::for_budget(budget, cores);
                let seen = 2 * (s.seen_per_generation as u64 * 8 / 7) * SEEN_SLOT_BYTES;
                let reads = (s.file_readers * s.read_buf) as u64;
                let handed = s.upload_bytes as u64 + reads + seen;
                assert!(
                    handed <= budget / 8 * 5 + (2 * READ_BUF_MIN) as u64,
                    "{budget} on {cores} cores: {s:?} hands out {handed}"
                );
            }
        }
    }

    #[test]
    fn the_default_budget_sizes() {
        let s = Sizing::for_budget(DEFAULT_BUDGET, 2);
        assert_eq!(s.upload_bytes, 24 << 20);
        assert_eq!(s.put_batch_bytes, 1 << 20);
        assert_eq!(s.file_readers, 8);
        assert_eq!(s.read_buf, 1 << 20);
        assert_eq!(s.seen_per_generation, 7 << 13);
        assert_eq!(s.open_dirs, 32);
    }

    #[test]
    fn a_larger_budget_never_shrinks_anything() {
        let mut last = Sizing::for_budget(MIN_BUDGET, 4);
        for shift in 26..36 {
            let s = Sizing::for_budget(1 << shift, 4);
            assert!(s.upload_bytes >= last.upload_bytes, "{s:?} < {last:?}");
            assert!(s.put_batch_bytes >= last.put_batch_bytes);
            assert!(s.read_buf * s.file_readers >= last.read_buf * last.file_readers);
            assert!(s.seen_per_generation >= last.seen_per_generation);
            assert!(s.open_dirs >= last.open_dirs);
            last = s;
        }
        // Reads stop growing at the cap; the rest keeps growing.
        assert_eq!(last.read_buf, READ_BUF_MAX);
        assert_eq!(last.put_batch_bytes, TARGET_BATCH_BYTES);
    }
}

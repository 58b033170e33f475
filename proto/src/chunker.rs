//! Chunker parameters. They are part of the cluster's configuration (set at init, stored in
//! the catalog) because every agent must cut identically for deduplication to be global.

use serde::{Deserialize, Serialize};

use crate::{pb, DecodeError};

/// FastCDC (v2020, normalization level 1) bounds in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl ChunkerParams {
    /// 16/64/256 KiB: small enough that 1% block churn on a VM image costs ~4x fewer new bytes
    /// than 1 MiB chunks, large enough to keep per-chunk metadata at 10^9 chunks per node.
    pub const DEFAULT: ChunkerParams = ChunkerParams {
        min_size: 16 * 1024,
        avg_size: 64 * 1024,
        max_size: 256 * 1024,
    };

    /// Checks the bounds FastCDC v2020 accepts and that they are ordered.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let ok = (64..=1 << 20).contains(&self.min_size)
            && (256..=4 << 20).contains(&self.avg_size)
            && (1024..=16 << 20).contains(&self.max_size)
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size
            && self.avg_size.is_power_of_two();
        if ok {
            Ok(())
        } else {
            Err(DecodeError::invalid(
                "chunker parameters",
                format!("{self:?} (need 64 <= min <= avg <= max, avg a power of two)"),
            ))
        }
    }
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl From<ChunkerParams> for pb::ChunkerParams {
    fn from(p: ChunkerParams) -> Self {
        pb::ChunkerParams {
            min_size: p.min_size,
            avg_size: p.avg_size,
            max_size: p.max_size,
        }
    }
}

impl TryFrom<pb::ChunkerParams> for ChunkerParams {
    type Error = DecodeError;
    fn try_from(p: pb::ChunkerParams) -> Result<Self, DecodeError> {
        let params = ChunkerParams {
            min_size: p.min_size,
            avg_size: p.avg_size,
            max_size: p.max_size,
        };
        params.validate()?;
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bad_ones_are_not() {
        ChunkerParams::DEFAULT.validate().unwrap();
        let mut p = ChunkerParams::DEFAULT;
        p.avg_size = 60_000;
        assert!(p.validate().is_err());
        p = ChunkerParams::DEFAULT;
        p.min_size = p.max_size * 2;
        assert!(p.validate().is_err());
    }
}

//! The limit on chunk bytes the background workers move (`--move-mib-per-sec`), so that a
//! rebalance, a refill or a repair after an outage leaves the disks and links to the
//! backups and restores running beside it.
//!
//! A worker is charged after each copy for the encoded bytes it moved and waits until the
//! limit allows them, so over any stretch of time the bytes moved stay within the limit
//! times that time plus one batch; the batches themselves are cut small while a limit is
//! set ([`Pacer::batch`]). Only the workers are paced: a lookup or a commit check that
//! repairs a chunk an agent is waiting on copies it at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The encoded bytes a batch of copies should carry at most while a limit is set: a
/// quarter of a second's worth, so that the pace is smooth rather than bursts and pauses.
const BATCH_SECONDS: f64 = 0.25;
/// The average encoded chunk the batch size assumes (64 KiB chunks, lightly compressed).
const TYPICAL_CHUNK: f64 = 64.0 * 1024.0;

/// Shared by the rebalance and repair workers (and hand-off): the limit is the node's.
#[derive(Default)]
pub struct Pacer {
    /// Bytes per second; 0 means no limit.
    bytes_per_sec: AtomicU64,
    /// When the bytes charged so far are paid for.
    paid_until: Mutex<Option<Instant>>,
}

impl Pacer {
    /// Sets the limit; 0 lifts it.
    pub fn set_limit(&self, bytes_per_sec: u64) {
        self.bytes_per_sec.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// The limit in bytes per second, if one is set.
    pub fn limit(&self) -> Option<u64> {
        Some(self.bytes_per_sec.load(Ordering::Relaxed)).filter(|&l| l > 0)
    }

    /// Ids to copy per call: `most`, or under a limit about [`BATCH_SECONDS`] worth of
    /// typical chunks (at least one).
    pub fn batch(&self, most: usize) -> usize {
        match self.limit() {
            None => most,
            Some(rate) => ((rate as f64 * BATCH_SECONDS / TYPICAL_CHUNK) as usize).clamp(1, most),
        }
    }

    /// Waits until the limit allows `bytes` more (at once without a limit). Time nobody
    /// used is not saved up: after a pause the pace starts again from now.
    pub async fn charge(&self, bytes: u64) {
        let Some(rate) = self.limit() else {
            return;
        };
        let until = {
            let mut paid = self.paid_until.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = paid.filter(|&t| t > now).unwrap_or(now);
            let until = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            *paid = Some(until);
            until
        };
        tokio::time::sleep_until(until).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_limit_nothing_waits_and_batches_are_whole() {
        let p = Pacer::default();
        assert_eq!(p.batch(128), 128);
        let t = Instant::now();
        p.charge(1 << 40).await;
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn bytes_charged_take_their_time_at_the_limit_whoever_charges_them() {
        let p = std::sync::Arc::new(Pacer::default());
        p.set_limit(4 << 20);
        // 4 MiB/s, a quarter second per batch: 16 typical chunks.
        assert_eq!(p.batch(128), 16);
        let t = Instant::now();
        // 2 MiB from two workers at once: half a second in all, not a quarter each.
        let (a, b) = (p.clone(), p.clone());
        tokio::join!(a.charge(1 << 20), b.charge(1 << 20));
        assert!(
            t.elapsed() >= Duration::from_millis(490),
            "{:?}",
            t.elapsed()
        );
        // Lifted: at once again.
        p.set_limit(0);
        let t = Instant::now();
        p.charge(1 << 30).await;
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_tiny_limit_still_copies_one_chunk_per_batch() {
        let p = Pacer::default();
        p.set_limit(1024);
        assert_eq!(p.batch(128), 1);
    }
}

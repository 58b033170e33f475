//! The agent's one retry policy: which failed calls are tried again, how long to wait
//! between tries, and when to give up.
//!
//! A failed call is classified by its status code and the typed metadata nodes attach
//! ([`hashgrid_proto::status_meta`]), never by its message:
//! - the coordinator did not answer (a transport error, `UNAVAILABLE` without the retry key,
//!   a deadline or keepalive that expired): switch to another seed and re-issue;
//! - the coordinator answered that the cluster cannot serve this right now (`UNAVAILABLE`
//!   with `x-hashgrid-retry`: no catalog leader yet, fewer owners than the write quorum):
//!   back off and ask again;
//! - the request was routed by a stale map epoch (`x-hashgrid-refresh`): fetch the map and
//!   re-issue at once;
//! - anything else (not found, invalid argument, permission denied, data loss, a refused
//!   commit...) fails at once: the same request would fail the same way.
//!
//! Every re-issued request is safe to repeat: lookups and reads change nothing, nodes never
//! overwrite a stored chunk, and a commit carries its idempotency key (`commit_key`).

use std::time::Duration;

use hashgrid_proto::status_meta;
use tokio::time::Instant;
use tonic::{Code, Status};

/// What to do about a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The coordinator is gone or hung: reconnect through the next seed, then re-issue.
    Failover,
    /// The coordinator answered that the cluster cannot serve this now: wait, re-issue.
    Retry,
    /// The request's map epoch is stale: refresh the map, re-issue at once.
    Refresh,
    /// Retrying will not help.
    Fail,
}

/// Classifies a failed call's status.
pub fn classify(status: &Status) -> Action {
    match status.code() {
        Code::Unavailable if status.metadata().get(status_meta::RETRY).is_some() => Action::Retry,
        // No retry key: the transport failed (nothing listening, connection reset, an
        // HTTP/2 keepalive ping that was never acknowledged), not the cluster.
        Code::Unavailable => Action::Failover,
        // Our own deadline expired (tonic reports its client timeout as CANCELLED) or the
        // peer's: a coordinator that accepts but does not answer.
        Code::DeadlineExceeded | Code::Cancelled => Action::Failover,
        // Made here from a transport error (the connection broke mid-stream, e.g. closed
        // by a keepalive ping the coordinator never answered): a node's own answer is
        // decoded from headers and carries no source.
        Code::Unknown | Code::Internal if std::error::Error::source(status).is_some() => {
            Action::Failover
        }
        Code::FailedPrecondition if status.metadata().get(status_meta::REFRESH).is_some() => {
            Action::Refresh
        }
        _ => Action::Fail,
    }
}

/// Backoff between tries and the total time a call may spend retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the first retry; doubles with each one.
    pub initial: Duration,
    /// Longest wait between two tries.
    pub max: Duration,
    /// Longest time from the first failure to giving up. Long enough to outlast a catalog
    /// election and a peer timeout or two, short enough that a dead cluster is reported.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            budget: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// A backoff that starts counting its budget now.
    pub fn start(&self) -> Backoff {
        Backoff {
            policy: *self,
            started: Instant::now(),
            tries: 0,
            exhausted: false,
        }
    }
}

/// The retries of one call (or of one upload stream, between acknowledgements).
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    started: Instant,
    tries: u32,
    /// Set once a wait would pass the budget: later calls give up too.
    exhausted: bool,
}

impl Backoff {
    /// The wait before the next try, or `None` when the budget would be spent by then.
    /// The wait is the doubled delay (capped at `max`) with jitter over its upper half, so
    /// agents that failed together do not come back together.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let ceiling = self
            .policy
            .initial
            .saturating_mul(1u32 << self.tries.min(16))
            .min(self.policy.max);
        let delay = ceiling / 2 + ceiling.mul_f64(rand::random::<f64>() / 2.0);
        if self.exhausted || self.started.elapsed() + delay > self.policy.budget {
            self.exhausted = true;
            return None;
        }
        self.tries += 1;
        Some(delay)
    }

    /// Waits for the next try; `false` when the budget is spent (give up).
    pub async fn wait(&mut self) -> bool {
        match self.next_delay() {
            Some(d) => {
                tokio::time::sleep(d).await;
                true
            }
            None => false,
        }
    }

    /// Whether the budget is spent (a refresh re-issues at once but not forever).
    pub fn spent(&self) -> bool {
        self.exhausted || self.started.elapsed() >= self.policy.budget
    }

    /// Tries made so far.
    pub fn tries(&self) -> u32 {
        self.tries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn with_meta(mut s: Status, key: &'static str, value: &'static str) -> Status {
        s.metadata_mut()
            .insert(key, MetadataValue::from_static(value));
        s
    }

    #[test]
    fn a_cluster_that_cannot_serve_now_is_asked_again() {
        for why in [status_meta::RETRY_STARTING, status_meta::RETRY_UNAVAILABLE] {
            let s = with_meta(Status::unavailable("no leader"), status_meta::RETRY, why);
            assert_eq!(classify(&s), Action::Retry);
        }
    }

    #[test]
    fn a_coordinator_that_does_not_answer_is_left_for_another_seed() {
        for s in [
            Status::unavailable("connection refused"),
            Status::deadline_exceeded("deadline"),
            Status::cancelled("Timeout expired"),
        ] {
            assert_eq!(classify(&s), Action::Failover, "{s:?}");
        }
        // A broken connection met while reading a stream's body.
        let broken = Status::from_error(Box::new(std::io::Error::other("connection lost")));
        assert_eq!(broken.code(), Code::Unknown);
        assert_eq!(classify(&broken), Action::Failover);
    }

    #[test]
    fn a_stale_epoch_refreshes_the_map_but_another_precondition_fails() {
        let stale = with_meta(
            Status::failed_precondition("epoch 1, current 2"),
            status_meta::REFRESH,
            "2",
        );
        assert_eq!(classify(&stale), Action::Refresh);
        assert_eq!(
            classify(&Status::failed_precondition("chunks missing")),
            Action::Fail
        );
    }

    #[test]
    fn errors_a_retry_cannot_fix_fail_at_once() {
        for s in [
            Status::not_found("x"),
            Status::invalid_argument("x"),
            Status::permission_denied("x"),
            Status::unauthenticated("x"),
            Status::data_loss("x"),
            Status::resource_exhausted("disk full"),
            Status::internal("x"),
        ] {
            assert_eq!(classify(&s), Action::Fail, "{s:?}");
        }
    }

    #[test]
    fn backoff_grows_and_is_bounded_by_max() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(800),
            budget: Duration::from_secs(3600),
        };
        let mut b = policy.start();
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay().unwrap()).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_millis(100 << i.min(3));
            assert!(
                *d >= ceiling / 2 && *d <= ceiling,
                "try {i}: {d:?} not in [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        assert!(delays[3] > delays[0], "{delays:?}");
        assert!(delays[7] <= policy.max);
    }

    #[tokio::test]
    async fn the_budget_ends_the_retries() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(20),
            budget: Duration::from_millis(200),
        };
        let mut b = policy.start();
        while b.wait().await {
            assert!(b.tries() < 100, "the budget never ended the retries");
        }
        assert!(b.started.elapsed() <= policy.budget + Duration::from_millis(50));
        // 200 ms of waits of 2.5..20 ms: at least 10 tries.
        assert!(b.tries() >= 10, "{} tries", b.tries());
        assert!(b.spent());
        assert!(!b.wait().await, "a spent budget stays spent");
    }
}

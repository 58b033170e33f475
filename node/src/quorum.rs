//! The one way a replicated call reaches the owners of a chunk (modelled on Garage's
//! `rpc_helper::try_call_many`): fan the call out to every owner at once, each call under its
//! own deadline, and return as soon as `quorum` owners answered, or as soon as the quorum has
//! become impossible (too many failed). Which owners failed, and why, comes back with the
//! answers, so callers can tell "absent" from "not asked".
//!
//! With [`Wait::Quorum`] the calls still running when the quorum is reached are not dropped:
//! they finish in the background, so a write acknowledged by W owners still reaches all R of
//! them when they are up. With [`Wait::All`] the helper waits for every owner (each under its
//! deadline), for lookups that must count copies.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use hashgrid_proto::NodeId;

use crate::error::NodeError;

/// When the helper returns once the quorum is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// At the quorum; the other calls finish in the background.
    Quorum,
    /// At the quorum, or once the given time passed without it: the owners that have not
    /// answered by then are counted failed ([`NodeError::Unavailable`]) though their calls go
    /// on in the background under their deadlines, so the caller can ask others (a write's
    /// fallbacks) beside an owner that stopped answering without closing its connections,
    /// instead of waiting out its whole deadline.
    QuorumWithin(Duration),
    /// When every owner answered or failed.
    All,
    /// When every owner answered or failed, or once the given time passed: the owners that
    /// have not answered by then are counted failed, as with [`Wait::QuorumWithin`]. For a
    /// write around hung owners, whose other owners may hang too without the pool knowing
    /// it yet.
    AllWithin(Duration),
}

/// The answers of a fan-out that reached its quorum.
#[derive(Debug)]
pub struct Answers<T> {
    /// Owners that answered, in the order they did.
    pub ok: Vec<(NodeId, T)>,
    /// Owners that failed, or had not answered in the time [`Wait::QuorumWithin`] or
    /// [`Wait::AllWithin`] gave them.
    pub failed: Vec<(NodeId, NodeError)>,
}

/// A quorum that was not, or could not be, reached.
#[derive(Debug, thiserror::Error)]
pub enum QuorumError {
    #[error(
        "{what}: {owners} owner(s) known, fewer than the {needed} needed (the write quorum W); \
         the cluster has too few active members to accept writes, add or activate members"
    )]
    TooFewOwners {
        what: &'static str,
        owners: usize,
        needed: usize,
    },
    #[error(
        "{what}: only {answered} of {owners} owner(s) answered, {needed} needed; failed: {}",
        describe(.failed)
    )]
    NotReached {
        what: &'static str,
        owners: usize,
        needed: usize,
        answered: usize,
        failed: Vec<(NodeId, NodeError)>,
    },
}

/// `node N: error; ...` for the owners that failed.
pub fn describe(failed: &[(NodeId, NodeError)]) -> String {
    failed
        .iter()
        .map(|(n, e)| format!("node {n}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<QuorumError> for NodeError {
    /// A missing quorum is retryable: owners come back, or the map changes.
    fn from(e: QuorumError) -> Self {
        NodeError::Unavailable(e.to_string())
    }
}

/// One owner call under its deadline: running out of time is `UNAVAILABLE` (retryable), like
/// an owner that could not be reached. Peer calls carry the peer pool's deadline too; this
/// one also bounds calls this node answers itself.
pub async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, NodeError>>,
) -> Result<T, NodeError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(NodeError::Unavailable(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

/// Calls `call(owner)` for every owner in `owners` at once, each under `timeout`, and returns
/// when `quorum` of them answered (see [`Wait`]), or fails with [`QuorumError`] when fewer
/// than `quorum` can answer (or, with [`Wait::QuorumWithin`], have answered in time).
pub async fn call_owners<T, F, Fut>(
    what: &'static str,
    owners: &[NodeId],
    quorum: usize,
    wait: Wait,
    timeout: Duration,
    mut call: F,
) -> Result<Answers<T>, QuorumError>
where
    F: FnMut(NodeId) -> Fut,
    Fut: Future<Output = Result<T, NodeError>> + Send + 'static,
    T: Send + 'static,
{
    if owners.len() < quorum {
        return Err(QuorumError::TooFewOwners {
            what,
            owners: owners.len(),
            needed: quorum,
        });
    }
    let mut pending: FuturesUnordered<_> = owners
        .iter()
        .map(|&node| {
            let fut = call(node);
            async move { (node, within(timeout, fut).await) }
        })
        .collect();
    let mut answers = Answers {
        ok: Vec::with_capacity(owners.len()),
        failed: Vec::new(),
    };
    // With `QuorumWithin`, when to stop waiting for the quorum (the sleep below is only
    // polled then).
    let give_up = match wait {
        Wait::QuorumWithin(after) | Wait::AllWithin(after) => {
            Some((after, tokio::time::Instant::now() + after))
        }
        Wait::Quorum | Wait::All => None,
    };
    loop {
        let (node, result) = tokio::select! {
            next = pending.next() => match next {
                Some(answer) => answer,
                None => break,
            },
            () = tokio::time::sleep_until(give_up.map_or_else(tokio::time::Instant::now, |g| g.1)),
                if give_up.is_some() =>
            {
                let after = give_up.map(|g| g.0).unwrap_or_default();
                metrics::counter!(crate::metrics::HEDGED_CALLS, "call" => what).increment(1);
                let answered: Vec<NodeId> = answers
                    .ok
                    .iter()
                    .map(|a| a.0)
                    .chain(answers.failed.iter().map(|f| f.0))
                    .collect();
                for &node in owners.iter().filter(|n| !answered.contains(n)) {
                    tracing::debug!(%node, ?after, what, "owner slow to answer; asking others beside it");
                    answers.failed.push((
                        node,
                        NodeError::Unavailable(format!(
                            "no answer within {after:?} (still asked, in the background)"
                        )),
                    ));
                }
                break;
            }
        };
        match result {
            Ok(v) => answers.ok.push((node, v)),
            Err(e) => {
                tracing::debug!(%node, error = %e, what, "owner call failed");
                answers.failed.push((node, e));
            }
        }
        if answers.ok.len() + pending.len() < quorum {
            break;
        }
        let all = matches!(wait, Wait::All | Wait::AllWithin(_));
        if !all && answers.ok.len() >= quorum {
            break;
        }
    }
    if !pending.is_empty() {
        // Let the other owners' calls complete (a write reaches all R owners); each is
        // bounded by its deadline.
        tokio::spawn(async move {
            while let Some((node, result)) = pending.next().await {
                if let Err(e) = result {
                    tracing::warn!(%node, error = %e, what, "owner call failed after the quorum");
                }
            }
        });
    }
    if answers.ok.len() < quorum {
        return Err(QuorumError::NotReached {
            what,
            owners: owners.len(),
            needed: quorum,
            answered: answers.ok.len(),
            failed: answers.failed,
        });
    }
    Ok(answers)
}

/// How often [`call_hedged`] asks whether a candidate it waits for is known to hang: an
/// eighth of the hedge, within these bounds.
const HANGS_POLL_MIN: Duration = Duration::from_millis(10);
const HANGS_POLL_MAX: Duration = Duration::from_millis(250);

/// Asks `candidates` in their order until `need` of them answered: `need` at once, then the
/// next one for each call that fails, and the next one beside the slow ones whenever `hedge`
/// passes without an answer (a peer that stopped answering without closing its connections
/// would otherwise cost a whole `timeout` before the next is asked), or as soon as `hangs`
/// says a candidate with a call under way hangs (the peer pool learned it from another
/// call: [`crate::coordinator::Route::is_hanging`]). Why the second: calls that start just
/// before the pool learns a peer stopped would each wait out a hedge of their own; a backup
/// whose upload streams met such a peer one after the other paid two hedges in a row.
/// Returns when `need` answered or every candidate was asked and answered or failed; the
/// caller checks `ok.len()`. Calls still running then finish in the background, each under
/// `timeout` (an extra copy on a spare member is harmless, and the peer pool learns whether
/// the slow one is hung).
pub async fn call_hedged<T, F, Fut, H>(
    what: &'static str,
    candidates: &[NodeId],
    need: usize,
    timeout: Duration,
    hedge: Duration,
    hangs: H,
    mut call: F,
) -> Answers<T>
where
    F: FnMut(NodeId) -> Fut,
    Fut: Future<Output = Result<T, NodeError>> + Send + 'static,
    T: Send + 'static,
    H: Fn(NodeId) -> bool,
{
    let mut answers = Answers {
        ok: Vec::with_capacity(need),
        failed: Vec::new(),
    };
    let mut pending = FuturesUnordered::new();
    let mut asked = 0;
    // Candidates with a call under way that nobody has yet been asked beside.
    let mut unanswered: Vec<NodeId> = Vec::new();
    let mut poll_hangs = tokio::time::interval((hedge / 8).clamp(HANGS_POLL_MIN, HANGS_POLL_MAX));
    poll_hangs.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ask = |pending: &mut FuturesUnordered<_>,
                   asked: &mut usize,
                   unanswered: &mut Vec<NodeId>| {
        let node = candidates[*asked];
        *asked += 1;
        unanswered.push(node);
        let fut = call(node);
        pending.push(tokio::spawn(async move {
            // A call that panics is that candidate failing, listed with the others.
            let answer = AssertUnwindSafe(within(timeout, fut))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(NodeError::Internal(format!("{what}: the call panicked"))));
            (node, answer)
        }));
    };
    while asked < need.min(candidates.len()) {
        ask(&mut pending, &mut asked, &mut unanswered);
    }
    // The hedge counts from the last answer or question (a poll that finds nobody hanging
    // does not restart it).
    let hedge_timer = tokio::time::sleep(hedge);
    tokio::pin!(hedge_timer);
    while answers.ok.len() < need && !pending.is_empty() {
        let hedging = asked < candidates.len();
        tokio::select! {
            Some(joined) = pending.next() => match joined {
                Ok((node, Ok(v))) => {
                    unanswered.retain(|&n| n != node);
                    answers.ok.push((node, v));
                }
                Ok((node, Err(e))) => {
                    tracing::debug!(%node, error = %e, what, "call failed; asking the next");
                    unanswered.retain(|&n| n != node);
                    answers.failed.push((node, e));
                    if asked < candidates.len() {
                        ask(&mut pending, &mut asked, &mut unanswered);
                    }
                }
                Err(e) => {
                    // Only a cancelled task gets here (panics are caught above): the
                    // runtime is shutting down.
                    tracing::debug!(error = %e, what, "call task cancelled");
                    break;
                }
            },
            () = &mut hedge_timer, if hedging => {
                tracing::debug!(?hedge, what, "a call is slow; asking the next beside it");
                metrics::counter!(crate::metrics::HEDGED_CALLS, "call" => what).increment(1);
                // The one asked stands beside the call that has waited longest.
                if !unanswered.is_empty() {
                    unanswered.remove(0);
                }
                ask(&mut pending, &mut asked, &mut unanswered);
            }
            _ = poll_hangs.tick(), if hedging && !unanswered.is_empty() => {
                let Some(i) = unanswered.iter().position(|&n| hangs(n)) else {
                    continue;
                };
                let node = unanswered.remove(i);
                tracing::debug!(%node, what, "a call went to a peer now known to hang; asking the next beside it");
                metrics::counter!(crate::metrics::HEDGED_CALLS, "call" => what).increment(1);
                ask(&mut pending, &mut asked, &mut unanswered);
            }
        }
        hedge_timer
            .as_mut()
            .reset(tokio::time::Instant::now() + hedge);
    }
    if !pending.is_empty() {
        // Enough answered; the slow calls run on in their tasks.
        tokio::spawn(async move {
            while let Some(joined) = pending.next().await {
                if let Ok((node, Err(e))) = joined {
                    tracing::debug!(%node, error = %e, what, "call failed after enough answered");
                }
            }
        });
    }
    answers
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    const OWNERS: [NodeId; 3] = [1, 2, 3];
    const DEADLINE: Duration = Duration::from_millis(200);

    /// Owner 3 hangs, owner 2 fails, owner 1 answers.
    async fn one_of_each(node: NodeId) -> Result<NodeId, NodeError> {
        match node {
            1 => Ok(node),
            2 => Err(NodeError::Unavailable("down".into())),
            _ => std::future::pending().await,
        }
    }

    #[tokio::test]
    async fn returns_at_the_quorum_and_finishes_the_rest_in_the_background() {
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::channel(3);
        let answers = call_owners("put", &OWNERS, 2, Wait::Quorum, DEADLINE, |node| {
            let done = done.clone();
            let tx = tx.clone();
            async move {
                if node == 3 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                done.fetch_add(1, Ordering::SeqCst);
                tx.send(node).await.unwrap();
                Ok(node)
            }
        })
        .await
        .unwrap();
        assert_eq!(answers.ok.len(), 2);
        assert!(answers.failed.is_empty());
        let mut reached = vec![];
        for _ in 0..3 {
            reached.push(rx.recv().await.unwrap());
        }
        reached.sort_unstable();
        assert_eq!(reached, OWNERS, "the third owner's call still ran");
    }

    #[tokio::test]
    async fn an_impossible_quorum_fails_without_waiting_for_the_deadline() {
        let start = std::time::Instant::now();
        let calls = |node| async move {
            if node == 1 {
                return Ok(());
            }
            Err(NodeError::Unavailable("down".into()))
        };
        let err = call_owners(
            "put",
            &OWNERS,
            2,
            Wait::Quorum,
            Duration::from_secs(60),
            calls,
        )
        .await
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        match &err {
            QuorumError::NotReached {
                answered, failed, ..
            } => {
                assert_eq!(*answered, 1);
                let mut failed: Vec<_> = failed.iter().map(|f| f.0).collect();
                failed.sort_unstable();
                assert_eq!(failed, [2, 3]);
            }
            other => panic!("{other}"),
        }
        assert!(NodeError::from(err).is_retryable());
    }

    #[tokio::test]
    async fn a_hung_owner_counts_as_failed_at_its_deadline() {
        let answers = call_owners("has", &OWNERS, 1, Wait::All, DEADLINE, one_of_each)
            .await
            .unwrap();
        assert_eq!(answers.ok.iter().map(|a| a.0).collect::<Vec<_>>(), [1]);
        let mut failed: Vec<_> = answers.failed.iter().map(|f| f.0).collect();
        failed.sort_unstable();
        assert_eq!(failed, [2, 3]);
        let err = call_owners("has", &OWNERS, 2, Wait::All, DEADLINE, one_of_each)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("only 1 of 3"), "{err}");
    }

    #[tokio::test]
    async fn quorum_within_gives_up_on_a_hung_owner_at_its_time_not_its_deadline() {
        let start = std::time::Instant::now();
        let after = Duration::from_millis(50);
        let err = call_owners(
            "write",
            &OWNERS,
            2,
            Wait::QuorumWithin(after),
            Duration::from_secs(60),
            one_of_each,
        )
        .await
        .unwrap_err();
        assert!(start.elapsed() >= after);
        assert!(start.elapsed() < Duration::from_secs(5));
        let QuorumError::NotReached {
            answered, failed, ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(*answered, 1);
        let mut failed: Vec<_> = failed.iter().map(|f| f.0).collect();
        failed.sort_unstable();
        assert_eq!(failed, [2, 3], "the hung owner is counted failed");
        // A quorum reached in time is answered as with `Wait::Quorum`.
        let answers = call_owners(
            "write",
            &OWNERS,
            1,
            Wait::QuorumWithin(Duration::from_secs(60)),
            Duration::from_secs(60),
            one_of_each,
        )
        .await
        .unwrap();
        assert_eq!(answers.ok.iter().map(|a| a.0).collect::<Vec<_>>(), [1]);
    }

    #[tokio::test]
    async fn all_within_waits_for_every_owner_until_its_time_then_counts_the_rest_failed() {
        let start = std::time::Instant::now();
        let after = Duration::from_millis(50);
        let answers = call_owners(
            "write",
            &OWNERS,
            0,
            Wait::AllWithin(after),
            Duration::from_secs(60),
            one_of_each,
        )
        .await
        .unwrap();
        assert!(start.elapsed() >= after, "returned before its time");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(answers.ok.iter().map(|a| a.0).collect::<Vec<_>>(), [1]);
        let mut failed: Vec<_> = answers.failed.iter().map(|f| f.0).collect();
        failed.sort_unstable();
        assert_eq!(failed, [2, 3], "the hung owner is counted failed");
        // Owners that all answer in time end it at once.
        let start = std::time::Instant::now();
        let answers = call_owners(
            "write",
            &[1, 2],
            0,
            Wait::AllWithin(Duration::from_secs(60)),
            Duration::from_secs(60),
            one_of_each,
        )
        .await
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!((answers.ok.len(), answers.failed.len()), (1, 1));
    }

    #[tokio::test]
    async fn fewer_owners_than_the_quorum_is_refused_up_front() {
        let err = call_owners(
            "put",
            &[1],
            2,
            Wait::Quorum,
            DEADLINE,
            |n| async move { Ok(n) },
        )
        .await
        .unwrap_err();
        assert!(matches!(
            err,
            QuorumError::TooFewOwners {
                owners: 1,
                needed: 2,
                ..
            }
        ));
    }

    const HEDGE: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn hedged_calls_ask_the_next_beside_a_hung_one_without_waiting_its_deadline() {
        let start = std::time::Instant::now();
        // 3 hangs: after the hedge, 1 is asked beside it.
        let answers = call_hedged(
            "write",
            &[3, 1, 2],
            1,
            Duration::from_secs(60),
            HEDGE,
            |_| false,
            one_of_each,
        )
        .await;
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(answers.ok.iter().map(|a| a.0).collect::<Vec<_>>(), [1]);
        assert!(answers.failed.is_empty());
    }

    #[tokio::test]
    async fn hedged_calls_ask_the_next_once_the_pool_knows_a_waited_one_hangs() {
        // 3 hangs; the hedge is a minute, but the pool learns 3 hangs after 100 ms (another
        // call to it went unanswered past its own hedge): 1 is asked then.
        let start = std::time::Instant::now();
        let learned = Duration::from_millis(100);
        let answers = call_hedged(
            "write",
            &[3, 1, 2],
            1,
            Duration::from_secs(60),
            Duration::from_secs(60),
            |n| n == 3 && start.elapsed() > learned,
            one_of_each,
        )
        .await;
        let took = start.elapsed();
        assert!(took >= learned && took < Duration::from_secs(5), "{took:?}");
        assert_eq!(answers.ok.iter().map(|a| a.0).collect::<Vec<_>>(), [1]);
        // A candidate known to hang that has no call under way asks nobody more.
        let answers = call_hedged(
            "write",
            &[1, 2],
            1,
            DEADLINE,
            Duration::from_secs(60),
            |n| n == 2,
            |n| async move { Ok(n) },
        )
        .await;
        assert_eq!(answers.ok.iter().map(|a| a.0).collect::<Vec<_>>(), [1]);
    }

    #[tokio::test]
    async fn hedged_calls_ask_the_next_for_each_that_fails() {
        // 2 and 1 are asked at once; 2 fails, so 3 is asked (no hedge needed), and it hangs
        // to its deadline: one answer of the two needed.
        let hedge = Duration::from_secs(60);
        let answers = call_hedged(
            "write",
            &[2, 1, 3],
            2,
            DEADLINE,
            hedge,
            |_| false,
            one_of_each,
        )
        .await;
        assert_eq!(answers.ok.iter().map(|a| a.0).collect::<Vec<_>>(), [1]);
        let mut failed: Vec<_> = answers.failed.iter().map(|f| f.0).collect();
        failed.sort_unstable();
        assert_eq!(failed, [2, 3]);
        // Only the first `need` are asked when they answer.
        let asked = Arc::new(AtomicUsize::new(0));
        let answers = call_hedged(
            "write",
            &[1, 1, 1],
            2,
            DEADLINE,
            hedge,
            |_| false,
            |n| {
                asked.fetch_add(1, Ordering::SeqCst);
                async move { Ok(n) }
            },
        )
        .await;
        assert_eq!(answers.ok.len(), 2);
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_hedged_call_that_panics_is_listed_failed_and_the_next_asked() {
        let answers = call_hedged(
            "write",
            &[2, 1],
            1,
            DEADLINE,
            Duration::from_secs(60),
            |_| false,
            |node| async move {
                assert_ne!(node, 2, "this candidate's call panics");
                Ok(node)
            },
        )
        .await;
        assert_eq!(answers.ok.iter().map(|a| a.0).collect::<Vec<_>>(), [1]);
        assert_eq!(answers.failed.len(), 1);
        assert_eq!(answers.failed[0].0, 2);
        assert!(matches!(answers.failed[0].1, NodeError::Internal(_)));
    }

    #[tokio::test]
    async fn hedged_calls_left_running_finish_in_the_background() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(3);
        let answers = call_hedged(
            "write",
            &[3, 1],
            1,
            Duration::from_secs(60),
            HEDGE,
            |_| false,
            |node| {
                let tx = tx.clone();
                async move {
                    if node == 3 {
                        tokio::time::sleep(HEDGE * 4).await;
                    }
                    tx.send(node).await.unwrap();
                    Ok(node)
                }
            },
        )
        .await;
        assert_eq!(answers.ok.iter().map(|a| a.0).collect::<Vec<_>>(), [1]);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(3), "the slow call still ran");
    }
}

//! Talking to the other members of the cluster: the cluster secret that authenticates
//! node-to-node calls ([`secret`]) and a pool of gRPC clients, one lazily connected channel
//! per peer address ([`PeerPool`]).

pub mod secret;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hashgrid_proto::limits::{
    CONNECTION_WINDOW_BYTES, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, STREAM_WINDOW_BYTES,
};
use hashgrid_proto::pb::peer::peer_client::PeerClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub use secret::ClusterSecret;

/// Adds the cluster secret to every outgoing peer call.
#[derive(Clone)]
pub struct SecretInterceptor {
    value: MetadataValue<Ascii>,
}

impl tonic::service::Interceptor for SecretInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert(secret::METADATA_KEY, self.value.clone());
        Ok(req)
    }
}

pub type Client = PeerClient<InterceptedService<Channel, SecretInterceptor>>;

/// Why a call to a peer did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("peer {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("peer {addr}: {status}")]
    Status { addr: String, status: tonic::Status },
    /// Not sent: the peer is lagging and already has its cap of calls from this node under
    /// way (see [`PeerPool::with_max_calls`]), so it is slow or hung; ask another.
    #[error("peer {addr} already has {in_flight} calls from this node unanswered; not asked")]
    Shed { addr: String, in_flight: usize },
}

impl PeerError {
    /// Did the call fail to reach the peer at all (down, partitioned, hung)? Such failures
    /// say nothing about the request and may be retried elsewhere.
    pub fn is_unreachable(&self) -> bool {
        match self {
            PeerError::BadAddress { .. } | PeerError::Timeout { .. } | PeerError::Shed { .. } => {
                true
            }
            // A status made from a transport error (it has a source: refused, reset, closed
            // by a keepalive) is not the peer's answer; tonic reports a connection that
            // closed under a call as CANCELLED.
            PeerError::Status { status, .. } => {
                matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                ) || std::error::Error::source(status).is_some()
            }
        }
    }
}

impl PeerError {
    /// Did the call lose contact with the peer: a transport error (refused, reset, closed)
    /// or no answer in time, rather than an answer, even a refusal? Stricter than
    /// [`PeerError::is_unreachable`], which also takes a peer's own UNAVAILABLE answer (no
    /// leader, no quorum) for a reason to try elsewhere. [`PeerPool::call`] records only the
    /// timeouts of calls under the peer deadline (Raft's short deadlines run out on a busy
    /// machine with the peer alive).
    pub fn lost_contact(&self) -> bool {
        match self {
            PeerError::BadAddress { .. } | PeerError::Shed { .. } => false,
            PeerError::Timeout { .. } => true,
            PeerError::Status { status, .. } => {
                status.code() == tonic::Code::Cancelled
                    || std::error::Error::source(status).is_some()
            }
        }
    }
}

/// gRPC clients to the other members, by address.
pub struct PeerPool {
    interceptor: SecretInterceptor,
    timeout: Duration,
    /// Source address of every connection to a peer (`--dial-from`); `None` lets the
    /// system choose.
    dial_from: Option<IpAddr>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Peers whose last call ran out of time, and when one last did with the full deadline.
    suspects: Mutex<HashMap<String, Instant>>,
    /// Peers a call lost contact with (see [`PeerError::lost_contact`]) since the repair
    /// worker last heard from them: it probes them and, once one answers, both sides run a
    /// repair pass (copies written while they were apart are pulled by whoever missed them).
    lost: Mutex<HashSet<String>>,
    /// Per peer, the calls under the peer deadline now going unanswered for longer than
    /// [`PeerPool::hedge_after`] (see [`PeerPool::is_lagging`]).
    lagging: Mutex<HashMap<String, usize>>,
    /// Peers whose last call lost its connection, none answered since ([`PeerPool::is_down`]).
    down: Mutex<HashSet<String>>,
    /// Per peer, the calls under the peer deadline now under way (at most `max_calls` more
    /// are started while the peer is lagging).
    in_flight: Mutex<HashMap<String, usize>>,
    max_calls: usize,
}

/// How many calls under the peer deadline one node has under way to a lagging peer (one
/// with a call unanswered past the hedge, see [`PeerPool::is_lagging`]) before it sends it
/// no more, by default. Why a cap: a peer that stopped answering without closing its
/// connections keeps every call sent to it (and the chunk bytes a write holds) until its
/// deadline, and hedged reads and writes send the slow peer its share too, so without one a
/// busy coordinator's memory grows with its request rate times the deadline. Why only
/// while lagging: a healthy peer of a large cluster may have more calls than this under
/// way from a busy coordinator (one per owner group of each request), all answered soon.
pub const MAX_CALLS_PER_PEER: usize = 256;

/// How long a suspect peer is given a short deadline before one call gets the full one
/// again (a slow but live peer proves itself then, and stops being suspect).
const SUSPECT_FOR: Duration = Duration::from_secs(10);

/// A suspect peer's deadline: a fraction of the full one, not under half a second.
///
/// Why: a peer that stopped answering without closing its connections (SIGSTOP, a hung
/// host, a silent partition) costs every call one full deadline. A coordinator whose
/// lookups ask that peer first would add the deadline to each lookup wave of a backup;
/// asked last ([`PeerPool::is_suspect`]) and given a short deadline, it costs almost nothing
/// until it answers again.
fn suspect_timeout(full: Duration) -> Duration {
    (full / 4).max(Duration::from_millis(500)).min(full)
}

impl PeerPool {
    pub fn new(secret: &ClusterSecret, timeout: Duration, dial_from: Option<IpAddr>) -> Self {
        PeerPool {
            interceptor: SecretInterceptor {
                value: secret.metadata_value(),
            },
            timeout,
            dial_from,
            channels: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashSet::new()),
            lagging: Mutex::new(HashMap::new()),
            down: Mutex::new(HashSet::new()),
            in_flight: Mutex::new(HashMap::new()),
            max_calls: MAX_CALLS_PER_PEER,
        }
    }

    /// At most `max_calls` calls under the peer deadline under way to one lagging peer (at
    /// least one); further calls to it fail at once with [`PeerError::Shed`] until some end
    /// or it stops lagging.
    pub fn with_max_calls(mut self, max_calls: usize) -> Self {
        self.max_calls = max_calls.max(1);
        self
    }

    /// The deadline of one peer call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long a call may go unanswered before the caller also asks another peer that
    /// can answer for it (a lookup's next owner): the deadline a suspect peer gets, since a
    /// peer that has not answered in that long is probably what a suspect is.
    pub fn hedge_after(&self) -> Duration {
        suspect_timeout(self.timeout)
    }

    /// A client for the member at `addr` (`host:port`). Connects on first use.
    pub fn client(&self, addr: &str) -> Result<Client, PeerError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let url = format!("http://{addr}");
                let channel = Endpoint::from_shared(url)
                    .map_err(|e| PeerError::BadAddress {
                        addr: addr.to_string(),
                        reason: e.to_string(),
                    })?
                    .connect_timeout(self.timeout)
                    .local_address(self.dial_from)
                    .tcp_nodelay(true)
                    .max_frame_size(MAX_FRAME_BYTES)
                    .initial_stream_window_size(STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(self.timeout)
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                channels.insert(addr.to_string(), channel.clone());
                channel
            }
        };
        Ok(
            PeerClient::with_interceptor(channel, self.interceptor.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    fn suspects(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.suspects.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lost(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peers a call lost contact with and that the repair worker has not heard from
    /// since ([`PeerPool::regained`]).
    pub fn lost_contact(&self) -> Vec<String> {
        self.lost().iter().cloned().collect()
    }

    /// The repair worker heard from `addr` again (or it left the cluster).
    pub fn regained(&self, addr: &str) {
        self.lost().remove(addr);
    }

    /// Whether a call to `addr` lost its connection (refused, reset, closed under it) and
    /// none has been answered since: the peer is probably down. Its calls fail at once
    /// rather than hang, so its deadline is untouched; callers that choose whom to ask put
    /// it last, and writes go around it (see [`crate::coordinator::Route::is_slow`]).
    pub fn is_down(&self, addr: &str) -> bool {
        lock(&self.down).contains(addr)
    }

    /// Whether the last call to `addr` ran out of time (and no answer came since).
    pub fn is_suspect(&self, addr: &str) -> bool {
        self.suspects().contains_key(addr)
    }

    /// Whether a call to `addr` has now gone unanswered for longer than
    /// [`PeerPool::hedge_after`]. Callers that choose whom to ask first put such a peer
    /// last (its deadline is untouched): a peer that stopped answering is otherwise asked
    /// first by every read and lookup that starts before its first call runs out of time,
    /// each paying a hedge (a restore reads its trees, then its files: two hedges or more).
    pub fn is_lagging(&self, addr: &str) -> bool {
        lock(&self.lagging).get(addr).is_some_and(|&n| n > 0)
    }

    /// The deadline of a call with the pool's default timeout to `addr`: short while the
    /// peer is suspect, the full one every [`SUSPECT_FOR`] (marked by resetting the clock).
    fn default_timeout(&self, addr: &str) -> Duration {
        let mut suspects = self.suspects();
        match suspects.get_mut(addr) {
            Some(since) if since.elapsed() < SUSPECT_FOR => suspect_timeout(self.timeout),
            Some(since) => {
                *since = Instant::now();
                self.timeout
            }
            None => self.timeout,
        }
    }

    /// Runs one call to `addr` under `timeout` (the pool's default when `None`: shortened
    /// while the peer is suspect, see [`suspect_timeout`]).
    pub async fn call<T, F, Fut>(
        &self,
        addr: &str,
        timeout: Option<Duration>,
        f: F,
    ) -> Result<T, PeerError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // Only calls under the peer deadline judge a peer: Raft's own short deadlines run out
        // on a busy machine without the peer being hung.
        let judged = timeout.is_none();
        let timeout = match timeout {
            Some(t) => t,
            None => self.default_timeout(addr),
        };
        let client = self.client(addr)?;
        let _in_flight = if judged {
            // Only a lagging peer is capped: a busy coordinator in a large cluster has many
            // calls under way to each healthy peer (one per owner group of every request).
            let cap = if self.is_lagging(addr) {
                self.max_calls
            } else {
                usize::MAX
            };
            let started = Counted::start_within(&self.in_flight, addr, cap);
            match started {
                Some(counted) => Some(counted),
                None => {
                    metrics::counter!(crate::metrics::PEER_CALLS_SHED).increment(1);
                    return Err(PeerError::Shed {
                        addr: addr.to_string(),
                        in_flight: self.max_calls,
                    });
                }
            }
        } else {
            None
        };
        let call = f(client);
        let result = if judged {
            self.watched(addr, timeout, call).await
        } else {
            tokio::time::timeout(timeout, call).await
        };
        match result {
            Err(_) => {
                if judged {
                    self.lost().insert(addr.to_string());
                    self.suspects()
                        .entry(addr.to_string())
                        .or_insert_with(Instant::now);
                    tracing::debug!(%addr, ?timeout, "peer call ran out of time; peer suspect");
                }
                Err(PeerError::Timeout {
                    addr: addr.to_string(),
                    timeout,
                })
            }
            Ok(answer) => {
                let answer =
                    answer
                        .map(tonic::Response::into_inner)
                        .map_err(|status| PeerError::Status {
                            addr: addr.to_string(),
                            status,
                        });
                // An answer, even a refusal, shows the peer is alive; a broken connection
                // does not.
                if answer.as_ref().is_err_and(PeerError::lost_contact) {
                    self.lost().insert(addr.to_string());
                    lock(&self.down).insert(addr.to_string());
                }
                let alive = answer
                    .as_ref()
                    .map_or_else(|e| !e.is_unreachable(), |_| true);
                if alive {
                    if self.suspects().remove(addr).is_some() {
                        tracing::info!(%addr, "suspect peer answered again");
                    }
                    lock(&self.down).remove(addr);
                }
                answer
            }
        }
    }

    /// `call` under `timeout`, counted as lagging ([`PeerPool::is_lagging`]) from
    /// [`PeerPool::hedge_after`] until it ends, however it ends (dropped too).
    async fn watched<Fut: Future>(
        &self,
        addr: &str,
        timeout: Duration,
        call: Fut,
    ) -> Result<Fut::Output, tokio::time::error::Elapsed> {
        let deadline = tokio::time::Instant::now() + timeout;
        tokio::pin!(call);
        let hedge = self.hedge_after();
        if hedge < timeout {
            if let Ok(answer) = tokio::time::timeout(hedge, &mut call).await {
                return Ok(answer);
            }
            let _lag = Counted::start(&self.lagging, addr);
            return tokio::time::timeout_at(deadline, call).await;
        }
        tokio::time::timeout_at(deadline, call).await
    }
}

/// One call counted, per peer, in one of the pool's tallies (calls lagging, calls under
/// way) while it lives: dropped with the call however the call ends.
struct Counted<'a> {
    tally: &'a Mutex<HashMap<String, usize>>,
    addr: &'a str,
}

impl<'a> Counted<'a> {
    fn start(tally: &'a Mutex<HashMap<String, usize>>, addr: &'a str) -> Counted<'a> {
        Self::start_within(tally, addr, usize::MAX).expect("no cap")
    }

    /// Counts the call unless `addr` already has `max` counted. (Every judged call passes
    /// here: the address is copied only when the peer has no call counted yet.)
    fn start_within(
        tally: &'a Mutex<HashMap<String, usize>>,
        addr: &'a str,
        max: usize,
    ) -> Option<Counted<'a>> {
        let mut counts = lock(tally);
        match counts.get_mut(addr) {
            Some(n) if *n >= max => return None,
            Some(n) => *n += 1,
            None => {
                counts.insert(addr.to_string(), 1);
            }
        }
        Some(Counted { tally, addr })
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let mut tally = lock(self.tally);
        if let Some(n) = tally.get_mut(self.addr) {
            *n -= 1;
            if *n == 0 {
                tally.remove(self.addr);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use hashgrid_proto::pb::HasRequest;

    async fn ask(pool: &PeerPool, addr: &str) -> PeerError {
        pool.call(addr, None, |mut c| async move {
            c.owner_has(HasRequest::default()).await
        })
        .await
        .expect_err("nothing answers")
    }

    /// A pool with deadline `timeout`, and a peer that accepts connections and never
    /// answers (the kernel completes the handshake from the listen backlog; nobody reads),
    /// hung while its listener lives.
    fn pool_and_hung_peer(timeout: Duration) -> (PeerPool, std::net::TcpListener, String) {
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = hung.local_addr().unwrap().to_string();
        let dir = tempfile::tempdir().unwrap();
        let secret = ClusterSecret::load_or_create(dir.path(), None, true).unwrap();
        (PeerPool::new(&secret, timeout, None), hung, addr)
    }

    /// A peer that never answers costs the full deadline once, then
    /// the short one, and is asked last meanwhile.
    #[tokio::test]
    async fn a_peer_that_ran_out_of_time_is_suspect_and_gets_a_short_deadline() {
        let full = Duration::from_secs(2);
        let (pool, hung, addr) = pool_and_hung_peer(full);
        assert!(!pool.is_suspect(&addr));
        match ask(&pool, &addr).await {
            PeerError::Timeout { timeout, .. } => assert_eq!(timeout, full),
            e => panic!("expected a timeout, got {e}"),
        }
        assert!(pool.is_suspect(&addr));
        match ask(&pool, &addr).await {
            PeerError::Timeout { timeout, .. } => assert_eq!(timeout, suspect_timeout(full)),
            e => panic!("expected a timeout, got {e}"),
        }
        assert!(suspect_timeout(full) < full);
        // A refusal from a live peer would clear it; a broken connection does not.
        drop(hung);
        let refused = ask(&pool, &addr).await;
        assert!(refused.is_unreachable(), "{refused}");
        assert!(pool.is_suspect(&addr));
    }

    #[test]
    fn a_suspect_deadline_is_a_quarter_of_the_full_one_not_under_half_a_second() {
        assert_eq!(
            suspect_timeout(Duration::from_secs(5)),
            Duration::from_millis(1250)
        );
        assert_eq!(
            suspect_timeout(Duration::from_secs(1)),
            Duration::from_millis(500)
        );
        assert_eq!(
            suspect_timeout(Duration::from_millis(300)),
            Duration::from_millis(300)
        );
    }

    /// Calls to a lagging peer over the cap are not sent; the cap frees as calls end. A
    /// peer that is not lagging is not capped.
    #[tokio::test]
    async fn calls_over_the_cap_to_a_hung_peer_fail_at_once_until_some_end() {
        let (pool, _hung, addr) = pool_and_hung_peer(Duration::from_secs(8));
        let pool = Arc::new(pool.with_max_calls(2));
        let in_flight = |pool: &PeerPool| lock(&pool.in_flight).get(&addr).copied();
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let pool = pool.clone();
                let addr = addr.clone();
                tokio::spawn(async move { ask(&pool, &addr).await })
            })
            .collect();
        let started = std::time::Instant::now();
        while in_flight(&pool) != Some(3) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "calls not started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !pool.is_lagging(&addr),
            "3 calls under way before the hedge: not capped"
        );
        while !pool.is_lagging(&addr) {
            assert!(started.elapsed() < Duration::from_secs(20), "not lagging");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let asked = std::time::Instant::now();
        match ask(&pool, &addr).await {
            e @ PeerError::Shed { in_flight: 2, .. } => {
                assert!(e.is_unreachable() && !e.lost_contact(), "{e}")
            }
            e => panic!("expected the call to be shed, got {e}"),
        }
        assert!(asked.elapsed() < Duration::from_secs(5));
        assert!(
            !pool.is_suspect(&addr),
            "a shed call says nothing of the peer"
        );
        for call in calls {
            call.abort();
            let _ = call.await;
        }
        assert_eq!(in_flight(&pool), None, "ended calls still counted");
    }

    /// A call to a peer that does not answer makes the peer lagging from the hedge until the
    /// call ends (here: dropped by its caller), without a shorter deadline.
    #[tokio::test]
    async fn a_call_unanswered_past_the_hedge_makes_its_peer_lagging_until_it_ends() {
        let (pool, _hung, addr) = pool_and_hung_peer(Duration::from_secs(8));
        let pool = Arc::new(pool);
        assert_eq!(pool.hedge_after(), Duration::from_secs(2));
        let started = std::time::Instant::now();
        let call = tokio::spawn({
            let pool = pool.clone();
            let addr = addr.clone();
            async move { ask(&pool, &addr).await }
        });
        // Polled, not slept: a loaded machine only makes the mark come later.
        while !pool.is_lagging(&addr) {
            assert!(
                started.elapsed() < Duration::from_secs(7),
                "not lagging after the hedge"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            started.elapsed() >= pool.hedge_after(),
            "lagging after {:?}, before the hedge",
            started.elapsed()
        );
        assert!(!pool.is_suspect(&addr), "suspect before its deadline");
        call.abort();
        let _ = call.await;
        assert!(
            !pool.is_lagging(&addr),
            "still lagging after the call ended"
        );
    }
}

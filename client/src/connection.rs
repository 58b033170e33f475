//! A connection to a hashgrid cluster: gRPC clients that carry the bearer token on every
//! call, plus what the cluster told us at connect time (map epoch, chunker parameters).
//!
//! The agent is given one or more seed addresses (`--server http://a:7420,http://b:7420`).
//! It connects through the first seed whose status call answers, and learns the other
//! members' addresses from the cluster map that status carries. Every client in a
//! [`Connection`] goes through one [`RoutedChannel`]: when the coordinator fails (see
//! [`crate::retry`]), [`Connection::recover`] probes the seeds and the learned members and
//! swaps the channel, so every clone of the clients re-issues through the new coordinator.
//! Deadlines ([`Timeouts`]) and HTTP/2 keepalive pings make a coordinator that accepts
//! connections but answers nothing (SIGSTOP, a hung host) fail within seconds.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hashgrid_proto::auth::{bearer_value, METADATA_KEY};
use hashgrid_proto::chunker::ChunkerParams;
use hashgrid_proto::limits::{
    CONNECTION_WINDOW_BYTES, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, STREAM_WINDOW_BYTES,
};
use hashgrid_proto::pb::admin_client::AdminClient;
use hashgrid_proto::pb::catalog_client::CatalogClient;
use hashgrid_proto::pb::chunks_client::ChunksClient;
use hashgrid_proto::pb::{StatusRequest, StatusResponse};
use hashgrid_proto::placement::{ClusterMap, MemberState};
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{channel::ResponseFuture, Channel, Endpoint};

use crate::error::{ClientError, Result};
use crate::retry::{self, Action, Backoff, RetryPolicy};

/// Default coordinator address of a local node started with no flags.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7420";
/// Where a local node started with no flags keeps its admin token.
pub const DEFAULT_TOKEN_FILE: &str = "./hashgrid-data/admin.token";

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct TokenInterceptor {
    value: MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(METADATA_KEY, self.value.clone());
        Ok(req)
    }
}

/// How long the agent waits for each kind of call. A deadline that expires counts as a
/// coordinator failure ([`retry::Action::Failover`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Opening a TCP connection to a seed.
    pub connect: Duration,
    /// A status call (the node answers it alone): also how long a seed may take to prove
    /// it is alive when the agent connects or fails over.
    pub status: Duration,
    /// A `Has` lookup: the coordinator asks the owners and waits at most its peer timeout
    /// (5 s by default) for a slow one, so this is a few peer timeouts.
    pub lookup: Duration,
    /// Calls that move data or wait for the catalog: the acknowledgement of a `Put` batch,
    /// the start of a `Get` stream, a commit, catalog reads.
    pub transfer: Duration,
    /// HTTP/2 keepalive: a ping this often, while calls run and while idle.
    pub keepalive_interval: Duration,
    /// A connection whose ping is not answered within this is closed, failing its calls
    /// (streams included) at once: how long a stopped coordinator (SIGSTOP, a hung host)
    /// holds a backup up, plus up to one interval. A ping queues behind the data already
    /// in the socket's send buffer, so a link that takes longer than this to drain it
    /// needs a longer one.
    pub keepalive_timeout: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            status: Duration::from_secs(5),
            lookup: Duration::from_secs(15),
            transfer: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(3),
        }
    }
}

/// How to find the cluster and prove who we are.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Seed addresses, comma-separated (`http://a:7420,b:7420`); tried in order.
    pub server: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
}

impl ConnectOptions {
    pub fn new(server: impl Into<String>, token: impl Into<String>) -> Self {
        ConnectOptions {
            server: server.into(),
            token: Some(token.into()),
            token_file: None,
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
        }
    }

    /// The seed list: `--server` split at commas, each given `http://` when it names no
    /// scheme.
    pub fn seeds(&self) -> Result<Vec<String>> {
        let seeds: Vec<String> = self
            .server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(with_scheme)
            .collect();
        if seeds.is_empty() {
            return Err(ClientError::Config(format!(
                "no server address in {:?}",
                self.server
            )));
        }
        Ok(seeds)
    }

    /// The token from `--token`, else `--token-file`, else the local node's default file.
    fn resolve_token(&self) -> Result<String, ClientError> {
        if let Some(t) = self.token.as_ref().filter(|t| !t.trim().is_empty()) {
            return Ok(t.trim().to_string());
        }
        let (path, explicit) = match &self.token_file {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_TOKEN_FILE), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
            Ok(_) => Err(ClientError::Config(format!(
                "token file {} is empty",
                path.display()
            ))),
            Err(e) if explicit => Err(ClientError::Config(format!(
                "reading token file {}: {e}",
                path.display()
            ))),
            Err(_) => Err(ClientError::Config(format!(
                "no token: pass --token or --token-file, or set HASHGRID_TOKEN \
                 (a node writes its admin token to <data-dir>/admin.token; looked for {})",
                Path::new(DEFAULT_TOKEN_FILE).display()
            ))),
        }
    }
}

fn with_scheme(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

type Svc = InterceptedService<RoutedChannel, TokenInterceptor>;

/// How to reach a node: the seeds, the deadlines, the token.
struct Dialer {
    seeds: Vec<String>,
    timeouts: Timeouts,
    interceptor: TokenInterceptor,
}

/// The coordinator calls go to now, and the addresses to fail over to.
struct Route {
    dialer: Dialer,
    retry: RetryPolicy,
    current: RwLock<Current>,
    /// Held while probing for a new coordinator, so tasks that fail together switch once.
    switching: tokio::sync::Mutex<()>,
}

struct Current {
    channel: Channel,
    server: String,
    /// Bumped at every switch; a failure seen on an older generation was already handled.
    generation: u64,
    /// The map epoch requests are routed by.
    epoch: u64,
    /// Client addresses of the other members, from the last map (fallbacks after the seeds).
    members: Vec<String>,
}

impl Dialer {
    fn endpoint(&self, server: &str) -> Result<Endpoint> {
        let t = &self.timeouts;
        Ok(Endpoint::from_shared(server.to_string())
            .map_err(|e| ClientError::Config(format!("server address {server:?}: {e}")))?
            .connect_timeout(t.connect)
            .timeout(t.transfer)
            .tcp_nodelay(true)
            .max_frame_size(MAX_FRAME_BYTES)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .http2_keep_alive_interval(t.keepalive_interval)
            .keep_alive_timeout(t.keepalive_timeout)
            .keep_alive_while_idle(true))
    }

    /// Asks `server` for its status within the status deadline.
    async fn probe(&self, server: &str) -> Result<(Channel, StatusResponse)> {
        let channel = self.endpoint(server)?.connect_lazy();
        let mut admin = AdminClient::with_interceptor(channel.clone(), self.interceptor.clone());
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(self.timeouts.status);
        match admin.status(req).await {
            Ok(resp) => Ok((channel, resp.into_inner())),
            Err(s) => Err(ClientError::rpc(format!("connecting to {server}"), s)),
        }
    }
}

impl Current {
    /// Takes the epoch and the members' addresses (those not among `seeds`) from a status.
    fn learn(&mut self, status: &StatusResponse, seeds: &[String]) {
        let Some(map) = status
            .map
            .clone()
            .and_then(|m| ClusterMap::try_from(m).ok())
        else {
            return;
        };
        self.epoch = self.epoch.max(map.epoch);
        self.members = map
            .members
            .iter()
            .filter(|m| m.state != MemberState::Removed && !m.addr.is_empty())
            .map(|m| with_scheme(&m.addr))
            .filter(|a| !seeds.contains(a))
            .collect();
    }
}

impl Route {
    fn new(
        dialer: Dialer,
        retry: RetryPolicy,
        server: &str,
        channel: Channel,
        status: &StatusResponse,
    ) -> Route {
        let mut current = Current {
            channel,
            server: server.to_string(),
            generation: 0,
            epoch: 0,
            members: Vec::new(),
        };
        current.learn(status, &dialer.seeds);
        Route {
            dialer,
            retry,
            current: RwLock::new(current),
            switching: tokio::sync::Mutex::new(()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `server` the coordinator.
    fn install(&self, server: &str, channel: Channel, status: &StatusResponse) {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        cur.channel = channel;
        cur.server = server.to_string();
        cur.generation += 1;
        cur.learn(status, &self.dialer.seeds);
    }

    /// Switches to the first seed or known member (after the failed one, which is tried
    /// last) whose status answers. Returns at once when another task already switched
    /// away from `failed_generation`.
    async fn failover(&self, failed_generation: u64) -> Result<()> {
        let _one_at_a_time = self.switching.lock().await;
        let (candidates, failed) = {
            let cur = self.read();
            if cur.generation != failed_generation {
                return Ok(());
            }
            let mut all = self.dialer.seeds.clone();
            all.extend(cur.members.iter().cloned());
            let at = all.iter().position(|a| *a == cur.server).unwrap_or(0);
            all.rotate_left(at);
            // The failed coordinator goes last: it may have only had a moment's trouble.
            let failed = all.remove(0);
            all.push(failed.clone());
            (all, failed)
        };
        let mut last = None;
        for server in candidates {
            match self.dialer.probe(&server).await {
                Ok((channel, status)) => {
                    tracing::warn!(from = %failed, to = %server, "coordinator failed; switched");
                    self.install(&server, channel, &status);
                    return Ok(());
                }
                Err(e) => {
                    tracing::info!(%server, error = %e, "seed did not answer");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Config("no server address".into())))
    }

    /// Fetches the current map from the coordinator (after a stale-epoch answer).
    async fn refresh(&self) -> Result<()> {
        let (server, channel) = {
            let cur = self.read();
            (cur.server.clone(), cur.channel.clone())
        };
        let mut admin = AdminClient::with_interceptor(channel, self.dialer.interceptor.clone());
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(self.dialer.timeouts.status);
        let status = admin
            .status(req)
            .await
            .map_err(|s| ClientError::rpc(format!("refreshing the map from {server}"), s))?
            .into_inner();
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        cur.learn(&status, &self.dialer.seeds);
        tracing::info!(epoch = cur.epoch, "map refreshed");
        Ok(())
    }
}

/// A gRPC channel to whichever node is the coordinator now: each call takes the route's
/// current channel, so a failover redirects every client without rebuilding it.
pub struct RoutedChannel {
    route: Arc<Route>,
    /// The channel `poll_ready` readied, which the next `call` must use.
    ready: Option<Channel>,
}

impl Clone for RoutedChannel {
    fn clone(&self) -> Self {
        RoutedChannel {
            route: self.route.clone(),
            ready: None,
        }
    }
}

impl Service<http::Request<Body>> for RoutedChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let route = &self.route;
        self.ready
            .get_or_insert_with(|| route.read().channel.clone())
            .poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let mut channel = self
            .ready
            .take()
            .unwrap_or_else(|| self.route.read().channel.clone());
        channel.call(req)
    }
}

#[derive(Clone)]
pub struct Connection {
    pub chunks: ChunksClient<Svc>,
    pub catalog: CatalogClient<Svc>,
    pub admin: AdminClient<Svc>,
    /// The status, map and chunker parameters of the node first connected to.
    pub status: StatusResponse,
    pub map: ClusterMap,
    pub chunker: ChunkerParams,
    /// The seed first connected to.
    pub server: String,
    route: Arc<Route>,
}

impl Connection {
    /// Connects through the first seed that answers its status call. A node that is
    /// starting is asked again for a while; when no seed answers at all, the last error is
    /// reported at once (a wrong address should not look like a hang).
    pub async fn connect(opts: &ConnectOptions) -> Result<Self> {
        let token = opts.resolve_token()?;
        let value = MetadataValue::try_from(bearer_value(&token)).map_err(|_| {
            ClientError::Config("token has characters not allowed in a header".into())
        })?;
        let dialer = Dialer {
            seeds: opts.seeds()?,
            timeouts: opts.timeouts,
            interceptor: TokenInterceptor { value },
        };
        let mut backoff = STARTING.start();
        let (server, channel, status) = 'found: loop {
            let mut starting = None;
            let mut last = None;
            for seed in &dialer.seeds {
                match dialer.probe(seed).await {
                    Ok((channel, status)) => break 'found (seed.clone(), channel, status),
                    Err(e) => {
                        tracing::info!(%seed, error = %e, "seed did not answer");
                        if is_starting(&e) {
                            starting = Some(e);
                        } else {
                            last = Some(e);
                        }
                    }
                }
            }
            match (starting, last) {
                (Some(e), _) if !backoff.wait().await => return Err(e),
                (Some(_), _) => {}
                (None, Some(e)) => return Err(e),
                (None, None) => return Err(ClientError::Config("no server address".into())),
            }
        };
        let route = Route::new(dialer, opts.retry, &server, channel, &status);
        let route = Arc::new(route);
        let routed = RoutedChannel {
            route: route.clone(),
            ready: None,
        };
        let interceptor = route.dialer.interceptor.clone();
        let chunks = ChunksClient::with_interceptor(routed.clone(), interceptor.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let catalog = CatalogClient::with_interceptor(routed.clone(), interceptor.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let admin = AdminClient::with_interceptor(routed, interceptor);
        let map = ClusterMap::try_from(status.map.clone().unwrap_or_default())?;
        let chunker = ChunkerParams::try_from(status.chunker.unwrap_or_default())?;
        Ok(Connection {
            chunks,
            catalog,
            admin,
            status,
            map,
            chunker,
            server,
            route,
        })
    }

    /// The cluster-map epoch requests are routed by (the newest this agent has seen).
    pub fn epoch(&self) -> u64 {
        self.route.read().epoch
    }

    /// The node coordinating calls now.
    pub fn coordinator(&self) -> String {
        self.route.read().server.clone()
    }

    pub fn timeouts(&self) -> Timeouts {
        self.route.dialer.timeouts
    }

    /// Starts the retries of one call under this connection's policy.
    pub fn backoff(&self) -> Backoff {
        self.route.retry.start()
    }

    /// The coordinator generation a call is issued under: pass it to [`Self::recover`].
    pub fn generation(&self) -> u64 {
        self.route.read().generation
    }

    /// Runs `op` (one call) until it succeeds, retrying under the policy of
    /// [`crate::retry`]; `what` names the step in the error. Each try gets the transfer
    /// deadline (see [`Self::call_within`]).
    pub async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        self.call_within(what, self.timeouts().transfer, op).await
    }

    /// [`Self::call`] with each try bounded by `deadline` on the agent's own clock.
    pub async fn call_within<T, F, Fut>(
        &self,
        what: &str,
        deadline: Duration,
        mut op: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut backoff = None;
        loop {
            let generation = self.generation();
            match within(deadline, what, op()).await {
                Ok(v) => return Ok(v),
                Err(status) => {
                    let b = backoff.get_or_insert_with(|| self.backoff());
                    self.recover(what, status, generation, b).await?;
                }
            }
        }
    }

    /// Deals with one failed try of a call issued under `generation`: returns `Ok` when the
    /// call should be re-issued (after backing off, and switching coordinator or refreshing
    /// the map as the failure asks), or the error to report.
    pub async fn recover(
        &self,
        what: &str,
        status: tonic::Status,
        generation: u64,
        backoff: &mut Backoff,
    ) -> Result<()> {
        let action = retry::classify(&status);
        if action == Action::Fail || !backoff.wait().await {
            return Err(ClientError::rpc(what, status));
        }
        tracing::warn!(
            step = what,
            code = ?status.code(),
            message = status.message(),
            ?action,
            tries = backoff.tries(),
            "call failed; retrying"
        );
        let fixed = match action {
            Action::Failover => self.route.failover(generation).await,
            Action::Refresh => self.route.refresh().await,
            Action::Retry | Action::Fail => Ok(()),
        };
        if let Err(e) = fixed {
            // Nothing answered now; the next try fails fast or finds a node back.
            tracing::warn!(step = what, error = %e, "no coordinator answered");
        }
        Ok(())
    }
}

/// Waits at most `deadline` for `fut`; when it has not finished, fails it as
/// `DeadlineExceeded` (a coordinator failure, [`retry::Action::Failover`]).
///
/// Why the agent keeps its own clock: the channel's timeout covers a call only from the
/// moment the channel accepts it until the response headers, and the HTTP/2 keepalive only
/// a coordinator that stopped answering pings. A coordinator whose handler stalls while
/// its process stays up, a connection that never becomes ready, or a stream that stops
/// between two messages would otherwise hold a backup forever.
pub async fn within<T>(
    deadline: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "{what}: no answer within {deadline:?}"
        ))),
    }
}

/// How long [`Connection::connect`] waits for seeds that are starting.
const STARTING: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(200),
    max: Duration::from_millis(200),
    budget: Duration::from_secs(20),
};

/// A node that is up but still starting says so (the retry key), unlike nothing listening.
fn is_starting(e: &ClientError) -> bool {
    matches!(e, ClientError::Rpc { status, .. } if retry::classify(status) == Action::Retry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_split_at_commas_and_given_a_scheme() {
        let opts = ConnectOptions::new(" http://a:7420, b:7420,,https://c:1 ", "t");
        assert_eq!(
            opts.seeds().unwrap(),
            ["http://a:7420", "http://b:7420", "https://c:1"]
        );
    }

    #[test]
    fn an_empty_seed_list_is_a_config_error() {
        let opts = ConnectOptions::new(" , ", "t");
        assert!(matches!(opts.seeds(), Err(ClientError::Config(_))));
    }
}

//! Talking to the other members of the cluster: the cluster secret that authenticates
//! node-to-node calls ([`secret`]) and a pool of gRPC clients, one lazily connected channel
//! per peer address ([`PeerPool`]).

pub mod secret;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

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
}

impl PeerError {
    /// Did the call fail to reach the peer at all (down, partitioned, hung)? Such failures
    /// say nothing about the request and may be retried elsewhere.
    pub fn is_unreachable(&self) -> bool {
        match self {
            PeerError::BadAddress { .. } | PeerError::Timeout { .. } => true,
            PeerError::Status { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
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
        }
    }

    /// The deadline of one peer call.
    pub fn timeout(&self) -> Duration {
        self.timeout
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

    /// Runs one call to `addr` under `timeout` (the pool's default when `None`).
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
        let timeout = timeout.unwrap_or(self.timeout);
        let client = self.client(addr)?;
        match tokio::time::timeout(timeout, f(client)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(PeerError::Status {
                addr: addr.to_string(),
                status,
            }),
            Err(_) => Err(PeerError::Timeout {
                addr: addr.to_string(),
                timeout,
            }),
        }
    }
}

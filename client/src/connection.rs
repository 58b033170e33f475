//! A connection to a hashgrid cluster through one node (the coordinator): gRPC clients that
//! carry the bearer token on every call, plus what the cluster told us at connect time (map
//! epoch, chunker parameters).

use std::path::{Path, PathBuf};
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
use hashgrid_proto::placement::ClusterMap;
use hashgrid_proto::status_meta;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::ClientError;

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

type Svc = InterceptedService<Channel, TokenInterceptor>;

/// How to find the cluster and prove who we are.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub server: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
}

impl ConnectOptions {
    pub fn new(server: impl Into<String>, token: impl Into<String>) -> Self {
        ConnectOptions {
            server: server.into(),
            token: Some(token.into()),
            token_file: None,
        }
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

#[derive(Clone)]
pub struct Connection {
    pub chunks: ChunksClient<Svc>,
    pub catalog: CatalogClient<Svc>,
    pub admin: AdminClient<Svc>,
    pub status: StatusResponse,
    pub map: ClusterMap,
    pub chunker: ChunkerParams,
    pub server: String,
}

impl Connection {
    /// Connects and fetches the node status, retrying for a while if the node is starting.
    pub async fn connect(opts: &ConnectOptions) -> Result<Self, ClientError> {
        let token = opts.resolve_token()?;
        let value = MetadataValue::try_from(bearer_value(&token)).map_err(|_| {
            ClientError::Config("token has characters not allowed in a header".into())
        })?;
        let server = if opts.server.contains("://") {
            opts.server.clone()
        } else {
            format!("http://{}", opts.server)
        };
        let endpoint = Endpoint::from_shared(server.clone())
            .map_err(|e| ClientError::Config(format!("server address {server:?}: {e}")))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .max_frame_size(MAX_FRAME_BYTES)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        let interceptor = TokenInterceptor { value };
        let chunks = ChunksClient::with_interceptor(channel.clone(), interceptor.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let catalog = CatalogClient::with_interceptor(channel.clone(), interceptor.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut admin = AdminClient::with_interceptor(channel, interceptor);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            match admin.status(StatusRequest {}).await {
                Ok(resp) => break resp.into_inner(),
                // A node that is up but still starting says so (the retry key); anything
                // else (nothing listening, wrong address) is reported at once.
                Err(s)
                    if s.code() == tonic::Code::Unavailable
                        && s.metadata().get(status_meta::RETRY).is_some()
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(status = %s, "node not ready, retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => return Err(ClientError::rpc(format!("connecting to {server}"), s)),
            }
        };
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
        })
    }

    /// The cluster-map epoch requests are routed by.
    pub fn epoch(&self) -> u64 {
        self.map.epoch
    }
}

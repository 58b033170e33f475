//! Starting and stopping a node: open the stores, start Raft, initialize a new cluster on
//! first start, serve gRPC until `shutdown` resolves, then stop cleanly.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hashgrid_proto::auth::TokenHash;
use hashgrid_proto::chunker::ChunkerParams;
use hashgrid_proto::limits::{
    CONNECTION_WINDOW_BYTES, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, STREAM_WINDOW_BYTES,
};
use hashgrid_proto::pb::{
    admin_server::AdminServer, catalog_server::CatalogServer, chunks_server::ChunksServer,
};
use hashgrid_proto::placement::ClusterMap;
use openraft::BasicNode;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::catalog::{ClusterConfig, Command, CommandResult};
use crate::chunk_store::ChunkStore;
use crate::config::NodeConfig;
use crate::context::NodeContext;
use crate::durable;
use crate::raft::network::NoPeers;
use crate::raft::{self, LogStore, Raft, StateMachine};
use crate::service::admin::AdminService;
use crate::service::auth::interceptor;
use crate::service::catalog::CatalogService;
use crate::service::chunks::ChunksService;

/// File in the data dir holding the admin token made at cluster init (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// File in the data dir naming the address the node serves on, written once it is ready.
pub const ADDR_FILE: &str = "node.addr";

/// Runs a node until `shutdown` resolves.
///
/// Sets the process umask to 0o077 first: chunks are stored unencrypted and the data dir
/// holds the admin token, so everything the node (and RocksDB inside it) creates must be
/// private to its user, whatever umask the node was started with. An existing data dir is
/// made 0700 too, which also closes off files an older build created more openly.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let data_dir = config.data_dir.clone();
    durable::create_dirs(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    make_private(&data_dir)?;
    let _ = std::fs::remove_file(data_dir.join(ADDR_FILE));

    let store = Arc::new(
        ChunkStore::open(&data_dir.join("chunks"), config.cache_mib << 20)
            .context("opening the chunk store (is another node using this data dir?)")?,
    );
    let raft_dir = data_dir.join("raft");
    let raft_db = durable::create_dirs(&raft_dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(raft::open_db(&raft_dir)?))
        .with_context(|| format!("opening Raft state in {}", raft_dir.display()))?;
    let node_id = raft::node_id(&raft_db).context("reading node id")?;
    let state_machine = StateMachine::open(raft_db.clone()).context("loading the catalog")?;
    let catalog = state_machine.catalog();

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let bound = listener.local_addr()?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());

    if let Some(addr) = config.metrics_addr().context("--metrics-listen")? {
        crate::metrics::install(addr)?;
    }

    let raft = Raft::new(
        node_id,
        Arc::new(raft::config().validate()?),
        NoPeers,
        LogStore::new(raft_db.clone()),
        state_machine,
    )
    .await
    .context("starting Raft")?;

    let ctx = Arc::new(NodeContext::new(
        node_id,
        store.clone(),
        raft.clone(),
        catalog,
    ));
    // A failed startup stops the server too, so the process exits with the error.
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async {
        tokio::select! {
            _ = shutdown => {}
            Ok(()) = failed_rx => {}
        }
    };
    let server = serve(ctx.clone(), listener, stop);
    let startup = async {
        let result = async {
            bootstrap(&ctx, &data_dir, &advertise, &config.zone).await?;
            ctx.set_ready();
            write_atomically(&data_dir.join(ADDR_FILE), advertise.as_bytes())?;
            tracing::info!(node = node_id, addr = %advertise, "hashgrid-node ready");
            println!("hashgrid-node {node_id} ready on {advertise}");
            anyhow::Ok(())
        }
        .await;
        if result.is_err() {
            let _ = failed_tx.send(());
        }
        result
    };
    let (served, started) = tokio::join!(server, startup);
    let result = started.and(served);

    raft.shutdown().await.ok();
    store.flush().context("flushing the chunk store")?;
    raft_db.flush_wal(true).context("flushing Raft state")?;
    tracing::info!("hashgrid-node stopped");
    result
}

async fn serve(
    ctx: Arc<NodeContext>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let auth = interceptor(ctx.clone());
    let chunks = ChunksServer::new(ChunksService::new(ctx.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let catalog = CatalogServer::new(CatalogService::new(ctx.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let admin = AdminServer::new(AdminService::new(ctx));
    // Chunk traffic is bulk: large frames and windows mean one syscall per ~1 MiB instead of
    // per 16 KiB, and no stalls waiting for window updates.
    tonic::transport::Server::builder()
        .max_frame_size(MAX_FRAME_BYTES)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_service(InterceptedService::new(chunks, auth.clone()))
        .add_service(InterceptedService::new(catalog, auth.clone()))
        .add_service(InterceptedService::new(admin, auth))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .context("gRPC server")
}

/// Makes this node the leader of its one-voter group and, on a brand-new cluster, writes
/// the cluster config and the admin token.
async fn bootstrap(
    ctx: &NodeContext,
    data_dir: &Path,
    advertise: &str,
    zone: &str,
) -> anyhow::Result<()> {
    let raft = &ctx.raft;
    if !raft.is_initialized().await? {
        let members = BTreeMap::from([(ctx.node_id, BasicNode::new(advertise))]);
        raft.initialize(members)
            .await
            .context("initializing Raft")?;
    }
    raft.wait(Some(Duration::from_secs(30)))
        .metrics(
            |m| m.current_leader == Some(ctx.node_id),
            "this node leads its catalog group",
        )
        .await
        .context("waiting for Raft leadership")?;
    // Everything committed before the restart is applied before we serve.
    raft.ensure_linearizable()
        .await
        .map_err(|e| anyhow::anyhow!("catalog read barrier: {e}"))?;

    let initialized = ctx
        .catalog
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .config
        .clone();
    let token_path = data_dir.join(ADMIN_TOKEN_FILE);
    if let Some(config) = initialized {
        if !token_path.exists() {
            recover_token(&token_path, &config.admin_token)?;
        }
        return Ok(());
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    // Durable before the Init that commits its hash: a cluster whose token file was lost
    // would have no usable admin token.
    durable::write_private(&token_path, format!("{token}\n").as_bytes())
        .with_context(|| format!("writing {}", token_path.display()))?;
    let mut map = ClusterMap::single(ctx.node_id, advertise.to_string());
    map.members[0].zone = zone.to_string();
    let config = ClusterConfig {
        map,
        chunker: ChunkerParams::DEFAULT,
        admin_token: TokenHash::of(&token),
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    };
    let resp = raft
        .client_write(Command::Init(config))
        .await
        .context("writing the cluster config")?;
    if resp.data != CommandResult::Initialized {
        bail!("cluster init refused: {:?}", resp.data);
    }
    tracing::info!(token_file = %token_path.display(), "new cluster initialized; admin token written");
    Ok(())
}

/// Makes the data dir 0700. One the node may write in but not chmod (a volume root owned by
/// root and shared with a group the node is in, as Kubernetes mounts them) is left as it is,
/// with a warning: everything the node creates inside it is private anyway.
fn make_private(dir: &Path) -> anyhow::Result<()> {
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 == 0 {
        return Ok(());
    }
    match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(
                data_dir = %dir.display(),
                mode = format!("{:o}", mode & 0o7777),
                "cannot make the data dir private (not its owner); what the node creates in it is"
            );
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("making {} private", dir.display())),
    }
}

/// An initialized cluster whose token file is missing. Builds before the token's rename was
/// made durable could lose it to a power cut, leaving the complete, synced `.tmp` copy: if
/// that copy holds the token the catalog has the hash of, it is put in place.
fn recover_token(token_path: &Path, hash: &TokenHash) -> anyhow::Result<()> {
    let tmp = durable::tmp_path(token_path);
    let staged = std::fs::read_to_string(&tmp).ok();
    match staged {
        Some(token) if TokenHash::of(token.trim()) == *hash => {
            durable::rename(&tmp, token_path)
                .with_context(|| format!("restoring {}", token_path.display()))?;
            tracing::warn!(
                token_file = %token_path.display(),
                "the admin token file was missing; restored it from its interrupted write"
            );
        }
        _ => tracing::warn!(
            "{} is missing; the admin token cannot be recovered from its hash",
            ADMIN_TOKEN_FILE
        ),
    }
    Ok(())
}

fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = durable::tmp_path(path);
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The address a node in `data_dir` announced, once it is ready.
pub fn read_addr(data_dir: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(data_dir.join(ADDR_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

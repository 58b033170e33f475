//! Starting and stopping a node: open the stores, start Raft, then on first start either
//! create a new cluster (no `--join`) or join one, serve gRPC until `shutdown` resolves,
//! then stop cleanly. A member that restarts finds its cluster in its data directory.

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
use hashgrid_proto::pb::peer::peer_server::PeerServer;
use hashgrid_proto::pb::{
    admin_server::AdminServer, catalog_server::CatalogServer, chunks_server::ChunksServer,
};
use hashgrid_proto::placement::ClusterMap;
use openraft::BasicNode;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::anti_entropy;
use crate::catalog::{ClusterConfig, Command, CommandResult};
use crate::chunk_store::ChunkStore;
use crate::config::NodeConfig;
use crate::context::NodeContext;
use crate::durable;
use crate::membership;
use crate::peer::{ClusterSecret, PeerPool};
use crate::raft::network::Network;
use crate::raft::{self, LogStore, Raft, StateMachine};
use crate::service::admin::AdminService;
use crate::service::auth::interceptor;
use crate::service::catalog::CatalogService;
use crate::service::chunks::ChunksService;
use crate::service::peer::{self as peer_service, PeerService};

pub use hashgrid_proto::data_dir::{ADDR_FILE, ADMIN_TOKEN_FILE, METRICS_ADDR_FILE};

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
    let _ = std::fs::remove_file(data_dir.join(METRICS_ADDR_FILE));

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
        let bound = crate::metrics::serve(addr).await?;
        write_atomically(
            &data_dir.join(METRICS_ADDR_FILE),
            bound.to_string().as_bytes(),
        )?;
        tracing::info!(addr = %bound, "serving Prometheus metrics");
        // What the store holds shows from the first scrape, not from the first write.
        crate::owner::publish_store_gauges(&store);
    }

    let has_cluster = catalog
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .config
        .is_some();
    let creating = !has_cluster && config.join.is_empty();
    let secret = ClusterSecret::load_or_create(
        &data_dir,
        config.cluster_secret_file.as_deref(),
        creating || has_cluster,
    )?;
    let peers = Arc::new(
        PeerPool::new(&secret, config.peer_timeout(), config.dial_from)
            .with_max_calls(config.peer_max_calls),
    );
    let raft = Raft::new(
        node_id,
        Arc::new(raft::config(&config).validate()?),
        Network::new(peers.clone()),
        LogStore::new(raft_db.clone()),
        state_machine,
    )
    .await
    .context("starting Raft")?;

    let ctx = Arc::new(NodeContext::new(
        node_id,
        advertise.clone(),
        store.clone(),
        raft.clone(),
        catalog,
        secret,
        peers,
    ));
    // A failed startup stops the server too, so the process exits with the error; a
    // shutdown stops a startup still under way (a join still waiting for its cluster).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = serve(ctx.clone(), listener, stopped(stop_rx.clone()));
    let signal = async {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let startup = async {
        let result = async {
            if has_cluster {
                rejoin(&ctx, &config).await?;
            } else if creating {
                bootstrap(&ctx, &data_dir, &config).await?;
            } else {
                join(&ctx, &config).await?;
            }
            ctx.set_ready();
            tokio::spawn(membership::maintain(ctx.clone()));
            anti_entropy::workers::spawn(
                ctx.clone(),
                config.repair_interval(),
                config.move_limit(),
            );
            write_atomically(&data_dir.join(ADDR_FILE), advertise.as_bytes())?;
            tracing::info!(node = node_id, addr = %advertise, "hashgrid-node ready");
            println!("hashgrid-node {node_id} ready on {advertise}");
            anyhow::Ok(())
        }
        .await;
        if result.is_err() {
            let _ = stop_tx.send(true);
        }
        result
    };
    let startup = async {
        tokio::select! {
            r = startup => r,
            () = stopped(stop_rx.clone()) => Ok(()),
        }
    };
    let (served, started, ()) = tokio::join!(server, startup, async {
        tokio::select! {
            () = signal => {}
            () = stopped(stop_rx.clone()) => {}
        }
    });
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
    let peer = InterceptedService::new(
        PeerServer::new(PeerService::new(ctx.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        peer_service::interceptor(ctx.clone()),
    );
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
        .add_service(peer)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .context("gRPC server")
}

/// Creates a new cluster: this node becomes the only voter of the catalog group and writes
/// the cluster config (a one-member map with the configured R and W) and the admin token.
/// The token file is durable before the config that holds its hash is committed, so a crash
/// in between leaves a cluster that is not yet initialized (and is created afresh on the
/// next start), never one whose admin token is lost.
async fn bootstrap(ctx: &NodeContext, data_dir: &Path, config: &NodeConfig) -> anyhow::Result<()> {
    let raft = &ctx.raft;
    if !raft.is_initialized().await? {
        let members = BTreeMap::from([(ctx.node_id, BasicNode::new(&ctx.advertise))]);
        raft.initialize(members)
            .await
            .context("initializing Raft")?;
    }
    wait_for_leader(ctx, Some(ctx.node_id)).await?;
    // An Init committed before a crash but not yet applied then was applied by the barrier
    // in `wait_for_leader`: this is a restart, and the token file from then is the one.
    if ctx
        .catalog
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .config
        .is_some()
    {
        return settle_token(ctx, data_dir);
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    let token_path = data_dir.join(ADMIN_TOKEN_FILE);
    // Durable before the Init that commits its hash: a cluster whose token file was lost
    // would have no usable admin token.
    durable::write_private(&token_path, format!("{token}\n").as_bytes())
        .with_context(|| format!("writing {}", token_path.display()))?;
    let mut map = ClusterMap::single(ctx.node_id, ctx.advertise.clone());
    map.members[0].zone = config.zone.clone();
    map.members[0].weight = config.weight;
    map.replication = config.replicas;
    map.write_quorum = config.write_quorum;
    let init = ClusterConfig {
        map,
        chunker: ChunkerParams::DEFAULT,
        admin_token: TokenHash::of(&token),
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    };
    let result = ctx.write(Command::Init(init)).await?;
    if result != CommandResult::Initialized {
        bail!("cluster init refused: {result:?}");
    }
    tracing::info!(
        token_file = %token_path.display(),
        secret_file = %data_dir.join(crate::peer::secret::FILE).display(),
        "new cluster initialized; admin token and cluster secret written"
    );
    Ok(())
}

/// First start with `--join`: asks the members to admit this node, then waits until this
/// node's copy of the catalog lists it.
async fn join(ctx: &NodeContext, config: &NodeConfig) -> anyhow::Result<()> {
    tracing::info!(seeds = ?config.join, "joining the cluster");
    let resp = membership::join_through(
        ctx,
        &config.join,
        &config.zone,
        config.weight,
        config.standby,
    )
    .await?;
    ctx.raft
        .wait(Some(JOIN_APPLY))
        .metrics(
            |_| {
                ctx.catalog
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .config
                    .as_ref()
                    .is_some_and(|c| c.map.member(ctx.node_id).is_some())
            },
            "the catalog lists this node",
        )
        .await
        .context("waiting for the catalog to reach this node")?;
    tracing::info!(leader = resp.leader_id, "joined the cluster");
    Ok(())
}

/// A restart of a member: wait (a while) for a leader so that what was committed before is
/// applied, and make sure the map has this node's current address.
async fn rejoin(ctx: &NodeContext, config: &NodeConfig) -> anyhow::Result<()> {
    settle_token(ctx, &config.data_dir)?;
    if let Err(e) = wait_for_leader(ctx, None).await {
        // A member whose peers are all down still serves what it holds (restores).
        tracing::warn!(error = %e, "no catalog leader yet; serving with the catalog as stored");
        return Ok(());
    }
    let stale = ctx
        .catalog
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .config
        .as_ref()
        .and_then(|c| c.map.member(ctx.node_id).cloned())
        .is_some_and(|m| m.addr != ctx.advertise);
    if stale {
        tracing::info!(addr = %ctx.advertise, "this node's address changed; updating the map");
        membership::join_through(
            ctx,
            std::slice::from_ref(&ctx.advertise),
            &config.zone,
            config.weight,
            // An address update: the member's state stays as it is.
            true,
        )
        .await?;
    }
    Ok(())
}

/// How long a joiner waits for the catalog to list it after being admitted.
const JOIN_APPLY: Duration = Duration::from_secs(60);

/// Waits until the catalog group has a leader (`want`: a particular one) and everything
/// committed is applied here.
async fn wait_for_leader(ctx: &NodeContext, want: Option<u64>) -> anyhow::Result<()> {
    // A one-voter group would otherwise wait a whole election timeout after a restart.
    let single = {
        let m = ctx.raft.metrics().borrow().membership_config.clone();
        m.membership().voter_ids().eq([ctx.node_id])
    };
    if single {
        let _ = ctx.raft.trigger().elect().await;
    }
    ctx.raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(
            |m| match want {
                Some(id) => m.current_leader == Some(id),
                None => m.current_leader.is_some(),
            },
            "a catalog leader",
        )
        .await
        .context("waiting for a catalog leader")?;
    if ctx.leader() == Some(ctx.node_id) {
        ctx.raft
            .ensure_linearizable()
            .await
            .map_err(|e| anyhow::anyhow!("catalog read barrier: {e}"))?;
    }
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

/// On an initialized cluster: a token file left half-way by a power cut (an older build,
/// or a crash between the staged write and the rename) is completed. Builds before the
/// token's rename was made durable could lose it, leaving the complete, synced `.tmp` copy;
/// if that copy holds the token the catalog has the hash of, it is put in place. Members
/// that joined never had a token file and have nothing to do.
fn settle_token(ctx: &NodeContext, data_dir: &Path) -> anyhow::Result<()> {
    let token_path = data_dir.join(ADMIN_TOKEN_FILE);
    let tmp = durable::tmp_path(&token_path);
    if token_path.exists() || !tmp.exists() {
        return Ok(());
    }
    let Ok(hash) = ctx.config().map(|c| c.admin_token) else {
        return Ok(());
    };
    let staged = std::fs::read_to_string(&tmp).ok();
    match staged {
        Some(token) if TokenHash::of(token.trim()) == hash => {
            durable::rename(&tmp, &token_path)
                .with_context(|| format!("restoring {}", token_path.display()))?;
            tracing::warn!(
                token_file = %token_path.display(),
                "the admin token file was missing; restored it from its interrupted write"
            );
        }
        _ => tracing::warn!(
            "{} is missing and {} does not hold the cluster's token; the admin token cannot \
             be recovered from its hash",
            ADMIN_TOKEN_FILE,
            tmp.display()
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

//! `hashgrid demo`: the whole job on one machine in a minute. Starts a local cluster (three
//! `hashgrid-node` processes from the binary next to this one, every chunk on all three,
//! writes acknowledged by two), makes a sample file tree and VM image, backs
//! them up, changes them and backs up again, backs up a clone of the image as a second site,
//! restores, verifies the restore against the source, and prints what deduplication saved.

use super::outln;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hashgrid_proto::pb::StatsRequest;
use indicatif::HumanBytes;

use crate::backup::{backup, BackupOptions, BackupSummary, ParentChoice};
use crate::catalog::latest;
use crate::connection::{ConnectOptions, Connection};
use crate::local_node::{node_binary, LocalNode};
use crate::restore::{restore, RestoreOptions};
use crate::sample_data::{self, ChangeSpec, ImageSpec, TreeSpec};
use crate::treediff::{diff_trees, Compare};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Work directory [default: a new temporary directory, removed afterwards].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the work directory (node data, sample, restore) for a look around.
    #[arg(long)]
    pub keep: bool,
    /// Approximate size of the sample data in MiB.
    #[arg(long, default_value_t = 192)]
    pub size_mib: u64,
    /// Nodes in the local cluster; each chunk is kept on all of them (so the figures below,
    /// read from one node, are the cluster's).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub nodes: u8,
}

/// Copies of each chunk (R: one per node) and the write quorum (W: a majority of them).
fn replication(nodes: u8) -> (u8, u8) {
    (nodes, nodes / 2 + 1)
}

/// Starts the local cluster: node 1 creates it, the others join through it. Returns the
/// nodes and their addresses once all are ready.
fn start_cluster(work: &Path, nodes: u8) -> anyhow::Result<(Vec<LocalNode>, Vec<String>)> {
    let binary = node_binary()?;
    let (r, w) = replication(nodes);
    let base = ["--listen", "127.0.0.1:0", "--metrics-listen", "off"];
    let spawn = |i: u8, extra: Vec<OsString>| {
        let mut args: Vec<OsString> = base.map(OsString::from).to_vec();
        args.extend(extra);
        LocalNode::spawn(
            &binary,
            &work.join(format!("node{i}")),
            &work.join(format!("node{i}.log")),
            args,
            None,
        )
    };
    let mut first = spawn(
        1,
        vec![
            "--replicas".into(),
            r.to_string().into(),
            "--write-quorum".into(),
            w.to_string().into(),
        ],
    )?;
    let first_addr = first.wait_ready(Duration::from_secs(30))?.to_string();
    let secret = work.join("node1/cluster.secret");
    let mut all = vec![first];
    for i in 2..=nodes {
        all.push(spawn(
            i,
            vec![
                "--join".into(),
                first_addr.clone().into(),
                "--cluster-secret-file".into(),
                secret.clone().into(),
            ],
        )?);
    }
    let mut addrs = vec![first_addr];
    for node in all.iter_mut().skip(1) {
        addrs.push(node.wait_ready(Duration::from_secs(60))?.to_string());
    }
    Ok((all, addrs))
}

/// The sample tree: a small file server's tree from the shared generators, plus the entry
/// kinds a file server has that the generator does not make.
fn make_tree(root: &Path, budget: u64) -> anyhow::Result<()> {
    let files = (budget / (32 << 10)).clamp(100, 20_000) as usize;
    sample_data::fleet_tree(
        root,
        &TreeSpec {
            seed: 1,
            files,
            bytes: budget,
            max_file: 4 << 20,
        },
    )?;
    std::fs::create_dir_all(root.join("empty-dir"))?;
    std::fs::write(root.join("empty-file"), b"")?;
    std::fs::write(root.join("first.txt"), sample_data::text_bytes(7, 40_000))?;
    std::os::unix::fs::symlink("first.txt", root.join("link-to-first"))?;
    std::fs::hard_link(root.join("first.txt"), root.join("hardlink-to-first"))?;
    Ok(())
}

/// A day's changes to the tree: files rewritten, appended to, added and deleted.
fn change_tree(root: &Path) -> anyhow::Result<()> {
    let spec = ChangeSpec {
        seed: 1,
        files_percent: 2.0,
        image_percent: 0.0,
    };
    sample_data::fleet_change(Some(root), None, &spec)?;
    Ok(())
}

/// A thin-provisioned VM disk: data islands, written zeros and unwritten holes.
fn make_image(path: &Path, size: u64) -> anyhow::Result<()> {
    let spec = ImageSpec {
        seed: 1,
        bytes: size,
        data_fraction: 0.35,
    };
    sample_data::fleet_image(path, &spec)?;
    Ok(())
}

fn churn_image(path: &Path, seed: u64, blocks: u64) -> anyhow::Result<()> {
    sample_data::churn(path, seed, blocks as usize)?;
    Ok(())
}

async fn step(
    conn: &Connection,
    cache: &Path,
    steps: &mut Vec<BackupSummary>,
    what: &str,
    path: &Path,
    image: bool,
    client: &str,
) -> anyhow::Result<()> {
    let opts = BackupOptions {
        paths: vec![path.to_path_buf()],
        image,
        client: client.into(),
        dataset: if image {
            "vm.img".into()
        } else {
            "files".into()
        },
        tags: vec!["demo".into()],
        parent: ParentChoice::Latest,
        hostname: super::default_client(),
        zstd_level: hashgrid_proto::codec::DEFAULT_ZSTD_LEVEL,
        progress: false,
        tree_part_bytes: hashgrid_proto::limits::TREE_PART_BYTES,
        memory: Default::default(),
        tree_cache: Some(cache.to_path_buf()),
    };
    let summary = backup(conn, &opts).await?;
    let s = &summary.stats;
    outln!(
        "  {what:<36} snapshot {:>3}: {:>10} logical, {:>10} sent, {:>10} new, {:>5.2}s",
        summary.snapshot,
        HumanBytes(s.logical_bytes).to_string(),
        HumanBytes(s.sent_bytes).to_string(),
        HumanBytes(s.new_bytes).to_string(),
        s.duration_ms as f64 / 1000.0
    );
    steps.push(summary);
    Ok(())
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let temp = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            None
        }
        None => Some(
            tempfile::Builder::new()
                .prefix("hashgrid-demo-")
                .tempdir()?,
        ),
    };
    let work = match (&temp, &args.dir) {
        (Some(t), _) => t.path().to_path_buf(),
        (None, Some(d)) => d.clone(),
        (None, None) => unreachable!("one of them is set"),
    };
    outln!("hashgrid demo in {}", work.display());
    let (nodes, addrs) = start_cluster(&work, args.nodes)?;
    let (r, w) = replication(args.nodes);
    outln!(
        "  local cluster of {} node(s) on {} (each chunk on {r}, writes acknowledged by {w}; logs: {})",
        args.nodes,
        addrs.join(", "),
        work.join("node*.log").display()
    );
    let conn = Connection::connect(&ConnectOptions {
        token: None,
        token_file: Some(work.join("node1/admin.token")),
        ..ConnectOptions::new(addrs.join(","), "")
    })
    .await?;

    let data = work.join("data");
    let tree = data.join("tree");
    let image = data.join("site-a/vm.img");
    let clone = data.join("site-b/vm.img");
    std::fs::create_dir_all(image.parent().expect("has parent"))?;
    std::fs::create_dir_all(clone.parent().expect("has parent"))?;
    let mib = args.size_mib.max(16) << 20;
    make_tree(&tree, mib / 3)?;
    make_image(&image, mib * 2)?;
    outln!(
        "  sample: {} file tree, {} sparse VM image",
        HumanBytes(mib / 3),
        HumanBytes(mib * 2)
    );

    // The agent's local cache of each dataset's trees, kept with the demo's other files.
    let cache = work.join("agent-cache");
    let mut steps = Vec::new();
    step(
        &conn,
        &cache,
        &mut steps,
        "site A: file tree",
        &tree,
        false,
        "site-a",
    )
    .await?;
    step(
        &conn,
        &cache,
        &mut steps,
        "site A: VM image",
        &image,
        true,
        "site-a",
    )
    .await?;
    step(
        &conn,
        &cache,
        &mut steps,
        "site A: file tree, unchanged",
        &tree,
        false,
        "site-a",
    )
    .await?;
    change_tree(&tree)?;
    churn_image(&image, 1, 64)?;
    step(
        &conn,
        &cache,
        &mut steps,
        "site A: file tree, 11 files changed",
        &tree,
        false,
        "site-a",
    )
    .await?;
    step(
        &conn,
        &cache,
        &mut steps,
        "site A: VM image, 64 blocks changed",
        &image,
        true,
        "site-a",
    )
    .await?;
    std::fs::copy(&image, &clone)?;
    churn_image(&clone, 2, 32)?;
    step(
        &conn,
        &cache,
        &mut steps,
        "site B: clone of the VM image",
        &clone,
        true,
        "site-b",
    )
    .await?;

    let restore_dir = work.join("restore");
    for (client, dataset, source) in [
        ("site-a", "files", tree.clone()),
        ("site-a", "vm.img", image.clone()),
    ] {
        let snap = latest(&conn, client, dataset, None)
            .await?
            .context("latest snapshot")?;
        let target = restore_dir.join(dataset);
        let started = Instant::now();
        let r = restore(
            &conn,
            &snap,
            &RestoreOptions {
                target: target.clone(),
                paths: vec![],
                progress: false,
                ..Default::default()
            },
        )
        .await?;
        let (a, b) = if dataset == "files" {
            (
                source.clone(),
                target.join(source.strip_prefix("/").unwrap_or(&source)),
            )
        } else {
            (
                source.parent().expect("has parent").to_path_buf(),
                target.clone(),
            )
        };
        let diffs = diff_trees(&a, &b, Compare::ALL)?;
        if !diffs.is_empty() {
            bail!(
                "restore of snapshot {} differs from the source:\n{}",
                snap.id,
                diffs.join("\n")
            );
        }
        outln!(
            "  restored snapshot {:>3} ({} {}) in {:.2}s: {} file{}, identical to the source",
            snap.id,
            client,
            dataset,
            started.elapsed().as_secs_f64(),
            r.files,
            if r.files == 1 { "" } else { "s" }
        );
    }

    let stats = conn
        .admin
        .clone()
        .stats(StatsRequest::default())
        .await?
        .into_inner();
    let sent: u64 = steps.iter().map(|s| s.stats.sent_bytes).sum();
    outln!();
    outln!(
        "  logical bytes backed up  {:>12}",
        HumanBytes(stats.logical_bytes).to_string()
    );
    outln!(
        "  bytes sent over the wire {:>12}",
        HumanBytes(sent).to_string()
    );
    outln!(
        "  bytes stored             {:>12}  (one copy; the cluster keeps {r})",
        HumanBytes(stats.stored_bytes).to_string()
    );
    outln!(
        "  dedup + compression      {:>11.1}x  ({} distinct chunks)",
        stats.logical_bytes as f64 / stats.stored_bytes.max(1) as f64,
        stats.chunks
    );
    let clone_step = steps.last().expect("steps ran");
    outln!(
        "  site B sent {} for a {} image cloned from site A's",
        HumanBytes(clone_step.stats.sent_bytes),
        HumanBytes(clone_step.stats.logical_bytes)
    );
    drop(nodes);
    if args.keep {
        if let Some(t) = temp {
            let _ = t.keep();
        }
        outln!("  kept {}", work.display());
    }
    Ok(())
}

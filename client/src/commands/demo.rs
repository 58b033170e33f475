//! `hashgrid demo`: the whole job on one machine in a minute. Starts a local node (the
//! `hashgrid-node` binary next to this one), makes a sample file tree and VM image, backs
//! them up, changes them and backs up again, backs up a clone of the image as a second site,
//! restores, verifies the restore against the source, and prints what deduplication saved.

use super::outln;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
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
}

fn start_node(work: &Path) -> anyhow::Result<(LocalNode, String)> {
    let mut node = LocalNode::spawn(
        &node_binary()?,
        &work.join("node"),
        &work.join("node.log"),
        ["--listen", "127.0.0.1:0", "--metrics-listen", "off"]
            .map(OsString::from)
            .to_vec(),
        None,
    )?;
    let addr = node.wait_ready(Duration::from_secs(30))?.to_string();
    Ok((node, addr))
}

/// Deterministic sample bytes: random, or text-like (compressible) when `text`.
fn sample_bytes(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut rnd = vec![0u8; len];
    blake3::Hasher::new_derive_key("hashgrid demo sample")
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut rnd);
    if !text {
        return rnd;
    }
    const WORDS: [&str; 16] = [
        "backup", "chunk", "restore", "node", "cluster", "snapshot", "image", "tree", "hash",
        "dedup", "replica", "zone", "ring", "raft", "agent", "site",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        let w = WORDS[(rnd[i % len] & 15) as usize];
        out.extend_from_slice(w.as_bytes());
        out.push(if rnd[(i + 1) % len].is_multiple_of(11) {
            b'\n'
        } else {
            b' '
        });
        i += 2;
    }
    out.truncate(len);
    out
}

fn make_tree(root: &Path, budget: u64) -> anyhow::Result<()> {
    let mut used = 0u64;
    let mut n = 0u64;
    while used < budget {
        let dir = root.join(format!("dir{:02}/sub{}", n % 24, n % 3));
        std::fs::create_dir_all(&dir)?;
        let size = match n % 10 {
            0..=5 => 200 + (n * 997) % 8000,
            6..=8 => 20_000 + (n * 7919) % 200_000,
            _ => 1_000_000 + (n * 104_729) % 2_000_000,
        };
        std::fs::write(
            dir.join(format!("file{n:05}.dat")),
            sample_bytes(n, size as usize, n.is_multiple_of(2)),
        )?;
        used += size;
        n += 1;
    }
    std::fs::create_dir_all(root.join("empty-dir"))?;
    std::fs::write(root.join("empty-file"), b"")?;
    std::os::unix::fs::symlink("dir00/sub0/file00000.dat", root.join("link-to-first"))?;
    std::fs::hard_link(
        root.join("dir00/sub0/file00000.dat"),
        root.join("hardlink-to-first"),
    )?;
    Ok(())
}

fn change_tree(root: &Path) -> anyhow::Result<()> {
    for n in (0..400u64).step_by(37) {
        let p = root.join(format!("dir{:02}/sub{}/file{n:05}.dat", n % 24, n % 3));
        if p.exists() {
            let mut f = OpenOptions::new().append(true).open(&p)?;
            f.write_all(&sample_bytes(10_000 + n, 5000, true))?;
        }
    }
    std::fs::write(
        root.join("dir01/new-report.txt"),
        sample_bytes(99_999, 300_000, true),
    )?;
    Ok(())
}

fn make_image(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut f = File::create(path)?;
    f.set_len(size)?;
    // Data islands with unwritten holes between them, like a thin-provisioned VM disk.
    let island = 4 << 20;
    for (i, off) in (0..size).step_by((island * 3) as usize).enumerate() {
        f.seek(SeekFrom::Start(off))?;
        let len = island.min(size - off) as usize;
        f.write_all(&sample_bytes(1_000_000 + i as u64, len, i % 3 != 0))?;
    }
    Ok(())
}

fn churn_image(path: &Path, seed: u64, blocks: u64) -> anyhow::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    let size = f.metadata()?.len();
    for b in 0..blocks {
        let pick = sample_bytes(seed * 1000 + b, 8, false);
        let off = (u64::from_le_bytes(pick.try_into().expect("8 bytes")) % (size / 4096)) * 4096;
        f.seek(SeekFrom::Start(off))?;
        f.write_all(&sample_bytes(seed * 7777 + b, 4096, false))?;
    }
    Ok(())
}

async fn step(
    conn: &Connection,
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
    let (node, addr) = start_node(&work)?;
    outln!(
        "  node ready on {addr} (log: {})",
        work.join("node.log").display()
    );
    let conn = Connection::connect(&ConnectOptions {
        server: addr,
        token: None,
        token_file: Some(work.join("node/admin.token")),
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

    let mut steps = Vec::new();
    step(
        &conn,
        &mut steps,
        "site A: file tree",
        &tree,
        false,
        "site-a",
    )
    .await?;
    step(
        &conn,
        &mut steps,
        "site A: VM image",
        &image,
        true,
        "site-a",
    )
    .await?;
    step(
        &conn,
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
        &mut steps,
        "site A: file tree, 11 files changed",
        &tree,
        false,
        "site-a",
    )
    .await?;
    step(
        &conn,
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
        .stats(StatsRequest {})
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
        "  bytes stored             {:>12}",
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
    drop(node);
    if args.keep {
        if let Some(t) = temp {
            let _ = t.keep();
        }
        outln!("  kept {}", work.display());
    }
    Ok(())
}

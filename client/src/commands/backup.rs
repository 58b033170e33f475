//! `hashgrid backup PATH...` and `hashgrid backup --image FILE|DEVICE`.

use std::path::PathBuf;
use std::process::ExitCode;

use hashgrid_proto::codec::DEFAULT_ZSTD_LEVEL;
use hashgrid_proto::SnapshotId;
use indicatif::HumanBytes;

use super::{default_client, outln, print_json, Global};
use crate::backup::{backup, BackupOptions, ParentChoice};
use crate::memory::MemoryBudget;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Files or directories (file level), or one image file or block device with --image.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Image level: back up one file or block device as a single stream.
    #[arg(long)]
    pub image: bool,
    /// Client this backup belongs to [default: this host's name].
    #[arg(long)]
    pub client: Option<String>,
    /// Dataset name within the client [default: "files", or the image's file name].
    #[arg(long)]
    pub dataset: Option<String>,
    /// Tags to attach (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Compare with this snapshot instead of the latest of the same client and dataset.
    #[arg(long, conflicts_with = "no_parent")]
    pub parent: Option<SnapshotId>,
    /// Read every file, trusting no earlier snapshot (chunks still deduplicate).
    #[arg(long)]
    pub no_parent: bool,
    /// zstd level for chunks (0 = store uncompressed).
    #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(-7..=19))]
    pub zstd_level: i32,
    /// Memory the agent may use (e.g. 64M, 1G): every buffer and queue of the backup is sized
    /// from it. The default keeps the agent under 150 MB of RSS; more keeps more chunks and
    /// directories in flight, for links with a long round trip.
    #[arg(long, env = "HASHGRID_MEMORY_BUDGET", default_value_t = MemoryBudget::default())]
    pub memory_budget: MemoryBudget,
    /// Where to keep the local copy of each dataset's trees, so an unchanged re-backup
    /// fetches none from the cluster [default: $XDG_CACHE_HOME/hashgrid or ~/.cache/hashgrid].
    #[arg(long, env = "HASHGRID_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Keep no local cache (overrides --cache-dir): fetch the parent snapshot's trees from
    /// the cluster.
    #[arg(long)]
    pub no_cache: bool,
}

pub async fn run(global: &Global, args: &Args) -> anyhow::Result<ExitCode> {
    let conn = global.connect().await?;
    let dataset = match (&args.dataset, args.image) {
        (Some(d), _) => d.clone(),
        (None, true) => args.paths[0]
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into()),
        (None, false) => "files".into(),
    };
    let opts = BackupOptions {
        paths: args.paths.clone(),
        image: args.image,
        client: args.client.clone().unwrap_or_else(default_client),
        dataset,
        tags: args.tags.clone(),
        parent: match (args.parent, args.no_parent) {
            (Some(id), _) => ParentChoice::Id(id),
            (None, true) => ParentChoice::None,
            (None, false) => ParentChoice::Latest,
        },
        hostname: default_client(),
        zstd_level: args.zstd_level,
        progress: !global.json,
        tree_part_bytes: hashgrid_proto::limits::TREE_PART_BYTES,
        memory: args.memory_budget,
        tree_cache: if args.no_cache {
            None
        } else {
            args.cache_dir
                .clone()
                .or_else(crate::tree_cache::default_dir)
        },
    };
    let summary = backup(&conn, &opts).await?;
    for w in &summary.warnings {
        eprintln!("warning: {w}");
    }
    if global.json {
        print_json(&summary)?;
    } else {
        let s = &summary.stats;
        outln!(
            "snapshot {} saved ({} {}, parent {})",
            summary.snapshot,
            opts.client,
            opts.dataset,
            summary.parent.map_or("none".into(), |p| p.to_string())
        );
        outln!(
            "  files {} ({} unchanged), dirs {}, {} logical",
            s.files,
            s.reused_files,
            s.dirs,
            HumanBytes(s.logical_bytes)
        );
        outln!(
            "  chunks {} ({} new), sent {}, stored {} new, in {:.2}s",
            s.chunks,
            s.new_chunks,
            HumanBytes(s.sent_bytes),
            HumanBytes(s.new_bytes),
            s.duration_ms as f64 / 1000.0
        );
    }
    Ok(if summary.warnings.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{} files or directories could not be read; the snapshot lacks them",
            summary.warnings.len()
        );
        ExitCode::from(3)
    })
}

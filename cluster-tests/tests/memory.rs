//! The agent's memory stays within its budget whatever it backs up: an image much larger than
//! the budget (chunks are read, sent and dropped, never held all at once) and a file tree of
//! thousands of files in hundreds of directories (the walk, the read buffers and the upload
//! queues are all sized from the one budget, see `hashgrid::memory`). The bounds are the
//! promise of the default budget: peak RSS under 150 MB.

use std::io::Write;
use std::path::Path;

use hashgrid::sample_data::{fleet_tree, TreeSpec};
use hashgrid_cluster_tests::{data, Node, Watched};

/// What the default budget promises for the agent's whole process.
const DEFAULT_PEAK_BOUND: u64 = 150_000_000;

fn backup_watched(node: &Node, tmp: &Path, args: &[&str]) -> (Watched, serde_json::Value) {
    let mut all = vec!["--json", "backup"];
    all.extend_from_slice(args);
    let run = node.cli_watched(&[], &node.token_file(), &all, &tmp.join("agent"));
    assert!(run.status.success(), "{}\n{}", run.status, run.stderr);
    assert!(run.peak_rss > 0, "could not read the agent's memory use");
    let summary = serde_json::from_str(&run.stdout).unwrap();
    (run, summary)
}

#[test]
fn agent_memory_stays_bounded_on_a_large_image() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    // 3 GiB of incompressible data: thirty times the agent's default budget.
    let img = tmp.path().join("big.raw");
    let mut f = std::fs::File::create(&img).unwrap();
    for i in 0..48u64 {
        f.write_all(&data::random_bytes(i, 64 << 20)).unwrap();
    }
    drop(f);
    let (run, summary) = backup_watched(&node, tmp.path(), &["--image", img.to_str().unwrap()]);
    assert_eq!(summary["stats"]["logical_bytes"].as_u64(), Some(3 << 30));
    println!("3 GiB image: agent peak RSS {} MiB", run.peak_rss >> 20);
    assert!(
        run.peak_rss < DEFAULT_PEAK_BOUND,
        "agent peaked at {} MiB for a 3 GiB image",
        run.peak_rss >> 20
    );
}

#[test]
fn agent_memory_stays_bounded_on_a_file_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    // A file server's tree in miniature: log-normal sizes up to 4 MiB, half text-like.
    let src = tmp.path().join("tree");
    let stats = fleet_tree(
        &src,
        &TreeSpec {
            seed: 11,
            files: 12_000,
            bytes: 600 << 20,
            max_file: 4 << 20,
        },
    )
    .unwrap();
    let (run, summary) = backup_watched(&node, tmp.path(), &[src.to_str().unwrap()]);
    assert_eq!(
        summary["stats"]["files"].as_u64(),
        Some(stats.files as u64),
        "{summary}"
    );
    println!(
        "{} files in {} directories: agent peak RSS {} MiB",
        stats.files,
        stats.dirs,
        run.peak_rss >> 20
    );
    assert!(
        run.peak_rss < DEFAULT_PEAK_BOUND,
        "agent peaked at {} MiB for a tree of {} files",
        run.peak_rss >> 20,
        stats.files
    );
}

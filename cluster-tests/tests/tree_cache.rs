//! The agent's local tree cache (issue 11, the unchanged path): an unchanged re-backup reads
//! its parent's trees from the cache and fetches none from the node; a damaged cache entry
//! is fetched instead; a backup that changed a few directories appends their trees to the
//! file; a cache of another snapshot is not used; every snapshot restores identical. Real `hashgrid-node` process; the agent in-process and through the CLI.

use std::path::{Path, PathBuf};

use hashgrid::backup::{backup, BackupSummary, ParentChoice};
use hashgrid::Connection;
use hashgrid_cluster_tests::{
    assert_same_tree, assert_success, backup_opts, data, restore_all, restored, runtime, Node,
};

async fn run(conn: &Connection, src: &Path, cache: &Path, parent: ParentChoice) -> BackupSummary {
    let mut opts = backup_opts(&[src], false, "tc", "files");
    opts.tree_cache = Some(cache.to_path_buf());
    opts.parent = parent;
    backup(conn, &opts).await.expect("backup")
}

/// Restores `s` into `target` and compares it with `src`. (Roots are not compared: the
/// snapshot's root records the source's ancestors, and the temp dir above it changes.)
async fn same_as_source(conn: &Connection, s: &BackupSummary, src: &Path, target: &Path) {
    restore_all(conn, s.snapshot, target).await;
    assert_same_tree(src, &restored(target, src));
}

/// The root id a tree cache file names: its last 32 bytes (it ends with its root record,
/// and the roots here are of one piece).
fn cached_root(bytes: &[u8]) -> Vec<u8> {
    bytes[bytes.len() - 32..].to_vec()
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// The one cache file under `cache`.
fn cache_file(cache: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(cache.join("trees"))
        .expect("cache dir")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

#[test]
fn an_unchanged_backup_reads_its_parent_trees_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    data::many_files(&src, 40, 25, 7);
    data::many_files(&src.join("nested/deeper"), 10, 10, 8);
    let cache = tmp.path().join("cache");
    let rt = runtime();
    rt.block_on(async {
        let conn = node.connect().await;
        let first = run(&conn, &src, &cache, ParentChoice::Latest).await;
        let stats = first.tree_cache.expect("cache stats");
        assert_eq!(
            (stats.hits, stats.fetched),
            (0, 0),
            "no parent: nothing read"
        );

        // Unchanged: every tree from the cache, none from the node, the same root.
        let second = run(&conn, &src, &cache, ParentChoice::Latest).await;
        let stats = second.tree_cache.unwrap();
        assert_eq!(stats.fetched, 0, "{stats:?}");
        assert!(stats.hits >= 53, "{stats:?}");
        same_as_source(&conn, &second, &src, &tmp.path().join("restore2")).await;

        // A damaged entry is fetched from the node instead; the result is the same. The
        // entry damaged is the root tree's (the first id of the header), which every backup
        // reads: the file's entries come in no fixed order, and the last may be one an
        // unchanged backup never asks for.
        let file = cache_file(&cache);
        let mut bytes = std::fs::read(&file).unwrap();
        let root = cached_root(&bytes);
        let entry = bytes
            .windows(32)
            .position(|w| w == root)
            .expect("the root tree's entry");
        // The entry: id (32 bytes), length (4), the tree's bytes.
        bytes[entry + 32 + 4] ^= 0x40;
        std::fs::write(&file, &bytes).unwrap();
        let third = run(&conn, &src, &cache, ParentChoice::Latest).await;
        let stats = third.tree_cache.unwrap();
        assert!(stats.fetched >= 1 && stats.hits >= 50, "{stats:?}");
        same_as_source(&conn, &third, &src, &tmp.path().join("restore3")).await;

        // A change: new trees for the changed directories, the rest still cached; the file
        // gets the new trees appended, it is not rewritten.
        let before = inode(&file);
        std::fs::write(src.join("nested/deeper/dir-0003/new.txt"), b"a new file").unwrap();
        let fourth = run(&conn, &src, &cache, ParentChoice::Latest).await;
        let stats = fourth.tree_cache.unwrap();
        assert_eq!(stats.fetched, 0, "{stats:?}");
        assert_eq!(
            inode(&file),
            before,
            "the file was rewritten, not appended to"
        );
        same_as_source(&conn, &fourth, &src, &tmp.path().join("restore4")).await;

        // The cache describes the fourth snapshot: a backup against the first (another
        // root) does not use it, fetches the first's trees and still comes out right.
        let fifth = run(&conn, &src, &cache, ParentChoice::Id(first.snapshot)).await;
        let stats = fifth.tree_cache.unwrap();
        assert_eq!(stats.hits, 0, "{stats:?}");
        assert!(stats.fetched >= 53, "{stats:?}");
        same_as_source(&conn, &fifth, &src, &tmp.path().join("restore5")).await;
    });

    // The CLI keeps its cache where HASHGRID_CACHE_DIR says, and not at all with --no-cache.
    let cli_cache = tmp.path().join("cli-cache");
    let backup_cli = |extra: &[&str]| {
        let mut args = vec!["--json", "backup", "--client", "cli", "--dataset", "files"];
        args.extend_from_slice(extra);
        let src = src.to_str().unwrap();
        let mut all = args.clone();
        all.push(src);
        let out = node.cli_with(&all, |c| {
            c.env("HASHGRID_CACHE_DIR", &cli_cache);
        });
        assert_success(&out, "hashgrid backup");
        let line = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    backup_cli(&[]);
    let again = backup_cli(&[]);
    assert_eq!(again["tree_cache"]["fetched"], 0, "{again}");
    assert!(
        again["tree_cache"]["hits"].as_u64().unwrap() >= 53,
        "{again}"
    );
    let uncached = backup_cli(&["--no-cache"]);
    assert!(uncached["tree_cache"].is_null(), "{uncached}");
}

//! The file system being backed up is not trusted: entries swapped while the agent reads
//! them never hang it or get read through the swap, and trees of any depth back up whole
//! with a bounded number of descriptors. The agent runs as a real `hashgrid` process.

use std::path::{Component, Path};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashgrid::objects::ObjectReader;
use hashgrid_cluster_tests::{bin_dir, data, runtime, Node};
use hashgrid_proto::manifest::{Content, EntryKind, Extent, Tree};
use hashgrid_proto::SnapshotId;

/// `hashgrid --json backup <src>` as a child process, under `ulimit -n <nofile>` if given.
fn spawn_backup(node: &Node, src: &Path, nofile: Option<u32>) -> Child {
    let mut cmd = Command::new("sh");
    let limit = nofile.map_or(String::new(), |n| format!("ulimit -n {n} && "));
    cmd.arg("-c")
        .arg(format!("{limit}exec \"$0\" \"$@\""))
        .arg(bin_dir().join("hashgrid"))
        .args(["--server", &node.server(), "--token-file"])
        .arg(node.token_file())
        .args(["--json", "backup"])
        .arg(src)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("start hashgrid backup")
}

/// Waits for a backup at most `limit`; a backup still running then is killed and fails the
/// test. Returns (exit code, the JSON summary, stderr). Its output is read while it runs: a
/// backup that warns about thousands of swapped files writes more than a pipe holds, and
/// would block on it (a hang of the test, not of the agent).
fn finish_within(mut child: Child, limit: Duration) -> (i32, serde_json::Value, String) {
    use std::io::Read;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            pipe.read_to_end(&mut all)
                .expect("read the backup's output");
            all
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            let stderr = stderr.join().unwrap();
            panic!(
                "backup still running after {limit:?} (hung?):\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
    let stdout = String::from_utf8(stdout.join().unwrap()).unwrap();
    let code = status.code().unwrap_or(-1);
    assert!(code == 0 || code == 3, "backup failed ({code}):\n{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("summary")).unwrap();
    (code, summary, stderr)
}

#[test]
fn files_swapped_for_fifos_mid_backup_never_hang_it() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    let stage = tmp.path().join("stage");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&stage).unwrap();
    const FILES: usize = 2000;
    for i in 0..FILES {
        std::fs::write(src.join(format!("f{i}")), data::text_bytes(i as u64, 100)).unwrap();
    }
    // A FIFO that stays put is recorded as a FIFO, never opened.
    let mkfifo = |p: &Path| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap()
    };
    mkfifo(&src.join("fifo"));
    // Meanwhile every file keeps being replaced by a FIFO and back (atomically, by rename),
    // so many are a FIFO when the agent opens what its listing saw as a regular file.
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (src, stage, stop) = (src.clone(), stage.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..FILES {
                    let staged = stage.join("next");
                    if round.is_multiple_of(2) {
                        mkfifo(&staged);
                    } else {
                        std::fs::write(&staged, b"back to a file").unwrap();
                    }
                    std::fs::rename(&staged, src.join(format!("f{i}"))).unwrap();
                }
                round += 1;
            }
        })
    };
    // Until one backup met a swapped file (a FIFO, or a new file in the old one's place):
    // each must finish, none may hang on a FIFO.
    let mut replaced_seen = false;
    let mut last = (0, String::new());
    let mut attempts = 0;
    // Each backup meets a swap only by a race (the listing's stat, then the open); on a fast
    // machine most backups miss it, so this keeps trying for a while.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while attempts < 200 && std::time::Instant::now() < until {
        attempts += 1;
        let (code, summary, stderr) =
            finish_within(spawn_backup(&node, &src, None), Duration::from_secs(120));
        let replaced = summary["replaced"]
            .as_u64()
            .expect("replaced in the summary");
        replaced_seen = replaced > 0;
        if replaced_seen {
            // Reported to the user as well as counted, and not as a failed backup.
            assert_eq!(code, 3, "a backup that left entries out says so:\n{stderr}");
            assert!(
                stderr.matches("warning: skipped ").count() as u64 >= replaced,
                "every replaced entry is named:\n{stderr}"
            );
            break;
        }
        last = (code, stderr);
    }
    eprintln!("a backup met a swapped file after {attempts} attempt(s)");
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(
        replaced_seen,
        "no backup of {attempts} met a swapped file; the last exited {} with:\n{:.4000}",
        last.0, last.1
    );
    // Once the tree holds still, it backs up without a warning, the FIFO as a FIFO.
    let (code, summary, stderr) =
        finish_within(spawn_backup(&node, &src, None), Duration::from_secs(120));
    assert_eq!(code, 0, "{stderr}");
    let id = snapshot_id(&summary);
    runtime().block_on(async {
        let tree = tree_at(&node, id, &src).await;
        assert!(matches!(tree.get(b"fifo").unwrap().kind, EntryKind::Fifo));
        assert_eq!(tree.entries.len(), FILES + 1);
    });
}

fn snapshot_id(summary: &serde_json::Value) -> SnapshotId {
    SnapshotId(summary["snapshot"].as_u64().expect("snapshot id"))
}

/// The tree of directory `path` in snapshot `id`, walked down one level at a time.
async fn tree_at(node: &Node, id: SnapshotId, path: &Path) -> Tree {
    let conn = node.connect().await;
    let snap = hashgrid::catalog::get(&conn, id).await.unwrap();
    let reader = ObjectReader::new(conn);
    let mut tree = reader.load_tree(&snap.root).await.unwrap();
    for c in path.components() {
        if let Component::Normal(name) = c {
            tree = subtree(&reader, &tree, name.as_encoded_bytes()).await;
        }
    }
    tree
}

async fn subtree(reader: &ObjectReader, tree: &Tree, name: &[u8]) -> Tree {
    match &tree.get(name).expect("directory in the snapshot").kind {
        EntryKind::Dir { subtree } => reader.load_tree(subtree).await.unwrap(),
        other => panic!("{} is {other:?}", String::from_utf8_lossy(name)),
    }
}

async fn file_bytes(reader: &ObjectReader, tree: &Tree, name: &[u8]) -> Vec<u8> {
    let EntryKind::File {
        content: Content::Inline(extents),
        ..
    } = &tree.get(name).expect("file in the snapshot").kind
    else {
        panic!("not a small file");
    };
    let mut out = Vec::new();
    for e in extents {
        match e {
            Extent::Chunk { id, .. } => {
                out.extend_from_slice(&reader.fetch(&[*id]).await.unwrap()[0])
            }
            Extent::Hole { len } => out.resize(out.len() + *len as usize, 0),
        }
    }
    out
}

#[test]
fn a_3000_deep_tree_backs_up_whole_under_ulimit_n_256() {
    const DEPTH: usize = 3000;
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("deep");
    data::deep_tree(&src, DEPTH);
    let (code, summary, stderr) = finish_within(
        spawn_backup(&node, &src, Some(256)),
        Duration::from_secs(300),
    );
    assert_eq!(code, 0, "{stderr}");
    let id = snapshot_id(&summary);
    runtime().block_on(async {
        let reader = ObjectReader::new(node.connect().await);
        let mut tree = tree_at(&node, id, &src).await;
        let files = data::deep_tree_file_levels(DEPTH);
        for level in 0..=DEPTH {
            if files.contains(&level) {
                assert_eq!(
                    file_bytes(&reader, &tree, b"file").await,
                    data::deep_tree_file(level),
                    "level {level}"
                );
            }
            if level < DEPTH {
                assert_eq!(tree.entries.len(), 1 + usize::from(files.contains(&level)));
                tree = subtree(&reader, &tree, b"d").await;
            } else {
                assert_eq!(tree.entries.len(), 1, "the bottom holds only its file");
            }
        }
    });
    // The next backup finds every level unchanged.
    let (code, summary, stderr) = finish_within(
        spawn_backup(&node, &src, Some(256)),
        Duration::from_secs(300),
    );
    assert_eq!(code, 0, "{stderr}");
    let files = data::deep_tree_file_levels(DEPTH).len() as u64;
    assert_eq!(summary["stats"]["files"].as_u64(), Some(files));
    assert_eq!(summary["stats"]["reused_files"].as_u64(), Some(files));
    // Every level, and the source's ancestors from `/` down.
    let dirs = DEPTH + 1 + src.components().count() - 1;
    assert_eq!(summary["stats"]["dirs"].as_u64(), Some(dirs as u64));
    data::remove_deep_tree(&src);
}

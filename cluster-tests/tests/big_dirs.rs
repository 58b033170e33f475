//! Directories larger than one tree object: split over parts under a tree index, restored
//! identical, and used as the parent of the next backup. The 1,000,000-entry figures are an
//! ignored test (`cargo test --release --workspace -- --ignored million`).

use std::path::Path;
use std::time::Instant;

use hashgrid::backup::{backup, BackupOptions};
use hashgrid::objects::ObjectReader;
use hashgrid::Connection;
use hashgrid_cluster_tests::{
    assert_same_tree, backup_opts, bin_dir, data, restore_all, restored, runtime, Node,
};
use hashgrid_proto::manifest::{decode_dir, DirObject, EntryKind, ObjectRef};
use hashgrid_proto::SnapshotId;

const FILES: usize = 3000;

fn opts(src: &Path, part_bytes: usize) -> BackupOptions {
    BackupOptions {
        tree_part_bytes: part_bytes,
        memory: Default::default(),
        tree_cache: None,
        ..backup_opts(&[src], false, "big-dirs", "files")
    }
}

#[test]
fn a_directory_split_over_parts_restores_identical_and_serves_as_a_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    data::wide_dir(&src, FILES);
    runtime().block_on(async {
        let conn = node.connect().await;
        let first = backup(&conn, &opts(&src, 4096)).await.unwrap();
        assert!(first.warnings.is_empty(), "{:?}", first.warnings);

        // The directory's subtree reference is an index of many parts.
        let reader = ObjectReader::new(conn.clone());
        let subtree = subtree_of(&conn, first.snapshot, &src).await;
        assert_eq!(
            reader.load_tree(&subtree).await.unwrap().entries.len(),
            FILES
        );
        let index = match decode_dir(&reader.read_object(&subtree).await.unwrap()).unwrap() {
            DirObject::Index(i) => i,
            DirObject::Tree(_) => panic!("a {FILES}-entry directory in one 4 KiB part"),
        };
        assert!(index.parts.len() > 20, "{} parts", index.parts.len());
        assert_eq!(index.entries(), FILES as u64);

        let target = tmp.path().join("restore1");
        restore_all(&conn, first.snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, &src));

        // As a parent: unchanged files are reused, the changed and the new one are read.
        std::fs::write(src.join(data::wide_dir_name(7)), b"changed").unwrap();
        std::fs::write(src.join("zz-new"), b"new").unwrap();
        let second = backup(&conn, &opts(&src, 4096)).await.unwrap();
        assert_eq!(second.parent, Some(first.snapshot));
        assert_eq!(second.stats.files, FILES as u64 + 1);
        assert_eq!(second.stats.reused_files, FILES as u64 - 1);
        let target = tmp.path().join("restore2");
        restore_all(&conn, second.snapshot, &target).await;
        assert_same_tree(&src, &restored(&target, &src));

        // Nothing changed: the whole split directory is the parent's, reference and all.
        let third = backup(&conn, &opts(&src, 4096)).await.unwrap();
        assert_eq!(third.stats.reused_files, FILES as u64 + 1);
        assert_eq!(
            subtree_of(&conn, second.snapshot, &src).await,
            subtree_of(&conn, third.snapshot, &src).await
        );
    });
}

/// The subtree reference of directory `dir` in `snapshot`.
async fn subtree_of(conn: &Connection, snapshot: SnapshotId, dir: &Path) -> ObjectRef {
    let reader = ObjectReader::new(conn.clone());
    let snap = hashgrid::catalog::get(conn, snapshot).await.unwrap();
    let mut r = snap.root;
    for c in dir.components().skip(1) {
        let tree = reader.load_tree(&r).await.unwrap();
        r = match &tree.get(c.as_os_str().as_encoded_bytes()).unwrap().kind {
            EntryKind::Dir { subtree } => subtree.clone(),
            other => panic!("{other:?}"),
        };
    }
    r
}

/// Peak RSS (VmHWM) and wall time of `cmd`, via `/usr/bin/time -v`.
fn time_v(cmd: &mut std::process::Command) -> (f64, u64) {
    let started = Instant::now();
    let out = cmd.output().expect("run /usr/bin/time");
    let secs = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let kib = stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("peak RSS in /usr/bin/time -v output");
    (secs, kib)
}

#[test]
#[ignore = "figures: backup and restore of a 1,000,000-entry directory (several minutes, ~8 GB of disk)"]
fn million_entry_directory_backup_figures() {
    const ENTRIES: usize = 1_000_000;
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    let made = Instant::now();
    data::wide_dir(&src, ENTRIES);
    println!(
        "made {ENTRIES} files in {:.1}s",
        made.elapsed().as_secs_f64()
    );
    // The agent under `/usr/bin/time -v`, talking to the node.
    let agent = |args: &[&std::ffi::OsStr]| {
        let mut cmd = std::process::Command::new("/usr/bin/time");
        cmd.arg("-v")
            .arg(bin_dir().join("hashgrid"))
            .args(["--server", &node.server(), "--token-file"])
            .arg(node.token_file())
            .arg("--json")
            .args(args);
        time_v(&mut cmd)
    };
    for run in ["first", "unchanged"] {
        let (secs, kib) = agent(&[
            "backup".as_ref(),
            "--dataset".as_ref(),
            "wide".as_ref(),
            src.as_os_str(),
        ]);
        println!(
            "{run} backup of a {ENTRIES}-entry directory: {secs:.1}s, agent peak RSS {} MiB",
            kib / 1024
        );
    }
    let target = tmp.path().join("restored");
    let (secs, kib) = agent(&[
        "restore".as_ref(),
        "latest".as_ref(),
        "--dataset".as_ref(),
        "wide".as_ref(),
        "--target".as_ref(),
        target.as_os_str(),
    ]);
    println!(
        "restore of the {ENTRIES}-entry directory: {secs:.1}s, agent peak RSS {} MiB",
        kib / 1024
    );
    let restored = target.join(src.strip_prefix("/").unwrap());
    let count = std::fs::read_dir(&restored).unwrap().count();
    assert_eq!(count, ENTRIES, "every entry restored");
    let name = data::wide_dir_name(ENTRIES - 1);
    assert_eq!(
        std::fs::read(restored.join(&name)).unwrap(),
        std::fs::read(src.join(&name)).unwrap()
    );
}

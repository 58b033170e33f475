//! Restore holds a bounded number of descriptors and never recurses: a tree of many
//! directories with hard links across them restores under `ulimit -n 256`, and a tree
//! deeper than PATH_MAX restores whole.

use std::os::fd::OwnedFd;

use hashgrid::backup::backup;
use hashgrid_cluster_tests::manifests::{commit, dir, file, meta, upload_chunk, upload_tree};
use hashgrid_cluster_tests::{assert_same_tree, backup_opts, data, restored, runtime, Node};
use rustix::fs::{Mode, OFlags};

#[test]
fn hard_links_across_1500_directories_restore_under_256_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    data::hard_linked_dirs(&src, 1500);
    let id = runtime().block_on(async {
        let conn = node.connect().await;
        backup(&conn, &backup_opts(&[&src], false, "c", "d"))
            .await
            .unwrap()
            .snapshot
    });
    let target = tmp.path().join("target");
    let run = node.cli_watched(
        &["prlimit", "--nofile=256:256", "--"],
        &node.token_file(),
        &[
            "--json",
            "restore",
            &id.to_string(),
            "--target",
            target.to_str().unwrap(),
        ],
        &tmp.path().join("agent"),
    );
    assert!(run.status.success(), "{}\n{}", run.status, run.stderr);
    println!(
        "hard-link restore under RLIMIT_NOFILE 256: peak {} descriptors open (polled), {}",
        run.peak_fds,
        run.stdout.trim()
    );
    assert!(run.peak_fds > 0 && run.peak_fds <= 256, "{}", run.peak_fds);
    let summary: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(summary["summary"]["links"].as_u64(), Some(1500));
    assert_same_tree(&src, &restored(&target, &src));
    let a = std::fs::metadata(restored(&target, &src).join("d0042/f")).unwrap();
    let b = std::fs::metadata(restored(&target, &src).join("links/l0042")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
}

/// Opens `names` one below the other from `dir`, never following a symlink.
fn open_chain(dir: OwnedFd, names: impl Iterator<Item = &'static str>) -> OwnedFd {
    names.fold(dir, |d, n| {
        rustix::fs::openat(
            &d,
            n,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    })
}

#[test]
fn a_tree_3000_directories_deep_restores_whole() {
    const DEPTH: usize = 3000;
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let payload = b"at the bottom\n".to_vec();
    let snap = runtime().block_on(async {
        let conn = node.connect().await;
        let data = upload_chunk(&conn, payload.clone()).await;
        // Bottom up: each level holds one directory (the level below) and one file.
        let mut level = upload_tree(
            &conn,
            vec![file(b"bottom.txt", meta(0o640), data, payload.len() as u32)],
        )
        .await;
        for _ in 0..DEPTH {
            level = upload_tree(&conn, vec![dir(b"deeper", level)]).await;
        }
        commit(&conn, &level).await
    });
    let target = tmp.path().join("target");
    let run = node.cli_watched(
        &["prlimit", "--nofile=256:256", "--"],
        &node.token_file(),
        &[
            "--json",
            "restore",
            &snap.id.to_string(),
            "--target",
            target.to_str().unwrap(),
        ],
        &tmp.path().join("agent"),
    );
    assert!(run.status.success(), "{}\n{}", run.status, run.stderr);
    println!(
        "{DEPTH}-deep restore: peak {} descriptors, {} MiB RSS",
        run.peak_fds,
        run.peak_rss >> 20
    );
    let summary: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(summary["summary"]["dirs"].as_u64(), Some(DEPTH as u64));
    let top = rustix::fs::open(&target, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
    let bottom = open_chain(top, std::iter::repeat_n("deeper", DEPTH));
    let f = rustix::fs::openat(&bottom, "bottom.txt", OFlags::RDONLY, Mode::empty()).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(f), &mut got).unwrap();
    assert_eq!(got, payload);
    let st = rustix::fs::statat(&bottom, "bottom.txt", rustix::fs::AtFlags::empty()).unwrap();
    assert_eq!(st.st_mode & 0o7777, 0o640);
    assert_eq!(st.st_mtime, 1_600_000_000);
}

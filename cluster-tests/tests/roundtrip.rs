//! Backups restore identical: every kind of entry and its metadata, random trees, chosen
//! paths. Real `hashgrid-node` process; the agent library in-process.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hashgrid::backup::{backup, BackupOptions, BackupSummary};
use hashgrid::restore::{restore, RestoreOptions};
use hashgrid::treediff::{diff_trees, Compare};
use hashgrid::Connection;
use hashgrid_cluster_tests::{
    allocated_bytes, assert_same_tree, backup_opts, data, restore_all, restored, runtime, Node,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn files_opts(paths: &[&Path], dataset: &str) -> BackupOptions {
    backup_opts(paths, false, "test-client", dataset)
}

async fn backup_and_restore(
    conn: &Connection,
    src: &Path,
    target: &Path,
    dataset: &str,
) -> BackupSummary {
    let summary = backup(conn, &files_opts(&[src], dataset))
        .await
        .expect("backup");
    restore_all(conn, summary.snapshot, target).await;
    summary
}

#[test]
fn every_kind_of_entry_restores_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    data::edge_case_tree(&src);
    let target = tmp.path().join("restore");
    runtime().block_on(async {
        let conn = node.connect().await;
        let s = backup_and_restore(&conn, &src, &target, "edge").await;
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        assert_same_tree(&src, &restored(&target, &src));

        // Sparse files come back sparse; zeros written as data take no space either.
        let (a, b) = (
            src.join("sparse.img"),
            restored(&target, &src).join("sparse.img"),
        );
        assert!(
            allocated_bytes(&b) <= allocated_bytes(&a) + (64 << 10),
            "{} vs {}",
            allocated_bytes(&b),
            allocated_bytes(&a)
        );
        assert!(allocated_bytes(&restored(&target, &src).join("zeros.bin")) < 64 << 10);

        // The source's ancestors are restored too, as directories.
        assert!(restored(&target, &src).parent().unwrap().is_dir());
    });
}

#[test]
fn restore_of_chosen_paths_writes_only_those() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    data::edge_case_tree(&src);
    runtime().block_on(async {
        let conn = node.connect().await;
        let s = backup(&conn, &files_opts(&[&src], "partial"))
            .await
            .unwrap();
        let snap = hashgrid::catalog::get(&conn, s.snapshot).await.unwrap();
        let target = tmp.path().join("restore");
        let inside = src.join("dir/deeper");
        restore(
            &conn,
            &snap,
            &RestoreOptions {
                target: target.clone(),
                paths: vec![inside.clone(), src.join("small.txt")],
                progress: false,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let out = restored(&target, &src);
        assert_same_tree(&inside, &out.join("dir/deeper"));
        assert_eq!(std::fs::read(out.join("small.txt")).unwrap(), b"hello\n");
        assert!(!out.join("dir/random.bin").exists());
        assert!(!out.join("empty").exists());

        let missing = restore(
            &conn,
            &snap,
            &RestoreOptions {
                target: tmp.path().join("restore2"),
                paths: vec![src.join("no/such/path")],
                progress: false,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert!(
            missing.to_string().contains("is not in snapshot"),
            "{missing}"
        );
    });
}

/// A random directory tree to materialize.
#[derive(Clone, Debug)]
enum Spec {
    File {
        data: u8,
        size: usize,
        seed: u64,
        mode: u32,
        mtime: (i64, i64),
    },
    Dir {
        children: BTreeMap<Vec<u8>, Spec>,
        mode: u32,
    },
    Symlink {
        target: Vec<u8>,
    },
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            8 => proptest::char::range('a', 'z').prop_map(|c| c as u8),
            1 => Just(b'.'),
            1 => Just(b' '),
            1 => 0x80u8..=0xff,
            1 => 1u8..0x20,
        ],
        1..12,
    )
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn spec() -> impl Strategy<Value = Spec> {
    let file = (
        0u8..3,
        prop_oneof![Just(0usize), 1usize..200, 1000usize..300_000],
        any::<u64>(),
        prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o444, 0o4755, 0o2750]),
        (0i64..2_000_000_000, 0i64..1_000_000_000),
    )
        .prop_map(|(data, size, seed, mode, mtime)| Spec::File {
            data,
            size,
            seed,
            mode,
            mtime,
        });
    let symlink = name().prop_map(|target| Spec::Symlink { target });
    let leaf = prop_oneof![4 => file, 1 => symlink];
    leaf.prop_recursive(4, 48, 8, |inner| {
        (
            proptest::collection::btree_map(name(), inner, 0..8),
            prop::sample::select(vec![0o755u32, 0o700, 0o555, 0o750]),
        )
            .prop_map(|(children, mode)| Spec::Dir { children, mode })
    })
}

fn materialize(path: &Path, spec: &Spec) {
    match spec {
        Spec::File {
            data: kind,
            size,
            seed,
            mode,
            mtime,
        } => {
            let bytes = match kind {
                0 => data::random_bytes(*seed, *size),
                1 => data::text_bytes(*seed, *size),
                _ => vec![0u8; *size],
            };
            std::fs::write(path, bytes).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode)).unwrap();
            data::set_mtime(path, mtime.0, mtime.1);
        }
        Spec::Symlink { target } => {
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), path).unwrap();
        }
        Spec::Dir { children, mode } => {
            std::fs::create_dir(path).unwrap();
            for (n, child) in children {
                materialize(&path.join(std::ffi::OsStr::from_bytes(n)), child);
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode)).unwrap();
            data::set_mtime(path, 1_234_567_890, 5);
        }
    }
}

#[test]
fn random_trees_restore_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let rt = runtime();
    let conn = rt.block_on(node.connect());
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(
            &spec().prop_filter("a directory at the top", |s| matches!(s, Spec::Dir { .. })),
            |tree| {
                let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let dir = tmp.path().join(format!("case{case}"));
                std::fs::create_dir(&dir).unwrap();
                let src = dir.join("src");
                materialize(&src, &tree);
                let target = dir.join("restore");
                rt.block_on(backup_and_restore(
                    &conn,
                    &src,
                    &target,
                    &format!("case{case}"),
                ));
                let diffs = diff_trees(&src, &restored(&target, &src), Compare::ALL).unwrap();
                prop_assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn backups_after_changes_restore_the_new_state() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    data::edge_case_tree(&src);
    runtime().block_on(async {
        let conn = node.connect().await;
        let first = backup(&conn, &files_opts(&[&src], "changing"))
            .await
            .unwrap();

        // Content, metadata and structure change in different directories; most does not.
        let deep = src.join("dir/deeper/still/deeper/file");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&deep)
            .unwrap();
        std::io::Write::write_all(&mut f, b"appended").unwrap();
        drop(f);
        std::fs::set_permissions(src.join("empty"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::fs::write(src.join("dir/empty-too-new"), b"new file").unwrap();
        std::fs::remove_file(src.join("link-dangling")).unwrap();
        std::fs::write(
            src.join("big-many-chunks.bin"),
            data::random_bytes(77, 9 << 20),
        )
        .unwrap();

        let second = backup(&conn, &files_opts(&[&src], "changing"))
            .await
            .unwrap();
        assert_eq!(second.parent, Some(first.snapshot));
        assert!(second.stats.reused_files >= 8, "{:?}", second.stats);
        assert!(second.stats.reused_files < second.stats.files);

        // Then nothing changes: the third snapshot is the second's tree, reused whole.
        let third = backup(&conn, &files_opts(&[&src], "changing"))
            .await
            .unwrap();
        assert_eq!(third.stats.reused_files, third.stats.files);
        // Only tree objects of ancestors whose metadata moved (other tests touch /tmp) may
        // be new: the source's own subtree is reused by reference.
        assert!(third.stats.sent_bytes < 4096, "{:?}", third.stats);

        for snap in [second.snapshot, third.snapshot] {
            let target = tmp.path().join(format!("restore-{snap}"));
            restore_all(&conn, snap, &target).await;
            assert_same_tree(&src, &restored(&target, &src));
        }
    });
}

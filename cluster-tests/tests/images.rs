//! Image-level backups: sparse images restore identical and sparse, a dense image restores
//! identical when every fetch group writes into it at once, VMDK files restore
//! byte-identical and pass `qemu-img check`, clones of one template store only their
//! differences, and backing up the same data twice stores nothing new.

use std::path::{Path, PathBuf};
use std::process::Command;

use hashgrid::backup::{backup, BackupOptions, ParentChoice};
use hashgrid::treediff::{diff_trees, Compare};
use hashgrid_cluster_tests::{
    allocated_bytes, backup_opts, cluster_stats, data, restore_all, runtime, Node,
};

fn image_opts(path: &Path, client: &str) -> BackupOptions {
    backup_opts(&[path], true, client, "disk")
}

/// `dir/rel`, its parent directory made (each image is backed up from a directory of its own).
fn path_in(dir: &Path, rel: &str) -> PathBuf {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    p
}

fn same_bytes(a: &Path, b: &Path) {
    let st = Command::new("cmp").arg(a).arg(b).status().expect("cmp");
    assert!(st.success(), "{} and {} differ", a.display(), b.display());
}

#[test]
fn sparse_8gib_image_restores_identical_and_sparse() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let img = path_in(tmp.path(), "src/disk.raw");
    let gib = 1u64 << 30;
    let islands: Vec<(u64, usize, u64)> = (0..24u64)
        .map(|i| {
            (
                i * (8 * gib / 24) + i * 4096 * 7,
                (1 << 20) + (i as usize * 37_000),
                i,
            )
        })
        .chain([(8 * gib - (3 << 20), 3 << 20, 99)])
        .collect();
    data::sparse_image(&img, 8 * gib, &islands);
    let target = tmp.path().join("restore");
    runtime().block_on(async {
        let conn = node.connect().await;
        let s = backup(&conn, &image_opts(&img, "vm-sparse")).await.unwrap();
        assert_eq!(s.stats.logical_bytes, 8 * gib);
        let data_bytes: u64 = islands.iter().map(|i| i.1 as u64).sum();
        assert!(
            s.stats.sent_bytes < data_bytes + (4 << 20),
            "sent {} for {} of data",
            s.stats.sent_bytes,
            data_bytes
        );
        restore_all(&conn, s.snapshot, &target).await;
    });
    let out = target.join("disk.raw");
    let diffs = diff_trees(img.parent().unwrap(), &target, Compare::ALL).unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    let (src_alloc, out_alloc) = (allocated_bytes(&img), allocated_bytes(&out));
    assert!(
        (out_alloc as f64) <= src_alloc as f64 * 1.10,
        "restored image allocates {out_alloc} bytes, source {src_alloc}"
    );
}

/// A dense image of about 1,100 chunks: the restore's fetch groups (256 chunks each, three
/// at once) all write into the one file, taking turns (`restore/write.rs`), the case a
/// sparse image with a few MiB of data never reaches.
#[test]
fn a_dense_image_restores_identical_with_every_fetch_group_writing_it() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = path_in(tmp.path(), "src/dense.img");
    data::sparse_image(&src, 72 << 20, &[(0, 72 << 20, 41)]);
    let out = node.cli_json(&["backup", "--image", src.to_str().unwrap()]);
    let chunks = out["upload"]["sent_chunks"].as_u64().unwrap();
    assert!(
        chunks > 3 * 256,
        "{chunks} chunks: fewer than three fetch groups"
    );
    let id = out["snapshot"].as_u64().unwrap().to_string();
    let target = tmp.path().join("restore");
    node.cli_json(&["restore", &id, "--target", target.to_str().unwrap()]);
    same_bytes(&src, &target.join("dense.img"));
}

#[test]
fn vmdk_restores_byte_identical_and_checks_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let raw = tmp.path().join("disk.raw");
    data::sparse_image(
        &raw,
        256 << 20,
        &[
            (0, 2 << 20, 1),
            (100 << 20, 5 << 20, 2),
            (200 << 20, 1 << 20, 3),
        ],
    );
    let vmdk = path_in(tmp.path(), "src/disk.vmdk");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk"])
        .arg(&raw)
        .arg(&vmdk)
        .status()
        .expect("qemu-img is needed for this test (Debian: qemu-utils)");
    assert!(st.success());
    // Through the CLI, as an admin would.
    let out = node.cli_json(&[
        "backup",
        "--image",
        vmdk.to_str().unwrap(),
        "--client",
        "hyperv01",
    ]);
    let id = out["snapshot"].as_u64().unwrap().to_string();
    let target = tmp.path().join("restore");
    node.cli_json(&["restore", &id, "--target", target.to_str().unwrap()]);
    let restored = target.join("disk.vmdk");
    same_bytes(&vmdk, &restored);
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&restored)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let back = tmp.path().join("back.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&restored)
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success());
    same_bytes(&raw, &back);
}

#[test]
fn clones_of_one_template_store_only_their_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let template = tmp.path().join("template.raw");
    let islands: Vec<_> = (0..16u64).map(|i| (i * (8 << 20), 3 << 20, i)).collect();
    data::sparse_image(&template, 128 << 20, &islands);
    let (a, b) = (
        path_in(tmp.path(), "a/vm.raw"),
        path_in(tmp.path(), "b/vm.raw"),
    );
    for (p, seed) in [(&a, 1), (&b, 2)] {
        std::fs::copy(&template, p).unwrap();
        data::churn(p, seed, 20);
    }
    runtime().block_on(async {
        let conn = node.connect().await;
        let first = backup(&conn, &image_opts(&a, "site-a")).await.unwrap();
        let second = backup(&conn, &image_opts(&b, "site-b")).await.unwrap();
        assert!(second.parent.is_none(), "different clients share no parent");
        // 20 changed 4 KiB blocks touch at most 2 chunks each (a block may straddle a cut),
        // plus the manifest: the second site stores and sends only that.
        assert!(second.stats.new_chunks <= 20 * 2 + 2, "{:?}", second.stats);
        assert!(
            second.stats.sent_bytes < first.stats.sent_bytes / 5,
            "{:?} vs {:?}",
            second.stats,
            first.stats
        );
        let target = tmp.path().join("restore-b");
        restore_all(&conn, second.snapshot, &target).await;
        same_bytes(&b, &target.join("vm.raw"));
    });
}

#[test]
fn backing_up_the_same_data_again_stores_no_new_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    data::edge_case_tree(&src);
    let mut opts = image_opts(&src, "fileserver");
    opts.image = false;
    opts.dataset = "home".into();
    runtime().block_on(async {
        let conn = node.connect().await;
        let first = backup(&conn, &opts).await.unwrap();
        assert!(first.stats.new_chunks > 0);
        let before = cluster_stats(&conn).await;
        // With the parent (nothing re-read) and without it (everything re-read and hashed):
        // either way the cluster already has every chunk.
        // The source's ancestors (/, /tmp, ...) are recorded too, and other tests change
        // /tmp's mtime: at most one new tree object per ancestor, never file data.
        let ancestors = src.ancestors().count() as u64;
        for parent in [ParentChoice::Latest, ParentChoice::None] {
            opts.parent = parent.clone();
            let again = backup(&conn, &opts).await.unwrap();
            assert!(
                again.stats.new_chunks <= ancestors,
                "{parent:?}: {:?}",
                again.stats
            );
            assert!(
                again.stats.new_bytes < 4096,
                "{parent:?}: {:?}",
                again.stats
            );
            assert!(
                again.stats.sent_bytes < 4096,
                "{parent:?}: {:?}",
                again.stats
            );
            if parent == ParentChoice::Latest {
                assert_eq!(again.stats.reused_files, again.stats.files);
            } else {
                assert_eq!(again.stats.reused_files, 0);
            }
        }
        let after = cluster_stats(&conn).await;
        assert!(after.chunks <= before.chunks + 2 * ancestors);
        assert!(after.stored_bytes < before.stored_bytes + 8192);
        assert_eq!(after.snapshots, 3);
    });
}

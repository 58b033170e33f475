//! What a restore applies: as root, owners, setuid/setgid bits, device nodes and xattrs
//! (ACLs and file capabilities too), each of which an option turns off; as anyone else,
//! what the kernel refuses is skipped with one warning per kind. Modes of FIFOs and device
//! nodes are set through the new node's descriptor.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hashgrid_cluster_tests::manifests::{commit, entry, file, meta, upload_chunk, upload_tree};
use hashgrid_cluster_tests::{runtime, Node, Watched};
use hashgrid_proto::manifest::{EntryKind, Metadata, Xattr};
use hashgrid_proto::SnapshotId;

const CONTENT: &[u8] = b"restored content\n";

/// A file capability (version 2): cap_net_raw, effective and permitted.
fn net_raw_capability() -> Vec<u8> {
    let mut v = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// An access ACL: owner rw, user 1000 r, group r, mask r, other none (mode 0640).
fn acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

fn xattr(name: &str, value: &[u8]) -> Xattr {
    Xattr {
        name: name.as_bytes().to_vec(),
        value: value.to_vec(),
    }
}

fn tagged_meta() -> Metadata {
    Metadata {
        xattrs: vec![
            xattr("security.capability", &net_raw_capability()),
            xattr("system.posix_acl_access", &acl()),
            xattr("trusted.hashgrid", b"trusted"),
            xattr("user.hashgrid.note", b"hello"),
        ],
        ..meta(0o640)
    }
}

/// A snapshot with an owned file, a setuid file, a character device, a FIFO, and
/// `tagged` files carrying a user xattr, an ACL, a capability and a trusted xattr.
fn build(node: &Node, tagged: usize) -> SnapshotId {
    runtime().block_on(async {
        let conn = node.connect().await;
        let data = upload_chunk(&conn, CONTENT.to_vec()).await;
        let len = CONTENT.len() as u32;
        let mut entries = vec![
            file(
                b"owned",
                Metadata {
                    uid: 1234,
                    gid: 5678,
                    ..meta(0o644)
                },
                data,
                len,
            ),
            file(b"setuid", meta(0o4755), data, len),
            entry(
                b"null",
                meta(0o666),
                EntryKind::CharDevice {
                    rdev: rustix::fs::makedev(1, 3),
                },
            ),
            entry(b"fifo", meta(0o604), EntryKind::Fifo),
        ];
        for i in 0..tagged {
            entries.push(file(
                format!("tagged{i:03}").as_bytes(),
                tagged_meta(),
                data,
                len,
            ));
        }
        let root = upload_tree(&conn, entries).await;
        commit(&conn, &root).await.id
    })
}

fn restore(
    node: &Node,
    id: SnapshotId,
    target: &Path,
    opts: &[&str],
    wrapper: &[&str],
    token: &Path,
) -> Watched {
    let target = target.to_str().unwrap().to_string();
    let id = id.to_string();
    let mut args = vec!["--json", "restore", &id, "--target", &target];
    args.extend_from_slice(opts);
    node.cli_watched(
        wrapper,
        token,
        &args,
        &target_parent(&target).join("agent-output"),
    )
}

fn target_parent(target: &str) -> PathBuf {
    Path::new(target).parent().unwrap().to_path_buf()
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = [0u8; 512];
    rustix::fs::lgetxattr(path, name, &mut buf[..])
        .ok()
        .map(|n| buf[..n].to_vec())
}

/// Restores as root with `opts`; `None` (and the test says it was skipped) when not root.
fn restore_as_root(opts: &[&str]) -> Option<(tempfile::TempDir, PathBuf)> {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: needs root");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let id = build(&node, 1);
    let target = tmp.path().join("r").join("target");
    let run = restore(&node, id, &target, opts, &[], &node.token_file());
    assert!(run.status.success(), "{}\n{}", run.status, run.stderr);
    // Only what an option asked to skip is reported.
    assert!(
        run.stderr
            .lines()
            .filter(|l| l.contains("warning"))
            .all(|l| l.contains("(--no-devices)")),
        "{}",
        run.stderr
    );
    Some((tmp, target))
}

#[test]
fn as_root_a_restore_applies_owners_setid_devices_and_xattrs() {
    let Some((_tmp, t)) = restore_as_root(&[]) else {
        return;
    };
    let owned = std::fs::metadata(t.join("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
    assert_eq!(std::fs::read(t.join("owned")).unwrap(), CONTENT);
    let setuid = std::fs::metadata(t.join("setuid")).unwrap();
    assert_eq!(setuid.permissions().mode() & 0o7777, 0o4755);
    let null = std::fs::symlink_metadata(t.join("null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(null.permissions().mode() & 0o7777, 0o666);
    assert_eq!(null.mtime(), 1_600_000_000);
    let fifo = std::fs::symlink_metadata(t.join("fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.permissions().mode() & 0o7777, 0o604);
    let tagged = t.join("tagged000");
    assert_eq!(
        get_xattr(&tagged, "user.hashgrid.note").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        get_xattr(&tagged, "trusted.hashgrid").as_deref(),
        Some(&b"trusted"[..])
    );
    assert_eq!(
        get_xattr(&tagged, "security.capability"),
        Some(net_raw_capability())
    );
    assert_eq!(get_xattr(&tagged, "system.posix_acl_access"), Some(acl()));
    assert_eq!(
        std::fs::metadata(&tagged).unwrap().permissions().mode() & 0o7777,
        0o640
    );
}

#[test]
fn no_owner_leaves_files_to_the_restoring_user() {
    let Some((_tmp, t)) = restore_as_root(&["--no-owner"]) else {
        return;
    };
    let owned = std::fs::metadata(t.join("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (0, 0));
    assert_eq!(owned.permissions().mode() & 0o7777, 0o644);
}

#[test]
fn no_setid_strips_setuid_and_setgid() {
    let Some((_tmp, t)) = restore_as_root(&["--no-setid"]) else {
        return;
    };
    let setuid = std::fs::metadata(t.join("setuid")).unwrap();
    assert_eq!(setuid.permissions().mode() & 0o7777, 0o755);
    let owned = std::fs::metadata(t.join("owned")).unwrap();
    assert_eq!(owned.uid(), 1234);
}

#[test]
fn no_devices_creates_no_device_nodes() {
    let Some((_tmp, t)) = restore_as_root(&["--no-devices"]) else {
        return;
    };
    assert!(std::fs::symlink_metadata(t.join("null")).is_err());
    assert!(std::fs::symlink_metadata(t.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
}

#[test]
fn no_xattrs_sets_no_xattrs() {
    let Some((_tmp, t)) = restore_as_root(&["--no-xattrs"]) else {
        return;
    };
    let tagged = t.join("tagged000");
    assert_eq!(get_xattr(&tagged, "user.hashgrid.note"), None);
    assert_eq!(get_xattr(&tagged, "security.capability"), None);
    assert_eq!(get_xattr(&tagged, "system.posix_acl_access"), None);
}

#[test]
fn as_nobody_what_may_not_be_set_is_skipped_with_one_warning_per_kind() {
    if !rustix::process::geteuid().is_root() || !Path::new("/usr/bin/setpriv").exists() {
        println!("skipped: needs root (to become nobody) and setpriv");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let id = build(&node, 50);
    // A place nobody can reach: the token and the target.
    let open = tmp.path().join("open");
    std::fs::create_dir_all(open.join("target")).unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let token = open.join("token");
    std::fs::copy(node.token_file(), &token).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let target = open.join("target");
    rustix::fs::chown(
        &target,
        Some(rustix::fs::Uid::from_raw(65534)),
        Some(rustix::fs::Gid::from_raw(65534)),
    )
    .unwrap();
    let run = restore(
        &node,
        id,
        &target,
        &[],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &token,
    );
    assert!(run.status.success(), "{}\n{}", run.status, run.stderr);
    println!("{}", run.stderr);
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    let count = |kind: &str| warnings.iter().filter(|l| l.contains(kind)).count();
    assert_eq!(count("file capabilities"), 1, "{warnings:#?}");
    assert_eq!(count("trusted xattrs"), 1, "{warnings:#?}");
    assert_eq!(count("device nodes"), 1, "{warnings:#?}");
    assert!(
        run.stderr.contains("skipped on 50 entries"),
        "{}",
        run.stderr
    );
    assert_eq!(warnings.len(), 3, "{warnings:#?}");
    for i in [0, 49] {
        let tagged = target.join(format!("tagged{i:03}"));
        assert_eq!(
            get_xattr(&tagged, "user.hashgrid.note").as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(get_xattr(&tagged, "system.posix_acl_access"), Some(acl()));
        assert_eq!(get_xattr(&tagged, "security.capability"), None);
        assert_eq!(std::fs::metadata(&tagged).unwrap().uid(), 65534);
    }
    assert!(std::fs::symlink_metadata(target.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
}

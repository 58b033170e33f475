//! Fidelity capture: extended attributes in every namespace the agent can read, POSIX ACLs
//! and file capabilities land in the snapshot's entries, and an attribute change alone is
//! noticed by the next backup (through ctime).

use std::path::Path;
use std::process::Command;

use hashgrid::backup::backup;
use hashgrid::objects::ObjectReader;
use hashgrid_cluster_tests::{backup_opts, runtime, Node};
use hashgrid_proto::manifest::{EntryKind, Tree, Xattr};

/// An access ACL granting user 1000 read: `user::rw- user:1000:r-- group::r-- mask::r--
/// other::r--` in the kernel's `posix_acl_xattr` form (version 2, then tag, perm, id).
fn acl_bytes() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Gives `path` CAP_NET_RAW (as `ping` has): with `setcap` if installed, else by writing
/// the `vfs_cap_data` revision 2 bytes.
fn set_capability(path: &Path) {
    let by_tool = Command::new("setcap")
        .arg("cap_net_raw+ep")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    if !by_tool {
        let mut v = (0x0200_0000u32 | 1).to_le_bytes().to_vec();
        for word in [1u32 << 13, 0, 0, 0] {
            v.extend_from_slice(&word.to_le_bytes());
        }
        rustix::fs::setxattr(
            path,
            "security.capability",
            &v,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
}

fn set(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
}

/// What the kernel reports for `names` on `path`, as the snapshot should hold them.
fn source_xattrs(path: &Path, names: &[&str]) -> Vec<Xattr> {
    names
        .iter()
        .map(|n| {
            let mut buf = vec![0u8; 65536];
            let len = rustix::fs::lgetxattr(path, *n, &mut buf[..]).unwrap();
            Xattr {
                name: n.as_bytes().to_vec(),
                value: buf[..len].to_vec(),
            }
        })
        .collect()
}

fn entry_xattrs(tree: &Tree, name: &str) -> Vec<Xattr> {
    tree.get(name.as_bytes())
        .unwrap_or_else(|| panic!("{name} not in the snapshot"))
        .meta
        .xattrs
        .clone()
}

/// The snapshot's entries carry (at least) `expected`, and nothing twice.
fn assert_carries(tree: &Tree, name: &str, expected: &[Xattr]) {
    let got = entry_xattrs(tree, name);
    for x in expected {
        assert!(
            got.contains(x),
            "{name} lacks {} (has {:?})",
            String::from_utf8_lossy(&x.name),
            got.iter()
                .map(|x| String::from_utf8_lossy(&x.name))
                .collect::<Vec<_>>()
        );
    }
    assert!(
        got.windows(2).all(|w| w[0].name < w[1].name),
        "{name}: unsorted"
    );
}

async fn dir_tree(node: &Node, snapshot: hashgrid_proto::SnapshotId, dir: &Path) -> Tree {
    let conn = node.connect().await;
    let snap = hashgrid::catalog::get(&conn, snapshot).await.unwrap();
    let reader = ObjectReader::new(conn);
    let mut tree = reader.load_tree(&snap.root).await.unwrap();
    for c in dir.components().skip(1) {
        let EntryKind::Dir { subtree } = &tree.get(c.as_os_str().as_encoded_bytes()).unwrap().kind
        else {
            panic!("not a directory");
        };
        tree = reader.load_tree(subtree).await.unwrap();
    }
    tree
}

#[test]
fn xattrs_acls_and_capabilities_are_captured() {
    let root = rustix::process::geteuid().is_root();
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("dir")).unwrap();
    let (file, plain, dir, link) = (
        src.join("file"),
        src.join("plain"),
        src.join("dir"),
        src.join("link"),
    );
    std::fs::write(&file, b"content").unwrap();
    std::fs::write(&plain, b"no attributes changed here").unwrap();
    std::os::unix::fs::symlink("file", &link).unwrap();
    set(&file, "user.comment", b"hello");
    set(&file, "user.binary", &[0, 1, 2, 255]);
    set(&file, "system.posix_acl_access", &acl_bytes());
    set(&plain, "user.kept", b"as it was");
    set(&dir, "user.dir", b"on a directory");
    set(&dir, "system.posix_acl_default", &acl_bytes());
    let mut file_names = vec!["system.posix_acl_access", "user.binary", "user.comment"];
    if root {
        set_capability(&file);
        set(&file, "trusted.origin", b"root only");
        set(&link, "trusted.link", b"on the symlink itself");
        file_names.extend(["security.capability", "trusted.origin"]);
    }
    let expected_file = source_xattrs(&file, &file_names);
    runtime().block_on(async {
        let conn = node.connect().await;
        let first = backup(&conn, &backup_opts(&[&src], false, "fidelity", "files"))
            .await
            .unwrap();
        assert!(first.warnings.is_empty(), "{:?}", first.warnings);
        let tree = dir_tree(&node, first.snapshot, &src).await;
        assert_carries(&tree, "file", &expected_file);
        assert_carries(&tree, "plain", &source_xattrs(&plain, &["user.kept"]));
        assert_carries(
            &tree,
            "dir",
            &source_xattrs(&dir, &["system.posix_acl_default", "user.dir"]),
        );
        if root {
            assert_carries(&tree, "link", &source_xattrs(&link, &["trusted.link"]));
        }

        // Changing only an attribute moves ctime: the next backup notices it; the untouched
        // file is reused with its attributes.
        set(&file, "user.comment", b"changed");
        let second = backup(&conn, &backup_opts(&[&src], false, "fidelity", "files"))
            .await
            .unwrap();
        assert_eq!(second.stats.reused_files, 1, "only `plain` is unchanged");
        let tree = dir_tree(&node, second.snapshot, &src).await;
        assert_carries(&tree, "file", &source_xattrs(&file, &["user.comment"]));
        assert_carries(&tree, "plain", &source_xattrs(&plain, &["user.kept"]));
    });
}

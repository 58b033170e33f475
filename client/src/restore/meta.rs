//! Applying an entry's metadata in the one safe order: owner, mode, xattrs, mtime.
//!
//! Owner first, because chown clears setuid/setgid bits and file capabilities; mode next;
//! then xattrs (POSIX ACLs are the `system.posix_acl_*` xattrs, capabilities
//! `security.capability`), so a chown cannot clear a capability just set; the mtime last,
//! because nothing after it may touch the file. Every call goes through a descriptor of the
//! file itself, never through a name. An xattr the kernel refuses (as non-root: capabilities,
//! `trusted.*`, most `security.*`) is skipped and counted under its kind, so a restore warns
//! once per kind, not once per file.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use hashgrid_proto::manifest::{Metadata, Xattr};
use rustix::fs::XattrFlags;
use rustix::io::Errno;

use super::fs::{self, Dir};
use super::policy::RestorePolicy;
use super::report::Warnings;

/// The kind an xattr is counted under when it cannot be set.
pub fn xattr_kind(name: &[u8]) -> &'static str {
    match name {
        b"security.capability" => "file capabilities (security.capability)",
        b"system.posix_acl_access" | b"system.posix_acl_default" => "POSIX ACLs",
        n if n.starts_with(b"user.") => "user xattrs",
        n if n.starts_with(b"trusted.") => "trusted xattrs",
        n if n.starts_with(b"security.") => "security xattrs",
        _ => "other xattrs",
    }
}

/// Sets each xattr with `set`; failures are warnings counted by kind.
fn apply_xattrs(
    xattrs: &[Xattr],
    path: &Path,
    warnings: &Warnings,
    mut set: impl FnMut(&[u8], &[u8]) -> Result<(), Errno>,
) {
    for x in xattrs {
        if let Err(e) = set(&x.name, &x.value) {
            warnings.note(xattr_kind(&x.name), path, std::io::Error::from(e));
        }
    }
}

fn name_of(name: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(name)
}

/// Metadata of a regular file or directory, through its open descriptor.
pub fn apply_fd(
    fd: &impl AsFd,
    meta: &Metadata,
    path: &Path,
    policy: &RestorePolicy,
    warnings: &Warnings,
) -> Result<(), Errno> {
    fs::set_owner_mode_fd(fd, meta, policy)?;
    if policy.xattrs {
        apply_xattrs(&meta.xattrs, path, warnings, |n, v| {
            rustix::fs::fsetxattr(fd, name_of(n), v, XattrFlags::empty())
        });
    }
    fs::set_mtime_fd(fd, meta)
}

/// Metadata of a FIFO, socket or device node, through its `O_PATH` descriptor.
pub fn apply_node(
    fd: &OwnedFd,
    meta: &Metadata,
    path: &Path,
    policy: &RestorePolicy,
    warnings: &Warnings,
) -> Result<(), Errno> {
    fs::set_owner_mode_node(fd, meta, policy)?;
    if policy.xattrs {
        let proc = fs::proc_path(fd);
        apply_xattrs(&meta.xattrs, path, warnings, |n, v| {
            rustix::fs::setxattr(proc.as_str(), name_of(n), v, XattrFlags::empty())
        });
    }
    fs::set_mtime_node(fd, meta)
}

/// Metadata of a symlink. Linux offers no way to set a symlink's xattrs through a
/// descriptor (and allows only `trusted.*`/`security.*` ones on symlinks at all), so they
/// are skipped with a warning rather than set through a name.
pub fn apply_symlink(
    dir: &Dir,
    name: &[u8],
    meta: &Metadata,
    path: &Path,
    policy: &RestorePolicy,
    warnings: &Warnings,
) -> Result<(), Errno> {
    fs::set_meta_symlink(dir, name, meta, policy)?;
    if policy.xattrs && !meta.xattrs.is_empty() {
        warnings.note("xattrs of symlinks", path, "not restored");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattrs_are_counted_by_kind() {
        assert_eq!(xattr_kind(b"user.mime_type"), "user xattrs");
        assert_eq!(xattr_kind(b"system.posix_acl_default"), "POSIX ACLs");
        assert_eq!(
            xattr_kind(b"security.capability"),
            "file capabilities (security.capability)"
        );
        assert_eq!(xattr_kind(b"security.selinux"), "security xattrs");
        assert_eq!(xattr_kind(b"trusted.overlay.opaque"), "trusted xattrs");
    }

    #[test]
    fn refused_xattrs_warn_once_per_kind() {
        let w = Warnings::default();
        let xattrs: Vec<Xattr> = ["user.a", "user.b", "security.capability", "trusted.x"]
            .iter()
            .map(|n| Xattr {
                name: n.as_bytes().to_vec(),
                value: b"v".to_vec(),
            })
            .collect();
        for i in 0..500 {
            let path = format!("/r/file{i}");
            apply_xattrs(&xattrs, Path::new(&path), &w, |n, _| {
                if n.starts_with(b"user.") {
                    Ok(())
                } else {
                    Err(Errno::PERM)
                }
            });
        }
        let lines = w.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with(
            "file capabilities (security.capability): skipped on 500 entries (first: /r/file0"
        ));
        assert!(lines[1].starts_with("trusted xattrs: skipped on 500 entries"));
    }
}

#[cfg(test)]
mod node_tests {
    use std::os::unix::fs::PermissionsExt;

    use rustix::fs::{FileType, Mode, OFlags};

    use super::*;

    /// A FIFO's mode goes to the node made, through its descriptor: a symlink put in its
    /// place afterwards (to a file the restore must not touch) is not followed.
    #[test]
    fn a_node_mode_is_set_through_its_descriptor_not_its_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = rustix::fs::open(
            tmp.path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"not yours").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();

        let fd = fs::make_node(&dir, b"fifo", FileType::Fifo, 0).unwrap();
        std::fs::rename(tmp.path().join("fifo"), tmp.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path().join("fifo")).unwrap();

        let m = Metadata {
            mode: 0o4777,
            mtime: hashgrid_proto::manifest::Timestamp {
                sec: 1_000,
                nsec: 0,
            },
            ..Default::default()
        };
        let policy = RestorePolicy::default();
        apply_node(&fd, &m, Path::new("fifo"), &policy, &Warnings::default()).unwrap();

        let moved = std::fs::symlink_metadata(tmp.path().join("moved")).unwrap();
        assert_eq!(moved.permissions().mode() & 0o7777, 0o4777);
        let v = std::fs::metadata(&victim).unwrap();
        assert_eq!(v.permissions().mode() & 0o7777, 0o600);
        assert_ne!(std::os::unix::fs::MetadataExt::mtime(&v), 1_000);
    }
}

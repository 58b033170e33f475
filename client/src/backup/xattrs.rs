//! Extended attributes of the entries being backed up: every name the agent may read, in
//! every namespace (`user.`, `trusted.` when root, `security.` including file capabilities
//! in `security.capability`, and POSIX ACLs as `system.posix_acl_access` and
//! `system.posix_acl_default`), stored as the kernel gives them.
//!
//! Files and directories are read through the descriptor the walk opened and checked, so
//! the attributes belong to the inode whose content is stored. Entries the walk never opens
//! (symlinks, FIFOs, sockets, devices: opening a device can have effects) are read with the
//! `l*xattr` calls through `/proc/self/fd/<dir>/<name>`, which resolves the one name relative
//! to the directory's descriptor without following it.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use hashgrid_proto::limits::{MAX_XATTRS, MAX_XATTR_BYTES};
use hashgrid_proto::manifest::Xattr;
use rustix::io::Errno;

/// Attributes of an open file or directory.
pub fn of_fd(fd: impl AsFd) -> Result<Vec<Xattr>, Errno> {
    let fd = fd.as_fd();
    collect(
        |buf| match buf {
            None => rustix::fs::flistxattr_query(fd),
            Some(b) => rustix::fs::flistxattr(fd, b),
        },
        |name, buf| match buf {
            None => rustix::fs::fgetxattr_query(fd, name),
            Some(b) => rustix::fs::fgetxattr(fd, name, b),
        },
    )
}

/// Attributes of entry `name` of directory `dir`, without opening or following it.
pub fn of_entry(dir: impl AsFd, name: &[u8]) -> Result<Vec<Xattr>, Errno> {
    let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_fd().as_raw_fd()));
    path.push(OsStr::from_bytes(name));
    let path = path.as_path();
    let found = collect(
        |buf| match buf {
            None => rustix::fs::llistxattr_query(path),
            Some(b) => rustix::fs::llistxattr(path, b),
        },
        |attr, buf| match buf {
            None => rustix::fs::lgetxattr_query(path, attr),
            Some(b) => rustix::fs::lgetxattr(path, attr, b),
        },
    );
    match found {
        // Without /proc these entries' attributes cannot be reached safely.
        Err(Errno::NOENT) if !std::path::Path::new("/proc/self/fd").exists() => Ok(Vec::new()),
        other => other,
    }
}

/// Reads the list, then each attribute, sized by a query first; a list or value that grew
/// between the query and the read (`ERANGE`) is read again.
fn collect(
    list: impl Fn(Option<&mut [u8]>) -> Result<usize, Errno>,
    get: impl Fn(&[u8], Option<&mut [u8]>) -> Result<usize, Errno>,
) -> Result<Vec<Xattr>, Errno> {
    let names = match sized(list) {
        Ok(n) => n,
        // The file system keeps no attributes.
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    let mut total = 0usize;
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let value = match sized(|b| get(name, b)) {
            Ok(v) => v,
            // Removed since the list, or not readable by this agent: nothing to keep.
            Err(Errno::NODATA | Errno::PERM | Errno::ACCESS | Errno::NOTSUP) => continue,
            Err(e) => return Err(e),
        };
        total += name.len() + value.len();
        if out.len() == MAX_XATTRS || total > MAX_XATTR_BYTES {
            tracing::warn!(
                "extended attributes beyond {MAX_XATTRS} or {MAX_XATTR_BYTES} bytes left out"
            );
            break;
        }
        out.push(Xattr {
            name: name.to_vec(),
            value,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Calls `read` with a buffer of the size `read(None)` reports, retrying while the data
/// outgrows it.
fn sized(read: impl Fn(Option<&mut [u8]>) -> Result<usize, Errno>) -> Result<Vec<u8>, Errno> {
    for _ in 0..8 {
        let len = read(None)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; len];
        match read(Some(&mut buf)) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

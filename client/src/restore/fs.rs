//! The only way restore touches the filesystem: operations relative to a directory it holds
//! open, on single names that the manifest decoder already validated (no `/`, `.`, `..`,
//! NUL). Every open uses O_NOFOLLOW, and an existing symlink where a directory or file is to
//! go is removed, never followed. Together these keep every write beneath the target, whatever
//! the manifest says and whatever the target already contains.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use hashgrid_proto::manifest::{Metadata, Timestamp};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, UTIME_OMIT};
use rustix::io::Errno;

use super::policy::RestorePolicy;

pub type Dir = OwnedFd;

fn name_of(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

/// Opens the restore target itself (creating it if needed). This is the one path the user
/// chose, so it is resolved normally.
pub fn open_target(path: &std::path::Path) -> std::io::Result<Dir> {
    std::fs::create_dir_all(path)?;
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Removes whatever `name` is, if it is not a directory (directories are merged into).
fn remove_non_dir(dir: &Dir, name: &[u8]) -> Result<(), Errno> {
    match rustix::fs::unlinkat(dir, name_of(name), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates (or reuses) the subdirectory `name` and opens it without following symlinks.
pub fn make_dir(dir: &Dir, name: &[u8]) -> Result<Dir, Errno> {
    let open = || {
        rustix::fs::openat(
            dir,
            name_of(name),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    match rustix::fs::mkdirat(dir, name_of(name), Mode::from_raw_mode(0o700)) {
        Ok(()) => open(),
        Err(Errno::EXIST) => match open() {
            Ok(d) => Ok(d),
            // A file or a symlink is in the way: replace it.
            Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                remove_non_dir(dir, name)?;
                rustix::fs::mkdirat(dir, name_of(name), Mode::from_raw_mode(0o700))?;
                open()
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Creates the regular file `name` afresh (replacing a file or symlink already there).
pub fn create_file(dir: &Dir, name: &[u8]) -> Result<File, Errno> {
    let create = || {
        rustix::fs::openat(
            dir,
            name_of(name),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
    };
    match create() {
        Err(Errno::EXIST) => {
            remove_non_dir(dir, name)?;
            create()
        }
        other => other,
    }
    .map(File::from)
}

pub fn symlink(dir: &Dir, name: &[u8], target: &[u8]) -> Result<(), Errno> {
    match rustix::fs::symlinkat(name_of(target), dir, name_of(name)) {
        Err(Errno::EXIST) => {
            remove_non_dir(dir, name)?;
            rustix::fs::symlinkat(name_of(target), dir, name_of(name))
        }
        other => other,
    }
}

pub fn hard_link(from_dir: &Dir, from: &[u8], dir: &Dir, name: &[u8]) -> Result<(), Errno> {
    let link = || {
        rustix::fs::linkat(
            from_dir,
            name_of(from),
            dir,
            name_of(name),
            AtFlags::empty(),
        )
    };
    match link() {
        Err(Errno::EXIST) => {
            remove_non_dir(dir, name)?;
            link()
        }
        other => other,
    }
}

/// Which file a descriptor refers to, to check that a directory reopened by `..` is the one
/// left earlier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    dev: u64,
    ino: u64,
}

pub fn identity(fd: &impl AsFd) -> Result<Identity, Errno> {
    let st = rustix::fs::fstat(fd)?;
    Ok(Identity {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// Reopens the parent of `child` through its `..` entry (never a symlink), and checks that it
/// is still the directory `expected` (nothing renamed the tree under the restore).
pub fn open_parent(child: &Dir, expected: Identity) -> Result<Dir, Errno> {
    let parent = rustix::fs::openat(
        child,
        "..",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if identity(&parent)? != expected {
        return Err(Errno::STALE);
    }
    Ok(parent)
}

/// Opens the directory at `names` below `dir`, one name at a time, never following a
/// symlink.
pub fn open_beneath(dir: &Dir, names: &[Vec<u8>]) -> Result<Dir, Errno> {
    let mut cur = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for name in names {
        cur = rustix::fs::openat(
            &cur,
            name_of(name),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
    }
    Ok(cur)
}

/// Creates a FIFO, socket or device node and returns an `O_PATH` descriptor of it, checked
/// to be the node just made, so its metadata is set on it and never through a name that
/// something could have swapped for a symlink meanwhile.
pub fn make_node(dir: &Dir, name: &[u8], kind: FileType, rdev: u64) -> Result<OwnedFd, Errno> {
    let mk = || rustix::fs::mknodat(dir, name_of(name), kind, Mode::from_raw_mode(0o600), rdev);
    match mk() {
        Err(Errno::EXIST) => {
            remove_non_dir(dir, name)?;
            mk()
        }
        other => other,
    }?;
    let fd = rustix::fs::openat(
        dir,
        name_of(name),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != kind {
        return Err(Errno::STALE);
    }
    Ok(fd)
}

/// The `/proc` name of a descriptor: the kernel resolves it to the descriptor's own file
/// (not to a path), so calls without an fd variant that works on `O_PATH` descriptors
/// (chmod, utimes, setxattr) reach exactly that file.
pub fn proc_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn timestamps(mtime: Timestamp) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: mtime.sec,
            tv_nsec: i64::from(mtime.nsec),
        },
    }
}

fn owner(meta: &Metadata) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    (
        Some(rustix::fs::Uid::from_raw(meta.uid)),
        Some(rustix::fs::Gid::from_raw(meta.gid)),
    )
}

/// Applies owner (when the policy says so), then mode, to an open file or directory. Owner
/// goes first because chown clears setuid/setgid bits. Xattrs and the mtime come after
/// (see [`super::meta`]).
pub fn set_owner_mode_fd(
    fd: &impl AsFd,
    meta: &Metadata,
    policy: &RestorePolicy,
) -> Result<(), Errno> {
    if policy.apply_owners() {
        let (u, g) = owner(meta);
        rustix::fs::fchown(fd, u, g)?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(policy.mode(meta.mode)))
}

pub fn set_mtime_fd(fd: &impl AsFd, meta: &Metadata) -> Result<(), Errno> {
    rustix::fs::futimens(fd, &timestamps(meta.mtime))
}

/// Owner and mode of a node held by an `O_PATH` descriptor ([`make_node`]).
pub fn set_owner_mode_node(
    fd: &OwnedFd,
    meta: &Metadata,
    policy: &RestorePolicy,
) -> Result<(), Errno> {
    if policy.apply_owners() {
        let (u, g) = owner(meta);
        rustix::fs::chownat(fd, "", u, g, AtFlags::EMPTY_PATH)?;
    }
    rustix::fs::chmodat(
        rustix::fs::CWD,
        proc_path(fd),
        Mode::from_raw_mode(policy.mode(meta.mode)),
        AtFlags::empty(),
    )
}

pub fn set_mtime_node(fd: &OwnedFd, meta: &Metadata) -> Result<(), Errno> {
    rustix::fs::utimensat(
        rustix::fs::CWD,
        proc_path(fd),
        &timestamps(meta.mtime),
        AtFlags::empty(),
    )
}

/// Owner and mtime of the symlink `name` in `dir` (symlinks have no mode of their own).
pub fn set_meta_symlink(
    dir: &Dir,
    name: &[u8],
    meta: &Metadata,
    policy: &RestorePolicy,
) -> Result<(), Errno> {
    if policy.apply_owners() {
        let (u, g) = owner(meta);
        rustix::fs::chownat(dir, name_of(name), u, g, AtFlags::SYMLINK_NOFOLLOW)?;
    }
    rustix::fs::utimensat(
        dir,
        name_of(name),
        &timestamps(meta.mtime),
        AtFlags::SYMLINK_NOFOLLOW,
    )
}

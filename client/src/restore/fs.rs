//! The only way restore touches the filesystem: operations relative to a directory it holds
//! open, on single names that the manifest decoder already validated (no `/`, `.`, `..`,
//! NUL). Every open uses O_NOFOLLOW, and an existing symlink where a directory or file is to
//! go is removed, never followed. Together these keep every write beneath the target, whatever
//! the manifest says and whatever the target already contains.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use hashgrid_proto::manifest::{Metadata, Timestamp};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, UTIME_OMIT};
use rustix::io::Errno;

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

pub fn make_node(dir: &Dir, name: &[u8], kind: FileType, rdev: u64) -> Result<(), Errno> {
    let mk = || rustix::fs::mknodat(dir, name_of(name), kind, Mode::from_raw_mode(0o600), rdev);
    match mk() {
        Err(Errno::EXIST) => {
            remove_non_dir(dir, name)?;
            mk()
        }
        other => other,
    }
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

/// Applies owner (when `as_root`), mode and mtime to an open file or directory. Owner goes
/// first because chown clears setuid/setgid bits.
pub fn set_meta_fd(
    fd: &impl std::os::fd::AsFd,
    meta: &Metadata,
    as_root: bool,
) -> Result<(), Errno> {
    if as_root {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
        )?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
    rustix::fs::futimens(fd, &timestamps(meta.mtime))
}

/// Applies metadata to `name` in `dir` without following it if it is a symlink (symlinks
/// have no mode of their own).
pub fn set_meta_at(
    dir: &Dir,
    name: &[u8],
    meta: &Metadata,
    as_root: bool,
    is_symlink: bool,
) -> Result<(), Errno> {
    if as_root {
        rustix::fs::chownat(
            dir,
            name_of(name),
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    if !is_symlink {
        rustix::fs::chmodat(
            dir,
            name_of(name),
            Mode::from_raw_mode(meta.mode),
            AtFlags::empty(),
        )?;
    }
    rustix::fs::utimensat(
        dir,
        name_of(name),
        &timestamps(meta.mtime),
        AtFlags::SYMLINK_NOFOLLOW,
    )
}

//! Reading the file system being backed up without trusting it.
//!
//! The agent often runs as root over trees that other users can change while it reads them.
//! Every name is therefore resolved one component at a time, relative to the descriptor of
//! the directory it was listed in, never as a path: a directory or file swapped for a
//! symlink between the listing and the open is refused (`O_NOFOLLOW`), a file swapped for a
//! FIFO or a device cannot block the open (`O_NONBLOCK`), and what was opened is compared
//! with what the listing saw (device, inode, type) before a byte of it is read. Paths only
//! appear in messages, so their length never limits what can be backed up.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use hashgrid_proto::manifest::{Metadata, Timestamp, Xattr};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use thiserror::Error;

use super::xattrs;

/// Why an entry of the source tree could not be backed up. Both are reported as a warning
/// and the entry is left out; neither stops the backup.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The name no longer leads to what the listing saw: another inode, another kind, or a
    /// symlink where there was none. Nothing was read through it.
    #[error("{path}: replaced while being backed up ({found})")]
    Replaced { path: PathBuf, found: &'static str },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl SourceError {
    /// The entry vanished (deleted between the listing and its use): nothing to back up.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SourceError::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A [`SourceError`] before the path it concerns is known (paths are only built for
/// messages).
#[derive(Debug)]
pub enum Fault {
    Replaced(&'static str),
    Io(Errno),
}

impl Fault {
    pub fn at(self, path: PathBuf) -> SourceError {
        match self {
            Fault::Replaced(found) => SourceError::Replaced { path, found },
            Fault::Io(e) => SourceError::Io {
                path,
                error: e.into(),
            },
        }
    }
}

impl From<Errno> for Fault {
    fn from(e: Errno) -> Self {
        Fault::Io(e)
    }
}

/// What `lstat` said of an entry, in the few bytes the walk needs (a listing of a million
/// entries holds a million of these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceStat {
    pub dev: u64,
    pub ino: u64,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

impl From<&Stat> for SourceStat {
    // `as` only where a field's width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    fn from(st: &Stat) -> Self {
        SourceStat {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            mode: st.st_mode as u32,
            nlink: st.st_nlink as u64,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u64,
            size: st.st_size.max(0) as u64,
            mtime: Timestamp {
                sec: st.st_mtime as i64,
                nsec: st.st_mtime_nsec as u32,
            },
            ctime: Timestamp {
                sec: st.st_ctime as i64,
                nsec: st.st_ctime_nsec as u32,
            },
        }
    }
}

impl SourceStat {
    pub fn kind(&self) -> FileType {
        FileType::from_raw_mode(self.mode)
    }

    pub fn is_dir(&self) -> bool {
        self.kind() == FileType::Directory
    }

    pub fn is_file(&self) -> bool {
        self.kind() == FileType::RegularFile
    }

    /// The manifest metadata this stat gives (size and xattrs are filled in by the caller).
    pub fn metadata(&self) -> Metadata {
        Metadata {
            mode: self.mode & 0o7777,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            size: 0,
            xattrs: Vec::new(),
            ctime: self.ctime,
            inode: self.ino,
        }
    }

    /// Is `now` (an `fstat` of what was opened) the entry this stat describes?
    fn check_same(&self, now: &SourceStat) -> Result<(), Fault> {
        if now.kind() != self.kind() {
            return Err(Fault::Replaced(kind_name(now.kind())));
        }
        if (now.dev, now.ino) != (self.dev, self.ino) {
            return Err(Fault::Replaced("now another file"));
        }
        Ok(())
    }
}

fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "now a regular file",
        FileType::Directory => "now a directory",
        FileType::Symlink => "now a symbolic link",
        FileType::Fifo => "now a FIFO",
        FileType::Socket => "now a socket",
        FileType::CharacterDevice => "now a character device",
        FileType::BlockDevice => "now a block device",
        FileType::Unknown => "now of an unknown type",
    }
}

/// Opens a directory that the walk starts from, by path (the only path ever resolved whole).
pub fn open_root(path: &std::path::Path) -> Result<(OwnedFd, SourceStat), SourceError> {
    let io = |e: Errno| Fault::Io(e).at(path.to_path_buf());
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    let st = rustix::fs::fstat(&fd).map_err(io)?;
    Ok((fd, SourceStat::from(&st)))
}

/// Opens directory `name` of `parent` without following a symlink, and checks that it is
/// the directory `(dev, ino)` the parent's listing saw.
pub fn open_dir_at(parent: impl AsFd, name: &[u8], dev: u64, ino: u64) -> Result<OwnedFd, Fault> {
    let parent = parent.as_fd();
    let fd = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        // A symlink gives ENOTDIR (O_DIRECTORY) or ELOOP (O_NOFOLLOW): say what is there.
        Errno::LOOP | Errno::NOTDIR => {
            match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Fault::Replaced(kind_name(SourceStat::from(&st).kind())),
                Err(_) => Fault::Replaced("no longer a directory"),
            }
        }
        e => Fault::Io(e),
    })?;
    let now = SourceStat::from(&rustix::fs::fstat(&fd)?);
    if (now.dev, now.ino) != (dev, ino) {
        return Err(Fault::Replaced("now another directory"));
    }
    Ok(fd)
}

/// Opens regular file `name` of directory `dir` for reading, and checks that it is still
/// the file `listed` describes. Never follows a symlink, never blocks on a FIFO or device
/// that took the file's place, never makes a terminal the agent's controlling terminal.
pub fn open_file_at(dir: impl AsFd, name: &[u8], listed: &SourceStat) -> Result<File, Fault> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
    let dir = dir.as_fd();
    let open = |flags| rustix::fs::openat(dir, name, flags | OFlags::CLOEXEC, Mode::empty());
    // O_NOATIME is refused (EPERM) on files the agent does not own unless it is root.
    let fd = match open(flags | OFlags::NOATIME) {
        Err(Errno::PERM) => open(flags),
        other => other,
    }
    .map_err(|e| match e {
        Errno::LOOP => Fault::Replaced("now a symbolic link"),
        // A socket cannot be opened; a FIFO without a writer can (O_NONBLOCK) and is caught
        // by the type check below.
        Errno::NXIO => Fault::Replaced("now a socket or a device without its driver"),
        e => Fault::Io(e),
    })?;
    listed.check_same(&SourceStat::from(&rustix::fs::fstat(&fd)?))?;
    Ok(File::from(fd))
}

/// One entry of a directory listing.
#[derive(Debug)]
pub struct Listed {
    pub name: Vec<u8>,
    pub st: SourceStat,
    /// Extended attributes of entries that are never opened (symlinks, FIFOs, sockets,
    /// devices); files carry theirs from their open descriptor, directories from their own
    /// listing.
    pub xattrs: Vec<Xattr>,
    /// A symlink's target; empty for other kinds.
    pub target: Vec<u8>,
}

/// A directory's listing: its entries sorted by name bytes, the entries left out (each
/// with why), and the directory's own extended attributes.
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: Vec<Listed>,
    pub skipped: Vec<SourceError>,
    pub xattrs: Vec<Xattr>,
}

/// The names in directory `fd` (`.` and `..` left out), unsorted. `path` names the
/// directory in messages.
pub fn list_names(fd: &OwnedFd, path: &std::path::Path) -> Result<Vec<Vec<u8>>, SourceError> {
    read_names(fd).map_err(|e| e.at(path.to_path_buf()))
}

/// Lists directory `fd` (all of it, or only `names`), with `lstat` data of each entry taken
/// relative to `fd`. `path` names the directory in messages.
pub fn list_dir(
    fd: &OwnedFd,
    names: Option<Vec<Vec<u8>>>,
    path: &std::path::Path,
) -> Result<Listing, SourceError> {
    let names = match names {
        Some(n) => n,
        None => list_names(fd, path)?,
    };
    let (xattrs, mut skipped) = match xattrs::of_fd(fd) {
        Ok(x) => (x, Vec::new()),
        Err(e) => (Vec::new(), vec![Fault::Io(e).at(path.to_path_buf())]),
    };
    let mut entries = Vec::with_capacity(names.len());
    for name in names {
        match list_one(fd, name) {
            Ok(e) => entries.push(e),
            Err((Fault::Io(Errno::NOENT), _)) => {} // deleted since the listing: nothing to back up
            Err((f, name)) => skipped.push(f.at(path.join(std::ffi::OsStr::from_bytes(&name)))),
        }
    }
    entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    Ok(Listing {
        entries,
        skipped,
        xattrs,
    })
}

/// Bytes of directory entries read per `getdents64` call: most directories in one call.
const DIRENT_BUF: usize = 32 * 1024;

/// The names in directory `fd`, read through `fd` itself (from its start). `Dir::read_from`
/// would reopen the directory (`openat(fd, ".")`, `fcntl`, `close`) and grow its buffer from
/// 768 bytes: three system calls more per directory, and a fourth for most (on the
/// benchmark's 69,000-file tree, 5,500 of an unchanged backup's 107,000 calls).
fn read_names(fd: &OwnedFd) -> Result<Vec<Vec<u8>>, Fault> {
    rustix::fs::seek(fd, rustix::fs::SeekFrom::Start(0))?;
    let mut buf = Vec::with_capacity(DIRENT_BUF);
    let mut names = Vec::new();
    let mut entries = rustix::fs::RawDir::new(fd, buf.spare_capacity_mut());
    while let Some(item) = entries.next() {
        let item = item?;
        let name = item.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// The entry `name` of `dir`; on a fault, the name comes back with it (the listing owns each
/// name once: 69,000 entries are 69,000 allocations fewer than copying it).
fn list_one(dir: &OwnedFd, name: Vec<u8>) -> Result<Listed, (Fault, Vec<u8>)> {
    let (st, xattrs, target) = match stat_one(dir, &name) {
        Ok(parts) => parts,
        Err(f) => return Err((f, name)),
    };
    Ok(Listed {
        name,
        st,
        xattrs,
        target,
    })
}

fn stat_one(dir: &OwnedFd, name: &[u8]) -> Result<(SourceStat, Vec<Xattr>, Vec<u8>), Fault> {
    let st = SourceStat::from(&rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?);
    let target = match st.kind() {
        FileType::Symlink => rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes(),
        _ => Vec::new(),
    };
    // Files and directories are read through their own descriptor once opened and checked.
    let xattrs = match st.kind() {
        FileType::RegularFile | FileType::Directory => Vec::new(),
        _ => xattrs::of_entry(dir, name)?,
    };
    Ok((st, xattrs, target))
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::{Duration, Instant};

    use super::*;

    fn listed(dir: &OwnedFd, name: &str) -> Listed {
        let listing = list_dir(dir, Some(vec![name.as_bytes().to_vec()]), "t".as_ref()).unwrap();
        assert!(listing.skipped.is_empty(), "{:?}", listing.skipped);
        listing.entries.into_iter().next().unwrap()
    }

    fn open_tmp(tmp: &tempfile::TempDir) -> OwnedFd {
        open_root(tmp.path()).unwrap().0
    }

    /// The seam between a listing's `lstat` and the open: `swap` runs in between.
    fn open_after(swap: impl FnOnce(&std::path::Path)) -> Result<File, Fault> {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"secret-free data").unwrap();
        std::fs::write(tmp.path().join("other"), b"other data").unwrap();
        std::fs::write(tmp.path().join("target"), b"what a symlink would lead to").unwrap();
        let dir = open_tmp(&tmp);
        let entry = listed(&dir, "f");
        assert!(entry.st.is_file());
        swap(tmp.path());
        open_file_at(&dir, b"f", &entry.st)
    }

    #[test]
    fn unchanged_file_opens_and_reads() {
        let mut f = open_after(|_| {}).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "secret-free data");
    }

    #[test]
    fn file_swapped_for_a_symlink_is_not_followed() {
        let err = open_after(|d| {
            std::fs::remove_file(d.join("f")).unwrap();
            std::os::unix::fs::symlink(d.join("target"), d.join("f")).unwrap();
        })
        .unwrap_err();
        assert!(
            matches!(err, Fault::Replaced("now a symbolic link")),
            "{err:?}"
        );
    }

    #[test]
    fn file_swapped_for_a_fifo_neither_blocks_nor_is_read() {
        let started = Instant::now();
        let err = open_after(|d| {
            std::fs::remove_file(d.join("f")).unwrap();
            rustix::fs::mknodat(
                rustix::fs::CWD,
                d.join("f"),
                FileType::Fifo,
                Mode::from_raw_mode(0o600),
                0,
            )
            .unwrap();
        })
        .unwrap_err();
        assert!(matches!(err, Fault::Replaced("now a FIFO")), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn file_swapped_for_another_file_is_refused() {
        let err =
            open_after(|d| std::fs::rename(d.join("other"), d.join("f")).unwrap()).unwrap_err();
        assert!(
            matches!(err, Fault::Replaced("now another file")),
            "{err:?}"
        );
    }

    #[test]
    fn directory_swapped_for_a_symlink_or_another_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("d")).unwrap();
        std::fs::create_dir_all(tmp.path().join("elsewhere")).unwrap();
        let root = open_tmp(&tmp);
        let d = listed(&root, "d");
        std::fs::rename(tmp.path().join("d"), tmp.path().join("d.old")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), tmp.path().join("d")).unwrap();
        let err = open_dir_at(&root, b"d", d.st.dev, d.st.ino).unwrap_err();
        assert!(
            matches!(err, Fault::Replaced("now a symbolic link")),
            "{err:?}"
        );
        std::fs::remove_file(tmp.path().join("d")).unwrap();
        std::fs::rename(tmp.path().join("elsewhere"), tmp.path().join("d")).unwrap();
        let err = open_dir_at(&root, b"d", d.st.dev, d.st.ino).unwrap_err();
        assert!(
            matches!(err, Fault::Replaced("now another directory")),
            "{err:?}"
        );
        std::fs::rename(tmp.path().join("d.old"), tmp.path().join("d")).unwrap();
        open_dir_at(&root, b"d", d.st.dev, d.st.ino).unwrap();
    }

    #[test]
    fn listing_reads_symlink_targets_relative_to_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("some/where", tmp.path().join("l")).unwrap();
        std::fs::write(tmp.path().join("b"), b"").unwrap();
        let root = open_tmp(&tmp);
        let listing = list_dir(&root, None, tmp.path()).unwrap();
        let names: Vec<&[u8]> = listing.entries.iter().map(|e| e.name.as_slice()).collect();
        assert_eq!(names, vec![&b"b"[..], b"l"]);
        assert_eq!(listing.entries[1].target, b"some/where");
    }
}

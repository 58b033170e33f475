//! Making changes to the data directory's names survive power loss.
//!
//! `fsync` of a file makes its bytes durable, not its name: a file created or renamed into
//! place, or a directory made, can vanish after a crash until the directory holding the name
//! is synced too. Every name the node relies on (the data directory and its subdirectories,
//! pack files, the admin token) is created through these functions.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Syncs the directory `dir`, making the names created or renamed in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path`'s name ("." for a bare relative name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates `dir` and any missing ancestors; each directory made is made durable by syncing
/// its parent. An existing directory is left as it is.
pub fn create_dirs(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = parent_of(dir);
    create_dirs(parent)?;
    match std::fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        Err(e) if e.kind() == ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with a private (0600) file holding `data`, durably and atomically: the
/// bytes are written to `<path>.tmp` and synced, renamed over `path`, and the directory is
/// synced, so after a crash `path` holds either nothing new or all of `data`.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    rename(&tmp, path)
}

/// Renames `from` to `to` (in the same directory) and syncs the directory.
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    sync_dir(parent_of(to))
}

/// Where [`write_private`] stages `path`'s new content.
pub fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_missing_ancestors_and_accepts_existing_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        create_dirs(&deep).unwrap();
        assert!(deep.is_dir());
        create_dirs(&deep).unwrap();
        std::fs::write(tmp.path().join("file"), b"x").unwrap();
        assert!(create_dirs(&tmp.path().join("file/sub")).is_err());
    }

    #[test]
    fn private_writes_replace_the_file_and_leave_no_staging_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("secret");
        std::fs::write(tmp_path(&path), b"leftover of a crash").unwrap();
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!tmp_path(&path).exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

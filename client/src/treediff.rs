//! Compares two directory trees entry by entry: kind, content, mode, owner, mtime, symlink
//! targets, device numbers and hard-link structure. The demo uses it to check its restore,
//! and the tests use it as their oracle.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What to compare besides kind and content.
#[derive(Clone, Copy, Debug)]
pub struct Compare {
    pub mode: bool,
    pub owner: bool,
    pub mtime: bool,
    pub hard_links: bool,
}

impl Compare {
    pub const ALL: Compare = Compare {
        mode: true,
        owner: true,
        mtime: true,
        hard_links: true,
    };
}

/// Every difference between `a` and `b`, as readable lines (empty when identical).
pub fn diff_trees(a: &Path, b: &Path, what: Compare) -> std::io::Result<Vec<String>> {
    let la = list(a)?;
    let lb = list(b)?;
    let mut out = Vec::new();
    for (rel, ma) in &la {
        let Some(mb) = lb.get(rel) else {
            out.push(format!("{}: missing in {}", rel.display(), b.display()));
            continue;
        };
        diff_entry(&a.join(rel), &b.join(rel), rel, ma, mb, what, &mut out)?;
    }
    for rel in lb.keys().filter(|r| !la.contains_key(*r)) {
        out.push(format!("{}: only in {}", rel.display(), b.display()));
    }
    if what.hard_links {
        let ga = link_groups(&la);
        let gb = link_groups(&lb);
        if ga != gb {
            out.push(format!("hard-link groups differ: {ga:?} vs {gb:?}"));
        }
    }
    Ok(out)
}

fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "char device"
    } else {
        "block device"
    }
}

fn diff_entry(
    pa: &Path,
    pb: &Path,
    rel: &Path,
    ma: &Metadata,
    mb: &Metadata,
    what: Compare,
    out: &mut Vec<String>,
) -> std::io::Result<()> {
    let r = rel.display();
    if kind(ma) != kind(mb) {
        out.push(format!("{r}: {} vs {}", kind(ma), kind(mb)));
        return Ok(());
    }
    let is_link = ma.file_type().is_symlink();
    if what.mode && !is_link && ma.mode() != mb.mode() {
        out.push(format!("{r}: mode {:o} vs {:o}", ma.mode(), mb.mode()));
    }
    if what.owner && (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
        out.push(format!(
            "{r}: owner {}:{} vs {}:{}",
            ma.uid(),
            ma.gid(),
            mb.uid(),
            mb.gid()
        ));
    }
    if what.mtime && (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
        out.push(format!(
            "{r}: mtime {}.{:09} vs {}.{:09}",
            ma.mtime(),
            ma.mtime_nsec(),
            mb.mtime(),
            mb.mtime_nsec()
        ));
    }
    if is_link && std::fs::read_link(pa)? != std::fs::read_link(pb)? {
        out.push(format!("{r}: symlink targets differ"));
    }
    if (ma.file_type().is_char_device() || ma.file_type().is_block_device())
        && ma.rdev() != mb.rdev()
    {
        out.push(format!("{r}: device {} vs {}", ma.rdev(), mb.rdev()));
    }
    if ma.is_file() {
        if ma.len() != mb.len() {
            out.push(format!("{r}: size {} vs {}", ma.len(), mb.len()));
        } else if !same_content(pa, pb)? {
            out.push(format!("{r}: content differs"));
        }
    }
    Ok(())
}

fn same_content(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Every path under `root` (relative) with its `lstat`, sorted.
fn list(root: &Path) -> std::io::Result<BTreeMap<PathBuf, Metadata>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for item in std::fs::read_dir(root.join(&rel))? {
            let item = item?;
            let child = rel.join(item.file_name());
            let m = item.metadata()?;
            if m.is_dir() {
                stack.push(child.clone());
            }
            out.insert(child, m);
        }
    }
    Ok(out)
}

/// Sets of paths that share an inode, for files with more than one link.
fn link_groups(list: &BTreeMap<PathBuf, Metadata>) -> Vec<Vec<PathBuf>> {
    let mut by_inode: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    for (p, m) in list {
        if m.is_file() && m.nlink() > 1 {
            by_inode
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(p.clone());
        }
    }
    let mut groups: Vec<Vec<PathBuf>> = by_inode
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_differences_and_accepts_copies() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::create_dir(d.join("sub")).unwrap();
            std::fs::write(d.join("sub/f"), b"same").unwrap();
        }
        let what = Compare {
            mtime: false,
            ..Compare::ALL
        };
        assert!(diff_trees(a.path(), b.path(), what).unwrap().is_empty());
        std::fs::write(b.path().join("sub/f"), b"diff").unwrap();
        std::fs::write(b.path().join("extra"), b"").unwrap();
        let d = diff_trees(a.path(), b.path(), what).unwrap();
        assert_eq!(d.len(), 2, "{d:?}");
    }
}

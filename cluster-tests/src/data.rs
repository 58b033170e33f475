//! Deterministic test data: seeded bytes, file trees covering every kind of entry, sparse
//! images, and random trees for property tests.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub use hashgrid::sample_data::{random_bytes, text_bytes};

pub fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &ts,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("set mtime");
}

/// A tree with every kind of entry restore must reproduce: empty and large files, sparse
/// files, empty dirs, symlinks (relative, absolute, dangling), hard links, odd modes,
/// non-UTF-8 names, a fifo, other owners, fixed mtimes with nanoseconds.
pub fn edge_case_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    };
    w("empty", b"");
    w("small.txt", b"hello\n");
    w("dir/text.log", &text_bytes(1, 300_000));
    w("dir/random.bin", &random_bytes(2, 1_500_000));
    w("dir/deeper/still/deeper/file", &random_bytes(3, 70_000));
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("dir/empty-too")).unwrap();
    // Many extents: more than fit inline in a tree entry.
    w("big-many-chunks.bin", &random_bytes(4, 9 << 20));
    // Sparse: a hole at the start, data, a hole at the end.
    let sparse = root.join("sparse.img");
    let mut f = File::create(&sparse).unwrap();
    f.set_len(64 << 20).unwrap();
    f.seek(SeekFrom::Start(20 << 20)).unwrap();
    f.write_all(&random_bytes(5, 1 << 20)).unwrap();
    drop(f);
    // Zeros written as data (not a hole) must come back as zeros.
    w("zeros.bin", &vec![0u8; 600_000]);
    std::os::unix::fs::symlink("small.txt", root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("link-abs")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("link-dangling")).unwrap();
    std::os::unix::fs::symlink("dir", root.join("link-to-dir")).unwrap();
    std::fs::hard_link(root.join("small.txt"), root.join("hardlink-a")).unwrap();
    std::fs::hard_link(root.join("small.txt"), root.join("dir/hardlink-b")).unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"not-utf8-\xff\xfe-name");
    std::fs::write(root.join(odd), b"odd name").unwrap();
    std::fs::write(root.join("spaces and\nnewline"), b"x").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    for (p, mode) in [
        ("small.txt", 0o600),
        ("dir/text.log", 0o4755),
        ("dir/random.bin", 0o444),
        ("empty-dir", 0o1777),
        ("dir/empty-too", 0o500),
    ] {
        std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    if rustix::process::geteuid().is_root() {
        let chown = |p: &str, uid: u32, gid: u32| {
            rustix::fs::chownat(
                rustix::fs::CWD,
                root.join(p),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .unwrap();
        };
        chown("dir/random.bin", 1234, 5678);
        chown("link-rel", 42, 43);
        chown("empty-dir", 7, 8);
    }
    // Fixed mtimes last, deepest first, so creating children does not bump them again.
    for (i, p) in [
        "dir/deeper/still/deeper/file",
        "dir/deeper/still/deeper",
        "small.txt",
        "link-rel",
        "dir/empty-too",
        "dir",
        "empty-dir",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&root.join(p), 1_600_000_000 + i as i64, 123_456_789);
    }
}

/// A sparse image of `size` bytes with data islands `(offset, len, seed)`.
pub fn sparse_image(path: &Path, size: u64, islands: &[(u64, usize, u64)]) {
    hashgrid::sample_data::sparse_image(path, size, islands).expect("write sparse image");
}

/// Overwrites `count` scattered 4 KiB blocks in place (block churn).
pub fn churn(path: &Path, seed: u64, count: usize) {
    hashgrid::sample_data::churn(path, seed, count).expect("churn image");
}

/// A wide tree: `dirs` directories of `files_per_dir` small files each (distinct content,
/// one chunk per file), for tests whose cost grows with the number of files.
pub fn many_files(root: &Path, dirs: usize, files_per_dir: usize, seed: u64) {
    for d in 0..dirs {
        let dir = root.join(format!("dir-{d:04}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..files_per_dir {
            let n = (d * files_per_dir + f) as u64;
            std::fs::write(
                dir.join(format!("file-{f:05}")),
                random_bytes(seed.wrapping_mul(1_000_003) + n, 200 + (n % 300) as usize),
            )
            .unwrap();
        }
    }
}

/// Levels of a [`deep_tree`] that hold a file: the top, every 1000th level, the bottom.
pub fn deep_tree_file_levels(depth: usize) -> Vec<usize> {
    let mut levels: Vec<usize> = (0..=depth).step_by(1000).collect();
    if levels.last() != Some(&depth) {
        levels.push(depth);
    }
    levels
}

/// The content of the file `file` at `level` of a [`deep_tree`].
pub fn deep_tree_file(level: usize) -> Vec<u8> {
    format!("level {level}\n").into_bytes()
}

/// A chain of `depth` nested directories `root/d/d/.../d`, with a file `file` at the levels
/// [`deep_tree_file_levels`] names (level 0 is `root` itself). Built relative to directory
/// descriptors, so it may be far deeper than PATH_MAX allows a path to reach; remove it with
/// [`remove_deep_tree`].
pub fn deep_tree(root: &Path, depth: usize) {
    use rustix::fs::{Mode, OFlags};
    std::fs::create_dir_all(root).unwrap();
    let files = deep_tree_file_levels(depth);
    let mut dir = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
        .expect("open deep tree root");
    for level in 0..=depth {
        if files.contains(&level) {
            let f = rustix::fs::openat(
                &dir,
                "file",
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                Mode::from_raw_mode(0o644),
            )
            .expect("create deep tree file");
            File::from(f).write_all(&deep_tree_file(level)).unwrap();
        }
        if level < depth {
            rustix::fs::mkdirat(&dir, "d", Mode::from_raw_mode(0o755)).expect("mkdir d");
            dir = rustix::fs::openat(&dir, "d", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
                .expect("open d");
        }
    }
}

/// Removes a [`deep_tree`] (or any tree whose only deep branch is its chain of `d`s) one
/// level at a time from the top, never holding more than a few descriptors or a long path.
pub fn remove_deep_tree(root: &Path) {
    let top = root.join("d");
    let next = root.join(".deep-tree-next");
    while top.exists() {
        if top.join("d").exists() {
            std::fs::rename(top.join("d"), &next).unwrap();
        }
        std::fs::remove_dir_all(&top).unwrap();
        if next.exists() {
            std::fs::rename(&next, &top).unwrap();
        }
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// The name of file `i` of a [`wide_dir`].
pub fn wide_dir_name(i: usize) -> String {
    format!("file-{i:08}")
}

/// One directory holding `entries` small files ([`wide_dir_name`], a few dozen bytes of
/// text each): a directory whose tree is larger than one object at a lowered part size,
/// or at the real one with a million entries.
pub fn wide_dir(root: &Path, entries: usize) {
    std::fs::create_dir_all(root).unwrap();
    for i in 0..entries {
        let name = wide_dir_name(i);
        std::fs::write(root.join(&name), format!("{name}: {}\n", i * 7919)).unwrap();
    }
}

/// `dirs` directories `d0000`, `d0001`, ... each holding a small file `f`, and a directory
/// `links` holding a second name (hard link) of every one of them: a restore meets the first
/// name of each link group in a different directory, and links to them from one place.
pub fn hard_linked_dirs(root: &Path, dirs: usize) {
    std::fs::create_dir_all(root.join("links")).unwrap();
    for i in 0..dirs {
        let d = root.join(format!("d{i:04}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("f"), format!("file {i}\n")).unwrap();
        std::fs::hard_link(d.join("f"), root.join(format!("links/l{i:04}"))).unwrap();
    }
}

/// Every file under `dir` (not following symlinks to directories).
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

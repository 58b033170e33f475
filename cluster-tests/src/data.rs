//! Deterministic test data: seeded bytes, file trees covering every kind of entry, sparse
//! images, and random trees for property tests.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// `len` pseudo-random bytes from `seed` (incompressible).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new_derive_key("hashgrid cluster-tests data")
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

/// `len` compressible, text-like bytes from `seed`.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let r = random_bytes(seed, len.div_ceil(4) + 1);
    let mut out = Vec::with_capacity(len);
    let mut i = 0;
    while out.len() < len {
        let w: &[u8] = match r[i % r.len()] % 8 {
            0 => b"lorem ",
            1 => b"ipsum ",
            2 => b"backup ",
            3 => b"restore ",
            4 => b"chunk\n",
            5 => b"node ",
            6 => b"42 ",
            _ => b"zone ",
        };
        out.extend_from_slice(w);
        i += 1;
    }
    out.truncate(len);
    out
}

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

/// Writes a sparse image of `size` bytes with data islands `(offset, len, seed)`.
pub fn sparse_image(path: &Path, size: u64, islands: &[(u64, usize, u64)]) {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    for &(off, len, seed) in islands {
        f.seek(SeekFrom::Start(off)).unwrap();
        let data = if seed % 2 == 0 {
            random_bytes(seed, len)
        } else {
            text_bytes(seed, len)
        };
        f.write_all(&data).unwrap();
    }
    f.sync_all().unwrap();
}

/// Overwrites `count` scattered 4 KiB blocks in place (block churn).
pub fn churn(path: &Path, seed: u64, count: usize) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    let blocks = f.metadata().unwrap().len() / 4096;
    let picks = random_bytes(seed, count * 8);
    for (i, p) in picks.chunks(8).enumerate() {
        let b = u64::from_le_bytes(p.try_into().unwrap()) % blocks;
        f.seek(SeekFrom::Start(b * 4096)).unwrap();
        f.write_all(&random_bytes(seed * 100_000 + i as u64, 4096))
            .unwrap();
    }
    f.sync_all().unwrap();
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

//! Deterministic sample data: the one set of generators that the demo, the tests and the
//! benchmarks use, so they all measure the same kind of data.
//!
//! Everything is a pure function of a seed. Two kinds of content: random bytes
//! (incompressible, from BLAKE3's XOF, so generating gigabytes is faster than writing them)
//! and text-like bytes (words, numbers and log tokens from a seeded vocabulary, which zstd
//! brings to roughly a third). On top of them:
//!
//! - [`fleet_tree`]: a file server's tree, log-normal file sizes (most files small, a few
//!   large), 3-4 directory levels, about half the files text-like, 0.5 % exact duplicates;
//! - [`fleet_image`]: a sparse raw disk image of holes, written zeros, text and random data,
//!   and regions duplicated inside the image;
//! - [`fleet_change`]: a day's churn: files rewritten, appended to, added and deleted, and
//!   scattered 4 KiB blocks plus a few 1 MiB regions of the image overwritten in place;
//! - [`sparse_image`] and [`churn`]: images with data islands at chosen offsets, for tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// `len` pseudo-random bytes from `seed` (incompressible).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_random(seed, &mut v);
    v
}

fn fill_random(seed: u64, buf: &mut [u8]) {
    blake3::Hasher::new_derive_key("hashgrid cluster-tests data")
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(buf);
}

/// `len` compressible, text-like bytes from `seed` (prose-like words).
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    Vocabulary::new(seed).text(seed, len, Style::Prose)
}

/// Which vocabulary text is drawn from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Words with punctuation and line breaks.
    Prose,
    /// Timestamps, levels, URLs, numbers and hex ids, as in server logs.
    Log,
}

/// 256 tokens per style, chosen by one random byte each.
struct Vocabulary {
    prose: Vec<Vec<u8>>,
    log: Vec<Vec<u8>>,
}

impl Vocabulary {
    fn new(seed: u64) -> Self {
        let mut r = StdRng::seed_from_u64(seed.wrapping_mul(7919).wrapping_add(1));
        let letters = b"etaoinshrdlucmfwypvbgkjqxzETAOIN";
        let lengths = [1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10, 12];
        let prose: Vec<Vec<u8>> = (0..256)
            .map(|i| {
                let n = *lengths.choose(&mut r).unwrap();
                let mut w: Vec<u8> = (0..n).map(|_| *letters.choose(&mut r).unwrap()).collect();
                w.extend_from_slice(match i {
                    i if i % 23 == 0 => b".\n",
                    i if i % 7 == 0 => b", ",
                    _ => b" ",
                });
                w
            })
            .collect();
        let mut log: Vec<Vec<u8>> = (0..20)
            .map(|_| {
                format!(
                    "\n2024-05-{:02}T{:02}:",
                    r.random_range(1..=28),
                    r.random_range(0..24)
                )
                .into_bytes()
            })
            .collect();
        for t in [
            " INFO ",
            " WARN ",
            " ERROR ",
            " DEBUG ",
            "GET ",
            "POST ",
            "/api/v1/users/",
            "/api/v1/items/",
            " status=200",
            " status=404",
            " status=500",
            " latency_ms=",
            " user_id=",
            " req=",
            " host=node-",
            " bytes=",
            "\n",
        ] {
            log.push(t.as_bytes().to_vec());
        }
        while log.len() < 256 {
            let k: f64 = r.random();
            let token = if k < 0.5 {
                let sep = *[" ", "", ","].choose(&mut r).unwrap();
                format!("{}{sep}", r.random_range(0..100_000)).into_bytes()
            } else if k < 0.8 {
                let bits = *[16u32, 24, 32].choose(&mut r).unwrap();
                format!("{:x} ", r.random::<u64>() >> (64 - bits)).into_bytes()
            } else {
                prose.choose(&mut r).unwrap().clone()
            };
            log.push(token);
        }
        Vocabulary { prose, log }
    }

    fn text(&self, seed: u64, len: usize, style: Style) -> Vec<u8> {
        let vocab = match style {
            Style::Prose => &self.prose,
            Style::Log => &self.log,
        };
        let picks = random_bytes(seed ^ 0x7465_7874, len / 3 + 64);
        let mut out = Vec::with_capacity(len + 16);
        let mut i = 0usize;
        while out.len() < len {
            out.extend_from_slice(&vocab[picks[i % picks.len()] as usize]);
            i += 1;
            if i.is_multiple_of(picks.len()) {
                // Past the picks: rotate so long texts do not repeat with a short period.
                out.extend_from_slice(&vocab[(i / picks.len()) % 256]);
            }
        }
        out.truncate(len);
        out
    }
}

/// Content for generated files and images: each call draws a fresh seed from the
/// generator's own sequence, so the output is a function of the generator's seed alone.
pub struct Content {
    rng: StdRng,
    vocab: Vocabulary,
}

const TEXT_EXT: [&str; 8] = ["txt", "md", "log", "csv", "json", "c", "py", "html"];
const BIN_EXT: [&str; 8] = ["bin", "jpg", "png", "gz", "zip", "so", "pdf", "o"];

impl Content {
    pub fn new(seed: u64) -> Self {
        Content {
            rng: StdRng::seed_from_u64(seed),
            vocab: Vocabulary::new(seed),
        }
    }

    pub fn random(&mut self, len: usize) -> Vec<u8> {
        random_bytes(self.rng.random(), len)
    }

    pub fn text(&mut self, len: usize, style: Style) -> Vec<u8> {
        self.vocab.text(self.rng.random(), len, style)
    }

    /// Bytes that suit a file named `*.ext`: text for text-like extensions.
    pub fn for_extension(&mut self, len: usize, ext: &str) -> Vec<u8> {
        if !TEXT_EXT.contains(&ext) {
            return self.random(len);
        }
        let style = if ext == "log" || ext == "csv" {
            Style::Log
        } else {
            Style::Prose
        };
        self.text(len, style)
    }
}

/// What [`fleet_tree`] builds.
#[derive(Clone, Debug)]
pub struct TreeSpec {
    pub seed: u64,
    pub files: usize,
    /// Total bytes over all files (approximately: sizes are scaled to meet it).
    pub bytes: u64,
    /// No file is larger.
    pub max_file: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TreeStats {
    pub files: usize,
    pub dirs: usize,
    pub bytes: u64,
    pub text_files: usize,
    pub duplicates: usize,
}

/// A standard-normal sample (Box-Muller), so no distribution crate is needed.
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn fleet_dirs(rng: &mut StdRng, files: usize) -> Vec<String> {
    const TOP: [&str; 10] = [
        "home", "projects", "srv", "var", "photos", "docs", "build", "opt", "music", "mail",
    ];
    const MID: [&str; 12] = [
        "alice", "bob", "src", "lib", "cache", "assets", "2023", "2024", "archive", "work", "tmp",
        "data",
    ];
    const LEAF: [&str; 13] = [
        "a", "b", "core", "util", "img", "raw", "old", "new", "test", "net", "db", "ui", "x",
    ];
    let mut dirs = Vec::new();
    let n1 = ((8 * files) as f64 / 30_000.0).round().max(2.0) as usize;
    for i in 0..n1 {
        let d1 = format!("{}{i:02}", TOP.choose(rng).unwrap());
        dirs.push(d1.clone());
        for j in 0..rng.random_range(5..=10) {
            let d2 = format!("{d1}/{}{j}", MID.choose(rng).unwrap());
            dirs.push(d2.clone());
            for k in 0..rng.random_range(3..=10) {
                let d3 = format!("{d2}/{}{k}", LEAF.choose(rng).unwrap());
                dirs.push(d3.clone());
                if rng.random::<f64>() < 0.3 {
                    for l in 0..rng.random_range(1..=4) {
                        dirs.push(format!("{d3}/{}{l}", LEAF.choose(rng).unwrap()));
                    }
                }
            }
        }
    }
    dirs
}

/// Builds a file server's tree under `root` (see the module docs).
pub fn fleet_tree(root: &Path, spec: &TreeSpec) -> io::Result<TreeStats> {
    const STEMS: [&str; 18] = [
        "report", "notes", "main", "index", "data", "img", "backup", "config", "log", "module",
        "readme", "part", "chunk", "blob", "photo", "draft", "mail", "track",
    ];
    let n = spec.files;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut content = Content::new(spec.seed + 1);
    let dirs = fleet_dirs(&mut rng, n);

    // Log-normal sizes scaled so their sum meets the target; ~1.5 % empty files.
    let raw: Vec<f64> = (0..n).map(|_| (2.2 * normal(&mut rng)).exp()).collect();
    let empty: BTreeSet<usize> = rand::seq::index::sample(&mut rng, n, n / 70)
        .into_iter()
        .collect();
    let sizes_for = |s: f64| -> Vec<u64> {
        raw.iter()
            .enumerate()
            .map(|(i, x)| {
                if empty.contains(&i) {
                    0
                } else {
                    ((s * x) as u64).clamp(1, spec.max_file.max(1))
                }
            })
            .collect()
    };
    let (mut lo, mut hi) = (1e-3f64, 1e9f64);
    for _ in 0..80 {
        let mid = (lo * hi).sqrt();
        if sizes_for(mid).iter().sum::<u64>() < spec.bytes {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let sizes = sizes_for(lo);

    // ~0.5 % of the files in the second half are exact copies of files in the first half.
    let mut dup_of = BTreeMap::new();
    if n >= 4 {
        let half = n / 2;
        let ndup = (n / 200).max(3).min(half);
        for i in rand::seq::index::sample(&mut rng, n - half, ndup) {
            dup_of.insert(half + i, rng.random_range(0..half));
        }
    }

    for d in &dirs {
        std::fs::create_dir_all(root.join(d))?;
    }
    let mut paths: Vec<PathBuf> = Vec::with_capacity(n);
    let mut stats = TreeStats {
        files: n,
        dirs: dirs.len(),
        bytes: 0,
        text_files: 0,
        duplicates: dup_of.len(),
    };
    for (i, &size) in sizes.iter().enumerate() {
        let is_text = rng.random::<f64>() < 0.5;
        let ext = match dup_of.get(&i) {
            Some(&src) => extension(&paths[src]),
            None => (*(if is_text { &TEXT_EXT } else { &BIN_EXT })
                .choose(&mut rng)
                .unwrap())
            .to_string(),
        };
        let name = format!("{}_{i:05}.{ext}", STEMS.choose(&mut rng).unwrap());
        let path = root.join(dirs.choose(&mut rng).unwrap()).join(name);
        let data = match dup_of.get(&i) {
            Some(&src) => std::fs::read(&paths[src])?,
            None => content.for_extension(size as usize, &ext),
        };
        std::fs::write(&path, &data)?;
        stats.bytes += data.len() as u64;
        stats.text_files += usize::from(TEXT_EXT.contains(&ext.as_str()));
        paths.push(path);
    }
    Ok(stats)
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What [`fleet_image`] builds.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub seed: u64,
    /// Apparent size (rounded down to 4 KiB).
    pub bytes: u64,
    /// Share of the image that holds non-zero data.
    pub data_fraction: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ImageStats {
    pub apparent_bytes: u64,
    pub allocated_bytes: u64,
    pub hole_bytes: u64,
    pub zero_bytes: u64,
    pub text_bytes: u64,
    pub random_bytes: u64,
    pub duplicate_bytes: u64,
}

const BLOCK: u64 = 4096;
const WRITE_STEP: u64 = 4 << 20;

/// Builds a sparse raw disk image at `path` (see the module docs).
pub fn fleet_image(path: &Path, spec: &ImageSpec) -> io::Result<ImageStats> {
    let mut rng = StdRng::seed_from_u64(spec.seed + 100);
    let mut content = Content::new(spec.seed + 101);
    let size = spec.bytes / BLOCK * BLOCK;
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    f.set_len(size)?;
    let (min_region, max_region) = (64u64 << 10, (1u64 << 20).max(size / 48));
    let d = spec.data_fraction.clamp(0.0, 1.0);
    // hole, zero, text, random, duplicate
    let weights = [
        (1.0 - d) * 0.75,
        (1.0 - d) * 0.25,
        d * 0.48,
        d * 0.47,
        d * 0.05,
    ];
    let total: f64 = weights.iter().sum();
    let mut stats = ImageStats::default();
    let mut written: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let log_len = rng.random_range((min_region as f64).ln()..=(max_region as f64).ln());
        let mut len = (log_len.exp() as u64 / BLOCK * BLOCK).clamp(BLOCK, size - pos);
        let mut pick = rng.random::<f64>() * total;
        let mut kind = weights.len() - 1;
        for (k, w) in weights.iter().enumerate() {
            if pick < *w {
                kind = k;
                break;
            }
            pick -= w;
        }
        if kind == 4 && written.is_empty() {
            kind = 3;
        }
        match kind {
            0 => stats.hole_bytes += len,
            1 => {
                let zeros = vec![0u8; WRITE_STEP.min(len) as usize];
                for o in (0..len).step_by(WRITE_STEP as usize) {
                    let n = WRITE_STEP.min(len - o) as usize;
                    f.write_all_at(&zeros[..n], pos + o)?;
                }
                stats.zero_bytes += len;
            }
            2 | 3 => {
                for o in (0..len).step_by(WRITE_STEP as usize) {
                    let n = WRITE_STEP.min(len - o) as usize;
                    let data = if kind == 2 {
                        let style = if rng.random() {
                            Style::Prose
                        } else {
                            Style::Log
                        };
                        content.text(n, style)
                    } else {
                        content.random(n)
                    };
                    f.write_all_at(&data, pos + o)?;
                }
                written.push((pos, len));
                if kind == 2 {
                    stats.text_bytes += len;
                } else {
                    stats.random_bytes += len;
                }
            }
            _ => {
                let &(from, from_len) = written.choose(&mut rng).unwrap();
                len = len.min(from_len);
                let mut buf = vec![0u8; WRITE_STEP.min(len) as usize];
                for o in (0..len).step_by(WRITE_STEP as usize) {
                    let n = WRITE_STEP.min(len - o) as usize;
                    f.read_exact_at(&mut buf[..n], from + o)?;
                    f.write_all_at(&buf[..n], pos + o)?;
                }
                stats.duplicate_bytes += len;
            }
        }
        pos += len;
    }
    f.sync_all()?;
    let meta = f.metadata()?;
    stats.apparent_bytes = meta.len();
    stats.allocated_bytes = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    Ok(stats)
}

/// What [`fleet_change`] does.
#[derive(Clone, Debug)]
pub struct ChangeSpec {
    pub seed: u64,
    /// Percent of the tree's files modified (half rewritten, half appended to).
    pub files_percent: f64,
    /// Percent of the image overwritten in place.
    pub image_percent: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ChangeStats {
    pub tree_files_before: usize,
    pub rewritten: usize,
    pub appended: usize,
    pub added: usize,
    pub added_bytes: u64,
    pub deleted: usize,
    pub image_blocks_4k: u64,
    pub image_regions_1m: u64,
    pub image_bytes_written: u64,
}

fn files_under(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Applies a day's churn to a tree from [`fleet_tree`] and an image (either may be absent).
pub fn fleet_change(
    tree: Option<&Path>,
    image: Option<&Path>,
    spec: &ChangeSpec,
) -> io::Result<ChangeStats> {
    let mut rng = StdRng::seed_from_u64(spec.seed + 200);
    let mut content = Content::new(spec.seed + 201);
    let mut stats = ChangeStats::default();
    if let Some(tree) = tree {
        let files = files_under(tree)?;
        let n = files.len();
        stats.tree_files_before = n;
        let k = ((n as f64 * spec.files_percent / 100.0).round() as usize)
            .max(2)
            .min(n);
        let chosen: Vec<usize> = rand::seq::index::sample(&mut rng, n, k).into_vec();
        for (idx, &i) in chosen.iter().enumerate() {
            let p = &files[i];
            let ext = extension(p);
            let old = std::fs::metadata(p)?.len();
            if idx % 2 == 0 {
                let new = if old > 0 {
                    (old as f64 * rng.random_range(0.8..1.2)) as usize
                } else {
                    rng.random_range(100..=5000)
                };
                std::fs::write(p, content.for_extension(new, &ext))?;
                stats.rewritten += 1;
            } else {
                let add = (old / 10).clamp(1024, 256 << 10) as usize;
                let mut f = OpenOptions::new().append(true).open(p)?;
                f.write_all(&content.for_extension(add, &ext))?;
                stats.appended += 1;
            }
        }
        let scale = n as f64 / 30_000.0;
        let nnew = ((200.0 * scale).round() as usize).max(5);
        let ndel = ((100.0 * scale).round() as usize).max(3);
        let dirs: Vec<PathBuf> = files
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let sizes: Vec<u64> = files
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()))
            .collect::<Result<_, _>>()?;
        let all_ext: Vec<&str> = TEXT_EXT.iter().chain(BIN_EXT.iter()).copied().collect();
        for i in 0..nnew.min(if dirs.is_empty() { 0 } else { usize::MAX }) {
            let ext = *all_ext.choose(&mut rng).unwrap();
            let p = dirs
                .choose(&mut rng)
                .unwrap()
                .join(format!("new_{i:05}.{ext}"));
            let data = content.for_extension(*sizes.choose(&mut rng).unwrap() as usize, ext);
            std::fs::write(&p, &data)?;
            stats.added += 1;
            stats.added_bytes += data.len() as u64;
        }
        let chosen: BTreeSet<usize> = chosen.into_iter().collect();
        let others: Vec<&PathBuf> = (0..n)
            .filter(|i| !chosen.contains(i))
            .map(|i| &files[i])
            .collect();
        for p in others.choose_multiple(&mut rng, ndel) {
            std::fs::remove_file(p)?;
            stats.deleted += 1;
        }
    }
    if let Some(image) = image {
        let f = OpenOptions::new().write(true).open(image)?;
        let size = f.metadata()?.len();
        if size >= 1 << 20 {
            let big = ((size as f64 / (1u64 << 30) as f64 * 1.7).round() as u64).max(2);
            let blocks = ((size as f64 * spec.image_percent / 100.0 / BLOCK as f64).round() as u64)
                .saturating_sub(big * 256)
                .max(1);
            for _ in 0..blocks {
                let at = rng.random_range(0..size / BLOCK) * BLOCK;
                f.write_all_at(&content.random(BLOCK as usize), at)?;
            }
            for i in 0..big {
                let at = rng.random_range(0..(size - (1 << 20)) / BLOCK) * BLOCK;
                let data = if i % 2 == 1 {
                    content.text(1 << 20, Style::Prose)
                } else {
                    content.random(1 << 20)
                };
                f.write_all_at(&data, at)?;
            }
            f.sync_all()?;
            stats.image_blocks_4k = blocks;
            stats.image_regions_1m = big;
            stats.image_bytes_written = blocks * BLOCK + big * (1 << 20);
        }
    }
    Ok(stats)
}

/// A sparse image of `size` bytes with data islands `(offset, len, seed)`: random bytes for
/// even seeds, text for odd ones; the rest is holes.
pub fn sparse_image(path: &Path, size: u64, islands: &[(u64, usize, u64)]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    f.set_len(size)?;
    for &(off, len, seed) in islands {
        f.seek(SeekFrom::Start(off))?;
        // Large islands are written in steps so memory stays small.
        let mut done = 0usize;
        let mut part = 0u64;
        while done < len {
            let n = (len - done).min(WRITE_STEP as usize);
            let step_seed = seed.wrapping_add(part.wrapping_mul(1_000_003));
            let data = if seed % 2 == 0 {
                random_bytes(step_seed, n)
            } else {
                text_bytes(step_seed, n)
            };
            f.write_all(&data)?;
            done += n;
            part += 1;
        }
    }
    f.sync_all()
}

/// Overwrites `count` scattered 4 KiB blocks of `path` in place (block churn).
pub fn churn(path: &Path, seed: u64, count: usize) -> io::Result<()> {
    let f: File = OpenOptions::new().write(true).open(path)?;
    let blocks = (f.metadata()?.len() / BLOCK).max(1);
    let picks = random_bytes(seed, count * 8);
    for (i, p) in picks.chunks(8).enumerate() {
        let b = u64::from_le_bytes(p.try_into().unwrap()) % blocks;
        f.write_all_at(
            &random_bytes(seed * 100_000 + i as u64, BLOCK as usize),
            b * BLOCK,
        )?;
    }
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_deterministic_and_text_compresses() {
        assert_eq!(random_bytes(3, 100), random_bytes(3, 100));
        assert_ne!(random_bytes(3, 100), random_bytes(4, 100));
        let t = text_bytes(5, 1 << 20);
        assert_eq!(t, text_bytes(5, 1 << 20));
        let z = zstd::bulk::compress(&t, 3).unwrap();
        assert!(
            z.len() < t.len() / 2,
            "text compresses: {} -> {}",
            t.len(),
            z.len()
        );
        let mut c = Content::new(1);
        let log = c.text(1 << 20, Style::Log);
        assert!(zstd::bulk::compress(&log, 3).unwrap().len() < log.len() / 2);
    }

    #[test]
    fn fleet_tree_meets_its_spec_and_repeats() {
        let spec = TreeSpec {
            seed: 9,
            files: 600,
            bytes: 8 << 20,
            max_file: 1 << 20,
        };
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let sa = fleet_tree(a.path(), &spec).unwrap();
        let sb = fleet_tree(b.path(), &spec).unwrap();
        assert_eq!(sa.bytes, sb.bytes);
        assert_eq!(files_under(a.path()).unwrap().len(), 600);
        let within = sa.bytes as f64 / spec.bytes as f64;
        assert!(
            (0.9..1.1).contains(&within),
            "total {} of {}",
            sa.bytes,
            spec.bytes
        );
        assert!(sa.duplicates >= 3 && sa.text_files > 200 && sa.text_files < 400);
        let change = ChangeSpec {
            seed: 9,
            files_percent: 2.0,
            image_percent: 1.0,
        };
        let c = fleet_change(Some(a.path()), None, &change).unwrap();
        assert_eq!(c.tree_files_before, 600);
        assert_eq!(c.rewritten + c.appended, 12);
        assert_eq!(
            files_under(a.path()).unwrap().len(),
            600 + c.added - c.deleted
        );
    }

    #[test]
    fn fleet_image_is_sparse_with_the_asked_data_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let spec = ImageSpec {
            seed: 2,
            bytes: 64 << 20,
            data_fraction: 0.5,
        };
        let s = fleet_image(&path, &spec).unwrap();
        assert_eq!(s.apparent_bytes, 64 << 20);
        let parts = s.hole_bytes + s.zero_bytes + s.text_bytes + s.random_bytes + s.duplicate_bytes;
        assert_eq!(parts, 64 << 20);
        assert!(s.hole_bytes > 0 && s.allocated_bytes < s.apparent_bytes);
        let before = std::fs::read(&path).unwrap();
        let c = fleet_change(
            None,
            Some(&path),
            &ChangeSpec {
                seed: 2,
                files_percent: 0.0,
                image_percent: 1.0,
            },
        )
        .unwrap();
        let after = std::fs::read(&path).unwrap();
        assert_eq!(before.len(), after.len());
        let changed = before
            .chunks(4096)
            .zip(after.chunks(4096))
            .filter(|(x, y)| x != y)
            .count() as u64;
        assert!(changed > 0 && changed <= c.image_bytes_written / 4096);
    }
}

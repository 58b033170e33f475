//! What compressing each chunk on its own costs in stored bytes: reads a tree or an image,
//! cuts it as a backup does, and prints the compressed size of its non-zero data
//!   - per chunk at the agent's default level (what hashgrid stores: `codec::encode`),
//!   - per chunk at level 3 (zstd's default, which rustic and borg here use),
//!   - per chunk with a zstd dictionary (optional second argument, e.g. made with
//!     `zstd --train -r SAMPLE_DIR -o dict --maxdict=112640`),
//!   - in 1 MiB pieces at levels 2 and 3 (the unit restic and rustic compress).
//!
//! Duplicates are counted every time they occur, the same way in every column.
//!
//! `cargo run --release --example compression_units -- PATH [DICT]` (bench/README.md).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use hashgrid::chunker::Chunker;
use hashgrid_proto::chunker::ChunkerParams;
use hashgrid_proto::codec::{encode, is_zero, Codec, DEFAULT_ZSTD_LEVEL};
use rayon::prelude::*;

fn files(p: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(p)?;
    if meta.is_dir() {
        let mut entries = std::fs::read_dir(p)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()?;
        entries.sort();
        for e in entries {
            files(&e, out)?;
        }
    } else if meta.is_file() {
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// Plain bytes, then the compressed sizes in the order the module doc lists them.
type Sizes = [usize; 6];

fn measure(path: &Path, chunker: &Chunker, dict: Option<&[u8]>) -> std::io::Result<Sizes> {
    let data = std::fs::read(path)?;
    let mut cuts = Vec::new();
    chunker.cut_all(&data, true, &mut cuts);
    let mut with_dict = dict
        .map(|d| zstd::bulk::Compressor::with_dictionary(DEFAULT_ZSTD_LEVEL, d))
        .transpose()?;
    let mut level3 = zstd::bulk::Compressor::new(3)?;
    let mut s = Sizes::default();
    for &(o, l) in &cuts {
        let piece = &data[o..o + l];
        if is_zero(piece) {
            continue;
        }
        s[0] += l;
        let (codec, encoded) = encode(&Bytes::copy_from_slice(piece), DEFAULT_ZSTD_LEVEL);
        s[1] += encoded.len();
        s[2] += match codec {
            Codec::Zstd => level3.compress(piece)?.len().min(l),
            Codec::Raw => l,
        };
        s[3] += match (&mut with_dict, codec) {
            (Some(c), Codec::Zstd) => c.compress(piece)?.len().min(l),
            _ => encoded.len(),
        };
    }
    for piece in data.chunks(1 << 20).filter(|p| !is_zero(p)) {
        s[4] += zstd::bulk::compress(piece, 2)?.len().min(piece.len());
        s[5] += zstd::bulk::compress(piece, 3)?.len().min(piece.len());
    }
    Ok(s)
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(root) = args.next().map(PathBuf::from) else {
        eprintln!("usage: compression_units PATH [DICT]");
        std::process::exit(2);
    };
    let dict = args.next().map(std::fs::read).transpose()?;
    let mut all = Vec::new();
    files(&root, &mut all)?;
    let chunker = Chunker::new(ChunkerParams::DEFAULT);
    let per_file = all
        .par_iter()
        .map(|f| measure(f, &chunker, dict.as_deref()))
        .collect::<std::io::Result<Vec<Sizes>>>()?;
    let mut t = Sizes::default();
    for s in per_file {
        for (sum, x) in t.iter_mut().zip(s) {
            *sum += x;
        }
    }
    println!("files {}, non-zero bytes {}", all.len(), t[0]);
    let rows = [
        (format!("per chunk, level {DEFAULT_ZSTD_LEVEL}"), Some(t[1])),
        ("per chunk, level 3".to_string(), Some(t[2])),
        (
            format!("per chunk, level {DEFAULT_ZSTD_LEVEL}, dictionary"),
            dict.is_some().then_some(t[3]),
        ),
        ("1 MiB pieces, level 2".to_string(), Some(t[4])),
        ("1 MiB pieces, level 3".to_string(), Some(t[5])),
    ];
    for (label, size) in rows {
        let Some(size) = size else { continue };
        let pct = 100.0 * (size as f64 / t[1] as f64 - 1.0);
        println!("{:<32}{size:>14} ({pct:+.2} %)", format!("{label}:"));
    }
    Ok(())
}

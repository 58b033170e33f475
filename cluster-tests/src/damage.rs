//! Damage on disk, as a failing disk or a stray write makes it: bytes flipped inside a
//! stored chunk's record in a node's pack files (read by the record headers, as
//! docs/file-formats.md lays them out); and damage its node cannot see, the index's
//! checksum rewritten to match (see [`damage_behind_the_checksum`]).

use std::path::Path;

use hashgrid_proto::ChunkId;

use crate::Node;

/// Pack record layout (docs/file-formats.md): magic, id, plaintext length, codec, length.
const MAGIC: &[u8; 4] = b"HGP1";
const HEADER_LEN: usize = 4 + 32 + 4 + 1 + 4;

/// One record found in a pack file.
pub struct PackRecord {
    pub id: ChunkId,
    /// Offset of the encoded bytes in the file.
    pub data_offset: usize,
    pub len: usize,
}

/// Reads every record of a pack file by its headers, skipping the zero padding between
/// write groups to the next 4 KiB boundary.
pub fn scan_pack(pack: &[u8]) -> Vec<PackRecord> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + HEADER_LEN <= pack.len() {
        if &pack[pos..pos + 4] != MAGIC {
            pos = (pos / 4096 + 1) * 4096;
            continue;
        }
        let len = u32::from_le_bytes(pack[pos + 41..pos + 45].try_into().unwrap()) as usize;
        out.push(PackRecord {
            id: ChunkId::from_slice(&pack[pos + 4..pos + 36]).unwrap(),
            data_offset: pos + HEADER_LEN,
            len,
        });
        pos += HEADER_LEN + len;
    }
    out
}

/// Flips one byte in the middle of the stored bytes of one of `wanted`; returns its id and
/// encoded length.
pub fn damage_one_of(packs: &Path, wanted: &[ChunkId]) -> (ChunkId, usize) {
    for entry in std::fs::read_dir(packs).unwrap() {
        let path = entry.unwrap().path();
        let mut pack = std::fs::read(&path).unwrap();
        if let Some(r) = scan_pack(&pack)
            .into_iter()
            .find(|r| wanted.contains(&r.id))
        {
            pack[r.data_offset + r.len / 2] ^= 0xff;
            std::fs::write(&path, pack).unwrap();
            return (r.id, r.len);
        }
    }
    panic!("no record of the file's chunks in {}", packs.display());
}

/// The ids of every chunk record in the pack files under `packs`.
pub fn stored_ids(packs: &Path) -> Vec<ChunkId> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(packs).unwrap() {
        let pack = std::fs::read(entry.unwrap().path()).unwrap();
        ids.extend(scan_pack(&pack).into_iter().map(|r| r.id));
    }
    ids
}

/// Flips a byte of one stored chunk of those `wanted` on a stopped node and rewrites that
/// chunk's index checksum to match, as if the bytes had been damaged in memory before the
/// checksum was taken: the node's own reads pass them (only a full decode and hash, as
/// `verify` or the receiving end does, finds them bad). Returns the chunk's id.
pub fn damage_behind_the_checksum(node: &Node, wanted: impl Fn(&ChunkId) -> bool) -> ChunkId {
    let packs = node.dir.join("data/chunks/packs");
    let (pack_path, mut pack, record) = std::fs::read_dir(&packs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .find_map(|path| {
            let pack = std::fs::read(&path).unwrap();
            let record = scan_pack(&pack).into_iter().find(|r| wanted(&r.id))?;
            Some((path, pack, record))
        })
        .expect("a record of a wanted chunk");
    let bytes = record.data_offset..record.data_offset + record.len;
    pack[record.data_offset + record.len / 2] ^= 0x20;
    std::fs::write(&pack_path, &pack).unwrap();

    // chunk_meta (docs/file-formats.md): version 2, ..., the XXH3-64 of the encoded bytes last.
    let db = open_index(node);
    let cf = db.cf_handle("chunk_meta").unwrap();
    let mut entry = db
        .get_cf(cf, record.id.as_bytes())
        .unwrap()
        .expect("indexed");
    assert_eq!((entry[0], entry.len()), (2, 38), "a version 2 entry");
    let sum = xxhash_rust::xxh3::xxh3_64(&pack[bytes]);
    entry[30..38].copy_from_slice(&sum.to_le_bytes());
    db.put_cf(cf, record.id.as_bytes(), entry).unwrap();
    db.flush_cf(cf).unwrap();
    record.id
}

/// A stopped node's chunk index, opened directly: RocksDB under `data/chunks/meta`.
pub fn open_index(node: &Node) -> rocksdb::DB {
    let path = node.dir.join("data/chunks/meta");
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &path).unwrap();
    assert!(cfs.iter().any(|c| c == "chunk_meta"), "{cfs:?}");
    rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, &cfs).unwrap()
}

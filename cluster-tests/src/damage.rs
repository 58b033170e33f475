//! Damage on disk, as a failing disk or a stray write makes it: bytes flipped inside a
//! stored chunk's record in a node's pack files (read by the record headers, as
//! docs/file-formats.md lays them out).

use std::path::Path;

use hashgrid_proto::ChunkId;

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

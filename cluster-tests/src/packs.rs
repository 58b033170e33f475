//! Pack files read and damaged from outside the node, as a disk fault would (layout in
//! docs/file-formats.md: a record header of magic, id, plaintext length, codec and length,
//! then the encoded bytes; write groups padded with zeros to 4 KiB).

use std::path::Path;

use hashgrid_proto::ChunkId;

const MAGIC: &[u8; 4] = b"HGP1";
const HEADER_LEN: usize = 4 + 32 + 4 + 1 + 4;

/// One record found in a pack file.
pub struct PackRecord {
    pub id: ChunkId,
    /// Offset of the encoded bytes in the file.
    pub data_offset: usize,
    pub len: usize,
}

/// Every record of a pack file, found by its headers.
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

/// Flips one byte in the middle of the stored bytes of one of `wanted` (in the node's
/// `data/chunks/packs` directory, with the node stopped); returns its id.
pub fn damage_one_of(packs: &Path, wanted: &[ChunkId]) -> ChunkId {
    for entry in std::fs::read_dir(packs).unwrap() {
        let path = entry.unwrap().path();
        let mut pack = std::fs::read(&path).unwrap();
        if let Some(r) = scan_pack(&pack)
            .into_iter()
            .find(|r| wanted.contains(&r.id))
        {
            pack[r.data_offset + r.len / 2] ^= 0xff;
            std::fs::write(&path, pack).unwrap();
            return r.id;
        }
    }
    panic!("no record of the wanted chunks in {}", packs.display());
}

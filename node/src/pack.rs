//! Pack files: where chunk bytes live. Append-only files of records, each a fixed header
//! (magic, id, plaintext length, codec, encoded length) followed by the encoded bytes.
//!
//! Why not RocksDB blob files: with BlobDB every chunk is written twice (to the WAL, then to
//! a blob file when the memtable flushes), copied twice more in memory, and checksummed
//! twice. Measured on a 3 GiB image backup here, that was half the node's CPU and half its
//! disk writes. A pack file is written once, with one `fdatasync` per group of batches; the
//! chunk's metadata, including where its record is, goes to RocksDB only after that sync,
//! so metadata never points at bytes that are not durable.
//!
//! Appends bypass the page cache (`O_DIRECT`) where the filesystem allows: each group is laid
//! out in one page-aligned buffer, padded with zeros to a 4 KiB boundary, and written with one
//! `pwrite`. Through the page cache the same writes cost the node ~40% of its CPU on a busy
//! machine (page reclaim and copying), and the data would only evict the source files the
//! agent is reading. Where `O_DIRECT` is refused (tmpfs), appends fall back to buffered
//! writes. Reads always go through the page cache.
//!
//! A crash between the sync and the metadata write leaves an unreferenced record, which is
//! harmless and reclaimed by pack compaction (with GC, a later issue). A torn record at the
//! tail is never referenced for the same reason. Headers make a pack file self-describing, so
//! scrub and recovery can read one without the metadata; zero padding between groups has no
//! magic and is skipped to the next 4 KiB boundary. Readers check the header in front of the
//! bytes they read against the metadata that sent them there.
//!
//! A failed `fdatasync` is never retried on the same file (PostgreSQL's "fsyncgate"): Linux
//! may already have dropped the dirty pages and cleared the error, so a second sync could
//! report success for bytes that are gone. The failed group is not acknowledged, and the
//! pack is retired: later groups go to a new pack file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use hashgrid_proto::ChunkId;

use crate::durable;

const MAGIC: &[u8; 4] = b"HGP1";
pub const HEADER_LEN: usize = 4 + 32 + 4 + 1 + 4;

/// A pack file is closed for appends once it passes this size.
const PACK_TARGET_BYTES: u64 = 1 << 30;

/// Alignment of direct writes: offsets, lengths and buffers.
const ALIGN: u64 = 4096;

fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Where a record's encoded bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
}

/// One record to append.
pub struct Record<'a> {
    pub id: &'a ChunkId,
    pub plain_len: u32,
    pub codec: i32,
    pub data: &'a [u8],
}

/// What a record's header says about the bytes behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub id: ChunkId,
    pub plain_len: u32,
    pub codec: u8,
    /// Encoded length.
    pub len: u32,
}

impl RecordHeader {
    fn of(r: &Record<'_>) -> Self {
        RecordHeader {
            id: *r.id,
            plain_len: r.plain_len,
            codec: r.codec as u8,
            len: r.data.len() as u32,
        }
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(MAGIC);
        h[4..36].copy_from_slice(self.id.as_bytes());
        h[36..40].copy_from_slice(&self.plain_len.to_le_bytes());
        h[40] = self.codec;
        h[41..45].copy_from_slice(&self.len.to_le_bytes());
        h
    }

    /// The header at the start of `b`; `None` when `b` is too short or has no magic.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let h = b.get(..HEADER_LEN)?;
        if &h[..4] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        Some(RecordHeader {
            id: ChunkId::from_slice(&h[4..36]).ok()?,
            plain_len: u32_at(36),
            codec: h[40],
            len: u32_at(41),
        })
    }
}

/// Makes a pack's appended bytes durable: `fdatasync` in production. A seam, so tests can
/// make it fail and see the pack retired.
pub type SyncData = Arc<dyn Fn(&File) -> std::io::Result<()> + Send + Sync>;

struct Current {
    number: u32,
    file: File,
    /// Where the next group goes (a multiple of `ALIGN` when `direct`).
    len: u64,
    direct: bool,
    /// Page-aligned staging buffer for direct writes, reused between groups.
    staging: Option<memmap2::MmapMut>,
    /// A sync of this pack failed: nothing more is appended to it.
    retired: bool,
}

pub struct PackFiles {
    dir: PathBuf,
    sync: SyncData,
    /// The pack being appended to. Only the store's writer thread appends.
    current: std::sync::Mutex<Current>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
}

pub(crate) fn pack_path(dir: &Path, number: u32) -> PathBuf {
    dir.join(format!("{number:08}.pack"))
}

impl PackFiles {
    /// Opens the pack directory, appending to the newest pack.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        Self::open_with_sync(dir, Arc::new(File::sync_data))
    }

    /// [`PackFiles::open`] with another way of syncing appends (tests make it fail).
    pub fn open_with_sync(dir: &Path, sync: SyncData) -> std::io::Result<Self> {
        durable::create_dirs(dir)?;
        let newest = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".pack")?.parse::<u32>().ok()
            })
            .max()
            .unwrap_or(1);
        let current = Self::open_for_append(dir, newest)?;
        Ok(PackFiles {
            dir: dir.to_path_buf(),
            sync,
            current: std::sync::Mutex::new(current),
            readers: RwLock::new(HashMap::new()),
        })
    }

    fn open_for_append(dir: &Path, number: u32) -> std::io::Result<Current> {
        let path = pack_path(dir, number);
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.create(true).write(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(false)?, false),
            Err(e) => return Err(e),
        };
        // Make the file's name durable before any record in it is referenced. Done for an
        // existing pack too: an earlier attempt may have created it and failed before this.
        file.sync_all()?;
        durable::sync_dir(dir)?;
        let size = file.metadata()?.len();
        Ok(Current {
            number,
            file,
            len: if direct { align_up(size) } else { size },
            direct,
            staging: None,
            retired: false,
        })
    }

    /// Moves appends from the current pack to the next one.
    fn roll(&self, cur: &mut Current) -> std::io::Result<()> {
        let next = cur.number + 1;
        *cur = Self::open_for_append(&self.dir, next)?;
        Ok(())
    }

    /// Appends records and makes them durable; returns where each one's bytes are.
    pub fn append(&self, records: &[Record<'_>]) -> std::io::Result<Vec<Location>> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.retired || cur.len >= PACK_TARGET_BYTES {
            self.roll(&mut cur)?;
        }
        let total: u64 = records
            .iter()
            .map(|r| (HEADER_LEN + r.data.len()) as u64)
            .sum();
        let padded = if cur.direct { align_up(total) } else { total } as usize;
        if cur.staging.as_ref().is_none_or(|b| b.len() < padded) {
            cur.staging = Some(memmap2::MmapMut::map_anon(padded.next_power_of_two())?);
        }
        let start = cur.len;
        let mut locations = Vec::with_capacity(records.len());
        {
            let buf = cur.staging.as_mut().expect("allocated above");
            let mut at = 0usize;
            for r in records {
                buf[at..at + HEADER_LEN].copy_from_slice(&RecordHeader::of(r).encode());
                at += HEADER_LEN;
                locations.push(Location {
                    pack: 0,
                    offset: start + at as u64,
                    len: r.data.len() as u32,
                });
                buf[at..at + r.data.len()].copy_from_slice(r.data);
                at += r.data.len();
            }
            buf[at..padded].fill(0);
        }
        let number = cur.number;
        for l in &mut locations {
            l.pack = number;
        }
        let write = {
            let c = &*cur;
            let buf = c.staging.as_ref().expect("allocated above");
            c.file.write_all_at(&buf[..padded], start)
        };
        if let Err(e) = write {
            // Whatever part landed is unreferenced; the next group goes after it.
            cur.len = start + padded as u64;
            return Err(e);
        }
        cur.len = start + padded as u64;
        if let Err(e) = (self.sync)(&cur.file) {
            tracing::error!(
                pack = cur.number,
                error = %e,
                "syncing a pack file failed; its last group is not acknowledged and the pack is retired"
            );
            cur.retired = true;
            // Roll now, so a restart before the next append does not append to it either.
            if let Err(roll) = self.roll(&mut cur) {
                tracing::warn!(error = %roll, "opening the next pack file failed; the next append retries");
            }
            return Err(e);
        }
        Ok(locations)
    }

    fn reader(&self, pack: u32) -> std::io::Result<Arc<File>> {
        if let Some(f) = self
            .readers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pack)
        {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(pack_path(&self.dir, pack))?);
        self.readers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pack, f.clone());
        Ok(f)
    }

    /// Reads the record whose encoded bytes are at `loc`: its header followed by those bytes
    /// (check the header with [`RecordHeader::decode`], the bytes are `[HEADER_LEN..]`).
    pub fn read_record(&self, loc: Location) -> std::io::Result<Bytes> {
        let start = loc.offset.checked_sub(HEADER_LEN as u64).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("offset {} leaves no room for a record header", loc.offset),
            )
        })?;
        let mut buf = vec![0u8; HEADER_LEN + loc.len as usize];
        self.reader(loc.pack)?.read_exact_at(&mut buf, start)?;
        Ok(Bytes::from(buf))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn appended_records_read_back_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<ChunkId> = (0..3u8).map(|i| ChunkId::of(&[i])).collect();
        let data: Vec<Vec<u8>> = (0..3usize)
            .map(|i| vec![i as u8 + 1; 1000 * (i + 1)])
            .collect();
        let locs = {
            let packs = PackFiles::open(dir.path()).unwrap();
            let recs: Vec<Record<'_>> = ids
                .iter()
                .zip(&data)
                .map(|(id, d)| Record {
                    id,
                    plain_len: d.len() as u32,
                    codec: 0,
                    data: d,
                })
                .collect();
            packs.append(&recs).unwrap()
        };
        let packs = PackFiles::open(dir.path()).unwrap();
        for ((loc, d), id) in locs.iter().zip(&data).zip(&ids) {
            let rec = packs.read_record(*loc).unwrap();
            assert_eq!(&rec[HEADER_LEN..], d);
            assert_eq!(
                RecordHeader::decode(&rec),
                Some(RecordHeader {
                    id: *id,
                    plain_len: d.len() as u32,
                    codec: 0,
                    len: d.len() as u32
                })
            );
        }
        // Appends after reopening go after the existing records.
        let more = packs.append(&[record(&ids[0], b"abc")]).unwrap();
        assert!(more[0].offset > locs[2].offset);
        assert_eq!(&packs.read_record(more[0]).unwrap()[HEADER_LEN..], b"abc");
        // The header describes the record.
        let raw = std::fs::read(pack_path(dir.path(), 1)).unwrap();
        assert_eq!(&raw[..4], MAGIC);
        assert_eq!(&raw[4..36], ids[0].as_bytes());
    }

    fn record<'a>(id: &'a ChunkId, data: &'a [u8]) -> Record<'a> {
        Record {
            id,
            plain_len: data.len() as u32,
            codec: 0,
            data,
        }
    }

    /// A sync that fails on the calls whose numbers (from 0) are in `failing`.
    pub(crate) fn failing_sync(failing: &'static [usize]) -> SyncData {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        Arc::new(move |f: &File| {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if failing.contains(&n) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            f.sync_data()
        })
    }

    #[test]
    fn a_failed_sync_retires_the_pack_and_appends_move_to_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let packs = PackFiles::open_with_sync(dir.path(), failing_sync(&[1])).unwrap();
        let id = ChunkId::of(b"x");
        let first = packs.append(&[record(&id, b"first")]).unwrap();
        let err = packs.append(&[record(&id, b"lost")]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        let third = packs.append(&[record(&id, b"third")]).unwrap();
        assert_eq!((first[0].pack, third[0].pack), (1, 2));
        assert!(pack_path(dir.path(), 2).exists());
        // Appends after a restart go to the new pack too, never the retired one.
        drop(packs);
        let packs = PackFiles::open(dir.path()).unwrap();
        let fourth = packs.append(&[record(&id, b"fourth")]).unwrap();
        assert_eq!(fourth[0].pack, 2);
        for (loc, want) in [
            (first[0], &b"first"[..]),
            (third[0], b"third"),
            (fourth[0], b"fourth"),
        ] {
            assert_eq!(&packs.read_record(loc).unwrap()[HEADER_LEN..], want);
        }
    }

    #[test]
    fn a_header_without_magic_or_cut_short_does_not_decode() {
        let id = ChunkId::of(b"x");
        let h = RecordHeader::of(&record(&id, b"abc")).encode();
        assert_eq!(RecordHeader::decode(&h).map(|h| h.id), Some(id));
        assert_eq!(RecordHeader::decode(&h[..HEADER_LEN - 1]), None);
        let mut bad = h;
        bad[0] ^= 1;
        assert_eq!(RecordHeader::decode(&bad), None);
    }
}

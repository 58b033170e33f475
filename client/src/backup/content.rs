//! Reading one file or disk image into extents: holes found with SEEK_DATA/SEEK_HOLE are
//! skipped without reading, data runs are cut by FastCDC, hashed on all cores, all-zero
//! chunks become holes, and every other chunk is offered to the uploader. Memory stays
//! bounded by the read buffer and the uploader's budget, whatever the file's size.

use std::fs::File;
use std::io::ErrorKind;
use std::io::{Read, Seek};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use bytes::Bytes;
use hashgrid_proto::codec::is_zero;
use hashgrid_proto::manifest::{ChunkListEncoder, Content, Extent, INLINE_EXTENTS_MAX};
use hashgrid_proto::ChunkId;
use rayon::prelude::*;
use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::chunker::Chunker;
use crate::error::{ClientError, Result};
use crate::objects::ObjectWriter;
use crate::progress::Progress;
use crate::upload::Uploader;

/// What reading a file produced.
pub struct FileContent {
    pub content: Content,
    /// Bytes of content (data and holes).
    pub size: u64,
    /// Data chunks referenced (holes excluded).
    pub chunks: u64,
}

/// Collects extents: inline while few, then streamed into a chunk-list object.
pub struct ContentBuilder<'a> {
    chunker: &'a Chunker,
    uploader: &'a Uploader,
    inline: Vec<Extent>,
    list: Option<ObjectWriter<'a>>,
    count: u64,
    pending_hole: u64,
    size: u64,
    chunks: u64,
    scratch: Vec<u8>,
}

impl<'a> ContentBuilder<'a> {
    pub fn new(chunker: &'a Chunker, uploader: &'a Uploader) -> Self {
        ContentBuilder {
            chunker,
            uploader,
            inline: Vec::new(),
            list: None,
            count: 0,
            pending_hole: 0,
            size: 0,
            chunks: 0,
            scratch: Vec::new(),
        }
    }

    pub fn hole(&mut self, len: u64) {
        self.pending_hole += len;
        self.size += len;
    }

    pub fn chunk(&mut self, id: ChunkId, len: u32) -> Result<()> {
        self.flush_hole()?;
        self.size += u64::from(len);
        self.chunks += 1;
        self.push(Extent::Chunk { id, len })
    }

    fn flush_hole(&mut self) -> Result<()> {
        if self.pending_hole > 0 {
            let len = std::mem::take(&mut self.pending_hole);
            self.push(Extent::Hole { len })?;
        }
        Ok(())
    }

    fn push(&mut self, e: Extent) -> Result<()> {
        self.count += 1;
        if let Some(list) = self.list.as_mut() {
            self.scratch.clear();
            ChunkListEncoder::encode_extent(&e, &mut self.scratch);
            return list.write(&self.scratch);
        }
        self.inline.push(e);
        if self.inline.len() > INLINE_EXTENTS_MAX {
            let mut list = ObjectWriter::new(self.chunker, self.uploader);
            list.write(&ChunkListEncoder::header())?;
            for e in self.inline.drain(..) {
                self.scratch.clear();
                ChunkListEncoder::encode_extent(&e, &mut self.scratch);
                list.write(&self.scratch)?;
            }
            self.list = Some(list);
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<FileContent> {
        self.flush_hole()?;
        let content = match self.list {
            Some(list) => Content::List {
                list: list.finish()?,
                extents: self.count,
                chunks: self.chunks,
            },
            None => Content::Inline(self.inline),
        };
        Ok(FileContent {
            content,
            size: self.size,
            chunks: self.chunks,
        })
    }
}

/// Opens an image (a file or block device named on the command line) for reading without
/// following a final symlink and, where permitted, without updating the access time. Files
/// met by the walk are opened relative to their directory instead ([`super::source`]).
pub fn open_for_read(path: &Path) -> Result<File> {
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_NOFOLLOW | libc::O_NOATIME) {
        Err(e) if e.kind() == ErrorKind::PermissionDenied => open(libc::O_NOFOLLOW),
        other => other,
    }
    .map_err(|e| ClientError::io(path, e))
}

/// Reads a whole open file (or block device) into content, `read_buf` bytes per call (see
/// [`crate::memory::Sizing`]); `path` names it in errors.
pub fn read_content(
    file: &File,
    path: &Path,
    chunker: &Chunker,
    uploader: &Uploader,
    progress: &Progress,
    read_buf: usize,
) -> Result<FileContent> {
    let io = |e: Errno| ClientError::io(path, e.into());
    let size = rustix::fs::seek(file, SeekFrom::End(0)).map_err(io)?;
    let mut builder = ContentBuilder::new(chunker, uploader);
    let mut pos = 0u64;
    // Filesystems without hole support report one data run; devices may refuse to seek by
    // data, in which case everything is read and zero chunks still become holes. Files
    // of one chunk or less are read whole: looking for their holes costs more than it saves.
    let mut holes_supported = size > chunker.max_size() as u64;
    while pos < size {
        let data = if holes_supported {
            match rustix::fs::seek(file, SeekFrom::Data(pos)) {
                Ok(d) => d.min(size),
                Err(Errno::NXIO) => size,
                Err(_) => {
                    holes_supported = false;
                    pos
                }
            }
        } else {
            pos
        };
        if data > pos {
            progress.add_bytes(data - pos);
            builder.hole(data - pos);
            pos = data;
        }
        if pos >= size {
            break;
        }
        let end = if holes_supported {
            rustix::fs::seek(file, SeekFrom::Hole(pos))
                .unwrap_or(size)
                .min(size)
        } else {
            size
        };
        let read_to = read_run(
            file,
            path,
            (pos, end),
            chunker,
            uploader,
            &mut builder,
            progress,
            read_buf,
        )?;
        if read_to < end {
            // The file shrank while we read it: record what was there.
            break;
        }
        pos = end;
    }
    builder.finish()
}

/// Reads `[start, end)`, a run without holes, and returns where reading stopped.
#[allow(clippy::too_many_arguments)]
fn read_run(
    file: &File,
    path: &Path,
    (start, end): (u64, u64),
    chunker: &Chunker,
    uploader: &Uploader,
    builder: &mut ContentBuilder<'_>,
    progress: &Progress,
    read_buf: usize,
) -> Result<u64> {
    let mut reader = file;
    reader
        .seek(std::io::SeekFrom::Start(start))
        .map_err(|e| ClientError::io(path, e))?;
    let mut pos = start;
    let mut carry = Bytes::new();
    let mut cuts = Vec::new();
    loop {
        let want = (read_buf as u64).min(end - pos);
        // A fresh buffer each round: the chunks cut from the last one are still in flight.
        // `read_to_end` fills spare capacity without zeroing it first.
        let mut buf = Vec::with_capacity(carry.len() + want as usize);
        buf.extend_from_slice(&carry);
        let got = reader
            .take(want)
            .read_to_end(&mut buf)
            .map_err(|e| ClientError::io(path, e))? as u64;
        pos += got;
        progress.add_bytes(got);
        let eof = got < want || pos >= end;
        let buf = Bytes::from(buf);
        cuts.clear();
        let used = chunker.cut_all(&buf, eof, &mut cuts);
        let hash = |&(o, l): &(usize, usize)| {
            let piece = &buf[o..o + l];
            (!is_zero(piece)).then(|| ChunkId::of(piece))
        };
        // Fan hashing out over the cores only when there is enough of it to pay for that.
        let ids: Vec<Option<ChunkId>> = if cuts.len() > 4 {
            cuts.par_iter().map(hash).collect()
        } else {
            cuts.iter().map(hash).collect()
        };
        for (&(o, l), id) in cuts.iter().zip(ids) {
            match id {
                Some(id) => {
                    builder.chunk(id, l as u32)?;
                    uploader.submit_blocking(id, buf.slice(o..o + l))?;
                }
                None => builder.hole(l as u64),
            }
        }
        if eof {
            debug_assert_eq!(used, buf.len());
            return Ok(pos);
        }
        carry = buf.slice(used..);
    }
}

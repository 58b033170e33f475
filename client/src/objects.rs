//! Reading and writing manifest objects (trees, chunk lists) as chunks.
//!
//! [`ObjectWriter`] cuts an object's bytes with the same chunker as file data and offers the
//! pieces to the uploader, so an unchanged tree yields the same ids and is not sent again.
//! [`ObjectReader`] fetches pieces, verifies each against its id, and reassembles objects
//! within the size bound, or streams a chunk list extent by extent.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use hashgrid_proto::codec::decode_verified;
use hashgrid_proto::id::pack_ids;
use hashgrid_proto::limits::{MAX_IDS_PER_REQUEST, MAX_TREE_BYTES};
use hashgrid_proto::manifest::{
    decode_dir, ChunkListDecoder, ChunkListEncoder, DirObject, Extent, ObjectRef, Tree,
};
use hashgrid_proto::pb::{self, ChunkFault, GetRequest};
use hashgrid_proto::{ChunkId, DecodeError};

use crate::chunker::Chunker;
use crate::connection::{within, Connection};
use crate::error::{ClientError, Result};
use crate::tree_cache::TreeCache;
use crate::upload::Uploader;

/// The most bytes one extent record takes in a chunk-list object (key, length, and a body
/// the decoder bounds at 64 bytes).
const MAX_EXTENT_RECORD: u64 = 1 + 1 + 64;

/// Streams one object's bytes into chunks. For use on blocking threads.
pub struct ObjectWriter<'a> {
    chunker: &'a Chunker,
    uploader: &'a Uploader,
    /// Where a tree's pieces are also kept (the next backup's parent trees).
    keep: Option<&'a TreeCache>,
    buf: BytesMut,
    ids: Vec<ChunkId>,
    cuts: Vec<(usize, usize)>,
}

impl<'a> ObjectWriter<'a> {
    pub fn new(chunker: &'a Chunker, uploader: &'a Uploader) -> Self {
        ObjectWriter {
            chunker,
            uploader,
            keep: None,
            buf: BytesMut::new(),
            ids: Vec::new(),
            cuts: Vec::new(),
        }
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= 4 * self.chunker.max_size() {
            self.cut(false)?;
        }
        Ok(())
    }

    fn cut(&mut self, eof: bool) -> Result<()> {
        self.cuts.clear();
        let used = self.chunker.cut_all(&self.buf, eof, &mut self.cuts);
        let data = self.buf.split_to(used).freeze();
        for &(offset, len) in &self.cuts {
            let piece = data.slice(offset..offset + len);
            let id = ChunkId::of(&piece);
            if let Some(cache) = self.keep {
                cache.keep(id, piece.clone());
            }
            self.uploader.submit_blocking(id, piece)?;
            self.ids.push(id);
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<ObjectRef> {
        self.cut(true)?;
        Ok(ObjectRef(self.ids))
    }

    /// Writes a whole object at once.
    pub fn write_all(chunker: &Chunker, uploader: &Uploader, bytes: &[u8]) -> Result<ObjectRef> {
        Self::write_tree(chunker, uploader, None, bytes)
    }

    /// Writes a whole tree object at once, keeping its pieces in `cache` too.
    pub fn write_tree(
        chunker: &Chunker,
        uploader: &Uploader,
        cache: Option<&TreeCache>,
        bytes: &[u8],
    ) -> Result<ObjectRef> {
        let mut w = ObjectWriter::new(chunker, uploader);
        w.keep = cache;
        w.write(bytes)?;
        w.finish()
    }
}

/// A `Get` reply for `expected` that carries a fault instead of the chunk, as an error.
pub(crate) fn check_fault(chunk: &pb::Chunk, expected: ChunkId) -> Result<()> {
    match ChunkFault::try_from(chunk.fault) {
        Ok(ChunkFault::None) => Ok(()),
        Ok(fault) => Err(ClientError::ChunkFault {
            id: expected,
            fault,
        }),
        Err(_) => Err(ClientError::Manifest(format!(
            "chunk {expected}: the node reports fault {}, unknown to this agent",
            chunk.fault
        ))),
    }
}

/// Why a group of chunks is fetched again.
enum FetchAgain {
    /// The stream failed (retried under the connection's policy).
    Failed(tonic::Status),
    /// A chunk failed verification: asked again once, with copies read in full.
    BadCopy,
}

/// Fetches chunks and manifest objects from the cluster, verifying every chunk. With a
/// [`TreeCache`], manifest objects are read from it first (a backup's parent trees).
#[derive(Clone)]
pub struct ObjectReader {
    conn: Connection,
    trees: Option<Arc<TreeCache>>,
}

impl ObjectReader {
    pub fn new(conn: Connection) -> Self {
        ObjectReader { conn, trees: None }
    }

    /// Reads manifest objects through `cache` (and keeps what it fetches there).
    pub fn with_tree_cache(mut self, cache: Option<Arc<TreeCache>>) -> Self {
        self.trees = cache;
        self
    }

    pub fn tree_cache(&self) -> Option<&Arc<TreeCache>> {
        self.trees.as_ref()
    }

    /// The pieces of a manifest object: each from the tree cache when it has it, the
    /// others fetched in one call (and then kept in the cache).
    async fn fetch_manifest(&self, ids: &[ChunkId]) -> Result<Vec<Bytes>> {
        let Some(cache) = &self.trees else {
            return self.fetch(ids).await;
        };
        let mut pieces: Vec<Option<Bytes>> = ids.iter().map(|id| cache.get(id)).collect();
        let missing: Vec<ChunkId> = ids
            .iter()
            .zip(&pieces)
            .filter(|(_, p)| p.is_none())
            .map(|(id, _)| *id)
            .collect();
        if !missing.is_empty() {
            let mut fetched = missing.iter().zip(self.fetch(&missing).await?);
            for slot in pieces.iter_mut().filter(|p| p.is_none()) {
                let (id, p) = fetched.next().expect("one fetched piece per missing id");
                cache.fetched(*id, p.clone());
                *slot = Some(p);
            }
        }
        Ok(pieces.into_iter().flatten().collect())
    }

    /// The plaintexts of `ids`, in order, each checked against its id. A stream that fails
    /// is asked for again (its group from the start) under the connection's retry policy;
    /// a group with a chunk that fails the check is asked for once more with every copy
    /// read in full by its owner (`full_check`: a copy gone bad before its owner took its
    /// checksum is then found there, dropped, and read from another owner).
    pub async fn fetch(&self, ids: &[ChunkId]) -> Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(ids.len());
        for group in ids.chunks(MAX_IDS_PER_REQUEST) {
            let start = out.len();
            let mut backoff = None;
            let mut full_check = false;
            loop {
                let generation = self.conn.generation();
                let Some(again) = self.fetch_group(group, &mut out, full_check).await? else {
                    break;
                };
                out.truncate(start);
                match again {
                    FetchAgain::BadCopy => full_check = true,
                    FetchAgain::Failed(status) => {
                        let b = backoff.get_or_insert_with(|| self.conn.backoff());
                        self.conn
                            .recover("fetching chunks", status, generation, b)
                            .await?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// One `Get` stream for `group`, appending to `out`; why it is to be asked again, if
    /// it is.
    async fn fetch_group(
        &self,
        group: &[ChunkId],
        out: &mut Vec<Bytes>,
        full_check: bool,
    ) -> Result<Option<FetchAgain>> {
        let max_len = self.conn.chunker.max_size;
        let mut client = self.conn.chunks.clone();
        let request = GetRequest {
            epoch: self.conn.epoch(),
            ids: pack_ids(group),
            full_check,
        };
        let deadline = self.conn.timeouts().transfer;
        let mut stream = match within(deadline, "fetching chunks", client.get(request)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Ok(Some(FetchAgain::Failed(s))),
        };
        let mut got = 0;
        loop {
            let msg = match within(deadline, "fetching chunks", stream.message()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(s) => return Ok(Some(FetchAgain::Failed(s))),
            };
            for chunk in msg.chunks {
                let expected = group.get(got).ok_or_else(|| {
                    ClientError::Manifest("node sent more chunks than asked for".into())
                })?;
                check_fault(&chunk, *expected)?;
                let (id, plain) = match decode_verified(&chunk, max_len) {
                    Ok(v) => v,
                    Err(e) if !full_check => {
                        tracing::warn!(chunk = %expected, error = %e, "node sent a chunk that fails verification; asking again with copies read in full");
                        return Ok(Some(FetchAgain::BadCopy));
                    }
                    Err(e) => return Err(e.into()),
                };
                if id != *expected {
                    return Err(ClientError::Manifest(format!(
                        "node sent chunk {id} where {expected} was asked for"
                    )));
                }
                out.push(plain);
                got += 1;
            }
        }
        if got != group.len() {
            return Err(ClientError::Manifest(format!(
                "node sent {got} of {} chunks",
                group.len()
            )));
        }
        Ok(None)
    }

    /// The fewest bytes an object cut into `pieces` chunks holds: the chunker cuts every
    /// piece but the last at its minimum size or more.
    fn least_bytes(&self, pieces: usize) -> u64 {
        (pieces as u64).saturating_sub(1) * u64::from(self.conn.chunker.min_size)
    }

    /// A whole tree or tree-index object. A reference with more pieces than an object of
    /// [`MAX_TREE_BYTES`] can have is refused before anything is fetched, and the pieces are
    /// fetched a few at a time so a lying one costs at most the bound.
    pub async fn read_object(&self, r: &ObjectRef) -> Result<Vec<u8>> {
        let least = self.least_bytes(r.0.len());
        if least > MAX_TREE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "manifest object (by its piece count)",
                size: least,
                limit: MAX_TREE_BYTES,
            }
            .into());
        }
        let mut out = Vec::new();
        for group in r.0.chunks(Self::PIECES_PER_READ) {
            for p in self.fetch_manifest(group).await? {
                let total = (out.len() + p.len()) as u64;
                if total > MAX_TREE_BYTES {
                    return Err(DecodeError::TooLarge {
                        what: "manifest object",
                        size: total,
                        limit: MAX_TREE_BYTES,
                    }
                    .into());
                }
                out.extend_from_slice(&p);
            }
        }
        Ok(out)
    }

    /// Pieces of a manifest object fetched at once.
    const PIECES_PER_READ: usize = 32;

    /// Checks a chunk-list reference against the extent count its entry declares, before
    /// anything is fetched: a list of `extents` extents is at most [`MAX_EXTENT_RECORD`]
    /// bytes each, so a reference with more pieces than that fills is a lie.
    pub fn check_chunk_list(&self, list: &ObjectRef, extents: u64) -> Result<()> {
        let most = (ChunkListEncoder::header().len() as u64)
            .saturating_add(extents.saturating_mul(MAX_EXTENT_RECORD));
        let least = self.least_bytes(list.0.len());
        if least > most {
            return Err(DecodeError::TooLarge {
                what: "chunk list (by its piece count, for the extents its entry declares)",
                size: least,
                limit: most,
            }
            .into());
        }
        Ok(())
    }

    /// A directory's whole tree; a directory split over parts is loaded part by part and
    /// joined.
    pub async fn load_tree(&self, r: &ObjectRef) -> Result<Tree> {
        let bytes = self.read_object(r).await?;
        match decode_dir(&bytes)? {
            DirObject::Tree(t) => Ok(t),
            DirObject::Index(index) => {
                let mut tree = Tree::default();
                for part in &index.parts {
                    let t = Tree::decode(&self.read_object(&part.object).await?)?;
                    part.check(&t)?;
                    tree.entries.extend(t.entries);
                }
                Ok(tree)
            }
        }
    }

    /// Streams the extents of a chunk-list object.
    pub fn chunk_list(&self, list: &ObjectRef) -> ChunkListReader {
        ChunkListReader {
            reader: self.clone(),
            pieces: list.0.clone(),
            next_piece: 0,
            decoder: ChunkListDecoder::new(),
        }
    }
}

/// Reads a chunk-list object a few pieces at a time, so memory stays bounded for any file.
pub struct ChunkListReader {
    reader: ObjectReader,
    pieces: Vec<ChunkId>,
    next_piece: usize,
    decoder: ChunkListDecoder,
}

impl ChunkListReader {
    const PIECES_PER_FETCH: usize = 8;

    pub async fn next(&mut self) -> Result<Option<Extent>> {
        loop {
            if let Some(e) = self.decoder.next_extent()? {
                return Ok(Some(e));
            }
            if self.next_piece == self.pieces.len() {
                self.decoder.finish()?;
                return Ok(None);
            }
            let end = (self.next_piece + Self::PIECES_PER_FETCH).min(self.pieces.len());
            for piece in self
                .reader
                .fetch(&self.pieces[self.next_piece..end])
                .await?
            {
                self.decoder.push(&piece);
            }
            self.next_piece = end;
        }
    }

    /// Every extent (for small lists or when the caller needs them all anyway).
    pub async fn collect(mut self) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await? {
            out.push(e);
        }
        Ok(out)
    }
}

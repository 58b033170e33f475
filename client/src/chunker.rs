//! Content-defined chunking with FastCDC v2020 (normalization level 1), the same cut rule for
//! file data, images and manifest objects. Boundaries depend only on content, so an insert
//! shifts at most a chunk or two; they are pinned by tests below because a silent change
//! would break deduplication against every existing snapshot.

use fastcdc::v2020;
use hashgrid_proto::chunker::ChunkerParams;

#[derive(Clone, Copy, Debug)]
pub struct Chunker {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl Chunker {
    pub fn new(p: ChunkerParams) -> Self {
        // Normalization level 1, as `v2020::FastCDC::new` uses.
        let bits = v2020::logarithm2(p.avg_size);
        Chunker {
            min: p.min_size as usize,
            avg: p.avg_size as usize,
            max: p.max_size as usize,
            mask_s: v2020::MASKS[(bits + 1) as usize],
            mask_l: v2020::MASKS[(bits - 1) as usize],
        }
    }

    pub fn max_size(&self) -> usize {
        self.max
    }

    /// Length of the chunk starting at `data[0]`. Unless `data` is the end of the stream it
    /// must hold at least `max_size` bytes, so the cut does not depend on how data arrived.
    pub fn next_cut(&self, data: &[u8]) -> usize {
        let (_, len) = v2020::cut(
            data,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len.max(1).min(data.len())
    }

    /// Cuts `data` into chunks. With `eof` false, stops before the last `max_size` bytes and
    /// returns how many bytes it consumed; the caller keeps the rest for the next call.
    pub fn cut_all(&self, data: &[u8], eof: bool, cuts: &mut Vec<(usize, usize)>) -> usize {
        let mut pos = 0;
        while pos < data.len() && (eof || data.len() - pos >= self.max) {
            let len = self.next_cut(&data[pos..]);
            cuts.push((pos, len));
            pos += len;
        }
        pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        blake3::Hasher::new_derive_key("hashgrid chunker test")
            .finalize_xof()
            .fill(&mut v);
        v
    }

    fn lengths(data: &[u8]) -> Vec<usize> {
        let c = Chunker::new(ChunkerParams::DEFAULT);
        let mut cuts = Vec::new();
        c.cut_all(data, true, &mut cuts);
        cuts.iter().map(|&(_, l)| l).collect()
    }

    #[test]
    fn boundaries_are_pinned() {
        // Changing these numbers means every agent would cut differently from the chunks
        // already stored: dedup against old snapshots would be lost.
        let l = lengths(&seeded(1 << 20));
        assert_eq!(l.iter().sum::<usize>(), 1 << 20);
        assert_eq!(l, PINNED.to_vec(), "chunk boundaries changed");
    }

    const PINNED: [usize; 13] = [
        71045, 93801, 75755, 97724, 53918, 140421, 107396, 72618, 66509, 42617, 48240, 172565, 5967,
    ];

    #[test]
    fn same_cuts_as_the_fastcdc_crate() {
        let data = seeded(4 << 20);
        let p = ChunkerParams::DEFAULT;
        let theirs: Vec<usize> = v2020::FastCDC::new(&data, p.min_size, p.avg_size, p.max_size)
            .map(|c| c.length)
            .collect();
        assert_eq!(lengths(&data), theirs);
    }

    #[test]
    fn bounds_hold() {
        let l = lengths(&seeded(8 << 20));
        let (min, max) = (16 * 1024, 256 * 1024);
        assert!(l[..l.len() - 1].iter().all(|&x| (min..=max).contains(&x)));
        let avg = l.iter().sum::<usize>() / l.len();
        assert!((40_000..100_000).contains(&avg), "average {avg}");
    }

    #[test]
    fn empty_small_and_zero_inputs() {
        assert!(lengths(&[]).is_empty());
        assert_eq!(lengths(&[7; 100]), vec![100]);
        let zeros = lengths(&vec![0u8; 1 << 20]);
        assert!(zeros.iter().all(|&l| l == 256 * 1024), "{zeros:?}");
    }

    #[test]
    fn streaming_matches_one_shot() {
        let data = seeded(3 << 20);
        let c = Chunker::new(ChunkerParams::DEFAULT);
        let mut whole = Vec::new();
        c.cut_all(&data, true, &mut whole);
        // Feed in odd-sized pieces, carrying the unconsumed tail like the file reader does.
        let mut streamed = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut base = 0;
        for piece in data.chunks(300_001) {
            buf.extend_from_slice(piece);
            let mut cuts = Vec::new();
            let used = c.cut_all(&buf, false, &mut cuts);
            streamed.extend(cuts.iter().map(|&(o, l)| (o + base, l)));
            buf.drain(..used);
            base += used;
        }
        let mut cuts = Vec::new();
        c.cut_all(&buf, true, &mut cuts);
        streamed.extend(cuts.iter().map(|&(o, l)| (o + base, l)));
        assert_eq!(streamed, whole);
    }

    #[test]
    fn an_insert_shifts_only_nearby_boundaries() {
        let data = seeded(4 << 20);
        let mut edited = data.clone();
        edited.splice(2_000_000..2_000_000, b"inserted bytes".iter().copied());
        let a = lengths(&data);
        let b = lengths(&edited);
        let same_prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let same_suffix = a
            .iter()
            .rev()
            .zip(b.iter().rev())
            .take_while(|(x, y)| x == y)
            .count();
        assert!(
            a.len() - same_prefix - same_suffix <= 3,
            "{} {} {}",
            a.len(),
            same_prefix,
            same_suffix
        );
    }
}

//! Property tests of the decoders here against hostile input: arbitrary bytes and mutations
//! (overwritten bytes, truncation, insertion) of valid encodings of every manifest object,
//! encoded chunks and snapshot records. Each decoder must return an error or a valid value
//! (one that re-encodes and decodes to itself), never panic; the inputs are small, so a
//! decoder that trusted a length or count from them to allocate or loop would show up as a
//! hang or an abort here.

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;

use crate::codec::{decode_verified, encode_chunk};
use crate::manifest::{
    decode_dir, ChunkListDecoder, ChunkListEncoder, Content, DirObject, Entry, EntryKind, Extent,
    Metadata, ObjectRef, Timestamp, Tree, TreeIndex, TreePart, Xattr,
};
use crate::snapshot::SnapshotRecord;
use crate::{pb, ChunkId};

fn id(n: u8) -> ChunkId {
    ChunkId::of(&[n])
}

fn sample_tree() -> Tree {
    let meta = Metadata {
        mode: 0o4755,
        uid: 1,
        gid: 2,
        mtime: Timestamp { sec: 7, nsec: 9 },
        size: 30,
        xattrs: vec![Xattr {
            name: b"user.x".to_vec(),
            value: b"v".to_vec(),
        }],
        ctime: Timestamp { sec: 8, nsec: 1 },
        inode: 42,
    };
    let mut t = Tree {
        entries: vec![
            Entry {
                name: b"file".to_vec(),
                meta: meta.clone(),
                kind: EntryKind::File {
                    content: Content::Inline(vec![
                        Extent::Chunk { id: id(1), len: 10 },
                        Extent::Hole { len: 20 },
                    ]),
                    link_key: std::num::NonZeroU64::new(5),
                },
            },
            Entry {
                name: b"big".to_vec(),
                meta: Metadata {
                    size: 1 << 20,
                    ..Default::default()
                },
                kind: EntryKind::File {
                    content: Content::List {
                        list: ObjectRef(vec![id(2), id(3)]),
                        extents: 16,
                        chunks: 16,
                    },
                    link_key: None,
                },
            },
            Entry {
                name: b"dir".to_vec(),
                meta: Metadata::default(),
                kind: EntryKind::Dir {
                    subtree: ObjectRef(vec![id(4)]),
                },
            },
            Entry {
                name: b"link".to_vec(),
                meta: Metadata {
                    size: 4,
                    ..Default::default()
                },
                kind: EntryKind::Symlink {
                    target: b"/etc".to_vec(),
                },
            },
            Entry {
                name: b"dev".to_vec(),
                meta: Metadata::default(),
                kind: EntryKind::BlockDevice { rdev: 2049 },
            },
            Entry {
                name: b"fifo".to_vec(),
                meta: Metadata::default(),
                kind: EntryKind::Fifo,
            },
        ],
    };
    t.sort();
    t
}

fn sample_index() -> TreeIndex {
    let parts = sample_tree().split(60);
    TreeIndex {
        parts: parts
            .iter()
            .enumerate()
            .map(|(i, p)| TreePart::describe(ObjectRef(vec![id(100 + i as u8)]), p))
            .collect(),
    }
}

fn sample_list() -> Vec<u8> {
    let mut out = ChunkListEncoder::header().to_vec();
    for i in 0..20u8 {
        let e = if i % 5 == 4 {
            Extent::Hole {
                len: u64::from(i) * 4096 + 1,
            }
        } else {
            Extent::Chunk {
                id: id(i),
                len: 1000 + u32::from(i),
            }
        };
        ChunkListEncoder::encode_extent(&e, &mut out);
    }
    out
}

fn sample_snapshot() -> pb::Snapshot {
    pb::Snapshot {
        id: 3,
        client: "client".into(),
        dataset: "data".into(),
        kind: pb::SnapshotKind::Image as i32,
        time_unix_ms: 99,
        root: vec![id(1).as_bytes().to_vec(), id(2).as_bytes().to_vec()],
        stats: Some(pb::SnapshotStats {
            files: 3,
            ..Default::default()
        }),
        tags: vec!["t1".into()],
        parent: 2,
        hostname: "host".into(),
        paths: vec![b"/srv".to_vec()],
        manifest_version: 1,
        damage: Some(pb::SnapshotDamage {
            missing_chunks: 1,
            examples: vec![id(9).as_bytes().to_vec()],
            found_unix_ms: 5,
        }),
    }
}

/// Overwritten bytes, then an optional insertion, then an optional truncation.
#[derive(Clone, Debug)]
struct Mutation {
    writes: Vec<(usize, u8)>,
    insert: Option<(usize, Vec<u8>)>,
    cut: Option<usize>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        proptest::option::of((
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..12),
        )),
        proptest::option::of(any::<usize>()),
    )
        .prop_map(|(writes, insert, cut)| Mutation {
            writes,
            insert,
            cut,
        })
}

fn apply(bytes: &[u8], m: &Mutation) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.is_empty() {
        return out;
    }
    for &(at, b) in &m.writes {
        let at = at % out.len();
        out[at] = b;
    }
    if let Some((at, ins)) = &m.insert {
        let at = at % (out.len() + 1);
        out.splice(at..at, ins.iter().copied());
    }
    if let Some(cut) = m.cut {
        out.truncate(cut % (out.len() + 1));
    }
    out
}

/// Every manifest decoder on `bytes`; decoded values must survive a round trip.
fn check_manifest(bytes: &[u8]) {
    if let Ok(t) = Tree::decode(bytes) {
        assert_eq!(Tree::decode(&t.encode()).unwrap(), t);
    }
    if let Ok(i) = TreeIndex::decode(bytes) {
        assert_eq!(TreeIndex::decode(&i.encode()).unwrap(), i);
    }
    match decode_dir(bytes) {
        Ok(DirObject::Tree(t)) => assert_eq!(Tree::decode(bytes).unwrap(), t),
        Ok(DirObject::Index(i)) => assert_eq!(TreeIndex::decode(bytes).unwrap(), i),
        Err(_) => {}
    }
    for piece in [1usize, 7, 4096] {
        let mut d = ChunkListDecoder::new();
        let mut extents = 0usize;
        'feed: for p in bytes.chunks(piece) {
            d.push(p);
            loop {
                match d.next_extent() {
                    Ok(Some(e)) => {
                        assert!(!e.is_empty());
                        extents += 1;
                        // Each extent consumes at least two bytes: no endless loop.
                        assert!(extents <= bytes.len());
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
        let _ = d.finish();
    }
}

/// A chunk decoder's verdict: an error, or a plaintext that hashes to the id.
fn check_chunk(c: &pb::Chunk) {
    if let Ok((id, plain)) = decode_verified(c, 1 << 20) {
        assert_eq!(ChunkId::of(&plain), id);
        assert_eq!(plain.len(), c.plain_len as usize);
    }
}

fn check_snapshot(bytes: &[u8]) {
    let Ok(msg) = pb::Snapshot::decode(bytes) else {
        return;
    };
    if let Ok(rec) = SnapshotRecord::try_from(msg) {
        let again = SnapshotRecord::try_from(pb::Snapshot::from(&rec)).unwrap();
        assert_eq!(again, rec);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn manifest_decoders_survive_arbitrary_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..512),
        kind in prop_oneof![Just(b'T'), Just(b'I'), Just(b'L'), any::<u8>()],
    ) {
        check_manifest(&body);
        let mut framed = vec![b'H', b'G', b'M', kind, 1];
        framed.extend_from_slice(&body);
        check_manifest(&framed);
    }

    #[test]
    fn manifest_decoders_survive_mutated_objects(m in mutation()) {
        check_manifest(&apply(&sample_tree().encode(), &m));
        check_manifest(&apply(&sample_index().encode(), &m));
        check_manifest(&apply(&sample_list(), &m));
    }

    #[test]
    fn chunk_decoding_survives_arbitrary_and_mutated_chunks(
        raw in proptest::collection::vec(any::<u8>(), 0..256),
        m in mutation(),
        plain_len_delta in -3i64..3,
        level in prop_oneof![Just(0), Just(3)],
    ) {
        if let Ok(c) = pb::Chunk::decode(&raw[..]) {
            check_chunk(&c);
        }
        let plain = b"some chunk content, some chunk content, some more".repeat(20);
        let honest = encode_chunk(ChunkId::of(&plain), &Bytes::from(plain.clone()), level);
        check_chunk(&honest);
        let mut c = honest.clone();
        c.data = apply(&honest.data, &m).into();
        c.plain_len = (i64::from(c.plain_len) + plain_len_delta).max(0) as u32;
        check_chunk(&c);
        // The whole message mutated on the wire.
        if let Ok(c) = pb::Chunk::decode(&apply(&honest.encode_to_vec(), &m)[..]) {
            check_chunk(&c);
        }
    }

    #[test]
    fn snapshot_records_survive_arbitrary_and_mutated_bytes(
        raw in proptest::collection::vec(any::<u8>(), 0..512),
        m in mutation(),
    ) {
        check_snapshot(&raw);
        check_snapshot(&apply(&sample_snapshot().encode_to_vec(), &m));
    }
}

#[test]
fn samples_are_valid() {
    let t = sample_tree();
    assert_eq!(Tree::decode(&t.encode()).unwrap(), t);
    let i = sample_index();
    assert!(i.parts.len() > 1);
    assert_eq!(TreeIndex::decode(&i.encode()).unwrap(), i);
    let rec = SnapshotRecord::try_from(sample_snapshot()).unwrap();
    assert_eq!(rec.damage.unwrap().missing_chunks, 1);
}

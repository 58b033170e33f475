//! Encoding of Raft log entries and state-machine records: a version byte, then postcard.

use serde::de::DeserializeOwned;
use serde::Serialize;

const VERSION: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    let mut out = vec![VERSION];
    out.extend(postcard::to_stdvec(value)?);
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    match bytes.split_first() {
        Some((&VERSION, body)) => postcard::from_bytes(body),
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}

/// Raft log entries and state-machine records come from disk and from peers: their decoder
/// must return an error or a value for any bytes, never panic or allocate what the input
/// does not hold (postcard checks each length against the bytes left; serde caps the
/// capacity it reserves from a length).
#[cfg(test)]
mod tests {
    use hashgrid_proto::auth::TokenHash;
    use hashgrid_proto::chunker::ChunkerParams;
    use hashgrid_proto::manifest::ObjectRef;
    use hashgrid_proto::placement::ClusterMap;
    use hashgrid_proto::snapshot::{SnapshotDamage, SnapshotKind, SnapshotRecord, SnapshotStats};
    use hashgrid_proto::{ChunkId, SnapshotId};
    use openraft::{Entry, EntryPayload, LogId};
    use proptest::prelude::*;

    use super::*;
    use crate::catalog::{Catalog, ClusterConfig, Command};
    use crate::raft::TypeConfig;

    fn record() -> SnapshotRecord {
        SnapshotRecord {
            id: SnapshotId(4),
            client: "c".into(),
            dataset: "d".into(),
            kind: SnapshotKind::Files,
            time_unix_ms: 1,
            root: ObjectRef(vec![ChunkId::of(b"root")]),
            stats: SnapshotStats::default(),
            tags: vec!["t".into()],
            parent: Some(SnapshotId(2)),
            hostname: "h".into(),
            paths: vec![b"/x".to_vec()],
            manifest_version: 1,
            damage: None,
        }
    }

    fn commands() -> Vec<Command> {
        vec![
            Command::Init(ClusterConfig {
                map: ClusterMap::single(1, "127.0.0.1:1".into()),
                chunker: ChunkerParams::DEFAULT,
                admin_token: TokenHash::of("secret"),
                created_unix_ms: 0,
            }),
            Command::CommitSnapshot(record()),
            Command::Synced { node: 3, epoch: 9 },
            Command::SetDamage(vec![(
                SnapshotId(4),
                Some(SnapshotDamage {
                    missing_chunks: 2,
                    examples: vec![ChunkId::of(b"x")],
                    found_unix_ms: 3,
                }),
            )]),
        ]
    }

    fn entry(command: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(2, 1), 17),
            payload: EntryPayload::Normal(command),
        }
    }

    /// Every decoder of Raft data on `bytes`; what decodes must encode and decode again.
    fn check(bytes: &[u8]) {
        if let Ok(c) = decode::<Command>(bytes) {
            assert_eq!(decode::<Command>(&encode(&c).unwrap()).unwrap(), c);
        }
        if let Ok(e) = decode::<Entry<TypeConfig>>(bytes) {
            let again: Entry<TypeConfig> = decode(&encode(&e).unwrap()).unwrap();
            assert_eq!(again.log_id, e.log_id);
        }
        if let Ok(r) = decode::<SnapshotRecord>(bytes) {
            assert_eq!(decode::<SnapshotRecord>(&encode(&r).unwrap()).unwrap(), r);
        }
        let _ = decode::<Catalog>(bytes);
    }

    #[test]
    fn valid_encodings_round_trip() {
        for c in commands() {
            let bytes = encode(&entry(c.clone())).unwrap();
            let back: Entry<TypeConfig> = decode(&bytes).unwrap();
            assert!(matches!(back.payload, EntryPayload::Normal(ref d) if *d == c));
        }
        assert!(decode::<Command>(b"").is_err());
        assert!(decode::<Command>(b"\x02").is_err(), "unknown version");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_decode_to_an_error_or_a_value(
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            check(&body);
            let mut versioned = vec![1u8];
            versioned.extend_from_slice(&body);
            check(&versioned);
        }

        #[test]
        fn mutated_entries_decode_to_an_error_or_a_value(
            which in 0usize..4,
            writes in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in proptest::option::of(any::<usize>()),
        ) {
            let c = commands().swap_remove(which);
            for mut bytes in [encode(&entry(c.clone())).unwrap(), encode(&c).unwrap()] {
                for (at, b) in &writes {
                    let at = at % bytes.len();
                    bytes[at] = *b;
                }
                if let Some(cut) = cut {
                    bytes.truncate(cut % (bytes.len() + 1));
                }
                check(&bytes);
            }
        }
    }
}

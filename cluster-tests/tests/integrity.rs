//! Presence means a verified copy: a chunk damaged on the node's disk is found on the next
//! read, reported as damaged (not served), leaves the index, and the next backup of the same
//! data sends it again, so the copy heals. A node stores only what an honest encoder makes.

use std::path::Path;

use hashgrid::backup::{backup, BackupOptions, ParentChoice};
use hashgrid::chunker::Chunker;
use hashgrid::objects::ObjectReader;
use hashgrid::restore::{restore, DamagedChunk, DamagedPath, RestoreOptions};
use hashgrid::{ClientError, Connection};
use hashgrid_cluster_tests::cluster::{status_members, Cluster};
use hashgrid_cluster_tests::damage::{damage_behind_the_checksum, damage_one_of};
use hashgrid_cluster_tests::{
    assert_same_tree, backup_opts, cluster_stats, data, put_chunks, restore_all, restored, runtime,
    Node,
};
use hashgrid_proto::codec::encode_chunk;
use hashgrid_proto::id::{bit_set, pack_ids};
use hashgrid_proto::pb::{self, ChunkFault, HasRequest};
use hashgrid_proto::placement::Placement;
use hashgrid_proto::ChunkId;
use tonic::Code;

/// How long a cluster gets to settle.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(60);

/// The ids the agent cuts `content` into.
fn chunk_ids(conn: &Connection, content: &[u8]) -> Vec<ChunkId> {
    let mut cuts = Vec::new();
    Chunker::new(conn.chunker).cut_all(content, true, &mut cuts);
    cuts.iter()
        .map(|&(at, len)| ChunkId::of(&content[at..at + len]))
        .collect()
}

async fn has(conn: &Connection, id: ChunkId) -> bool {
    absent_of(conn, &[id]).await.is_empty()
}

/// Which of `ids` an agent's lookup answers absent.
async fn absent_of(conn: &Connection, ids: &[ChunkId]) -> Vec<ChunkId> {
    let present = conn
        .chunks
        .clone()
        .has(HasRequest {
            epoch: conn.epoch(),
            ids: pack_ids(ids),
        })
        .await
        .unwrap()
        .into_inner()
        .present;
    ids.iter()
        .enumerate()
        .filter(|&(i, _)| !bit_set(&present, i))
        .map(|(_, id)| *id)
        .collect()
}

/// Every reply of one `Get` of `ids`.
async fn get_all(conn: &Connection, ids: &[ChunkId]) -> Vec<pb::Chunk> {
    hashgrid_cluster_tests::get_chunks(conn, ids).await.unwrap()
}

fn opts(src: &Path, parent: ParentChoice) -> BackupOptions {
    BackupOptions {
        parent,
        ..backup_opts(&[src], false, "db01", "files")
    }
}

/// A node holding one backup of a file tree, one of whose data chunks (the file's first, or
/// with `last` its last) was then damaged on disk while the node was down.
struct Damaged {
    tmp: tempfile::TempDir,
    node: Node,
    src: std::path::PathBuf,
    first: hashgrid::backup::BackupSummary,
    /// The damaged chunk, its encoded length, and another chunk of the same file.
    victim: ChunkId,
    victim_len: usize,
    good: ChunkId,
}

fn backup_then_damage_a_chunk(rt: &tokio::runtime::Runtime, last: bool) -> Damaged {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let content = data::random_bytes(7, 1 << 20);
    std::fs::write(src.join("data.bin"), &content).unwrap();
    std::fs::write(src.join("notes.txt"), data::text_bytes(8, 20_000)).unwrap();
    let (first, ids) = rt.block_on(async {
        let conn = node.connect().await;
        let first = backup(&conn, &opts(&src, ParentChoice::Latest))
            .await
            .unwrap();
        (first, chunk_ids(&conn, &content))
    });
    assert!(ids.len() > 4, "{} chunks", ids.len());
    node.stop();
    let wanted = if last {
        &ids[ids.len() - 1..]
    } else {
        &ids[..1]
    };
    let (victim, victim_len) = damage_one_of(&node.dir.join("data/chunks/packs"), wanted);
    node.restart();
    let good = *ids.iter().find(|id| **id != victim).unwrap();
    Damaged {
        tmp,
        node,
        src,
        first,
        victim,
        victim_len,
        good,
    }
}

#[test]
fn a_flipped_byte_is_reported_dropped_and_healed_by_the_next_backup() {
    let rt = runtime();
    let d = backup_then_damage_a_chunk(&rt, false);
    let (victim, good, src) = (d.victim, d.good, &d.src);
    let absent = ChunkId::of(b"never stored");
    rt.block_on(async {
        let conn = d.node.connect().await;
        let chunks_before = cluster_stats(&conn).await.chunks;
        // `Has` reads metadata only.
        assert!(has(&conn, victim).await);

        // One reply per id, in order; the damaged and the absent one carry a fault and no
        // data, and the stream goes on past them.
        let replies = get_all(&conn, &[victim, good, absent, good]).await;
        let summary: Vec<(ChunkId, ChunkFault, bool)> = replies
            .iter()
            .map(|c| {
                (
                    ChunkId::from_slice(&c.id).unwrap(),
                    ChunkFault::try_from(c.fault).unwrap(),
                    c.data.is_empty(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (victim, ChunkFault::Damaged, true),
                (good, ChunkFault::None, false),
                (absent, ChunkFault::Missing, true),
                (good, ChunkFault::None, false),
            ]
        );
        assert!(!has(&conn, victim).await, "a damaged copy still counts");
        assert_eq!(cluster_stats(&conn).await.chunks, chunks_before - 1);
        // Asked again: now simply not stored.
        let again = get_all(&conn, &[victim]).await;
        assert_eq!(again[0].fault, ChunkFault::Missing as i32);

        // A backup that reads the file again sends that chunk again and no other data chunk
        // (tree objects of ancestors whose mtime moved may be new; they are small).
        let healed = backup(&conn, &opts(src, ParentChoice::None)).await.unwrap();
        let sent = healed.upload.sent_bytes as usize;
        assert!(
            (d.victim_len..d.victim_len + 16 * 1024).contains(&sent),
            "sent {sent} bytes for a {}-byte chunk: {:?}",
            d.victim_len,
            healed.upload
        );
        assert!(has(&conn, victim).await);
        let target = d.tmp.path().join("restore-healed");
        restore_all(&conn, healed.snapshot, &target).await;
        assert_same_tree(src, &restored(&target, src));
        // The first snapshot is whole again too.
        let target = d.tmp.path().join("restore-first");
        restore_all(&conn, d.first.snapshot, &target).await;
        assert_same_tree(src, &restored(&target, src));
    });
    let log = d.node.log();
    assert!(
        log.contains("stored chunk failed verification") && log.contains(&victim.to_string()),
        "no warning naming the chunk:\n{log}"
    );
}

#[test]
fn a_damaged_chunk_costs_the_file_that_uses_it_not_the_restore() {
    damaged_chunk_costs_only_its_file(false);
}

/// The lost chunk is the file's tail: the file still gets its full length, the tail a hole.
#[test]
fn a_damaged_last_chunk_leaves_its_file_the_full_length() {
    damaged_chunk_costs_only_its_file(true);
}

fn damaged_chunk_costs_only_its_file(last: bool) {
    let rt = runtime();
    let d = backup_then_damage_a_chunk(&rt, last);
    let target = d.tmp.path().join("restore");
    let data_path = restored(&target, &d.src).join("data.bin");
    rt.block_on(async {
        let conn = d.node.connect().await;
        let snap = hashgrid::catalog::get(&conn, d.first.snapshot)
            .await
            .unwrap();
        let err = restore(
            &conn,
            &snap,
            &RestoreOptions {
                target: target.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        let ClientError::RestoreIncomplete {
            damaged,
            unnamed,
            summary,
        } = &err
        else {
            panic!("not an incomplete restore: {err}");
        };
        assert_eq!(*unnamed, 0);
        assert_eq!(
            damaged,
            &vec![DamagedPath {
                path: data_path.clone(),
                chunks: vec![DamagedChunk {
                    id: d.victim,
                    fault: ChunkFault::Damaged
                }],
            }]
        );
        assert!(err.to_string().contains("data.bin"), "{err}");
        // Everything else is restored, the damaged file too, with its lost range a hole.
        assert_eq!(summary.files, 2);
        let src = restored(&target, &d.src);
        assert_eq!(
            std::fs::read(src.join("notes.txt")).unwrap(),
            std::fs::read(d.src.join("notes.txt")).unwrap()
        );
        let original = std::fs::read(d.src.join("data.bin")).unwrap();
        let got = std::fs::read(&data_path).unwrap();
        assert_eq!(got.len(), original.len());
        let differing = got.iter().zip(&original).filter(|(a, b)| a != b).count();
        assert!(
            differing > 0 && differing <= 256 * 1024,
            "{differing} bytes differ"
        );

        // Dropped by that read: now it is not stored at all.
        match ObjectReader::new(conn.clone())
            .fetch(&[d.good, d.victim])
            .await
        {
            Err(ClientError::ChunkFault { id, fault }) => {
                assert_eq!((id, fault), (d.victim, ChunkFault::Missing))
            }
            other => panic!("fetch of a lost chunk: {:?}", other.map(|v| v.len())),
        }
    });
    // The CLI names the file and the chunk, and exits with 3.
    let target = d.tmp.path().join("restore-cli");
    let out = d.node.cli(&[
        "restore",
        &d.first.snapshot.to_string(),
        "--target",
        target.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let expected = format!(
        "damaged: {}: chunk {} (missing)",
        restored(&target, &d.src).join("data.bin").display(),
        d.victim
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(
        std::fs::read(restored(&target, &d.src).join("notes.txt")).unwrap(),
        std::fs::read(d.src.join("notes.txt")).unwrap()
    );
}

fn encoded(plain: &[u8], level: i32) -> pb::Chunk {
    encode_chunk(ChunkId::of(plain), &plain.to_vec().into(), level)
}

#[test]
fn chunks_carrying_extra_bytes_are_refused_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    runtime().block_on(async {
        let conn = node.connect().await;
        let text = data::text_bytes(1, 50_000);
        let honest = encoded(&text, 3);
        assert_eq!(honest.codec, pb::Codec::Zstd as i32);
        // A skippable frame (magic 0x184D2A5?, length, payload) after the real one.
        let mut skippable = 0x184D_2A50u32.to_le_bytes().to_vec();
        skippable.extend_from_slice(&16u32.to_le_bytes());
        skippable.extend_from_slice(b"sixteen bytes...");

        let mut padded = honest.clone();
        padded.data = [&honest.data[..], &skippable].concat().into();
        let mut trailing = honest.clone();
        trailing.data = [&honest.data[..], b"trailing"].concat().into();
        let random = data::random_bytes(2, 20_000);
        let mut long_raw = encoded(&random, 0);
        long_raw.data = [&random[..], b"more"].concat().into();

        let good = encoded(b"a good chunk in a bad batch", 0);
        for bad in [padded, trailing, long_raw] {
            let e = put_chunks(&conn, vec![good.clone(), bad])
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e}");
            assert!(e.message().contains("honest encoder"), "{e}");
        }
        assert_eq!(
            cluster_stats(&conn).await.chunks,
            0,
            "refused input left traces"
        );
        assert!(!has(&conn, ChunkId::of(&text)).await);
        assert!(!has(&conn, ChunkId::from_slice(&good.id).unwrap()).await);
        // The honest encoding of the same chunk is taken.
        assert_eq!(put_chunks(&conn, vec![honest]).await.unwrap().stored, 1);
    });
}

#[test]
fn a_lost_directory_listing_costs_that_directory_only() {
    use hashgrid_cluster_tests::manifests::{commit, dir, file, meta, upload_chunk, upload_tree};
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(&tmp.path().join("node"));
    let rt = runtime();
    let (snap, listing) = rt.block_on(async {
        let conn = node.connect().await;
        let text = data::text_bytes(3, 5_000);
        let id = upload_chunk(&conn, text.clone()).await;
        let len = text.len() as u32;
        let lost = upload_tree(&conn, vec![file(b"inside", meta(0o644), id, len)]).await;
        let kept = upload_tree(&conn, vec![file(b"inside", meta(0o600), id, len)]).await;
        let root = upload_tree(
            &conn,
            vec![
                dir(b"kept", kept),
                dir(b"lost", lost.clone()),
                file(b"top", meta(0o644), id, len),
            ],
        )
        .await;
        (commit(&conn, &root).await, lost.0[0])
    });
    node.stop();
    damage_one_of(&node.dir.join("data/chunks/packs"), &[listing]);
    node.restart();
    let target = tmp.path().join("restore");
    rt.block_on(async {
        let conn = node.connect().await;
        let err = restore(
            &conn,
            &snap,
            &RestoreOptions {
                target: target.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        let ClientError::RestoreIncomplete { damaged, .. } = &err else {
            panic!("not an incomplete restore: {err}");
        };
        assert_eq!(damaged.len(), 1, "{damaged:?}");
        assert_eq!(damaged[0].path, target.join("lost"));
        assert_eq!(damaged[0].chunks[0].id, listing);
    });
    assert!(target.join("lost").is_dir());
    assert_eq!(std::fs::read_dir(target.join("lost")).unwrap().count(), 0);
    assert!(target.join("kept/inside").is_file());
    assert!(target.join("top").is_file());
}

/// Copies their own node cannot tell are bad (damaged before the node took their checksums:
/// the index's checksums match the damaged bytes), one of a file's chunks and one piece of
/// the snapshot's manifest, on the node an agent restores through, in a cluster of three at
/// R = 3: that node reads its own copies first, and its cheap check passes them. The agent's
/// check of the bytes fails; it asks again with copies read in full, the node finds its
/// copies bad and drops them, the reads go to another owner, and the tree restores
/// identical. (Before, the file was named damaged and the manifest piece failed the
/// restore.) The dropped copies are rewritten from the good ones.
#[test]
fn copies_bad_behind_their_checksums_are_read_from_another_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&tmp.path().join("cluster"), 3, 3, 2);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let content = data::random_bytes(17, 1 << 20);
    let notes = data::text_bytes(18, 20_000);
    std::fs::write(src.join("data.bin"), &content).unwrap();
    std::fs::write(src.join("notes.txt"), &notes).unwrap();
    let rt = runtime();
    let (snapshot, file_chunks) = rt.block_on(async {
        let conn = cluster.connect(0).await;
        let summary = backup(&conn, &opts(&src, ParentChoice::None))
            .await
            .unwrap();
        let mut ids = chunk_ids(&conn, &content);
        ids.extend(chunk_ids(&conn, &notes));
        (summary.snapshot, ids)
    });
    let settled = cluster.wait_quiet(0, "backed up on every node", SETTLE, |_| true);
    let chunks = |s: &serde_json::Value| -> Vec<u64> {
        status_members(s)
            .iter()
            .map(|m| m["chunks"].as_u64().unwrap())
            .collect()
    };
    let held = chunks(&settled);
    assert!(held.iter().all(|&c| c == held[0]), "{settled:#}");

    cluster.nodes[0].stop();
    let data_chunk = damage_behind_the_checksum(&cluster.nodes[0], |id| file_chunks.contains(id));
    let manifest_piece =
        damage_behind_the_checksum(&cluster.nodes[0], |id| !file_chunks.contains(id));
    cluster.nodes[0].restart();

    let target = tmp.path().join("restore");
    rt.block_on(async {
        let conn = cluster.connect(0).await;
        let snap = hashgrid::catalog::get(&conn, snapshot).await.unwrap();
        let opts = RestoreOptions {
            target: target.clone(),
            ..Default::default()
        };
        if let Err(e) = restore(&conn, &snap, &opts).await {
            cluster.dump_logs();
            panic!("restore with {data_chunk} and {manifest_piece} bad on node 0: {e}");
        }
    });
    assert_same_tree(&src, &restored(&target, &src));
    // Node 0 dropped its two bad copies when it read them in full; the reads that found
    // them rewrote them from the good copies.
    cluster.wait_quiet(0, "bad copies rewritten", SETTLE, |s| chunks(s) == held);
}

/// `verify` through a node that does not own a manifest piece reads it from the piece's
/// first owner, whose copy went bad behind its checksum (as above): the node's check of the
/// bytes fails, it reads again with copies read in full, the owner drops its copy, the
/// second owner serves a good one, and verify finds nothing damaged. (Before, the walk
/// failed on the bad bytes and verify with it.)
#[test]
fn verify_reads_a_manifest_piece_bad_behind_its_checksum_from_another_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&tmp.path().join("cluster"), 4, 2, 2);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let content = data::random_bytes(27, 256 << 10);
    std::fs::write(src.join("data.bin"), &content).unwrap();
    let rt = runtime();
    let (file_chunks, map, ids) = rt.block_on(async {
        let conn = cluster.connect(0).await;
        backup(&conn, &opts(&src, ParentChoice::None))
            .await
            .unwrap();
        let map = conn.map.clone();
        (chunk_ids(&conn, &content), map, cluster.node_ids().await)
    });
    cluster.wait_quiet(0, "backed up", SETTLE, |_| true);
    let placement = Placement::new(&map).expect("cluster map");
    // A manifest piece held on its first owner, which is the one poisoned.
    let index_of = |id: u64| ids.iter().position(|&n| n == id).unwrap();
    let (piece, first) = (0..ids.len())
        .find_map(|i| {
            let stored = hashgrid_cluster_tests::damage::stored_ids(
                &cluster.nodes[i].dir.join("data/chunks/packs"),
            );
            stored
                .into_iter()
                .find(|id| !file_chunks.contains(id) && placement.owners_of(id)[0] == ids[i])
                .map(|id| (id, i))
        })
        .expect("a manifest piece on its first owner");
    let owners: Vec<usize> = placement
        .owners_of(&piece)
        .iter()
        .map(|&n| index_of(n))
        .collect();
    let via = (0..ids.len()).find(|i| !owners.contains(i)).unwrap();
    cluster.nodes[first].stop();
    let bad = damage_behind_the_checksum(&cluster.nodes[first], |id| *id == piece);
    cluster.nodes[first].restart();
    cluster.wait_quiet(via, "restarted", SETTLE, |_| true);

    let out = cluster.cli(via, &["--json", "verify"]);
    let report = String::from_utf8_lossy(&out.stdout);
    if out.status.code() != Some(0) {
        cluster.dump_logs();
        panic!(
            "verify through node {via} with {bad} bad on node {first}: {:?}\n{report}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A repair on lookup takes the copies it read one by one. Two nodes at R = W = 2; the
/// second loses its chunk store (its background workers kept to a crawl, so what repairs
/// it here is the lookups), and on the first one file's chunk goes bad behind its checksum.
/// A lookup of the tree's chunks through the first node, which holds the only copies and
/// repairs them onto the second as it answers, refuses the bad copy alone: only that chunk
/// answers absent, so only it is sent again. (Before, the copies of a repair round were
/// verified together, and the bad one failed its whole round of 32: all 32 answered absent,
/// and the agent sent them again.) A backup of the same tree then restores identical.
#[test]
fn a_bad_copy_costs_a_repair_on_lookup_only_its_own_chunk() {
    const FILES: usize = 200;
    let tmp = tempfile::tempdir().unwrap();
    let slow_workers = ["--repair-interval-secs", "0", "--move-mib-per-sec", "0.001"];
    let mut cluster = Cluster::start_with(&tmp.path().join("cluster"), 2, 2, 2, &slow_workers);
    let src = tmp.path().join("src");
    data::many_files(&src, 4, FILES / 4, 41);
    let rt = runtime();
    let file_chunks: Vec<ChunkId> = data::files_under(&src)
        .iter()
        .map(|f| ChunkId::of(&std::fs::read(f).unwrap()))
        .collect();
    assert_eq!(file_chunks.len(), FILES);
    rt.block_on(async {
        let conn = cluster.connect(0).await;
        backup(&conn, &opts(&src, ParentChoice::None))
            .await
            .unwrap();
    });
    // W = 2 of 2: the backup's end means both nodes hold every chunk.
    let held = cluster.status_json(0);
    let counts: Vec<u64> = status_members(&held)
        .iter()
        .map(|m| m["chunks"].as_u64().unwrap())
        .collect();
    assert!(
        counts[0] > FILES as u64 && counts[0] == counts[1],
        "{held:#}"
    );

    for node in &mut cluster.nodes {
        node.stop();
    }
    std::fs::remove_dir_all(cluster.nodes[1].dir.join("data/chunks")).unwrap();
    let bad = damage_behind_the_checksum(&cluster.nodes[0], |id| file_chunks.contains(id));
    for node in &mut cluster.nodes {
        node.restart();
    }

    // The agent's lookup of the files' chunks through node 0, which holds the only copies
    // and copies each onto node 1 before it answers. (A lookup also answers absent what an
    // owner was too slow to answer, on a loaded machine, and repairs it the next time; what
    // it repaired stays repaired.) Every copy verified alone: the answer comes down to the
    // bad chunk alone, where a round verified together leaves its whole round absent.
    let absent = rt.block_on(async {
        let conn = cluster.connect(0).await;
        let mut absent = Vec::new();
        for _ in 0..5 {
            absent = absent_of(&conn, &file_chunks).await;
            if absent == [bad] {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        absent
    });
    assert_eq!(
        absent,
        [bad],
        "{bad} bad on node 0: {} chunks stay absent",
        absent.len()
    );
    let refused = cluster.nodes[0]
        .metric_with("hashgrid_chunk_rejected_total", "reason=\"verify\"")
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "node 0 refused {refused} copies");

    // The next backup sends the bad chunk again, and the snapshot restores identical.
    let again = BackupOptions {
        parent: ParentChoice::None,
        ..backup_opts(&[&src], false, "db01", "files-again")
    };
    let summary = rt.block_on(async {
        let conn = cluster.connect(0).await;
        backup(&conn, &again).await.unwrap()
    });
    println!("second backup: {:?}", summary.upload);
    assert!(summary.upload.sent_chunks >= 1, "{:?}", summary.upload);

    let target = tmp.path().join("restore");
    rt.block_on(async {
        let conn = cluster.connect(1).await;
        restore_all(&conn, summary.snapshot, &target).await;
    });
    assert_same_tree(&src, &restored(&target, &src));
}

//! The Raft state machine: applies catalog commands and persists their effect together with
//! `last_applied` and the membership in one synced write batch.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use hashgrid_proto::snapshot::SnapshotDamage;
use hashgrid_proto::SnapshotId;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use super::codec::{decode, encode};
use super::{NodeId, TypeConfig, CF_SM_DAMAGE, CF_SM_META, CF_SM_SNAPSHOTS};
use crate::catalog::{Catalog, Change, CommandResult, CommitKey};

type Result<T> = std::result::Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, BasicNode>;

const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_CONFIG: &[u8] = b"config";
const KEY_HISTORY: &[u8] = b"map_history";
const KEY_SNAPSHOT: &[u8] = b"raft_snapshot";
/// `commit_key/<16-byte key>` -> the snapshot id (big-endian u64) that key committed.
const COMMIT_KEY_PREFIX: &[u8] = b"commit_key/";

fn commit_key_entry(key: &CommitKey) -> Vec<u8> {
    [COMMIT_KEY_PREFIX, key.as_slice()].concat()
}

/// The catalog shared between the state machine (writer) and the services (readers).
pub type SharedCatalog = Arc<RwLock<Catalog>>;

/// What a Raft snapshot carries: the catalog, and the damage marks and commit keys, which
/// the catalog's own encoding leaves out. Snapshots written before damage marks existed hold a bare
/// [`Catalog`]; [`CatalogImage::decode`] reads both.
#[derive(Serialize, Deserialize)]
struct CatalogImage {
    catalog: Catalog,
    damage: Vec<(SnapshotId, SnapshotDamage)>,
    commit_keys: Vec<(CommitKey, SnapshotId)>,
}

/// [`CatalogImage`] as written, borrowing the catalog.
#[derive(Serialize)]
struct CatalogImageRef<'a> {
    catalog: &'a Catalog,
    damage: Vec<(SnapshotId, SnapshotDamage)>,
    commit_keys: Vec<(CommitKey, SnapshotId)>,
}

impl CatalogImage {
    fn of(catalog: &Catalog) -> CatalogImageRef<'_> {
        let damage = catalog
            .snapshots
            .values()
            .filter_map(|s| s.damage.clone().map(|d| (s.id, d)))
            .collect();
        let commit_keys = catalog
            .commit_keys
            .iter()
            .map(|(k, id)| (*k, *id))
            .collect();
        CatalogImageRef {
            catalog,
            damage,
            commit_keys,
        }
    }

    fn decode(data: &[u8]) -> std::result::Result<Catalog, postcard::Error> {
        let (mut catalog, damage, keys) = match decode::<CatalogImage>(data) {
            Ok(image) => (image.catalog, image.damage, image.commit_keys),
            Err(_) => (decode::<Catalog>(data)?, Vec::new(), Vec::new()),
        };
        catalog.commit_keys = keys.into_iter().collect();
        for (id, d) in damage {
            if let Some(s) = catalog.snapshots.get_mut(&id) {
                s.damage = Some(d);
            }
        }
        Ok(catalog)
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

pub struct StateMachine {
    db: Arc<DB>,
    catalog: SharedCatalog,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    snapshot_seq: u64,
}

fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

fn read_err(e: &(impl std::error::Error + 'static)) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(e).into()
}

fn write_err(e: &(impl std::error::Error + 'static)) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(e).into()
}

impl StateMachine {
    /// Loads the persisted catalog from `db`.
    pub fn open(db: Arc<DB>) -> Result<Self> {
        let meta = db.cf_handle(CF_SM_META).expect("cf opened in open_db");
        let get = |key: &[u8]| db.get_cf(meta, key).map_err(|e| read_err(&e));
        let last_applied = match get(KEY_LAST_APPLIED)? {
            Some(b) => decode(&b).map_err(|e| read_err(&e))?,
            None => None,
        };
        let membership = match get(KEY_MEMBERSHIP)? {
            Some(b) => decode(&b).map_err(|e| read_err(&e))?,
            None => Membership::default(),
        };
        let mut catalog = Catalog::default();
        if let Some(b) = get(KEY_CONFIG)? {
            catalog.config = Some(decode(&b).map_err(|e| read_err(&e))?);
        }
        if let Some(b) = get(KEY_HISTORY)? {
            catalog.history = decode(&b).map_err(|e| read_err(&e))?;
        }
        for item in db.prefix_iterator_cf(meta, COMMIT_KEY_PREFIX) {
            let (k, v) = item.map_err(|e| read_err(&e))?;
            let Some(rest) = k.strip_prefix(COMMIT_KEY_PREFIX) else {
                break;
            };
            let bad = || read_err(&std::io::Error::other("malformed commit key entry"));
            let key: CommitKey = rest.try_into().map_err(|_| bad())?;
            let id: [u8; 8] = v.as_ref().try_into().map_err(|_| bad())?;
            catalog
                .commit_keys
                .insert(key, SnapshotId(u64::from_be_bytes(id)));
        }
        let snaps = db.cf_handle(CF_SM_SNAPSHOTS).expect("cf opened in open_db");
        for item in db.iterator_cf(snaps, rocksdb::IteratorMode::Start) {
            let (_, value) = item.map_err(|e| read_err(&e))?;
            let record: hashgrid_proto::snapshot::SnapshotRecord =
                decode(&value).map_err(|e| read_err(&e))?;
            catalog.snapshots.insert(record.id, record);
        }
        let damage = db.cf_handle(CF_SM_DAMAGE).expect("cf opened in open_db");
        for item in db.iterator_cf(damage, rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(|e| read_err(&e))?;
            let Ok(key) = <[u8; 8]>::try_from(&key[..]) else {
                continue;
            };
            if let Some(s) = catalog
                .snapshots
                .get_mut(&SnapshotId(u64::from_be_bytes(key)))
            {
                s.damage = Some(decode(&value).map_err(|e| read_err(&e))?);
            }
        }
        Ok(StateMachine {
            db,
            catalog: Arc::new(RwLock::new(catalog)),
            last_applied,
            membership,
            snapshot_seq: 0,
        })
    }

    pub fn catalog(&self) -> SharedCatalog {
        self.catalog.clone()
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("cf opened in open_db")
    }

    fn put_state(&self, batch: &mut WriteBatch) -> Result<()> {
        batch.put_cf(
            self.cf(CF_SM_META),
            KEY_LAST_APPLIED,
            encode(&self.last_applied).map_err(|e| write_err(&e))?,
        );
        batch.put_cf(
            self.cf(CF_SM_META),
            KEY_MEMBERSHIP,
            encode(&self.membership).map_err(|e| write_err(&e))?,
        );
        Ok(())
    }

    fn persist_change(
        &self,
        catalog: &Catalog,
        change: &Change,
        batch: &mut WriteBatch,
    ) -> Result<()> {
        match change {
            // A map change can change the history too, so both are written.
            Change::Config | Change::History => {
                if let Some(config) = &catalog.config {
                    batch.put_cf(
                        self.cf(CF_SM_META),
                        KEY_CONFIG,
                        encode(config).map_err(|e| write_err(&e))?,
                    );
                }
                batch.put_cf(
                    self.cf(CF_SM_META),
                    KEY_HISTORY,
                    encode(&catalog.history).map_err(|e| write_err(&e))?,
                );
            }
            Change::KeyedSnapshot(id, key) => {
                self.persist_change(catalog, &Change::Snapshot(*id), batch)?;
                batch.put_cf(
                    self.cf(CF_SM_META),
                    commit_key_entry(key),
                    id.0.to_be_bytes(),
                );
            }
            Change::Snapshot(id) => {
                let key = id.0.to_be_bytes();
                match catalog.snapshots.get(id) {
                    Some(record) => batch.put_cf(
                        self.cf(CF_SM_SNAPSHOTS),
                        key,
                        encode(record).map_err(|e| write_err(&e))?,
                    ),
                    None => batch.delete_cf(self.cf(CF_SM_SNAPSHOTS), key),
                }
            }
            Change::Snapshots(added) => {
                for (id, key) in added {
                    match key {
                        Some(key) => {
                            self.persist_change(catalog, &Change::KeyedSnapshot(*id, *key), batch)?
                        }
                        None => self.persist_change(catalog, &Change::Snapshot(*id), batch)?,
                    }
                }
            }
            Change::Damage(ids) => {
                for id in ids {
                    let key = id.0.to_be_bytes();
                    match catalog.snapshots.get(id).and_then(|s| s.damage.as_ref()) {
                        Some(d) => batch.put_cf(
                            self.cf(CF_SM_DAMAGE),
                            key,
                            encode(d).map_err(|e| write_err(&e))?,
                        ),
                        None => batch.delete_cf(self.cf(CF_SM_DAMAGE), key),
                    }
                }
            }
        }
        Ok(())
    }
}

/// Builds a snapshot from a copy of the catalog taken between two applies.
pub struct SnapshotBuilder {
    sm_db: Arc<DB>,
    catalog: Catalog,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let image = CatalogImage::of(&self.catalog);
        let data = encode(&image).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.seq),
            None => format!("--{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.sm_db
                .cf_handle(CF_SM_META)
                .expect("cf opened in open_db"),
            KEY_SNAPSHOT,
            encode(&stored).map_err(|e| write_err(&e))?,
        );
        self.sm_db
            .write_opt(batch, &synced())
            .map_err(|e| write_err(&e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership)> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut batch = WriteBatch::default();
        {
            let catalog = self.catalog.clone();
            let mut catalog = catalog.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                self.last_applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::Nothing,
                    EntryPayload::Normal(command) => {
                        let (result, change) = catalog.apply(entry.log_id.index, command);
                        if let Some(change) = change {
                            self.persist_change(&catalog, &change, &mut batch)?;
                        }
                        result
                    }
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(entry.log_id), m);
                        CommandResult::Nothing
                    }
                };
                results.push(result);
            }
        }
        self.put_state(&mut batch)?;
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| write_err(&e))?;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        SnapshotBuilder {
            sm_db: self.db.clone(),
            catalog: self
                .catalog
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            seq: self.snapshot_seq,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let data = snapshot.into_inner();
        let new = CatalogImage::decode(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let mut batch = WriteBatch::default();
        let snaps = self.cf(CF_SM_SNAPSHOTS);
        batch.delete_range_cf(snaps, 0u64.to_be_bytes(), u64::MAX.to_be_bytes());
        batch.delete_cf(snaps, u64::MAX.to_be_bytes());
        let damage = self.cf(CF_SM_DAMAGE);
        batch.delete_range_cf(damage, 0u64.to_be_bytes(), u64::MAX.to_be_bytes());
        batch.delete_cf(damage, u64::MAX.to_be_bytes());
        batch.delete_cf(self.cf(CF_SM_META), KEY_CONFIG);
        batch.delete_cf(self.cf(CF_SM_META), KEY_HISTORY);
        self.persist_change(&new, &Change::Config, &mut batch)?;
        for id in new.snapshots.keys() {
            self.persist_change(&new, &Change::Snapshot(SnapshotId(id.0)), &mut batch)?;
        }
        batch.delete_range_cf(
            self.cf(CF_SM_META),
            commit_key_entry(&[0; 16]),
            commit_key_entry(&[0xff; 16]),
        );
        batch.delete_cf(self.cf(CF_SM_META), commit_key_entry(&[0xff; 16]));
        for (key, id) in &new.commit_keys {
            batch.put_cf(
                self.cf(CF_SM_META),
                commit_key_entry(key),
                id.0.to_be_bytes(),
            );
        }
        let damaged = new
            .snapshots
            .values()
            .filter(|s| s.damage.is_some())
            .map(|s| s.id)
            .collect();
        self.persist_change(&new, &Change::Damage(damaged), &mut batch)?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.put_state(&mut batch)?;
        batch.put_cf(
            self.cf(CF_SM_META),
            KEY_SNAPSHOT,
            encode(&StoredSnapshot {
                meta: meta.clone(),
                data,
            })
            .map_err(|e| write_err(&e))?,
        );
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| write_err(&e))?;
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let Some(bytes) = self
            .db
            .get_cf(self.cf(CF_SM_META), KEY_SNAPSHOT)
            .map_err(|e| read_err(&e))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot = decode(&bytes).map_err(|e| read_err(&e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use hashgrid_proto::manifest::ObjectRef;
    use hashgrid_proto::snapshot::{SnapshotKind, SnapshotRecord, SnapshotStats};
    use hashgrid_proto::ChunkId;

    use super::*;

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        for i in [3u64, 5] {
            c.snapshots.insert(
                SnapshotId(i),
                SnapshotRecord {
                    id: SnapshotId(i),
                    client: "c".into(),
                    dataset: "d".into(),
                    kind: SnapshotKind::Files,
                    time_unix_ms: 1,
                    root: ObjectRef(vec![ChunkId::of(b"r")]),
                    stats: SnapshotStats::default(),
                    tags: vec![],
                    parent: None,
                    hostname: "h".into(),
                    paths: vec![],
                    manifest_version: 1,
                    damage: None,
                },
            );
        }
        c
    }

    #[test]
    fn raft_snapshots_carry_damage_marks_and_old_payloads_still_install() {
        let mut c = catalog();
        let mark = SnapshotDamage {
            missing_chunks: 4,
            examples: vec![ChunkId::of(b"gone")],
            found_unix_ms: 7,
        };
        c.snapshots.get_mut(&SnapshotId(5)).unwrap().damage = Some(mark.clone());
        c.commit_keys.insert([3; 16], SnapshotId(5));
        let back = CatalogImage::decode(&encode(&CatalogImage::of(&c)).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.snapshots[&SnapshotId(5)].damage, Some(mark));
        assert_eq!(back.commit_keys[&[3; 16]], SnapshotId(5));

        // A payload from before damage marks: the bare catalog.
        let old = catalog();
        assert_eq!(CatalogImage::decode(&encode(&old).unwrap()).unwrap(), old);
        assert!(CatalogImage::decode(b"\x01\xff\xff").is_err());
    }
}

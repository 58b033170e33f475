//! The catalog: the cluster metadata that Raft replicates, as plain data plus a pure
//! `apply`. The Raft state machine (`raft::state_machine`) persists what `apply` changes;
//! services read a shared copy. Keeping the rules here, free of I/O, makes them testable.
//!
//! Evolution: commands are encoded with postcard (not self-describing), so a released
//! variant's fields never change; new behaviour gets a new variant appended at the end.

use std::collections::BTreeMap;

use hashgrid_proto::auth::TokenHash;
use hashgrid_proto::chunker::ChunkerParams;
use hashgrid_proto::placement::ClusterMap;
use hashgrid_proto::snapshot::{SnapshotDamage, SnapshotKind, SnapshotRecord};
use hashgrid_proto::NodeId;
use hashgrid_proto::SnapshotId;
use serde::{Deserialize, Serialize};

use crate::cluster_map::{apply_change, MapChange, MapHistory};

/// Cluster-wide settings set at init; the map changes through `Command::ChangeMap`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub map: ClusterMap,
    pub chunker: ChunkerParams,
    pub admin_token: TokenHash,
    pub created_unix_ms: i64,
}

/// A change to the catalog, proposed through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets the cluster config once; later Inits are rejected.
    Init(ClusterConfig),
    /// Records a snapshot; its id becomes the log index of this command.
    CommitSnapshot(SnapshotRecord),
    /// Changes the cluster map (membership, states, replication): a new epoch.
    ChangeMap(MapChange),
    /// `node` holds every chunk of the partitions it owns under the map of `epoch`.
    Synced { node: NodeId, epoch: u64 },
    /// Verify's findings: marks snapshots damaged (`Some`) or whole again (`None`).
    /// Snapshots that no longer exist are left out.
    SetDamage(Vec<(SnapshotId, Option<SnapshotDamage>)>),
    /// Records several snapshots in one entry (concurrent commits grouped by the node, so
    /// they share one log append and one apply); they get consecutive ids in this order.
    /// A record with the agent's commit key is added once per key: a key already recorded
    /// answers with the snapshot that key made.
    CommitSnapshots(Vec<(Option<CommitKey>, SnapshotRecord)>),
    /// Records a snapshot once per `key`: a retry of a commit whose outcome the agent did
    /// not learn returns the snapshot the first attempt made instead of adding another.
    CommitSnapshotOnce {
        key: CommitKey,
        record: SnapshotRecord,
    },
}

/// The agent's idempotency key of one backup's commit.
pub type CommitKey = [u8; 16];

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Entries without a command (blank, membership).
    #[default]
    Nothing,
    Initialized,
    Committed(SnapshotId),
    Rejected(String),
    /// The map now has this epoch.
    MapEpoch(u64),
    /// This many snapshots had their damage mark set or cleared.
    DamageMarked(u64),
    /// The ids of a `CommitSnapshots`, in order.
    CommittedMany(Vec<SnapshotId>),
}

/// What an applied command changed, for the state machine to persist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Config,
    Snapshot(SnapshotId),
    /// The map history (older maps, sync reports) changed.
    History,
    /// A snapshot was added under a commit key.
    KeyedSnapshot(SnapshotId, CommitKey),
    /// These snapshots' damage marks changed.
    Damage(Vec<SnapshotId>),
    /// These snapshots were added, each with the commit key it was added under.
    Snapshots(Vec<(SnapshotId, Option<CommitKey>)>),
}

/// Who is calling, as established by the auth layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Admin,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub config: Option<ClusterConfig>,
    pub snapshots: BTreeMap<SnapshotId, SnapshotRecord>,
    pub history: MapHistory,
    /// Commit keys and the snapshots they made. Not in the catalog's own encoding: Raft
    /// snapshots carry them beside it (`raft::state_machine`), so payloads written before
    /// commit keys existed still decode.
    #[serde(skip)]
    pub commit_keys: BTreeMap<CommitKey, SnapshotId>,
}

/// Which snapshots a page of `ListSnapshots` holds, before the caller's visibility.
#[derive(Clone, Debug, Default)]
pub struct SnapshotQuery {
    /// Empty: any.
    pub client: String,
    /// Empty: any.
    pub dataset: String,
    pub kind: Option<SnapshotKind>,
    pub undamaged_only: bool,
    pub newest_first: bool,
    /// 0: from the start; else the last id of the previous page (exclusive).
    pub cursor: u64,
}

impl SnapshotQuery {
    fn matches(&self, s: &SnapshotRecord) -> bool {
        (self.client.is_empty() || s.client == self.client)
            && (self.dataset.is_empty() || s.dataset == self.dataset)
            && self.kind.is_none_or(|k| s.kind == k)
            && !(self.undamaged_only && s.damage.is_some())
    }
}

impl Catalog {
    /// The snapshots `q` selects, in its order, starting after its cursor: a range of the
    /// ordered map read lazily, so a page costs what it returns (plus what the filters skip),
    /// never a pass over the whole catalog.
    pub fn query<'a>(
        &'a self,
        q: &'a SnapshotQuery,
    ) -> Box<dyn Iterator<Item = &'a SnapshotRecord> + 'a> {
        let records: Box<dyn Iterator<Item = &SnapshotRecord>> = match (q.newest_first, q.cursor) {
            (false, c) => Box::new(
                self.snapshots
                    .range(SnapshotId(c.saturating_add(1))..)
                    .map(|(_, s)| s),
            ),
            (true, 0) => Box::new(self.snapshots.values().rev()),
            (true, c) => Box::new(self.snapshots.range(..SnapshotId(c)).rev().map(|(_, s)| s)),
        };
        Box::new(records.filter(move |s| q.matches(s)))
    }

    /// Applies the command at log `index`. Deterministic: every replica gets the same result.
    pub fn apply(&mut self, index: u64, command: Command) -> (CommandResult, Option<Change>) {
        match command {
            Command::Init(config) => {
                if self.config.is_some() {
                    return (
                        CommandResult::Rejected("cluster already initialized".into()),
                        None,
                    );
                }
                self.config = Some(config);
                (CommandResult::Initialized, Some(Change::Config))
            }
            Command::CommitSnapshot(record) => {
                if self.config.is_none() {
                    return (
                        CommandResult::Rejected("cluster not initialized".into()),
                        None,
                    );
                }
                let id = self.add_snapshot(index, record);
                (CommandResult::Committed(id), Some(Change::Snapshot(id)))
            }
            Command::CommitSnapshotOnce { key, record } => {
                if let Some(&id) = self.commit_keys.get(&key) {
                    return (CommandResult::Committed(id), None);
                }
                if self.config.is_none() {
                    return (
                        CommandResult::Rejected("cluster not initialized".into()),
                        None,
                    );
                }
                let id = self.add_snapshot(index, record);
                self.commit_keys.insert(key, id);
                (
                    CommandResult::Committed(id),
                    Some(Change::KeyedSnapshot(id, key)),
                )
            }
            Command::CommitSnapshots(records) => {
                if self.config.is_none() {
                    return (
                        CommandResult::Rejected("cluster not initialized".into()),
                        None,
                    );
                }
                let mut ids = Vec::with_capacity(records.len());
                let mut added = Vec::with_capacity(records.len());
                for (key, record) in records {
                    if let Some(&id) = key.as_ref().and_then(|k| self.commit_keys.get(k)) {
                        ids.push(id);
                        continue;
                    }
                    let id = self.add_snapshot(index, record);
                    if let Some(k) = key {
                        self.commit_keys.insert(k, id);
                    }
                    ids.push(id);
                    added.push((id, key));
                }
                let change = (!added.is_empty()).then_some(Change::Snapshots(added));
                (CommandResult::CommittedMany(ids), change)
            }
            Command::ChangeMap(change) => {
                let Some(config) = self.config.as_mut() else {
                    return (
                        CommandResult::Rejected("cluster not initialized".into()),
                        None,
                    );
                };
                match apply_change(&config.map, &change) {
                    Ok(next) => {
                        let previous = std::mem::replace(&mut config.map, next);
                        self.history.changed(&previous, &config.map);
                        (
                            CommandResult::MapEpoch(config.map.epoch),
                            Some(Change::Config),
                        )
                    }
                    Err(e) => (CommandResult::Rejected(e.to_string()), None),
                }
            }
            Command::Synced { node, epoch } => {
                let Some(config) = self.config.as_ref() else {
                    return (
                        CommandResult::Rejected("cluster not initialized".into()),
                        None,
                    );
                };
                self.history.report_synced(node, epoch, &config.map);
                (
                    CommandResult::MapEpoch(config.map.epoch),
                    Some(Change::History),
                )
            }
            Command::SetDamage(marks) => {
                let mut changed = Vec::new();
                for (id, mark) in marks {
                    if let Some(record) = self.snapshots.get_mut(&id) {
                        record.damage = mark;
                        changed.push(id);
                    }
                }
                (
                    CommandResult::DamageMarked(changed.len() as u64),
                    Some(Change::Damage(changed)),
                )
            }
        }
    }

    /// Adds a committed record. Its id is the log index of the entry that committed it, or,
    /// when that entry commits several, the next id after the highest so far: ids grow with
    /// the log and are never shared. (A future `forget` must keep the high-water mark, so a
    /// removed newest id is not handed out again.)
    fn add_snapshot(&mut self, index: u64, mut record: SnapshotRecord) -> SnapshotId {
        let next = self
            .snapshots
            .last_key_value()
            .map_or(0, |(id, _)| id.0 + 1);
        let id = SnapshotId(index.max(next));
        record.id = id;
        record.damage = None;
        self.snapshots.insert(id, record);
        id
    }

    /// The principal holding `token`, if any.
    pub fn authenticate(&self, token: &TokenHash) -> Option<Principal> {
        let config = self.config.as_ref()?;
        (config.admin_token == *token).then_some(Principal::Admin)
    }
}

#[cfg(test)]
mod tests {
    use hashgrid_proto::manifest::ObjectRef;
    use hashgrid_proto::snapshot::{SnapshotKind, SnapshotStats};
    use hashgrid_proto::ChunkId;

    use super::*;

    fn config() -> ClusterConfig {
        ClusterConfig {
            map: ClusterMap::single(1, "127.0.0.1:1".into()),
            chunker: ChunkerParams::DEFAULT,
            admin_token: TokenHash::of("secret"),
            created_unix_ms: 0,
        }
    }

    fn record() -> SnapshotRecord {
        SnapshotRecord {
            id: SnapshotId(0),
            client: "c".into(),
            dataset: "d".into(),
            kind: SnapshotKind::Files,
            time_unix_ms: 1,
            root: ObjectRef(vec![ChunkId::of(b"root")]),
            stats: SnapshotStats::default(),
            tags: vec![],
            parent: None,
            hostname: "h".into(),
            paths: vec![],
            manifest_version: 1,
            damage: None,
        }
    }

    #[test]
    fn commit_before_init_is_rejected() {
        let mut c = Catalog::default();
        let (res, change) = c.apply(3, Command::CommitSnapshot(record()));
        assert!(matches!(res, CommandResult::Rejected(_)));
        assert_eq!(change, None);
    }

    #[test]
    fn snapshot_id_is_the_log_index() {
        let mut c = Catalog::default();
        assert_eq!(
            c.apply(1, Command::Init(config())).0,
            CommandResult::Initialized
        );
        let (res, change) = c.apply(7, Command::CommitSnapshot(record()));
        assert_eq!(res, CommandResult::Committed(SnapshotId(7)));
        assert_eq!(change, Some(Change::Snapshot(SnapshotId(7))));
        assert_eq!(c.snapshots[&SnapshotId(7)].id, SnapshotId(7));
    }

    #[test]
    fn a_commit_retried_with_its_key_returns_the_first_snapshot() {
        let mut c = Catalog::default();
        c.apply(1, Command::Init(config()));
        let key = [7u8; 16];
        let once = |record| Command::CommitSnapshotOnce { key, record };
        let (res, change) = c.apply(5, once(record()));
        assert_eq!(res, CommandResult::Committed(SnapshotId(5)));
        assert_eq!(change, Some(Change::KeyedSnapshot(SnapshotId(5), key)));
        let (res, change) = c.apply(9, once(record()));
        assert_eq!(res, CommandResult::Committed(SnapshotId(5)));
        assert_eq!(change, None);
        assert_eq!(c.snapshots.len(), 1);
        let (res, _) = c.apply(
            11,
            Command::CommitSnapshotOnce {
                key: [8u8; 16],
                record: record(),
            },
        );
        assert_eq!(res, CommandResult::Committed(SnapshotId(11)));
        assert_eq!(c.snapshots.len(), 2);
    }

    #[test]
    fn grouped_commits_get_consecutive_ids_never_reused() {
        let mut c = Catalog::default();
        c.apply(1, Command::Init(config()));
        let (res, change) = c.apply(
            5,
            Command::CommitSnapshots(vec![
                (None, record()),
                (Some([1; 16]), record()),
                (None, record()),
                (Some([1; 16]), record()),
            ]),
        );
        // The second record under key 1 is the first one's retry: it gets the same id.
        let ids = vec![SnapshotId(5), SnapshotId(6), SnapshotId(7), SnapshotId(6)];
        assert_eq!(res, CommandResult::CommittedMany(ids));
        let added = vec![
            (SnapshotId(5), None),
            (SnapshotId(6), Some([1; 16])),
            (SnapshotId(7), None),
        ];
        assert_eq!(change, Some(Change::Snapshots(added)));
        // The next entry's index (6) is already taken: the next free id is used.
        assert_eq!(
            c.apply(6, Command::CommitSnapshot(record())).0,
            CommandResult::Committed(SnapshotId(8))
        );
        assert_eq!(
            c.apply(20, Command::CommitSnapshot(record())).0,
            CommandResult::Committed(SnapshotId(20))
        );
    }

    #[test]
    fn damage_marks_are_set_and_cleared() {
        let mut c = Catalog::default();
        c.apply(1, Command::Init(config()));
        c.apply(2, Command::CommitSnapshot(record()));
        let mark = SnapshotDamage {
            missing_chunks: 3,
            examples: vec![ChunkId::of(b"x")],
            found_unix_ms: 9,
        };
        let (res, change) = c.apply(
            3,
            Command::SetDamage(vec![
                (SnapshotId(2), Some(mark.clone())),
                (SnapshotId(77), Some(mark.clone())),
            ]),
        );
        assert_eq!(res, CommandResult::DamageMarked(1));
        assert_eq!(change, Some(Change::Damage(vec![SnapshotId(2)])));
        assert_eq!(c.snapshots[&SnapshotId(2)].damage, Some(mark));
        c.apply(4, Command::SetDamage(vec![(SnapshotId(2), None)]));
        assert_eq!(c.snapshots[&SnapshotId(2)].damage, None);
    }

    #[test]
    fn queries_page_in_either_order_with_filters() {
        let mut c = Catalog::default();
        c.apply(1, Command::Init(config()));
        for i in 2..12 {
            let mut r = record();
            r.dataset = if i % 2 == 0 { "even" } else { "odd" }.into();
            c.apply(i, Command::CommitSnapshot(r));
        }
        c.apply(
            20,
            Command::SetDamage(vec![(SnapshotId(10), Some(SnapshotDamage::default()))]),
        );
        let ids = |q: &SnapshotQuery| c.query(q).map(|s| s.id.0).collect::<Vec<_>>();
        let mut q = SnapshotQuery {
            dataset: "even".into(),
            ..Default::default()
        };
        assert_eq!(ids(&q), vec![2, 4, 6, 8, 10]);
        q.cursor = 4;
        assert_eq!(ids(&q), vec![6, 8, 10]);
        q.newest_first = true;
        assert_eq!(ids(&q), vec![2]);
        q.cursor = 0;
        q.undamaged_only = true;
        assert_eq!(ids(&q), vec![8, 6, 4, 2]);
        q.kind = Some(SnapshotKind::Image);
        assert_eq!(ids(&q), Vec::<u64>::new());
    }

    #[test]
    fn init_happens_once() {
        let mut c = Catalog::default();
        c.apply(1, Command::Init(config()));
        let mut other = config();
        other.admin_token = TokenHash::of("attacker");
        assert!(matches!(
            c.apply(2, Command::Init(other)).0,
            CommandResult::Rejected(_)
        ));
        assert_eq!(
            c.authenticate(&TokenHash::of("secret")),
            Some(Principal::Admin)
        );
        assert_eq!(c.authenticate(&TokenHash::of("attacker")), None);
    }
}

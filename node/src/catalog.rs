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
use hashgrid_proto::snapshot::SnapshotRecord;
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
    /// Commit keys and the snapshots they made.
    pub commit_keys: BTreeMap<CommitKey, SnapshotId>,
}

impl Catalog {
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
            Command::CommitSnapshot(record) => match self.add_snapshot(index, record) {
                Ok(id) => (CommandResult::Committed(id), Some(Change::Snapshot(id))),
                Err(rejected) => (rejected, None),
            },
            Command::CommitSnapshotOnce { key, record } => {
                if let Some(&id) = self.commit_keys.get(&key) {
                    return (CommandResult::Committed(id), None);
                }
                match self.add_snapshot(index, record) {
                    Ok(id) => {
                        self.commit_keys.insert(key, id);
                        (
                            CommandResult::Committed(id),
                            Some(Change::KeyedSnapshot(id, key)),
                        )
                    }
                    Err(rejected) => (rejected, None),
                }
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
        }
    }

    /// Adds a snapshot record with the id `index` (its log index).
    fn add_snapshot(
        &mut self,
        index: u64,
        mut record: SnapshotRecord,
    ) -> Result<SnapshotId, CommandResult> {
        if self.config.is_none() {
            return Err(CommandResult::Rejected("cluster not initialized".into()));
        }
        let id = SnapshotId(index);
        record.id = id;
        self.snapshots.insert(id, record);
        Ok(id)
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

//! openraft's own storage test suite, run against our RocksDB log store and state machine.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tempfile::TempDir;

use super::{open_db, LogStore, NodeId, StateMachine, TypeConfig};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = TempDir::new().expect("temp dir");
        let db = open_db(dir.path()).expect("open raft db");
        let sm = StateMachine::open(db.clone())?;
        Ok((dir, LogStore::new(db), sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(RocksBuilder)
}

#[test]
fn catalog_survives_reopen() {
    use hashgrid_proto::auth::TokenHash;
    use hashgrid_proto::chunker::ChunkerParams;
    use hashgrid_proto::placement::ClusterMap;
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    use crate::catalog::{ClusterConfig, Command};

    let dir = TempDir::new().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let entry = |index, command| Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(command),
    };
    rt.block_on(async {
        let db = open_db(dir.path()).unwrap();
        let mut sm = StateMachine::open(db).unwrap();
        sm.apply([entry(
            1,
            Command::Init(ClusterConfig {
                map: ClusterMap::single(1, "a:1".into()),
                chunker: ChunkerParams::DEFAULT,
                admin_token: TokenHash::of("t"),
                created_unix_ms: 0,
            }),
        )])
        .await
        .unwrap();
    });
    rt.block_on(async {
        let db = open_db(dir.path()).unwrap();
        let mut sm = StateMachine::open(db).unwrap();
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.unwrap().index, 1);
        assert!(sm.catalog().read().unwrap().config.is_some());
    });
}

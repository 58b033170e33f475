//! Group commit for snapshots. Every catalog write is a Raft entry, and every entry costs a
//! synced log append and a synced apply (a few milliseconds each on ordinary disks), so
//! commits one entry each top out at a few hundred per second however many agents wait.
//! Commits that arrive while one is being written wait here and go together as one
//! `Command::CommitSnapshots` entry, so the rate grows with the number of concurrent commits.
//! A lone commit is written at once, as before. Each commit keeps the agent's commit key, so
//! a retried commit returns its first snapshot whether or not it was grouped.

use std::sync::Arc;

use hashgrid_proto::snapshot::SnapshotRecord;
use hashgrid_proto::SnapshotId;
use tokio::sync::{mpsc, oneshot};

use crate::catalog::{Command, CommandResult, CommitKey};
use crate::context::NodeContext;
use crate::error::NodeError;

/// Most snapshots in one entry, and (roughly) most bytes of records: an entry is replicated
/// to every catalog member in one message.
const MAX_GROUP: usize = 512;
const MAX_GROUP_BYTES: usize = 4 << 20;
/// Commits waiting for their turn at most; more wait in the RPC.
const QUEUE: usize = 4096;

struct Waiting {
    key: Option<CommitKey>,
    record: SnapshotRecord,
    reply: oneshot::Sender<Result<SnapshotId, NodeError>>,
}

/// The queue the catalog service commits through; one writer task per node.
#[derive(Clone)]
pub struct CommitQueue {
    tx: mpsc::Sender<Waiting>,
}

impl CommitQueue {
    /// Starts the writer task (call from within the runtime).
    pub fn start(ctx: Arc<NodeContext>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_groups(ctx, rx));
        CommitQueue { tx }
    }

    /// Commits `record` (already checked), once per `key` when given, and returns its id.
    pub async fn commit(
        &self,
        key: Option<CommitKey>,
        record: SnapshotRecord,
    ) -> Result<SnapshotId, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Waiting { key, record, reply })
            .await
            .map_err(|_| NodeError::Unavailable("the node is shutting down".into()))?;
        answer
            .await
            .map_err(|_| NodeError::Unavailable("the node is shutting down".into()))?
    }
}

/// Approximate encoded size of a record, for the group bound.
fn size_of(r: &SnapshotRecord) -> usize {
    256 + r.root.0.len() * 32
        + r.paths.iter().map(Vec::len).sum::<usize>()
        + r.tags.iter().map(String::len).sum::<usize>()
        + r.hostname.len()
}

/// The same error for every waiter of a failed group.
fn copy_err(e: &NodeError) -> NodeError {
    match e {
        NodeError::NotReady => NodeError::NotReady,
        NodeError::Unavailable(s) => NodeError::Unavailable(s.clone()),
        NodeError::Rejected(s) => NodeError::Rejected(s.clone()),
        NodeError::Precondition(s) => NodeError::Precondition(s.clone()),
        other => NodeError::Internal(other.to_string()),
    }
}

async fn write_groups(ctx: Arc<NodeContext>, mut rx: mpsc::Receiver<Waiting>) {
    while let Some(first) = rx.recv().await {
        let mut bytes = size_of(&first.record);
        let mut group = vec![first];
        while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(w) => {
                    bytes += size_of(&w.record);
                    group.push(w);
                }
                Err(_) => break,
            }
        }
        let (records, replies): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|w| ((w.key, w.record), w.reply))
            .unzip();
        let command = match <[(Option<CommitKey>, SnapshotRecord); 1]>::try_from(records) {
            Ok([(None, one)]) => Command::CommitSnapshot(one),
            Ok([(Some(key), record)]) => Command::CommitSnapshotOnce { key, record },
            Err(many) => Command::CommitSnapshots(many),
        };
        let outcome: Vec<Result<SnapshotId, NodeError>> = match ctx.write(command).await {
            Ok(CommandResult::Committed(id)) => vec![Ok(id)],
            Ok(CommandResult::CommittedMany(ids)) => ids.into_iter().map(Ok).collect(),
            Ok(CommandResult::Rejected(reason)) => replies
                .iter()
                .map(|_| Err(NodeError::Precondition(reason.clone())))
                .collect(),
            Ok(other) => replies
                .iter()
                .map(|_| {
                    Err(NodeError::Internal(format!(
                        "unexpected commit result {other:?}"
                    )))
                })
                .collect(),
            Err(e) => replies.iter().map(|_| Err(copy_err(&e))).collect(),
        };
        if outcome.len() != replies.len() {
            tracing::error!(
                sent = replies.len(),
                got = outcome.len(),
                "the catalog answered a group commit with the wrong number of ids"
            );
        }
        for (reply, result) in replies.into_iter().zip(outcome) {
            // A waiter that went away (its RPC was cancelled) still has its snapshot.
            let _ = reply.send(result);
        }
    }
}

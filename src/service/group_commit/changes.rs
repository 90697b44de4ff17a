//! Status changes committed in groups: the writers and what they are given.

use super::{next_batch, Queues};
use crate::domain::{Change, EventSource};
use crate::storage::{Commit, DecidedOn, OutboxEntry, StorageError, Store};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A status change to commit, owned so it can wait in the writer's queue.
#[derive(Debug, Clone)]
pub struct OwnedCommit {
    pub id: String,
    pub expected_version: i64,
    pub change: Change,
    pub source: EventSource,
    pub now_ms: i64,
    pub poll_due_at_ms: Option<i64>,
    pub outbox: Option<OutboxEntry>,
    pub archive: bool,
    pub upstream_payload: Option<String>,
    pub leaves_pending: bool,
    /// The change frees units that waiting work can use: its batch commits without waiting to
    /// fill, since every millisecond until the commit is a paid unit idle.
    pub urgent: bool,
    /// The task as read when the change was decided (`Commit::decided_on`).
    pub decided_on: Option<DecidedOn>,
}

impl OwnedCommit {
    fn as_commit(&self) -> Commit<'_> {
        Commit {
            id: &self.id,
            expected_version: self.expected_version,
            change: &self.change,
            source: self.source,
            now_ms: self.now_ms,
            poll_due_at_ms: self.poll_due_at_ms,
            outbox: self.outbox.as_ref(),
            archive: self.archive,
            upstream_payload: self.upstream_payload.as_deref(),
            leaves_pending: self.leaves_pending,
            decided_on: self.decided_on.as_ref(),
        }
    }
}

struct Job {
    commit: OwnedCommit,
    reply: oneshot::Sender<Result<bool, StorageError>>,
}

/// The queues to the writers.
pub struct GroupCommit {
    queues: Queues<Job>,
}

impl GroupCommit {
    /// Starts `writers` writers, each on its own queue (SQLite has one writer at a time anyway;
    /// on Postgres several batches commit at once, each waiting on its own round trips).
    /// `max_batch` 1 commits every change alone (no grouping).
    pub fn start(
        store: Store,
        writers: usize,
        max_batch: usize,
        max_wait: Duration,
    ) -> GroupCommit {
        let max_batch = max_batch.max(1);
        GroupCommit {
            queues: Queues::start(writers, max_batch, "commit writer", |rx| {
                writer(store.clone(), rx, max_batch, max_wait)
            }),
        }
    }

    /// Commits `c` with whatever else is queued; true when its compare-and-set won.
    pub async fn commit(&self, c: OwnedCommit) -> Result<bool, StorageError> {
        let queue = self.queues.pick(&c.id);
        self.queues
            .ask(queue, |reply| Job { commit: c, reply })
            .await
    }
}

async fn writer(store: Store, mut rx: mpsc::Receiver<Job>, max_batch: usize, max_wait: Duration) {
    while let Some(batch) = next_batch(&mut rx, max_batch, max_wait, |j| j.commit.urgent).await {
        metrics::histogram!("klr_group_commit_batch_size").record(batch.len() as f64);
        let commits: Vec<Commit<'_>> = batch.iter().map(|j| j.commit.as_commit()).collect();
        let result = store.commit_changes(&commits).await;
        drop(commits);
        match result {
            Ok(won) => {
                for (job, won) in batch.into_iter().zip(won) {
                    let _ = job.reply.send(Ok(won));
                }
            }
            Err(e) if batch.len() > 1 => {
                // One change the database refuses (a constraint, say) must not fail the others:
                // each is tried alone, and only what fails alone fails.
                tracing::warn!(error = %e, changes = batch.len(), "a batch of status changes was not stored; committing each alone");
                for job in batch {
                    let alone = store.commit_change(&job.commit.as_commit()).await;
                    let _ = job.reply.send(alone);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "a status change was not stored");
                if let Some(job) = batch.into_iter().next() {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
    }
}

//! Group commit: status changes from callbacks, polls and dispatch are queued to one writer that
//! commits many in one transaction, so concurrent changes share one flush instead of waiting for
//! one each. Each change is still its own compare-and-set (see `Store::commit_changes`), and
//! each caller is answered only after the transaction holding its change has committed. A batch
//! the database refuses stores nothing; its changes are then committed one by one, so only a
//! change that fails alone fails its caller.
//!
//! The writer takes whatever is queued when it is free (so a lone change waits for nothing),
//! and, once several are queued, up to `max_wait` more for the batch to fill to `max_batch`.

use crate::domain::{Change, EventSource};
use crate::storage::{Commit, OutboxEntry, StorageError, Store};
use std::sync::Arc;
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
        }
    }
}

struct Job {
    commit: OwnedCommit,
    reply: oneshot::Sender<Result<bool, StorageError>>,
}

/// The queue to the writer; the writer stops when this is dropped.
pub struct GroupCommit {
    queue: mpsc::Sender<Job>,
}

impl GroupCommit {
    /// Starts `writers` writers on one queue (SQLite has one writer at a time anyway; on
    /// Postgres several batches commit at once, since a batch costs a round trip per statement).
    /// `max_batch` 1 commits every change alone (no grouping).
    pub fn start(
        store: Store,
        writers: usize,
        max_batch: usize,
        max_wait: Duration,
    ) -> GroupCommit {
        let max_batch = max_batch.max(1);
        let (queue, rx) = mpsc::channel(max_batch * 4);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(store.clone(), rx.clone(), max_batch, max_wait));
        }
        GroupCommit { queue }
    }

    /// Commits `c` with whatever else is queued; true when its compare-and-set won.
    pub async fn commit(&self, c: OwnedCommit) -> Result<bool, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { commit: c, reply })
            .await
            .map_err(|_| StorageError::Batch("the commit writer has stopped".into()))?;
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(StorageError::Batch(
                "the commit writer stopped before answering".into(),
            )),
        }
    }
}

/// Takes the next batch from the queue: what is there now, and once several are, up to
/// `max_wait` more. None when the queue is closed.
async fn next_batch(
    rx: &tokio::sync::Mutex<mpsc::Receiver<Job>>,
    max_batch: usize,
    max_wait: Duration,
) -> Option<Vec<Job>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < max_batch {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    if batch.len() > 1 && batch.len() < max_batch && !max_wait.is_zero() {
        // Under load: let the batch fill a little more.
        let deadline = tokio::time::Instant::now() + max_wait;
        while batch.len() < max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => batch.push(job),
                _ => break,
            }
        }
    }
    Some(batch)
}

async fn writer(
    store: Store,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    max_batch: usize,
    max_wait: Duration,
) {
    while let Some(batch) = next_batch(&rx, max_batch, max_wait).await {
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

//! Group commit: status changes from callbacks, polls and dispatch are queued to one writer that
//! commits many in one transaction, so concurrent changes share one flush instead of waiting for
//! one each. Each change is still its own compare-and-set (see `Store::commit_changes`), and
//! each caller is answered only after the transaction holding its change has committed. A batch
//! the database refuses stores nothing; its changes are then committed one by one, so only a
//! change that fails alone fails its caller.
//!
//! The writer takes whatever is queued when it is free (so a lone change waits for nothing),
//! and, once several are queued, up to `max_wait` more for the batch to fill to `max_batch`,
//! unless a change in it is urgent (it frees units that waiting work can use).
//! With several writers (Postgres), a task's changes always go to the same one, chosen by the
//! task's usage shard, so two batches committing at once never hold the same task nor the same
//! usage aggregate row.
//!
//! The read a change is decided on is grouped the same way (`GroupRead`): one query for the
//! tasks of whatever reads are queued, so a callback costs no round trip of its own.

use crate::domain::{Change, EventSource, Task};
use crate::storage::{Commit, InsertOutcome, NewTask, OutboxEntry, StorageError, Store};
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

/// Queues to workers that each serve theirs in batches; a worker stops when its queue is
/// dropped. A job about a task goes to the queue its usage shard picks, so one task's jobs always
/// meet the same worker.
pub(super) struct Queues<J> {
    senders: Vec<mpsc::Sender<J>>,
    /// What the worker is, for the error when it is gone ("commit writer").
    worker: &'static str,
}

impl<J: Send + 'static> Queues<J> {
    /// `workers` queues of `max_batch * 4` jobs, each served by `serve` on its own task.
    pub(super) fn start<F, Fut>(
        workers: usize,
        max_batch: usize,
        worker: &'static str,
        mut serve: F,
    ) -> Self
    where
        F: FnMut(mpsc::Receiver<J>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let senders = (0..workers.max(1))
            .map(|_| {
                let (queue, rx) = mpsc::channel(max_batch.max(1) * 4);
                tokio::spawn(serve(rx));
                queue
            })
            .collect();
        Queues { senders, worker }
    }

    /// The queue for jobs about task `id`.
    pub(super) fn pick(&self, id: &str) -> usize {
        crate::storage::usage_shard(id) as usize % self.senders.len()
    }

    /// Queues on `queue` (see `pick`) the job `make` builds around its reply channel, and
    /// waits for the answer.
    pub(super) async fn ask<R>(
        &self,
        queue: usize,
        make: impl FnOnce(oneshot::Sender<Result<R, StorageError>>) -> J,
    ) -> Result<R, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.senders[queue]
            .send(make(reply))
            .await
            .map_err(|_| StorageError::Batch(format!("the {} has stopped", self.worker)))?;
        answer.await.unwrap_or_else(|_| {
            Err(StorageError::Batch(format!(
                "the {} stopped before answering",
                self.worker
            )))
        })
    }
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

/// Takes the next batch from the queue: what is there now, and once several are, up to
/// `max_wait` more unless a job in it is `urgent`. None when the queue is closed.
pub(super) async fn next_batch<J>(
    rx: &mut mpsc::Receiver<J>,
    max_batch: usize,
    max_wait: Duration,
    urgent: impl Fn(&J) -> bool,
) -> Option<Vec<J>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < max_batch {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    if batch.len() > 1
        && batch.len() < max_batch
        && !max_wait.is_zero()
        && !batch.iter().any(&urgent)
    {
        // Under load: let the batch fill a little more.
        let deadline = tokio::time::Instant::now() + max_wait;
        while batch.len() < max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => {
                    let now = urgent(&job);
                    batch.push(job);
                    if now {
                        break;
                    }
                }
                _ => break,
            }
        }
    }
    Some(batch)
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

struct ReadJob {
    id: String,
    reply: oneshot::Sender<Result<Option<Task>, StorageError>>,
}

/// Reads of single tasks, grouped: each reader takes whatever is queued (a lone read waits for
/// nothing) and reads those tasks in one query.
pub struct GroupRead {
    queues: Queues<ReadJob>,
}

impl GroupRead {
    pub fn start(store: Store, readers: usize, max_batch: usize) -> GroupRead {
        let max_batch = max_batch.max(1);
        GroupRead {
            queues: Queues::start(readers, max_batch, "task reader", |rx| {
                reader(store.clone(), rx, max_batch)
            }),
        }
    }

    /// The task as stored now (read with whatever other reads are queued).
    pub async fn get(&self, id: &str) -> Result<Option<Task>, StorageError> {
        self.queues
            .ask(self.queues.pick(id), |reply| ReadJob {
                id: id.to_owned(),
                reply,
            })
            .await
    }
}

async fn reader(store: Store, mut rx: mpsc::Receiver<ReadJob>, max_batch: usize) {
    while let Some(batch) = next_batch(&mut rx, max_batch, Duration::ZERO, |_| false).await {
        let ids: Vec<&str> = batch.iter().map(|j| j.id.as_str()).collect();
        match store.get_tasks(&ids).await {
            Ok(tasks) => {
                let by_id: std::collections::HashMap<&str, &Result<Task, StorageError>> =
                    tasks.iter().map(|(id, t)| (id.as_str(), t)).collect();
                for job in batch {
                    let answer = match by_id.get(job.id.as_str()) {
                        None => Ok(None),
                        Some(Ok(task)) => Ok(Some(task.clone())),
                        Some(Err(StorageError::Corrupt(m))) => {
                            Err(StorageError::Corrupt(m.clone()))
                        }
                        Some(Err(e)) => Err(StorageError::Batch(e.to_string())),
                    };
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, reads = batch.len(), "a group of task reads failed");
                let message = e.to_string();
                let mut batch = batch.into_iter();
                if let Some(first) = batch.next() {
                    let _ = first.reply.send(Err(e));
                }
                for job in batch {
                    let _ = job.reply.send(Err(StorageError::Batch(message.clone())));
                }
            }
        }
    }
}

struct InsertJob {
    task: NewTask,
    reply: oneshot::Sender<Result<InsertOutcome, StorageError>>,
}

/// New tasks, grouped: one writer stores whatever submits are queued in one transaction
/// (`Store::insert_tasks`), each still checked on its own, and answers each only after that
/// transaction committed. A batch the database refuses is stored one task at a time, so only
/// a task that fails alone fails its caller.
pub struct GroupInsert {
    queues: Queues<InsertJob>,
}

/// Submits taken before the first statistics refresh; each refresh doubles it.
const FIRST_STATISTICS_REFRESH: u64 = 1000;

/// Most tasks in one insert batch, whatever `database.group_commit_max_batch` says: the batch's
/// largest statement binds 28 values per task on Postgres (at most 65,535 in all) and 15 on
/// SQLite (at most 32,766). A larger batch would be refused whole and stored task by task.
pub const MAX_TASKS_PER_BATCH: usize = 1024;

impl GroupInsert {
    pub fn start(store: Store, max_batch: usize, max_wait: Duration) -> GroupInsert {
        Self::start_refreshing_statistics_after(
            store,
            max_batch,
            max_wait,
            FIRST_STATISTICS_REFRESH,
        )
    }

    /// `start`, refreshing the planner's statistics (`Store::refresh_task_statistics`) once
    /// it has taken `first` submits, then at every doubling: a table growing fast from small is
    /// planned on fresh counts, at a cost that fades as it grows.
    pub fn start_refreshing_statistics_after(
        store: Store,
        max_batch: usize,
        max_wait: Duration,
        first: u64,
    ) -> GroupInsert {
        let max_batch = max_batch.clamp(1, MAX_TASKS_PER_BATCH);
        GroupInsert {
            queues: Queues::start(1, max_batch, "task writer", |rx| {
                inserter(store.clone(), rx, max_batch, max_wait, first)
            }),
        }
    }

    pub async fn insert(&self, task: NewTask) -> Result<InsertOutcome, StorageError> {
        // One writer: submits are serialised by the submit lock anyway.
        self.queues.ask(0, |reply| InsertJob { task, reply }).await
    }
}

async fn inserter(
    store: Store,
    mut rx: mpsc::Receiver<InsertJob>,
    max_batch: usize,
    max_wait: Duration,
    first_refresh: u64,
) {
    let mut taken: u64 = 0;
    let mut next_refresh = first_refresh.max(1);
    while let Some(batch) = next_batch(&mut rx, max_batch, max_wait, |_| false).await {
        taken += batch.len() as u64;
        if taken >= next_refresh {
            next_refresh = next_refresh.saturating_mul(2);
            // Beside the intake, not in it: no submit waits for the sample.
            let store = store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.refresh_task_statistics().await {
                    tracing::warn!(error = %e, "the planner's statistics of tasks were not refreshed");
                }
            });
        }
        // A task with large images (Base64) is stored alone, so no batch holds several.
        let (large, small): (Vec<InsertJob>, Vec<InsertJob>) =
            batch.into_iter().partition(|j| j.task.is_large());
        for group in large
            .into_iter()
            .map(|j| vec![j])
            .chain(std::iter::once(small))
        {
            if !group.is_empty() {
                insert_group(&store, group).await;
            }
        }
    }
}

async fn insert_group(store: &Store, group: Vec<InsertJob>) {
    let (mut tasks, replies): (Vec<NewTask>, Vec<_>) =
        group.into_iter().map(|j| (j.task, j.reply)).unzip();
    match store.insert_tasks(&mut tasks).await {
        Ok(outcomes) if outcomes.len() == replies.len() => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(e) if tasks.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        other => {
            if let Err(e) = &other {
                tracing::warn!(error = %e, tasks = tasks.len(), "a batch of new tasks was not stored; storing each alone");
            }
            for (task, reply) in tasks.iter_mut().zip(replies) {
                let _ = reply.send(store.insert_one(task).await);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::next_batch;
    use std::time::{Duration, Instant};
    use tokio::sync::mpsc;

    /// Jobs are (id, urgent).
    async fn batch_of(jobs: &[(u32, bool)], max_wait: Duration) -> (Vec<u32>, Duration) {
        let (tx, mut rx) = mpsc::channel(16);
        for j in jobs {
            tx.send(*j).await.expect("queued");
        }
        let started = Instant::now();
        let batch = tokio::time::timeout(
            Duration::from_secs(10),
            next_batch(&mut rx, 8, max_wait, |j: &(u32, bool)| j.1),
        )
        .await
        .expect("the batch is taken without waiting out max_wait")
        .expect("a batch");
        (batch.iter().map(|j| j.0).collect(), started.elapsed())
    }

    #[tokio::test]
    async fn several_queued_wait_for_the_batch_to_fill_unless_one_is_urgent() {
        let (ids, waited) = batch_of(&[(1, false), (2, false)], Duration::from_millis(300)).await;
        assert_eq!(ids, [1, 2]);
        assert!(waited >= Duration::from_millis(300), "waited {waited:?}");

        // An urgent job ends the wait before it starts.
        let (ids, _) = batch_of(
            &[(1, false), (2, true), (3, false)],
            Duration::from_secs(3600),
        )
        .await;
        assert_eq!(ids, [1, 2, 3]);

        // A lone job waits for nothing.
        let (ids, _) = batch_of(&[(1, false)], Duration::from_secs(3600)).await;
        assert_eq!(ids, [1]);
    }
}

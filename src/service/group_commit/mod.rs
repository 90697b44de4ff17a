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
//! tasks of whatever reads are queued, so a callback costs no round trip of its own. New tasks
//! are stored in groups too (`GroupInsert`). This file holds the queues and how a batch is
//! taken; `changes.rs`, `inserts.rs` and `reads.rs` hold each kind of worker.

mod changes;
mod inserts;
mod reads;

pub use changes::{GroupCommit, OwnedCommit};
pub use inserts::{GroupInsert, MAX_TASKS_PER_BATCH};
pub use reads::GroupRead;

use crate::storage::StorageError;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

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

//! New tasks stored in groups by one writer, with the planner's statistics refreshed as the
//! table grows.

use super::{next_batch, Queues};
use crate::storage::{InsertOutcome, NewTask, StorageError, Store};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

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

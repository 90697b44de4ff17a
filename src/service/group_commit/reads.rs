//! The reads status changes are decided on, grouped into one query per reader's batch.

use super::{next_batch, Queues};
use crate::domain::Task;
use crate::storage::{StorageError, Store};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

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

//! Lookups by key, grouped: each reader takes whatever lookups are queued (a lone one waits for
//! nothing) and reads their rows in one query. The reads status changes are decided on
//! (`GroupRead::tasks`) and API key lookups (`service::key_reads`) both go through it.

use super::{next_batch, Queues};
use crate::domain::Task;
use crate::storage::{StorageError, Store};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

struct Lookup<V> {
    key: String,
    reply: oneshot::Sender<Result<Option<V>, StorageError>>,
}

/// What a grouped read found: each key with its row (or the row's own error); a key it did not
/// find is missing.
pub type Found<V> = Vec<(String, Result<V, StorageError>)>;

pub struct GroupRead<V> {
    queues: Queues<Lookup<V>>,
}

impl<V: Clone + Send + 'static> GroupRead<V> {
    /// `readers` readers (`what` names them in errors and logs), each reading the distinct keys
    /// of a batch of at most `max_batch` lookups with one call of `read`.
    pub fn start<F, Fut>(readers: usize, max_batch: usize, what: &'static str, read: F) -> Self
    where
        F: Fn(Vec<String>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Found<V>, StorageError>> + Send + 'static,
    {
        let max_batch = max_batch.max(1);
        GroupRead {
            queues: Queues::start(readers, max_batch, what, |rx| {
                reader(rx, max_batch, what, read.clone())
            }),
        }
    }

    /// The row under `key` as stored now (read with whatever other lookups are queued).
    pub async fn get(&self, key: &str) -> Result<Option<V>, StorageError> {
        self.queues
            .ask(self.queues.pick(key), |reply| Lookup {
                key: key.to_owned(),
                reply,
            })
            .await
    }
}

impl GroupRead<Task> {
    /// Reads of single tasks by id.
    pub fn tasks(store: Store, readers: usize, max_batch: usize) -> Self {
        GroupRead::start(
            readers,
            max_batch,
            "task reader",
            move |ids: Vec<String>| {
                let store = store.clone();
                async move {
                    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                    store.get_tasks(&ids).await
                }
            },
        )
    }
}

async fn reader<V, F, Fut>(
    mut rx: mpsc::Receiver<Lookup<V>>,
    max_batch: usize,
    what: &'static str,
    read: F,
) where
    V: Clone,
    F: Fn(Vec<String>) -> Fut,
    Fut: Future<Output = Result<Found<V>, StorageError>>,
{
    while let Some(batch) = next_batch(&mut rx, max_batch, Duration::ZERO, |_| false).await {
        // A key asked for by several lookups (one client's requests share a key) is read once.
        let mut keys: Vec<String> = batch.iter().map(|j| j.key.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        match read(keys).await {
            Ok(found) => {
                let by_key: HashMap<&str, &Result<V, StorageError>> =
                    found.iter().map(|(k, v)| (k.as_str(), v)).collect();
                for job in batch {
                    let answer = match by_key.get(job.key.as_str()) {
                        None => Ok(None),
                        Some(Ok(row)) => Ok(Some(row.clone())),
                        Some(Err(StorageError::Corrupt(m))) => {
                            Err(StorageError::Corrupt(m.clone()))
                        }
                        Some(Err(e)) => Err(StorageError::Batch(e.to_string())),
                    };
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, lookups = batch.len(), reader = what, "a group of reads failed");
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

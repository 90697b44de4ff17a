//! API keys looked up in groups: a reader takes whatever lookups are queued and reads their
//! clients in one query. Each request still reads the clients table as it is at that moment (a
//! key revoked a moment ago is refused, on every replica, as before); a burst of requests costs
//! the database a statement per group instead of one each, which at a few thousand submits a
//! second was most of their statements (BENCHMARKS §15).

use super::group_commit::{next_batch, Queues};
use crate::domain::client::Client;
use crate::storage::{StorageError, Store};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

type Found = Option<(Client, String)>;

struct KeyJob {
    hash: String,
    reply: oneshot::Sender<Result<Found, StorageError>>,
}

pub struct GroupKeyRead {
    queues: Queues<KeyJob>,
}

impl GroupKeyRead {
    pub fn start(store: Store, readers: usize, max_batch: usize) -> GroupKeyRead {
        let max_batch = max_batch.max(1);
        GroupKeyRead {
            queues: Queues::start(readers, max_batch, "key reader", |rx| {
                reader(store.clone(), rx, max_batch)
            }),
        }
    }

    /// The client holding the key with this hash, revoked or not, with the hash as stored.
    pub async fn get(&self, hash: &str) -> Result<Found, StorageError> {
        self.queues
            .ask(self.queues.pick(hash), |reply| KeyJob {
                hash: hash.to_owned(),
                reply,
            })
            .await
    }
}

async fn reader(store: Store, mut rx: mpsc::Receiver<KeyJob>, max_batch: usize) {
    while let Some(batch) = next_batch(&mut rx, max_batch, Duration::ZERO, |_| false).await {
        // One client's requests usually share a key: each hash is asked for once.
        let mut hashes: Vec<&str> = batch.iter().map(|j| j.hash.as_str()).collect();
        hashes.sort_unstable();
        hashes.dedup();
        match store.clients_by_key_hashes(&hashes).await {
            Ok(found) => {
                let by_hash: HashMap<&str, &(Client, String)> =
                    found.iter().map(|f| (f.1.as_str(), f)).collect();
                for job in batch {
                    let answer = by_hash.get(job.hash.as_str()).map(|&f| f.clone());
                    let _ = job.reply.send(Ok(answer));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, lookups = batch.len(), "a group of API key lookups failed");
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

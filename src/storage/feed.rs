//! Status changes committed by other replicas, heard through Postgres `LISTEN/NOTIFY`.
//!
//! Every status change sends a notification on `CHANNEL` in its own transaction, so it is heard
//! exactly when it is committed (never for a change that rolled back). The payload is the sending
//! store's instance tag and the task id; a replica ignores its own, which it already published
//! in process. Notifications are not stored: while the listening connection is down they are
//! missed, so the feed reports a gap and waiters re-read instead.

use super::{Pool, Result, Store};
use sqlx::postgres::PgListener;

/// The notification channel of task status changes.
pub(super) const CHANNEL: &str = "klr_task_changed";

/// What the feed heard.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedEvent {
    /// Another replica committed a change of this task.
    Changed(String),
    /// Changes may have been missed (the connection was lost and is being re-established).
    Gap,
}

pub struct ChangeFeed {
    listener: PgListener,
    instance: std::sync::Arc<str>,
}

impl Store {
    /// A feed of other replicas' changes; None on SQLite, which serves one instance.
    pub async fn change_feed(&self) -> Result<Option<ChangeFeed>> {
        let Pool::Postgres(pool) = &self.pool else {
            return Ok(None);
        };
        // Its own one-connection pool: the listener holds its connection for good, and taking it
        // from the work pool would leave one connection fewer for requests.
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*pool.connect_options()).clone())
            .await?;
        let mut listener = PgListener::connect_with(&own).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(ChangeFeed {
            listener,
            instance: self.instance.clone(),
        }))
    }

    /// The payload of this store's change notification for a task.
    pub(super) fn change_payload(&self, task_id: &str) -> String {
        format!("{} {task_id}", self.instance)
    }
}

impl ChangeFeed {
    /// The next change made elsewhere, or a gap. An error means the connection could not be
    /// re-established this time; calling again retries.
    pub async fn next(&mut self) -> Result<FeedEvent> {
        loop {
            let Some(n) = self.listener.try_recv().await? else {
                return Ok(FeedEvent::Gap);
            };
            match n.payload().split_once(' ') {
                Some((from, _)) if from == &*self.instance => continue,
                Some((_, task_id)) => return Ok(FeedEvent::Changed(task_id.to_owned())),
                None => continue,
            }
        }
    }
}

//! Status changes committed by other replicas, heard through Postgres `LISTEN/NOTIFY`.
//!
//! Every status change sends a notification on `CHANNEL` in its own transaction, so it is heard
//! exactly when it is committed (never for a change that rolled back). The payload is the sending
//! store's instance tag and the task id; a replica ignores its own, which it already published
//! in process. Notifications are not stored: while the listening connection is down they are
//! missed, so the feed reports a gap and waiters re-read instead.

use super::{Pool, Result, Store};
pub use crate::domain::FeedEvent;
use sqlx::postgres::PgListener;

/// The notification channel of task status changes.
pub(super) const CHANNEL: &str = "klr_task_changed";

pub struct ChangeFeed {
    listener: PgListener,
    instance: std::sync::Arc<str>,
    /// Task ids of a notification not handed out yet (one notification names up to
    /// `IDS_PER_NOTIFICATION`).
    pending: std::collections::VecDeque<String>,
}

/// Task ids per notification: a group commit names its changed tasks in few notifications,
/// each well under Postgres's 8,000-byte payload limit.
pub(super) const IDS_PER_NOTIFICATION: usize = 100;

impl Store {
    /// A feed of other replicas' changes; None on SQLite, which serves one instance.
    pub async fn change_feed(&self) -> Result<Option<ChangeFeed>> {
        let Pool::Postgres(super::PgPools { main: pool, .. }) = &self.pool else {
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
            pending: std::collections::VecDeque::new(),
        }))
    }

    /// The payload of this store's change notification for a task.
    /// "<instance> <task id> <task id> …": who changed which tasks.
    pub(super) fn change_payload(&self, task_ids: &[&str]) -> String {
        let mut p = String::with_capacity(self.instance.len() + 37 * task_ids.len());
        p.push_str(&self.instance);
        for id in task_ids {
            p.push(' ');
            p.push_str(id);
        }
        p
    }
}

impl ChangeFeed {
    /// The next change made elsewhere, or a gap. An error means the connection could not be
    /// re-established this time; calling again retries.
    pub async fn next(&mut self) -> Result<FeedEvent> {
        loop {
            if let Some(id) = self.pending.pop_front() {
                return Ok(FeedEvent::Changed(id));
            }
            let Some(n) = self.listener.try_recv().await? else {
                return Ok(FeedEvent::Gap);
            };
            let mut words = n.payload().split(' ');
            if words.next() == Some(&*self.instance) {
                continue;
            }
            self.pending
                .extend(words.filter(|w| !w.is_empty()).map(str::to_owned));
        }
    }
}

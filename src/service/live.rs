//! Waiting for a task to change: long-poll (`?wait=`) and the SSE stream. Status changes wake
//! waiters in process through the change broadcast; a waiter reads the database only when its
//! own task changed.

use super::{Relay, ServiceError};
use crate::domain::client::Caller;
use crate::domain::{Task, TaskStatus};
use std::time::Duration;
use tokio::sync::broadcast;

/// Longest a long-poll may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

impl Relay {
    /// Other replicas' task changes (Postgres); None on SQLite, where this is the only instance.
    pub async fn other_replicas_changes(
        &self,
    ) -> Result<Option<crate::storage::ChangeFeed>, ServiceError> {
        Ok(self.store.change_feed().await?)
    }

    /// The task as soon as its status differs from `status_not` (or it is final), else after
    /// `wait`. Without `status_not`, the status at the time of the call is the one to leave.
    pub async fn wait_for_change(
        &self,
        caller: &Caller,
        id: &str,
        status_not: Option<TaskStatus>,
        wait: Duration,
    ) -> Result<Task, ServiceError> {
        let mut changes = self.subscribe();
        let task = self.get(caller, id).await?;
        let from = status_not.unwrap_or(task.status);
        if task.status != from || task.status.is_final() {
            return Ok(task);
        }
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let mut recheck = self.recheck_timer();
        loop {
            let change = tokio::select! {
                c = tokio::time::timeout_at(deadline, self.next_change_of(&mut changes, id)) => c,
                // Shutting down: answer now rather than hold the drain.
                _ = self.shutdown.cancelled() => return self.get(caller, id).await,
                // A key revoked while its request waits gets no more answers.
                _ = recheck.tick() => {
                    if !self.still_authorized(caller).await? {
                        return Err(ServiceError::Unauthorized);
                    }
                    continue;
                }
            };
            match change {
                Err(_) => return self.get(caller, id).await,
                Ok(()) => {
                    let task = self.get(caller, id).await?;
                    if task.status != from || task.status.is_final() {
                        return Ok(task);
                    }
                }
            }
        }
    }

    /// Ticks every `auth.recheck_interval`, the first tick one interval from now.
    pub fn recheck_timer(&self) -> tokio::time::Interval {
        let every = self.settings.auth.recheck_interval;
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    }

    /// Resolves when `id` may have changed (or when the broadcast lagged, so nothing is missed).
    pub async fn next_change_of(&self, changes: &mut broadcast::Receiver<String>, id: &str) {
        loop {
            match changes.recv().await {
                Ok(changed) if changed == id || changed == super::EVERY_TASK => return,
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

//! What the poller reads to poll at the right moments: how long tasks have taken, which running
//! tasks are past their expected finish, whether work waits for units, and the next due poll.

use super::{sql, Pool, Result, Store};
use crate::domain::durations::{gcra_take, DurationSample, RunningTask};

impl Store {
    /// Durations of the most recent succeeded tasks (upstream's clock when both ends of it are
    /// known, else this service's), newest first.
    pub async fn recent_durations(&self, limit: i64) -> Result<Vec<DurationSample>> {
        let rows: Vec<(String, i64, Option<i64>)> = on_pool!(self, p => {
            sqlx::query_as(sql::RECENT_DURATIONS).bind(limit).fetch_all(p).await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(model, n, ms)| {
                Some(DurationSample {
                    model,
                    n,
                    ms: ms.filter(|ms| *ms >= 0)?,
                })
            })
            .collect())
    }

    /// Tasks upstream is running (their polls are scheduled), with when they were sent.
    pub async fn running_tasks(&self) -> Result<Vec<RunningTask>> {
        let rows: Vec<(String, String, i64, i64, i64)> = on_pool!(self, p => {
            sqlx::query_as(sql::RUNNING_TASKS).fetch_all(p).await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(id, model, n, submitted_at_ms, poll_due_at_ms)| RunningTask {
                    id,
                    model,
                    n,
                    submitted_at_ms,
                    poll_due_at_ms,
                },
            )
            .collect())
    }

    /// Moves these tasks' next poll to `due_at_ms` where it is later; returns how many moved.
    pub async fn bring_polls_forward(&self, ids: &[String], due_at_ms: i64) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let _writer = self.writer().await;
        const SQL: &str = "UPDATE tasks SET poll_due_at = $2 WHERE id = $1 AND poll_due_at > $2";
        let mut moved = 0;
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for id in ids {
                moved += sqlx::query(SQL)
                    .bind(id)
                    .bind(due_at_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            tx.commit().await?;
        });
        Ok(moved)
    }

    /// Whether a task waits for dispatch now (due, not in a retry's backoff).
    pub async fn dispatch_backlog(&self, now_ms: i64) -> Result<bool> {
        let waiting: bool = on_pool!(self, p => {
            sqlx::query_scalar(sql::DISPATCH_BACKLOG).bind(now_ms).fetch_one(p).await?
        });
        Ok(waiting)
    }

    /// The earliest scheduled poll, if any.
    pub async fn next_poll_due(&self) -> Result<Option<i64>> {
        let due: Option<i64> = on_pool!(self, p => {
            sqlx::query_scalar(sql::NEXT_POLL_DUE).fetch_one(p).await?
        });
        Ok(due)
    }

    /// Takes up to `want` calls from the rate `name` (one per `interval_us`, a burst of
    /// `burst_us`) that every replica on this database shares. Returns how many may start now,
    /// and the microseconds until one more may.
    pub async fn take_from_rate(
        &self,
        name: &str,
        now_ms: i64,
        want: i64,
        interval_us: i64,
        burst_us: i64,
    ) -> Result<(i64, i64)> {
        let _writer = self.writer().await;
        let read = format!(
            "SELECT tat FROM rate_limits WHERE name = $1{}",
            self.for_update()
        );
        const CREATE: &str =
            "INSERT INTO rate_limits (name, tat) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING";
        const WRITE: &str = "UPDATE rate_limits SET tat = $2 WHERE name = $1";
        let begin = self.begin_claim();
        on_pool!(self, p => {
            let mut tx = p.begin_with(begin).await?;
            let stored: Option<i64> =
                sqlx::query_scalar(&read).bind(name).fetch_optional(&mut *tx).await?;
            let tat = match stored {
                Some(t) => t,
                None => {
                    sqlx::query(CREATE).bind(name).execute(&mut *tx).await?;
                    sqlx::query_scalar(&read).bind(name).fetch_one(&mut *tx).await?
                }
            };
            let (granted, tat, wait_us) =
                gcra_take(tat, now_ms.saturating_mul(1000), want, interval_us, burst_us);
            if granted > 0 {
                sqlx::query(WRITE).bind(name).bind(tat).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok((granted, wait_us))
        })
    }

    /// Returns `unused` calls taken from the rate `name` (one per `interval_us`) but not made.
    pub async fn give_back_to_rate(&self, name: &str, unused: i64, interval_us: i64) -> Result<()> {
        if unused <= 0 {
            return Ok(());
        }
        let _writer = self.writer().await;
        const SQL: &str = "UPDATE rate_limits SET tat = tat - $2 WHERE name = $1";
        on_pool!(self, p => {
            sqlx::query(SQL).bind(name).bind(unused * interval_us).execute(p).await?;
        });
        Ok(())
    }
}

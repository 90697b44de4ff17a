//! Aggregates for the dashboard's overview.

use super::{Pool, Result, Store};
pub use crate::domain::usage::ClientUsage;

impl Store {
    /// Tasks created since `since_ms`, per status (one client's, or everyone's).
    pub async fn status_counts_since(
        &self,
        client: Option<&str>,
        since_ms: i64,
    ) -> Result<Vec<(String, i64)>> {
        const SQL: &str = "SELECT status, COUNT(*) FROM tasks \
            WHERE created_at >= $1 AND ($2 = '' OR client = $2) GROUP BY status";
        on_pool!(self, p => {
            Ok(sqlx::query_as(SQL)
                .bind(since_ms)
                .bind(client.unwrap_or(""))
                .fetch_all(p)
                .await?)
        })
    }

    /// Tasks that reached a final status since `finished_since_ms`, per minute and status:
    /// (minute start, status, count). Only tasks created since `created_since_ms` are read, so
    /// the index on creation time bounds the work.
    pub async fn finished_per_minute(
        &self,
        client: Option<&str>,
        created_since_ms: i64,
        finished_since_ms: i64,
    ) -> Result<Vec<(i64, String, i64)>> {
        const SQL: &str = "SELECT (completed_at / 60000) * 60000, status, COUNT(*) FROM tasks \
            WHERE created_at >= $1 AND completed_at >= $2 AND ($3 = '' OR client = $3) \
            GROUP BY (completed_at / 60000) * 60000, status";
        on_pool!(self, p => {
            Ok(sqlx::query_as(SQL)
                .bind(created_since_ms)
                .bind(finished_since_ms)
                .bind(client.unwrap_or(""))
                .fetch_all(p)
                .await?)
        })
    }

    /// Why tasks created since `since_ms` failed or timed out, most frequent first:
    /// (error code, one message of that code, how many).
    pub async fn failure_reasons_since(
        &self,
        client: Option<&str>,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<(String, String, i64)>> {
        const SQL: &str = "SELECT COALESCE(error_code, status), \
            COALESCE(MAX(error_message), ''), COUNT(*) FROM tasks \
            WHERE created_at >= $1 AND ($2 = '' OR client = $2) \
            AND status IN ('failed', 'timed_out') \
            GROUP BY COALESCE(error_code, status) ORDER BY COUNT(*) DESC LIMIT $3";
        on_pool!(self, p => {
            Ok(sqlx::query_as(SQL)
                .bind(since_ms)
                .bind(client.unwrap_or(""))
                .bind(limit)
                .fetch_all(p)
                .await?)
        })
    }
}

/// (client, units in use, tasks waiting)
type OpenRow = (Option<String>, i64, i64);
/// (client, unit-milliseconds held in the window)
type HeldRow = (Option<String>, i64);

impl Store {
    /// Per client: units held and tasks waiting now, and unit-milliseconds held since
    /// `since_ms`. The window counts tasks created within `lookback_ms` before it (a task that
    /// ran longer than that is left out: the index on `created_at` bounds the read).
    pub async fn client_usage(
        &self,
        now_ms: i64,
        since_ms: i64,
        lookback_ms: i64,
    ) -> Result<Vec<ClientUsage>> {
        const OPEN: &str = "SELECT client, \
            CAST(COALESCE(SUM(CASE WHEN status <> 'pending' OR dispatch_started_at IS NOT NULL \
                THEN n ELSE 0 END), 0) AS BIGINT), \
            CAST(COALESCE(SUM(CASE WHEN status = 'pending' AND dispatch_started_at IS NULL \
                THEN 1 ELSE 0 END), 0) AS BIGINT) \
            FROM tasks WHERE status IN ('pending', 'submitted', 'processing') GROUP BY client";
        const HELD: &str = "SELECT client, CAST(COALESCE(SUM(n * \
            ((CASE WHEN completed_at IS NULL OR completed_at > $1 THEN $1 ELSE completed_at END) \
            - (CASE WHEN submitted_at > $2 THEN submitted_at ELSE $2 END))), 0) AS BIGINT) \
            FROM tasks WHERE created_at >= $3 AND submitted_at IS NOT NULL AND submitted_at < $1 \
            AND (completed_at IS NULL OR completed_at > $2) GROUP BY client";
        let (open, held): (Vec<OpenRow>, Vec<HeldRow>) = on_pool!(self, p => {
            (
                sqlx::query_as(OPEN).fetch_all(p).await?,
                sqlx::query_as(HELD)
                    .bind(now_ms)
                    .bind(since_ms)
                    .bind(since_ms - lookback_ms)
                    .fetch_all(p)
                    .await?,
            )
        });
        let mut usage: Vec<ClientUsage> = open
            .into_iter()
            .map(|(client, units_in_use, waiting)| ClientUsage {
                client,
                units_in_use,
                waiting,
                unit_ms: 0,
            })
            .collect();
        for (client, unit_ms) in held {
            match usage.iter_mut().find(|u| u.client == client) {
                Some(u) => u.unit_ms = unit_ms.max(0),
                None => usage.push(ClientUsage {
                    client,
                    units_in_use: 0,
                    waiting: 0,
                    unit_ms: unit_ms.max(0),
                }),
            }
        }
        usage.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(usage)
    }
}

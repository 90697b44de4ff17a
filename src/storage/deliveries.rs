//! The notification outbox: deliveries written with each status change, claimed by the notifier,
//! and their attempts.

use super::{Pool, Result, Store};
pub use crate::domain::delivery::{
    AttemptRecord, Delivery, DeliveryAttempt, DueDelivery, NextStep,
};

/// A notification to write in the same transaction as its status change.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// The Standard Webhooks `webhook-id`; stable across attempts.
    pub id: String,
    pub client: String,
    pub url: String,
    pub payload: String,
}

/// Skipped when the client's URL was disabled by a 410.
pub(super) const INSERT_OUTBOX: &str = "INSERT INTO deliveries (id, task_id, client, url, \
    event_status, payload, state, attempts, next_attempt_at, created_at, updated_at) \
    SELECT $1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7, $7 \
    WHERE NOT EXISTS (SELECT 1 FROM disabled_urls WHERE client = $3 AND url = $4)";

/// A due delivery as the claim reads it.
#[derive(sqlx::FromRow)]
pub(super) struct DueRow {
    id: String,
    task_id: String,
    client: String,
    url: String,
    payload: String,
    attempts: i64,
}

impl From<DueRow> for DueDelivery {
    fn from(r: DueRow) -> Self {
        DueDelivery {
            id: r.id,
            task_id: r.task_id,
            client: r.client,
            url: r.url,
            payload: r.payload,
            attempts: r.attempts,
        }
    }
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: String,
    task_id: String,
    url: String,
    event_status: String,
    state: String,
    attempts: i64,
    next_attempt_at: Option<i64>,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    created_at: i64,
    delivered_at: Option<i64>,
}

impl Delivery {
    fn without_attempts(r: DeliveryRow) -> Delivery {
        Delivery {
            id: r.id,
            task_id: r.task_id,
            url: r.url,
            event_status: r.event_status,
            state: r.state,
            attempts: r.attempts,
            next_attempt_at_ms: r.next_attempt_at,
            last_status_code: r.last_status_code,
            last_error: r.last_error,
            created_at_ms: r.created_at,
            delivered_at_ms: r.delivered_at,
            attempt_log: Vec::new(),
        }
    }
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    delivery_id: String,
    at: i64,
    status_code: Option<i64>,
    error: Option<String>,
    duration_ms: i64,
}

impl Store {
    /// Records an attempt and moves the delivery on.
    pub async fn record_attempt(&self, d: &DueDelivery, r: &AttemptRecord) -> Result<()> {
        let _writer = self.writer().await;
        const ATTEMPT: &str =
            "INSERT INTO delivery_attempts (delivery_id, at, status_code, error, \
            duration_ms) VALUES ($1, $2, $3, $4, $5)";
        const UPDATE: &str = "UPDATE deliveries SET state = $2, next_attempt_at = $3, \
            last_status_code = $4, last_error = $5, updated_at = $6, \
            delivered_at = CASE WHEN $2 = 'delivered' THEN $6 ELSE delivered_at END \
            WHERE id = $1";
        const DISABLE: &str = "INSERT INTO disabled_urls (client, url, disabled_at) \
            VALUES ($1, $2, $3) ON CONFLICT (client, url) DO NOTHING";
        const DISABLE_PENDING: &str = "UPDATE deliveries SET state = 'disabled', \
            next_attempt_at = NULL, updated_at = $3 \
            WHERE client = $1 AND url = $2 AND state = 'pending'";
        let (state, next_at) = match r.next {
            NextStep::Delivered => ("delivered", None),
            NextStep::RetryAt(at) => ("pending", Some(at)),
            NextStep::Dead => ("dead", None),
            NextStep::Disabled => ("disabled", None),
        };
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query(ATTEMPT)
                .bind(&d.id)
                .bind(r.at_ms)
                .bind(r.status_code)
                .bind(&r.error)
                .bind(r.duration_ms)
                .execute(&mut *tx)
                .await?;
            sqlx::query(UPDATE)
                .bind(&d.id)
                .bind(state)
                .bind(next_at)
                .bind(r.status_code)
                .bind(&r.error)
                .bind(r.at_ms)
                .execute(&mut *tx)
                .await?;
            if r.next == NextStep::Disabled {
                sqlx::query(DISABLE)
                    .bind(&d.client)
                    .bind(&d.url)
                    .bind(r.at_ms)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(DISABLE_PENDING)
                    .bind(&d.client)
                    .bind(&d.url)
                    .bind(r.at_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// A task's deliveries, oldest first, each with its attempts.
    pub async fn list_deliveries(&self, task_id: &str) -> Result<Vec<Delivery>> {
        const DELIVERIES: &str = "SELECT id, task_id, url, event_status, state, attempts, \
            next_attempt_at, last_status_code, last_error, created_at, delivered_at \
            FROM deliveries WHERE task_id = $1 ORDER BY created_at, id";
        const ATTEMPTS: &str = "SELECT a.delivery_id, a.at, a.status_code, a.error, a.duration_ms \
            FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id \
            WHERE d.task_id = $1 ORDER BY a.id";
        let (rows, attempts): (Vec<DeliveryRow>, Vec<AttemptRow>) = on_pool!(self, p => {
            (
                sqlx::query_as(DELIVERIES).bind(task_id).fetch_all(p).await?,
                sqlx::query_as(ATTEMPTS).bind(task_id).fetch_all(p).await?,
            )
        });
        Ok(rows
            .into_iter()
            .map(|r| {
                let attempt_log = attempts
                    .iter()
                    .filter(|a| a.delivery_id == r.id)
                    .map(|a| DeliveryAttempt {
                        at_ms: a.at,
                        status_code: a.status_code,
                        error: a.error.clone(),
                        duration_ms: a.duration_ms,
                    })
                    .collect();
                Delivery {
                    attempt_log,
                    ..Delivery::without_attempts(r)
                }
            })
            .collect())
    }

    /// Sends a delivery again (same `webhook-id`), whatever its state. False if unknown.
    pub async fn retry_delivery(
        &self,
        task_id: &str,
        delivery_id: &str,
        now_ms: i64,
    ) -> Result<bool> {
        let _writer = self.writer().await;
        const SQL: &str = "UPDATE deliveries SET state = 'pending', next_attempt_at = $3, \
            updated_at = $3 WHERE id = $2 AND task_id = $1";
        on_pool!(self, p => {
            Ok(sqlx::query(SQL).bind(task_id).bind(delivery_id).bind(now_ms).execute(p).await?
                .rows_affected() == 1)
        })
    }

    /// Notifications in trouble across tasks, newest first: dead (the schedule ran out or the
    /// destination was refused), disabled (410), or failing and waiting for their next attempt.
    /// `client` limits them to one client's; their attempt logs are left empty.
    pub async fn troubled_deliveries(
        &self,
        client: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Delivery>> {
        const COLUMNS: &str = "SELECT id, task_id, url, event_status, state, attempts, \
            next_attempt_at, last_status_code, last_error, created_at, delivered_at FROM deliveries \
            WHERE (state IN ('dead', 'disabled') OR (state = 'pending' AND attempts > 0))";
        let rows: Vec<DeliveryRow> = match client {
            Some(c) => {
                let sql =
                    format!("{COLUMNS} AND client = $1 ORDER BY created_at DESC, id LIMIT $2");
                on_pool!(self, p => sqlx::query_as(&sql).bind(c).bind(limit).fetch_all(p).await?)
            }
            None => {
                let sql = format!("{COLUMNS} ORDER BY created_at DESC, id LIMIT $1");
                on_pool!(self, p => sqlx::query_as(&sql).bind(limit).fetch_all(p).await?)
            }
        };
        Ok(rows.into_iter().map(Delivery::without_attempts).collect())
    }

    /// Queues every dead notification (of `client`, or all) for another attempt, each under its
    /// own `webhook-id`; disabled ones stay disabled (their receiver said 410). How many.
    pub async fn retry_dead_deliveries(&self, client: Option<&str>, now_ms: i64) -> Result<u64> {
        let _writer = self.writer().await;
        const SQL: &str = "UPDATE deliveries SET state = 'pending', next_attempt_at = $1, \
            updated_at = $1 WHERE state = 'dead'";
        let done = match client {
            Some(c) => {
                let sql = format!("{SQL} AND client = $2");
                on_pool!(self, p => sqlx::query(&sql).bind(now_ms).bind(c).execute(p).await?.rows_affected())
            }
            None => {
                on_pool!(self, p => sqlx::query(SQL).bind(now_ms).execute(p).await?.rows_affected())
            }
        };
        Ok(done)
    }

    /// Deliveries waiting for an attempt (the notification backlog).
    pub async fn pending_deliveries(&self) -> Result<i64> {
        const SQL: &str = "SELECT COUNT(*) FROM deliveries WHERE next_attempt_at IS NOT NULL";
        on_pool!(self, p => {
            Ok(sqlx::query_scalar(SQL).fetch_one(p).await?)
        })
    }
}

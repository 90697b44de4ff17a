//! Usage aggregates (`usage_hourly`, `usage_durations`), written in the transaction that ends a
//! task, and the reads behind usage answers and budgets.

use super::{Pool, Result, Store};
use crate::domain::usage::{self, duration_bin, parse_units_milli, HOUR_MS};
use crate::domain::TaskStatus;
use sha2::{Digest, Sha256};

/// Rows per aggregate group: concurrent ends of one client's tasks spread over this many.
const SHARDS: i64 = 8;

/// Which of the aggregate rows' shards a task's end is added to. The group commit sends a
/// task's changes to writer `usage_shard % writers`, so concurrent batches add to disjoint
/// aggregate rows and never wait for each other's row locks.
pub fn usage_shard(id: &str) -> i64 {
    i64::from(Sha256::digest(id.as_bytes())[0]) % SHARDS
}

pub(super) const ADD_HOURLY: &str = "INSERT INTO usage_hourly \
    (client, hour_start, model, status, shard, tasks, units_milli) \
    VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (client, hour_start, model, status, shard) DO UPDATE SET \
    tasks = usage_hourly.tasks + excluded.tasks, \
    units_milli = usage_hourly.units_milli + excluded.units_milli";

pub(super) const ADD_DURATION: &str = "INSERT INTO usage_durations \
    (client, hour_start, bin, shard, tasks) VALUES ($1, $2, $3, $4, $5) \
    ON CONFLICT (client, hour_start, bin, shard) DO UPDATE SET \
    tasks = usage_durations.tasks + excluded.tasks";

/// An hourly aggregate row: (client, hour, model, status, shard).
pub(super) type HourlyKey = (String, i64, String, &'static str, i64);

/// The ends of one batch, summed per aggregate row and kept in key order (the order rows are
/// locked in).
#[derive(Default)]
pub(super) struct Ended {
    /// -> (tasks, units_milli)
    pub hourly: std::collections::BTreeMap<HourlyKey, (i64, i64)>,
    /// (client, hour, bin, shard) -> tasks
    pub durations: std::collections::BTreeMap<(String, i64, i64, i64), i64>,
}

impl Ended {
    pub fn add(&mut self, f: Finished) {
        if let Some(bin) = f.duration_bin {
            *self
                .durations
                .entry((f.client.clone(), f.hour_start, bin, f.shard))
                .or_insert(0) += 1;
        }
        let e = self
            .hourly
            .entry((f.client, f.hour_start, f.model, f.status, f.shard))
            .or_insert((0, 0));
        e.0 += 1;
        e.1 += f.units_milli;
    }
}

/// A task's end, as the aggregates count it.
pub(super) struct Finished {
    pub client: String,
    pub model: String,
    pub status: &'static str,
    pub hour_start: i64,
    pub shard: i64,
    /// Upstream's deduction; 0 when it did not say (the cost is never guessed).
    pub units_milli: i64,
    /// Upstream time, when the task reached upstream.
    pub duration_bin: Option<i64>,
}

impl Finished {
    pub fn new(
        id: &str,
        client: String,
        model: String,
        status: TaskStatus,
        now_ms: i64,
        submitted_at: Option<i64>,
        deduction: Option<&str>,
    ) -> Finished {
        let shard = usage_shard(id);
        Finished {
            client,
            model,
            status: status.as_str(),
            hour_start: now_ms.div_euclid(HOUR_MS) * HOUR_MS,
            shard,
            units_milli: deduction.and_then(parse_units_milli).unwrap_or(0),
            duration_bin: submitted_at.map(|s| duration_bin(now_ms - s)),
        }
    }
}

/// One hour of one client's usage: tasks and units by model and final status.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UsageRow {
    pub client: String,
    pub hour_start: i64,
    pub model: String,
    pub status: String,
    pub tasks: i64,
    pub units_milli: i64,
}

/// One hour of one client's durations histogram.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DurationRow {
    pub hour_start: i64,
    pub bin: i64,
    pub tasks: i64,
}

/// A budget threshold reached.
#[derive(Debug, Clone, Copy)]
pub struct BudgetAlert<'a> {
    pub client: &'a str,
    pub task_id: &'a str,
    pub period: usage::Period,
    pub period_start: i64,
    pub threshold: i64,
    pub now_ms: i64,
}

/// A client's budgets, as set with `clients set`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct ClientBudgets {
    pub units_per_day: Option<i64>,
    pub units_per_month: Option<i64>,
}

impl ClientBudgets {
    /// The budgets set, day first.
    pub fn limits(&self) -> Vec<(usage::Period, i64)> {
        [
            (usage::Period::Day, self.units_per_day),
            (usage::Period::Month, self.units_per_month),
        ]
        .into_iter()
        .filter_map(|(p, l)| l.map(|l| (p, l)))
        .collect()
    }
}

pub(super) const CLIENT_BUDGETS: &str =
    "SELECT units_per_day, units_per_month FROM clients WHERE name = $1";

impl Store {
    /// Usage rows in `[from_ms, to_ms)` (hour starts): one client's, or everyone's.
    pub async fn usage_rows(
        &self,
        client: Option<&str>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<UsageRow>> {
        const ONE: &str = "SELECT client, hour_start, model, status, \
            CAST(SUM(tasks) AS BIGINT) AS tasks, CAST(SUM(units_milli) AS BIGINT) AS units_milli \
            FROM usage_hourly WHERE client = $1 AND hour_start >= $2 AND hour_start < $3 \
            GROUP BY client, hour_start, model, status";
        const ALL: &str = "SELECT client, hour_start, model, status, \
            CAST(SUM(tasks) AS BIGINT) AS tasks, CAST(SUM(units_milli) AS BIGINT) AS units_milli \
            FROM usage_hourly WHERE hour_start >= $2 AND hour_start < $3 \
            AND ($1 = '' OR client = $1) \
            GROUP BY client, hour_start, model, status";
        let sql = if client.is_some() { ONE } else { ALL };
        Ok(on_pool!(self, p => {
            sqlx::query_as(sql)
                .bind(client.unwrap_or(""))
                .bind(from_ms)
                .bind(to_ms)
                .fetch_all(p)
                .await?
        }))
    }

    /// Duration histograms in `[from_ms, to_ms)`, by hour: one client's, or everyone's.
    pub async fn usage_durations(
        &self,
        client: Option<&str>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<DurationRow>> {
        const ONE: &str = "SELECT hour_start, bin, CAST(SUM(tasks) AS BIGINT) AS tasks \
            FROM usage_durations WHERE client = $1 AND hour_start >= $2 AND hour_start < $3 \
            GROUP BY hour_start, bin";
        const ALL: &str = "SELECT hour_start, bin, CAST(SUM(tasks) AS BIGINT) AS tasks \
            FROM usage_durations WHERE hour_start >= $2 AND hour_start < $3 \
            AND ($1 = '' OR client = $1) GROUP BY hour_start, bin";
        let sql = if client.is_some() { ONE } else { ALL };
        Ok(on_pool!(self, p => {
            sqlx::query_as(sql)
                .bind(client.unwrap_or(""))
                .bind(from_ms)
                .bind(to_ms)
                .fetch_all(p)
                .await?
        }))
    }

    /// Folds the shard rows of the hours in `[from_ms, before_ms)` into one row per group
    /// (shard -1), so reading a long range reads one row per hour, model and status. Tasks count
    /// in the hour they end, so a past hour gets no new rows (a replica whose clock lags may
    /// still add one; the next fold takes it). Returns the rows folded.
    pub async fn fold_usage_shards(&self, from_ms: i64, before_ms: i64) -> Result<u64> {
        let _writer = self.writer().await;
        const FOLD_HOURLY: &str = "INSERT INTO usage_hourly \
            (client, hour_start, model, status, shard, tasks, units_milli) \
            SELECT client, hour_start, model, status, -1, SUM(tasks), SUM(units_milli) \
            FROM usage_hourly WHERE hour_start >= $1 AND hour_start < $2 AND shard >= 0 \
            GROUP BY client, hour_start, model, status \
            ON CONFLICT (client, hour_start, model, status, shard) DO UPDATE SET \
            tasks = usage_hourly.tasks + excluded.tasks, \
            units_milli = usage_hourly.units_milli + excluded.units_milli";
        const DROP_HOURLY: &str = "DELETE FROM usage_hourly \
            WHERE hour_start >= $1 AND hour_start < $2 AND shard >= 0";
        const FOLD_DURATIONS: &str = "INSERT INTO usage_durations \
            (client, hour_start, bin, shard, tasks) \
            SELECT client, hour_start, bin, -1, SUM(tasks) FROM usage_durations \
            WHERE hour_start >= $1 AND hour_start < $2 AND shard >= 0 \
            GROUP BY client, hour_start, bin \
            ON CONFLICT (client, hour_start, bin, shard) DO UPDATE SET \
            tasks = usage_durations.tasks + excluded.tasks";
        const DROP_DURATIONS: &str = "DELETE FROM usage_durations \
            WHERE hour_start >= $1 AND hour_start < $2 AND shard >= 0";
        let begin = self.begin_claim();
        on_pool!(self, p => {
            let mut tx = p.begin_with(begin).await?;
            let mut folded = 0;
            for (fold, drop) in [(FOLD_HOURLY, DROP_HOURLY), (FOLD_DURATIONS, DROP_DURATIONS)] {
                sqlx::query(fold).bind(from_ms).bind(before_ms).execute(&mut *tx).await?;
                folded += sqlx::query(drop)
                    .bind(from_ms)
                    .bind(before_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            tx.commit().await?;
            Ok(folded)
        })
    }

    /// A client's budgets; None for no such client.
    pub async fn client_budgets(&self, client: &str) -> Result<Option<ClientBudgets>> {
        Ok(on_pool!(self, p => {
            sqlx::query_as(CLIENT_BUDGETS).bind(client).fetch_optional(p).await?
        }))
    }

    /// Units a client's unfinished tasks hold or will hold (`n` of pending and in-flight tasks).
    pub async fn units_reserved(&self, client: &str) -> Result<i64> {
        Ok(on_pool!(self, p => {
            sqlx::query_scalar(UNITS_RESERVED).bind(client).fetch_one(p).await?
        }))
    }

    /// Units reserved now, per client with any.
    pub async fn units_reserved_by_client(&self) -> Result<Vec<(String, i64)>> {
        const SQL: &str = "SELECT COALESCE(client, ''), CAST(SUM(n) AS BIGINT) FROM tasks \
            WHERE status IN ('pending', 'submitted', 'processing') GROUP BY client";
        Ok(on_pool!(self, p => { sqlx::query_as(SQL).fetch_all(p).await? }))
    }

    /// Thousandths of a unit deducted from `client`'s tasks that ended since `since_ms`.
    pub async fn units_spent_since(&self, client: &str, since_ms: i64) -> Result<i64> {
        Ok(on_pool!(self, p => {
            sqlx::query_scalar(UNITS_SPENT).bind(client).bind(since_ms).fetch_one(p).await?
        }))
    }

    /// Records that `client` reached `threshold` % of its `period` budget starting at
    /// `period_start`, with the notification about it (tied to `task_id`, the task whose end
    /// crossed it), in one transaction. False if it was already recorded, by this or any
    /// replica: each threshold is told once per period.
    pub async fn record_budget_alert(
        &self,
        alert: &BudgetAlert<'_>,
        outbox: Option<&super::OutboxEntry>,
    ) -> Result<bool> {
        let _writer = self.writer().await;
        const SQL: &str = "INSERT INTO budget_alerts (client, period, period_start, threshold, \
            sent_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let done = sqlx::query(SQL)
                .bind(alert.client)
                .bind(alert.period.as_str())
                .bind(alert.period_start)
                .bind(alert.threshold)
                .bind(alert.now_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if done == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            if let Some(o) = outbox {
                sqlx::query(super::deliveries::INSERT_OUTBOX)
                    .bind(&o.id)
                    .bind(alert.task_id)
                    .bind(&o.client)
                    .bind(&o.url)
                    .bind("budget")
                    .bind(&o.payload)
                    .bind(alert.now_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }
}

pub(super) const UNITS_RESERVED: &str = "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM tasks \
    WHERE client = $1 AND status IN ('pending', 'submitted', 'processing')";

pub(super) const UNITS_SPENT: &str = "SELECT CAST(COALESCE(SUM(units_milli), 0) AS BIGINT) \
    FROM usage_hourly WHERE client = $1 AND hour_start >= $2";

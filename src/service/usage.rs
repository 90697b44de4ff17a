//! Usage: what each client's tasks cost, in UTC buckets, from the aggregates kept with every
//! task's end (`storage::usage`); budgets and their notifications.

use super::{now_ms, Relay, ServiceError};
use crate::domain::client::Caller;
use crate::domain::usage::{
    milli_to_units, parse_units_milli, quantile_seconds, thresholds_reached, BudgetStanding,
    Granularity, HOUR_MS,
};
use crate::domain::{Change, Task};
use crate::domain::{FieldError, TaskStatus};
use crate::storage::Store;
use crate::storage::{BudgetAlert, OutboxEntry};
use std::collections::BTreeMap;

/// How often a replica folds the usage aggregates' shards of past hours.
const FOLD_EVERY_MS: i64 = 10 * 60 * 1000;

/// At most this many buckets in one answer (a year of days, a month of hours and then some).
pub const MAX_BUCKETS: i64 = 1_000;

/// What a usage question covers: `[from, to)`, hour-aligned, in buckets of `granularity`.
#[derive(Debug, Clone, Copy)]
pub struct UsageQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub granularity: Granularity,
}

impl UsageQuery {
    /// From optional bounds (default: the current UTC day). Bounds are rounded down to the hour,
    /// the aggregates' resolution; buckets start at the granularity's boundaries.
    pub fn new(
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        granularity: Option<Granularity>,
        now_ms: i64,
    ) -> Result<UsageQuery, Vec<FieldError>> {
        let granularity = granularity.unwrap_or(Granularity::Day);
        let today = Granularity::Day.floor(now_ms);
        let from = from_ms.unwrap_or(today);
        let to = to_ms.unwrap_or_else(|| Granularity::Day.next(today));
        let mut errors = Vec::new();
        if to <= from {
            errors.push(FieldError {
                field: "to".into(),
                message: "must be after `from`".into(),
            });
        }
        let q = UsageQuery {
            from_ms: granularity.floor(from),
            to_ms: to,
            granularity,
        };
        if errors.is_empty() && q.bucket_starts().len() as i64 > MAX_BUCKETS {
            errors.push(FieldError {
                field: "granularity".into(),
                message: format!(
                    "the range holds more than {MAX_BUCKETS} buckets of a {}; use a coarser granularity or a shorter range",
                    granularity.as_str()
                ),
            });
        }
        if errors.is_empty() {
            Ok(q)
        } else {
            Err(errors)
        }
    }

    fn bucket_starts(&self) -> Vec<i64> {
        let mut starts = Vec::new();
        let mut at = self.from_ms;
        while at < self.to_ms && starts.len() as i64 <= MAX_BUCKETS {
            starts.push(at);
            at = self.granularity.next(at);
        }
        starts
    }
}

/// One bucket of a usage answer.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageBucket {
    pub start_ms: i64,
    pub end_ms: i64,
    /// Tasks that ended in the bucket, by final status (every final status present).
    pub tasks: BTreeMap<&'static str, i64>,
    pub units_deducted_milli: i64,
    pub duration_p50_s: Option<f64>,
    pub duration_p95_s: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct UsageReport {
    pub query: UsageQuery,
    pub units_reserved: i64,
    pub buckets: Vec<UsageBucket>,
}

/// Usage figures the metrics endpoint reports.
#[derive(Debug, Clone, Default)]
pub struct UsageGauges {
    pub reserved: Vec<(String, i64)>,
    /// (client, period, units left)
    pub budget_remaining: Vec<(String, &'static str, f64)>,
}

/// A row of the operator's usage table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UsageLine {
    pub key: String,
    pub tasks: BTreeMap<&'static str, i64>,
    pub units_deducted: f64,
}

/// How the operator's usage table is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGrouping {
    Client,
    Day,
    Model,
}

fn final_statuses() -> BTreeMap<&'static str, i64> {
    TaskStatus::ALL
        .into_iter()
        .filter(|s| s.is_final())
        .map(|s| (s.as_str(), 0))
        .collect()
}

fn count_status(tasks: &mut BTreeMap<&'static str, i64>, status: &str, n: i64) {
    if let Some(s) = TaskStatus::ALL.into_iter().find(|s| s.as_str() == status) {
        *tasks.entry(s.as_str()).or_insert(0) += n;
    }
}

impl Relay {
    /// The caller's usage over `q` (a caller with no client of its own: everyone's).
    pub async fn usage(&self, caller: &Caller, q: UsageQuery) -> Result<UsageReport, ServiceError> {
        let client = caller.scope();
        let rows = self.store.usage_rows(client, q.from_ms, q.to_ms).await?;
        let durations = self
            .store
            .usage_durations(client, q.from_ms, q.to_ms)
            .await?;
        let units_reserved = match client {
            Some(c) => self.store.units_reserved(c).await?,
            None => self
                .store
                .units_reserved_by_client()
                .await?
                .into_iter()
                .map(|(_, n)| n)
                .sum(),
        };
        let mut buckets: Vec<UsageBucket> = q
            .bucket_starts()
            .into_iter()
            .map(|start| UsageBucket {
                start_ms: start,
                end_ms: q.granularity.next(start),
                tasks: final_statuses(),
                units_deducted_milli: 0,
                duration_p50_s: None,
                duration_p95_s: None,
            })
            .collect();
        let ends: Vec<i64> = buckets.iter().map(|b| b.end_ms).collect();
        let index = |hour: i64| ends.partition_point(|end| *end <= hour);
        let mut hist: Vec<BTreeMap<i64, i64>> = vec![BTreeMap::new(); buckets.len()];
        for r in rows {
            let i = index(r.hour_start);
            if let Some(b) = buckets.get_mut(i) {
                count_status(&mut b.tasks, &r.status, r.tasks);
                b.units_deducted_milli += r.units_milli;
            }
        }
        for d in durations {
            let i = index(d.hour_start);
            if let Some(h) = hist.get_mut(i) {
                *h.entry(d.bin).or_insert(0) += d.tasks;
            }
        }
        for (b, h) in buckets.iter_mut().zip(hist) {
            let bins: Vec<(i64, i64)> = h.into_iter().collect();
            b.duration_p50_s = quantile_seconds(&bins, 0.5);
            b.duration_p95_s = quantile_seconds(&bins, 0.95);
        }
        Ok(UsageReport {
            query: q,
            units_reserved,
            buckets,
        })
    }

    /// For the metrics: every client's units reserved now, and what is left of each budget
    /// (units; negative once overrun).
    pub async fn usage_gauges(&self) -> Result<UsageGauges, ServiceError> {
        let clients = self.store.list_clients().await?;
        let open: BTreeMap<String, i64> = self
            .store
            .units_reserved_by_client()
            .await?
            .into_iter()
            .collect();
        let mut g = UsageGauges::default();
        for c in clients {
            g.reserved
                .push((c.name.clone(), open.get(&c.name).copied().unwrap_or(0)));
            for b in self.budget_standings(&c.name).await? {
                g.budget_remaining.push((
                    c.name.clone(),
                    b.period.as_str(),
                    crate::domain::usage::milli_to_units(b.remaining_milli()),
                ));
            }
        }
        Ok(g)
    }

    /// After a task ended: count what it cost, and tell its client about each budget threshold
    /// its cost crossed. A failure here is logged; the task's change is already committed.
    pub(super) async fn on_task_ended(&self, task: &Task, change: &Change) {
        let Some(client) = &task.client else {
            return;
        };
        let Some(milli) = change
            .final_unit_deduction
            .as_deref()
            .and_then(parse_units_milli)
        else {
            return;
        };
        // A gauge that only grows: the metrics crate's counters are integers, a deduction may not be.
        metrics::gauge!("klr_units_deducted_total", "client" => client.clone(), "model" => task.model_name.clone())
            .increment(milli_to_units(milli));
        if milli == 0 {
            return;
        }
        if let Err(e) = self.tell_budget_thresholds(client, &task.id).await {
            tracing::warn!(client = %client, error = %e, "budget thresholds not checked");
        }
    }

    async fn tell_budget_thresholds(
        &self,
        client: &str,
        task_id: &str,
    ) -> Result<(), ServiceError> {
        let now = now_ms();
        for standing in self.budget_standings(client).await? {
            let (period_start, _) = standing.period.bounds(now);
            for threshold in thresholds_reached(standing.spent_milli, standing.limit_units) {
                let url = self.client_default_url(client, now).await?;
                let outbox = url.map(|url| OutboxEntry {
                    id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
                    client: client.to_owned(),
                    url,
                    payload: budget_event_json(client, &standing, threshold),
                });
                let alert = BudgetAlert {
                    client,
                    task_id,
                    period: standing.period,
                    period_start,
                    threshold,
                    now_ms: now,
                };
                if self
                    .store
                    .record_budget_alert(&alert, outbox.as_ref())
                    .await?
                {
                    tracing::info!(
                        client,
                        period = standing.period.as_str(),
                        threshold,
                        "budget threshold reached"
                    );
                    if outbox.is_some() {
                        self.notify_wake.notify_one();
                    }
                }
            }
        }
        Ok(())
    }

    /// Folds the usage aggregates' shards of the past two days' finished hours (see
    /// `Store::fold_usage_shards`); at most once per `FOLD_EVERY` in this replica.
    pub async fn fold_usage(&self) -> Result<(), ServiceError> {
        let now = now_ms();
        let last = self
            .usage_folded_at
            .load(std::sync::atomic::Ordering::Relaxed);
        if now - last < FOLD_EVERY_MS {
            return Ok(());
        }
        self.usage_folded_at
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let current_hour = Granularity::Hour.floor(now);
        let folded = self
            .store
            .fold_usage_shards(current_hour - 48 * HOUR_MS, current_hour)
            .await?;
        if folded > 0 {
            tracing::debug!(folded, "usage shards folded");
        }
        Ok(())
    }

    /// Where `client` stands against each budget it has, now.
    pub async fn budget_standings(
        &self,
        client: &str,
    ) -> Result<Vec<BudgetStanding>, ServiceError> {
        let budgets = self.store.client_budgets(client).await?;
        let limits = budgets.map(|b| b.limits()).unwrap_or_default();
        if limits.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let reserved = self.store.units_reserved(client).await?;
        let mut out = Vec::new();
        for (period, limit_units) in limits {
            let (start, resets_at_ms) = period.bounds(now);
            out.push(BudgetStanding {
                period,
                limit_units,
                spent_milli: self.store.units_spent_since(client, start).await?,
                reserved_units: reserved,
                resets_at_ms,
            });
        }
        Ok(out)
    }
}

/// Usage across clients in `[from_ms, to_ms)`, grouped for the operator.
pub async fn usage_table(
    store: &Store,
    from_ms: i64,
    to_ms: i64,
    by: UsageGrouping,
) -> Result<Vec<UsageLine>, ServiceError> {
    let from = from_ms.div_euclid(HOUR_MS) * HOUR_MS;
    let rows = store.usage_rows(None, from, to_ms).await?;
    let mut lines: BTreeMap<String, (BTreeMap<&'static str, i64>, i64)> = BTreeMap::new();
    for r in rows {
        let key = match by {
            UsageGrouping::Client => r.client.clone(),
            UsageGrouping::Model => r.model.clone(),
            UsageGrouping::Day => {
                crate::resource::rfc3339(Granularity::Day.floor(r.hour_start))[..10].to_owned()
            }
        };
        let line = lines.entry(key).or_insert_with(|| (final_statuses(), 0));
        count_status(&mut line.0, &r.status, r.tasks);
        line.1 += r.units_milli;
    }
    Ok(lines
        .into_iter()
        .map(|(key, (tasks, milli))| UsageLine {
            key,
            tasks,
            units_deducted: crate::domain::usage::milli_to_units(milli),
        })
        .collect())
}

/// The `budget` notification: a client's spend reached `threshold` % of a budget.
fn budget_event_json(client: &str, b: &BudgetStanding, threshold: i64) -> String {
    serde_json::json!({
        "type": "budget",
        "client": client,
        "period": b.period.as_str(),
        "threshold_percent": threshold,
        "budget_units": b.limit_units,
        "spent_units": milli_to_units(b.spent_milli),
        "reserved_units": b.reserved_units,
        "resets_at": crate::resource::rfc3339(b.resets_at_ms),
    })
    .to_string()
}

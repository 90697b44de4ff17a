//! Statements used only by `kling-relay-bench`: the storage limit it measures against, and bulk
//! seeding. Kept here so all SQL lives in the storage module.

use super::{Pool, Result, Store};

/// A task's life as the fairness scenario reads it.
#[doc(hidden)]
#[derive(Debug, sqlx::FromRow)]
pub struct BenchSpan {
    pub client: String,
    pub n: i64,
    pub created_at: i64,
    pub submitted_at: Option<i64>,
    pub completed_at: Option<i64>,
}

impl Store {
    /// Refreshes the planner's statistics after seeding, as autovacuum would within a minute:
    /// a plan cached while a table was still empty (sequential scans) would otherwise outlive
    /// the seeding and measure a state production leaves after its first minute.
    #[doc(hidden)]
    pub async fn bench_analyze(&self) -> Result<()> {
        on_pool!(self, p => { sqlx::query("ANALYZE").execute(p).await?; });
        Ok(())
    }

    /// Tasks waiting for dispatch.
    #[doc(hidden)]
    pub async fn bench_count_pending(&self) -> Result<i64> {
        const SQL: &str = "SELECT COUNT(*) FROM tasks WHERE status = 'pending'";
        Ok(on_pool!(self, p => sqlx::query_scalar(SQL).fetch_one(p).await?))
    }

    /// Tasks not yet final.
    #[doc(hidden)]
    pub async fn bench_count_open(&self) -> Result<i64> {
        const SQL: &str = "SELECT COUNT(*) FROM tasks \
            WHERE status NOT IN ('succeeded', 'failed', 'timed_out', 'canceled')";
        Ok(on_pool!(self, p => sqlx::query_scalar(SQL).fetch_one(p).await?))
    }

    /// Tasks whose input images are still stored (they should be only while pending).
    #[doc(hidden)]
    pub async fn bench_tasks_keeping_input_images(&self) -> Result<i64> {
        const SQL: &str = "SELECT COUNT(*) FROM task_inputs WHERE subject_images <> '[]' \
            OR scene_image IS NOT NULL OR style_image IS NOT NULL";
        Ok(on_pool!(self, p => sqlx::query_scalar(SQL).fetch_one(p).await?))
    }

    /// Every task's client, `n`, creation, dispatch (`submitted_at`) and end, on this service's
    /// clock: what the fairness scenario measures shares and waits from.
    #[doc(hidden)]
    pub async fn bench_task_spans(&self) -> Result<Vec<BenchSpan>> {
        const SQL: &str = "SELECT COALESCE(client, '') AS client, n, created_at, submitted_at, \
            completed_at FROM tasks";
        Ok(on_pool!(self, p => sqlx::query_as(SQL).fetch_all(p).await?))
    }

    /// One single-row update transaction: the storage limit of webhook intake.
    #[doc(hidden)]
    pub async fn bench_update_one(&self, id: &str, at: i64) -> Result<()> {
        const SQL: &str = "UPDATE tasks SET updated_at = $2 WHERE id = $1";
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query(SQL).bind(id).bind(at).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Inserts `n` final tasks of `client` (80% succeeded, 20% failed) with ids from `id_of` and
    /// `created_at` 1_700_000_000_000 + i, in multi-row statements.
    #[doc(hidden)]
    pub async fn bench_bulk_insert(
        &self,
        n: usize,
        client: &str,
        id_of: fn(usize) -> String,
    ) -> Result<()> {
        const ROWS: usize = 500;
        let mut start = 0;
        while start < n {
            let end = (start + ROWS).min(n);
            let mut sql = String::from(
                "INSERT INTO tasks (id, external_task_id, status, model_name, prompt, n, \
                 created_at, updated_at, completed_at, client, images) VALUES ",
            );
            let mut k = 0;
            for i in start..end {
                if i > start {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, 'kling-v2', ${}, 2, ${}, ${}, ${}, ${}, '[]')",
                    k + 1,
                    k + 2,
                    k + 3,
                    k + 4,
                    k + 5,
                    k + 5,
                    k + 5,
                    k + 6
                ));
                k += 6;
            }
            on_pool!(self, p => {
                let mut q = sqlx::query(&sql);
                for i in start..end {
                    let id = id_of(i);
                    let status = if i % 5 == 0 { "failed" } else { "succeeded" };
                    q = q
                        .bind(format!("klr-{id}"))
                        .bind(id)
                        .bind(status)
                        .bind(format!("bench task {i}"))
                        .bind(1_700_000_000_000i64 + i as i64)
                        .bind(client.to_owned());
                }
                q.execute(p).await?;
            });
            start = end;
        }
        Ok(())
    }

    /// (upstream task id, completed_at) of every completed task.
    #[doc(hidden)]
    pub async fn bench_completions(&self) -> Result<Vec<(String, i64)>> {
        const SQL: &str = "SELECT upstream_task_id, completed_at FROM tasks \
            WHERE completed_at IS NOT NULL AND upstream_task_id IS NOT NULL";
        on_pool!(self, p => {
            Ok(sqlx::query_as(SQL).fetch_all(p).await?)
        })
    }

    /// Inserts `n` open tasks of `client`, `submitted` upstream as `u{i}` and due for a poll now.
    #[doc(hidden)]
    pub async fn bench_seed_open(&self, n: usize, client: &str, now_ms: i64) -> Result<()> {
        const ROWS: usize = 500;
        let mut start = 0;
        while start < n {
            let end = (start + ROWS).min(n);
            let mut sql = String::from(
                "INSERT INTO tasks (id, external_task_id, upstream_task_id, status, model_name, n, \
                 created_at, updated_at, poll_due_at, client) VALUES ",
            );
            let mut k = 0;
            for i in start..end {
                if i > start {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, 'submitted', 'kling-v2', 1, ${}, ${}, ${}, ${})",
                    k + 1,
                    k + 2,
                    k + 3,
                    k + 4,
                    k + 4,
                    k + 4,
                    k + 5
                ));
                k += 5;
            }
            on_pool!(self, p => {
                let mut q = sqlx::query(&sql);
                for i in start..end {
                    let id = uuid::Uuid::now_v7().to_string();
                    q = q
                        .bind(id.clone())
                        .bind(format!("klr-{id}"))
                        .bind(format!("u{i}"))
                        .bind(now_ms)
                        .bind(client.to_owned());
                }
                q.execute(p).await?;
            });
            start = end;
        }
        Ok(())
    }

    /// Inserts `n` final tasks of `client` that ended evenly over `[from_ms, from_ms + span_ms)`
    /// (90% succeeded with a deduction of 2 units, 10% failed with 0), each upstream for a minute,
    /// and the usage aggregates exactly as `commit_change` would have kept them (the same
    /// `usage::Finished`), in multi-row statements.
    #[doc(hidden)]
    pub async fn bench_seed_usage(
        &self,
        n: usize,
        client: &str,
        from_ms: i64,
        span_ms: i64,
        id_of: fn(usize) -> String,
    ) -> Result<()> {
        use super::usage::Finished;
        use crate::domain::TaskStatus;
        use std::collections::HashMap;
        const ROWS: usize = 400;
        let step = (span_ms / n.max(1) as i64).max(1);
        let mut hourly: HashMap<super::usage::HourlyKey, (i64, i64)> = HashMap::new();
        let mut durations: HashMap<(String, i64, i64, i64), i64> = HashMap::new();
        let mut start = 0;
        while start < n {
            let end = (start + ROWS).min(n);
            let mut sql = String::from(
                "INSERT INTO tasks (id, external_task_id, upstream_task_id, status, model_name, \
                 prompt, n, created_at, updated_at, completed_at, submitted_at, client, images, \
                 final_unit_deduction, cost_source) VALUES ",
            );
            let mut k = 0;
            for i in start..end {
                if i > start {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${a}, ${b}, ${c}, ${d}, 'kling-v2', NULL, 2, ${e}, ${f}, ${f}, ${e}, ${g}, '[]', ${h}, 'webhook')",
                    a = k + 1,
                    b = k + 2,
                    c = k + 3,
                    d = k + 4,
                    e = k + 5,
                    f = k + 6,
                    g = k + 7,
                    h = k + 8,
                ));
                k += 8;
            }
            let rows: Vec<(String, TaskStatus, i64, i64, &'static str)> = (start..end)
                .map(|i| {
                    let ended = from_ms + i as i64 * step;
                    let (status, deduction) = if i % 10 == 0 {
                        (TaskStatus::Failed, "0")
                    } else {
                        (TaskStatus::Succeeded, "2")
                    };
                    (id_of(i), status, ended - 60_000, ended, deduction)
                })
                .collect();
            on_pool!(self, p => {
                let mut q = sqlx::query(&sql);
                for (id, status, submitted, ended, deduction) in &rows {
                    q = q
                        .bind(format!("klr-{id}"))
                        .bind(id.clone())
                        .bind(format!("u-{id}"))
                        .bind(status.as_str())
                        .bind(*submitted)
                        .bind(*ended)
                        .bind(client.to_owned())
                        .bind(*deduction);
                }
                q.execute(p).await?;
            });
            for (id, status, submitted, ended, deduction) in rows {
                let f = Finished::new(
                    &id,
                    client.to_owned(),
                    "kling-v2".into(),
                    status,
                    ended,
                    Some(submitted),
                    Some(deduction),
                );
                let e = hourly
                    .entry((
                        f.client.clone(),
                        f.hour_start,
                        f.model.clone(),
                        f.status,
                        f.shard,
                    ))
                    .or_insert((0, 0));
                e.0 += 1;
                e.1 += f.units_milli;
                if let Some(bin) = f.duration_bin {
                    *durations
                        .entry((f.client, f.hour_start, bin, f.shard))
                        .or_insert(0) += 1;
                }
            }
            start = end;
        }
        let hourly: Vec<_> = hourly.into_iter().collect();
        for chunk in hourly.chunks(ROWS) {
            let mut sql = String::from(
                "INSERT INTO usage_hourly (client, hour_start, model, status, shard, tasks, \
                 units_milli) VALUES ",
            );
            for j in 0..chunk.len() {
                let k = j * 7;
                if j > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    k + 1,
                    k + 2,
                    k + 3,
                    k + 4,
                    k + 5,
                    k + 6,
                    k + 7
                ));
            }
            on_pool!(self, p => {
                let mut q = sqlx::query(&sql);
                for ((client, hour, model, status, shard), (tasks, milli)) in chunk {
                    q = q.bind(client).bind(*hour).bind(model).bind(*status).bind(*shard)
                        .bind(*tasks).bind(*milli);
                }
                q.execute(p).await?;
            });
        }
        let durations: Vec<_> = durations.into_iter().collect();
        for chunk in durations.chunks(ROWS) {
            let mut sql = String::from(
                "INSERT INTO usage_durations (client, hour_start, bin, shard, tasks) VALUES ",
            );
            for j in 0..chunk.len() {
                let k = j * 5;
                if j > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${})",
                    k + 1,
                    k + 2,
                    k + 3,
                    k + 4,
                    k + 5
                ));
            }
            on_pool!(self, p => {
                let mut q = sqlx::query(&sql);
                for ((client, hour, bin, shard), tasks) in chunk {
                    q = q.bind(client).bind(*hour).bind(*bin).bind(*shard).bind(*tasks);
                }
                q.execute(p).await?;
            });
        }
        Ok(())
    }

    /// What the same question costs straight from the tasks table (no aggregates): a scan of
    /// every task of the client that ended in the range.
    #[doc(hidden)]
    pub async fn bench_usage_from_tasks(
        &self,
        client: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<i64> {
        const SQL: &str = "SELECT CAST(COUNT(*) AS BIGINT) FROM (SELECT status, \
            SUM(CAST(final_unit_deduction AS DOUBLE PRECISION)) AS u FROM tasks \
            WHERE client = $1 AND completed_at >= $2 AND completed_at < $3 \
            GROUP BY status, completed_at / 86400000) AS days";
        on_pool!(self, p => {
            Ok(sqlx::query_scalar(SQL).bind(client).bind(from_ms).bind(to_ms).fetch_one(p).await?)
        })
    }

    /// Up to `n` task ids.
    #[doc(hidden)]
    pub async fn bench_task_ids(&self, n: usize) -> Result<Vec<String>> {
        const SQL: &str = "SELECT id FROM tasks ORDER BY created_at LIMIT $1";
        on_pool!(self, p => {
            Ok(sqlx::query_scalar(SQL).bind(n as i64).fetch_all(p).await?)
        })
    }
}

//! Tasks: inserting a new task (idempotency, queue and budget checks in one transaction), and
//! reading tasks, their inputs, lists and timelines.

use super::*;

impl Store {
    /// Stores a new `pending` task, its inputs and its first event in one transaction — unless
    /// its idempotency key is already taken (the task that took it is returned instead) or
    /// `max_pending` tasks already wait for dispatch.
    pub async fn insert_task(
        &self,
        t: NewTaskRecord,
        idempotency: Option<&IdempotencyClaim>,
        caps: PendingCaps,
    ) -> Result<InsertOutcome> {
        let _writer = self.writer().await;
        const TASK: &str =
            "INSERT INTO tasks (id, external_task_id, status, model_name, prompt, n, \
            aspect_ratio, metadata, created_at, updated_at, next_dispatch_at, client, notify_url, \
            request_id, priority) \
            SELECT $1, $2, 'pending', $3, $4, $5, $6, $7, $8, $8, $8, $10, $11, $13, $14 \
            WHERE (SELECT COUNT(*) FROM tasks WHERE status = 'pending') < $9 \
            AND (SELECT COUNT(*) FROM tasks WHERE client = $10 AND status = 'pending') < $12";
        const INPUTS: &str =
            "INSERT INTO task_inputs (task_id, subject_images, scene_image, style_image, \
            negative_prompt, watermark_info, summary) VALUES ($1, $2, $3, $4, $5, $6, $7)";
        const EXPIRE_KEY: &str =
            "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND created_at < $3";
        const CLAIM_KEY: &str =
            "INSERT INTO idempotency_keys (scope, key, request_hash, task_id, created_at) \
            VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scope, key) DO NOTHING";
        const READ_KEY: &str =
            "SELECT request_hash, task_id FROM idempotency_keys WHERE scope = $1 AND key = $2";
        let metadata = t.metadata.as_ref().map(json_text).transpose()?;
        let summary = json_text(&t.inputs.summary())?;
        // The images move into the statement rather than being copied: a Base64 submit is
        // tens of MB, and SQLite copies each bound value and builds the row once more.
        let mut t = t;
        let subjects = json_text(&std::mem::take(&mut t.inputs.subject_images))?;
        let scene_image = t.inputs.scene_image.take();
        let style_image = t.inputs.style_image.take();
        let watermark = t
            .inputs
            .watermark_info
            .as_ref()
            .map(json_text)
            .transpose()?;
        let serialize_submits = self.is_postgres();
        let begin = self.begin_claim();
        on_pool!(self, p => {
            let mut conn = p.acquire().await?;
            let outcome = async {
            // SQLite: the write lock up front, since the budget check reads before the insert
            // writes, and a deferred transaction whose snapshot went stale cannot upgrade.
            let mut tx = conn.begin_with(begin).await?;
            if serialize_submits {
                // Postgres: make the pending count and the insert one atomic step across
                // sessions (SQLite's single writer already does).
                sqlx::query(dialect::ADVISORY_XACT_LOCK)
                    .bind(dialect::SUBMIT_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(k) = idempotency {
                sqlx::query(EXPIRE_KEY)
                    .bind(&k.scope)
                    .bind(&k.key)
                    .bind(k.expired_before_ms)
                    .execute(&mut *tx)
                    .await?;
                let taken: Option<(String, String)> = sqlx::query_as(READ_KEY)
                    .bind(&k.scope)
                    .bind(&k.key)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some((hash, task_id)) = taken {
                    tx.rollback().await?;
                    return Ok(InsertOutcome::Existing {
                        task_id,
                        same_request: hash == k.request_hash,
                    });
                }
            }
            if let Some(client) = &t.client {
                // Under the same lock as the insert (Postgres) or the single writer (SQLite):
                // two submits never both spend the last of a budget.
                let budgets: Option<usage::ClientBudgets> =
                    sqlx::query_as(usage::CLIENT_BUDGETS).bind(client).fetch_optional(&mut *tx).await?;
                let limits = budgets.map(|b| b.limits()).unwrap_or_default();
                if !limits.is_empty() {
                    let reserved: i64 =
                        sqlx::query_scalar(usage::UNITS_RESERVED).bind(client).fetch_one(&mut *tx).await?;
                    for (period, limit_units) in limits {
                        let (start, resets_at_ms) = period.bounds(t.created_at_ms);
                        let spent_milli: i64 = sqlx::query_scalar(usage::UNITS_SPENT)
                            .bind(client)
                            .bind(start)
                            .fetch_one(&mut *tx)
                            .await?;
                        let standing = crate::domain::usage::BudgetStanding {
                            period,
                            limit_units,
                            spent_milli,
                            reserved_units: reserved,
                            resets_at_ms,
                        };
                        if !standing.admits(t.n) {
                            tx.rollback().await?;
                            return Ok(InsertOutcome::OverBudget(standing));
                        }
                    }
                }
            }
            let inserted = sqlx::query(TASK)
                .bind(&t.id)
                .bind(&t.external_task_id)
                .bind(&t.model_name)
                .bind(&t.prompt)
                .bind(t.n)
                .bind(&t.aspect_ratio)
                .bind(&metadata)
                .bind(t.created_at_ms)
                .bind(caps.total)
                .bind(&t.client)
                .bind(&t.notify_url)
                .bind(caps.per_client)
                .bind(&t.request_id)
                .bind(t.priority.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if inserted == 0 {
                tx.rollback().await?;
                return Ok(InsertOutcome::QueueFull);
            }
            if let Some(k) = idempotency {
                // A concurrent request may have taken the key since the read above; the primary
                // key decides, and the loser returns the winner's task.
                let claimed = sqlx::query(CLAIM_KEY)
                    .bind(&k.scope)
                    .bind(&k.key)
                    .bind(&k.request_hash)
                    .bind(&t.id)
                    .bind(t.created_at_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if claimed == 0 {
                    tx.rollback().await?;
                    let (hash, task_id): (String, String) = sqlx::query_as(READ_KEY)
                        .bind(&k.scope)
                        .bind(&k.key)
                        .fetch_one(p)
                        .await?;
                    return Ok(InsertOutcome::Existing {
                        task_id,
                        same_request: hash == k.request_hash,
                    });
                }
            }
            // Not cached: a cached SQLite statement keeps its last bound values (here, megabytes
            // of Base64) until its next use.
            sqlx::query(INPUTS)
                .persistent(false)
                .bind(&t.id)
                .bind(subjects)
                .bind(scene_image)
                .bind(style_image)
                .bind(&t.inputs.negative_prompt)
                .bind(&watermark)
                .bind(summary)
                .execute(&mut *tx)
                .await?;
            sqlx::query(INSERT_EVENT)
                .bind(&t.id)
                .bind(t.created_at_ms)
                .bind(EventSource::Api.as_str())
                .bind(TaskStatus::Pending.as_str())
                .bind(None::<String>)
                .bind(Some("accepted"))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, StorageError>(InsertOutcome::Inserted)
            }
            .await;
            // A Base64 submit grows the connection's buffers to its size; the pool would keep
            // them for as long as the connection lives.
            conn.shrink_buffers();
            outcome
        })
    }

    /// Forgets idempotency keys older than `cutoff_ms`. Returns how many.
    pub async fn delete_expired_idempotency_keys(&self, cutoff_ms: i64, limit: i64) -> Result<u64> {
        let _writer = self.writer().await;
        const SQL: &str = "DELETE FROM idempotency_keys WHERE (scope, key) IN \
            (SELECT scope, key FROM idempotency_keys WHERE created_at < $1 LIMIT $2)";
        on_pool!(self, p => {
            Ok(sqlx::query(SQL).bind(cutoff_ms).bind(limit).execute(p).await?.rows_affected())
        })
    }

    /// Units of upstream concurrency our tasks may hold: tasks upstream has (`submitted`,
    /// `processing`) plus pending tasks whose create may have landed.
    pub async fn units_in_flight(&self) -> Result<i64> {
        on_pool!(self, p => {
            Ok(sqlx::query_scalar(sql::UNITS_IN_FLIGHT).fetch_one(p).await?)
        })
    }

    /// How many tasks are in each open status.
    pub async fn open_tasks_by_status(&self) -> Result<Vec<(String, i64)>> {
        on_pool!(self, p => {
            Ok(sqlx::query_as(sql::OPEN_BY_STATUS).fetch_all(p).await?)
        })
    }

    /// Tasks waiting for dispatch.
    pub async fn pending_count(&self) -> Result<i64> {
        on_pool!(self, p => {
            Ok(sqlx::query_scalar(sql::PENDING_COUNT).fetch_one(p).await?)
        })
    }

    pub async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
        let row: Option<TaskRow> = on_pool!(self, p => {
            sqlx::query_as(&sql).bind(id).fetch_optional(p).await?
        });
        row.map(Task::try_from).transpose()
    }

    /// Several tasks by id in one query, each read back on its own (one corrupt row does not
    /// hide the others); ids not found are left out.
    pub async fn get_tasks(&self, ids: &[&str]) -> Result<Vec<(String, Result<Task>)>> {
        let rows: Vec<TaskRow> = match &self.pool {
            Pool::Postgres(p) => {
                let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ANY($1)");
                sqlx::query_as(&sql).bind(ids).fetch_all(p).await?
            }
            Pool::Sqlite(p) => {
                let sql = format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE id IN (SELECT value FROM json_each($1))"
                );
                sqlx::query_as(&sql)
                    .bind(json_text(&ids)?)
                    .fetch_all(p)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|r| (r.id.clone(), Task::try_from(r)))
            .collect())
    }

    /// What the task's input images were: the summary written at submit (None for a task
    /// stored before summaries were kept, or with no inputs row).
    pub async fn input_summary(&self, id: &str) -> Result<Option<Vec<InputImage>>> {
        const SQL: &str = "SELECT summary FROM task_inputs WHERE task_id = $1";
        let row: Option<(Option<String>,)> = on_pool!(self, p => {
            sqlx::query_as(SQL).bind(id).fetch_optional(p).await?
        });
        row.and_then(|(s,)| s)
            .map(|s| {
                serde_json::from_str(&s)
                    .map_err(|e| StorageError::Corrupt(format!("task {id}: input summary: {e}")))
            })
            .transpose()
    }

    pub async fn get_inputs(&self, id: &str) -> Result<Option<TaskInputs>> {
        const SQL: &str =
            "SELECT subject_images, scene_image, style_image, negative_prompt, watermark_info \
            FROM task_inputs WHERE task_id = $1";
        let row: Option<InputsRow> = on_pool!(self, p => {
            let mut conn = p.acquire().await?;
            // Not cached, so the statement does not hold the last row's Base64 (see insert_task).
            let row = sqlx::query_as(SQL).persistent(false).bind(id).fetch_optional(&mut *conn).await;
            conn.shrink_buffers();
            row?
        });
        row.map(|r| {
            Ok(TaskInputs {
                subject_images: serde_json::from_str(&r.subject_images)
                    .map_err(|e| StorageError::Corrupt(format!("task {id}: inputs: {e}")))?,
                scene_image: r.scene_image,
                style_image: r.style_image,
                negative_prompt: r.negative_prompt,
                watermark_info: r
                    .watermark_info
                    .as_deref()
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(|e| {
                        StorageError::Corrupt(format!("task {id}: watermark_info: {e}"))
                    })?,
            })
        })
        .transpose()
    }

    /// Newest first, keyset-paged on `(created_at, id)`.
    pub async fn list_tasks(&self, f: &ListFilter) -> Result<Vec<Task>> {
        let sql = sql::list(f);
        let rows: Vec<TaskRow> = on_pool!(self, p => {
            let mut q = sqlx::query_as(&sql);
            if let Some(c) = &f.client {
                q = q.bind(c.clone());
            }
            for s in &f.statuses {
                q = q.bind(s.as_str());
            }
            if let Some(v) = f.created_after_ms {
                q = q.bind(v);
            }
            if let Some(v) = f.created_before_ms {
                q = q.bind(v);
            }
            if let Some(t) = &f.text {
                q = q.bind(like_pattern(t));
            }
            if let Some((at, id)) = &f.before {
                q = q.bind(*at).bind(id.clone());
            }
            q.bind(f.limit).fetch_all(p).await?
        });
        rows.into_iter().map(Task::try_from).collect()
    }

    pub async fn events(&self, id: &str) -> Result<Vec<TaskEvent>> {
        let rows: Vec<EventRow> = on_pool!(self, p => {
            sqlx::query_as(sql::EVENTS).bind(id).fetch_all(p).await?
        });
        Ok(rows
            .into_iter()
            .map(|r| TaskEvent {
                at_ms: r.at,
                source: r.source,
                status: r.status,
                upstream_status: r.upstream_status,
                detail: r.detail,
                upstream_payload: r.upstream_payload,
            })
            .collect())
    }
}

//! Tasks: inserting one new task (the batch is `intake`), and reading tasks, their inputs,
//! lists and timelines.

use super::*;

impl Store {
    /// Stores a new `pending` task, its inputs and its first event in one transaction — unless
    /// its idempotency key is already taken (the task that took it is returned instead),
    /// `max_pending` tasks already wait for dispatch, or the client's budget has no room (see
    /// `insert_tasks`, which this is with one task).
    pub async fn insert_task(
        &self,
        t: NewTaskRecord,
        idempotency: Option<&IdempotencyClaim>,
        caps: PendingCaps,
    ) -> Result<InsertOutcome> {
        self.insert_one(&mut NewTask::new(t, idempotency.cloned(), caps)?)
            .await
    }

    /// `insert_tasks` with one task.
    pub async fn insert_one(&self, task: &mut NewTask) -> Result<InsertOutcome> {
        self.insert_tasks(std::slice::from_mut(task))
            .await?
            .pop()
            .ok_or_else(|| StorageError::Batch("no outcome for the task".into()))
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
            Pool::Postgres(PgPools { keyed: p, .. }) => {
                sqlx::query_as(READ_TASKS_PG.as_str())
                    .bind(ids)
                    .fetch_all(p)
                    .await?
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

/// Postgres: the tasks with the given ids (`Store::get_tasks`, on the keyed pool), written once
/// rather than on every grouped read.
pub(super) static READ_TASKS_PG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ANY($1::text[])")
});

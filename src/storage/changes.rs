//! Status changes: one or a group committed as compare-and-sets with their events, outbox rows,
//! archive rows and usage; dispatch retries, poll scheduling, time-outs and query plans.

use super::*;

impl Store {
    /// Commits a status change decided on `expected_version`, with its event and its
    /// notification. Returns false when the task changed in between (the caller re-reads and
    /// decides again).
    pub async fn commit_change(&self, c: &Commit<'_>) -> Result<bool> {
        let done = self.commit_changes(std::slice::from_ref(c)).await?;
        Ok(done.first().copied().unwrap_or(false))
    }

    /// Commits several status changes in one transaction (group commit): each is still its own
    /// compare-and-set with its event, notification, archive rows and usage; the result says,
    /// per change, whether it won. Any database error fails them all: none is stored.
    pub async fn commit_changes(&self, batch: &[Commit<'_>]) -> Result<Vec<bool>> {
        let _writer = self.writer().await;
        let is_postgres = self.is_postgres();
        // Rows are changed in one order (tasks by id, then the usage aggregates by key), so two
        // batches committing at once (Postgres) wait for each other instead of deadlocking.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by(|a, b| batch[*a].id.cmp(batch[*b].id));
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let mut won = vec![false; batch.len()];
            let mut ended = usage::Ended::default();
            let mut changed: Vec<&str> = Vec::with_capacity(batch.len());
            for &slot in &order {
                let c = &batch[slot];
                let Commit {
                    id,
                    expected_version,
                    change,
                    source,
                    now_ms,
                    poll_due_at_ms,
                    outbox,
                    archive,
                    upstream_payload,
                    leaves_pending,
                } = *c;
                const SQL: &str = "UPDATE tasks SET status = $2, \
                    upstream_status = COALESCE($3, upstream_status), \
                    upstream_task_id = COALESCE(upstream_task_id, $4), \
                    upstream_updated_at = $5, \
                    images = COALESCE($6, images), \
                    error_code = COALESCE($7, error_code), \
                    error_message = COALESCE($8, error_message), \
                    updated_at = $9, completed_at = $10, \
                    next_dispatch_at = NULL, dispatch_started_at = NULL, \
                    poll_due_at = $11, poll_count = 0, version = version + 1, \
                    final_unit_deduction = COALESCE($13, final_unit_deduction), \
                    submitted_at = COALESCE(submitted_at, $14), \
                    upstream_started_at = COALESCE(upstream_started_at, $15), \
                    cost_source = CASE WHEN $13 IS NULL THEN cost_source ELSE $16 END \
                    WHERE id = $1 AND version = $12 \
                    RETURNING COALESCE(client, ''), model_name, \
                    CASE WHEN upstream_task_id IS NULL THEN NULL ELSE submitted_at END, \
                    final_unit_deduction";
                let images = change.images.as_ref().map(json_text).transpose()?;
                let upstream_status = change.upstream_status.map(|s| s.as_str());
                let completed_at = change.status.is_final().then_some(now_ms);
                let (code, message) = match &change.error {
                    Some(e) => (Some(e.code.as_str()), Some(e.message.as_str())),
                    None => (None, None),
                };
                let done: Option<(String, String, Option<i64>, Option<String>)> = sqlx::query_as(SQL)
                    .bind(id)
                    .bind(change.status.as_str())
                    .bind(upstream_status)
                    .bind(&change.bind_upstream_task_id)
                    .bind(change.upstream_updated_at_ms)
                    .bind(&images)
                    .bind(code)
                    .bind(message)
                    .bind(now_ms)
                    .bind(completed_at)
                    .bind(poll_due_at_ms)
                    .bind(expected_version)
                    .bind(&change.final_unit_deduction)
                    .bind(leaves_pending.then_some(now_ms))
                    .bind(if leaves_pending { change.upstream_updated_at_ms } else { None })
                    .bind(source.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some((client, model, submitted_at, deduction)) = done else {
                    continue;
                };
                if change.status.is_final() {
                    // A task is counted once: the status machine never moves a final task, and this
                    // commit won the compare-and-set on a version that was not final.
                    ended.add(usage::Finished::new(
                        id,
                        client,
                        model,
                        change.status,
                        now_ms,
                        submitted_at,
                        deduction.as_deref(),
                    ));
                }
                sqlx::query(INSERT_EVENT_WITH_PAYLOAD)
                    .bind(id)
                    .bind(now_ms)
                    .bind(source.as_str())
                    .bind(change.status.as_str())
                    .bind(upstream_status)
                    .bind(&change.detail)
                    .bind(upstream_payload)
                    .execute(&mut *tx)
                    .await?;
                if leaves_pending {
                    // Out of pending means upstream has the task or it is over: no dispatch can need
                    // its images again, so they go with the same commit (their summary stays).
                    sqlx::query(DROP_INPUT_IMAGES).bind(id).execute(&mut *tx).await?;
                }
                if let Some(o) = outbox {
                    // The notification is part of the change: both commit, or neither.
                    sqlx::query(deliveries::INSERT_OUTBOX)
                        .bind(&o.id)
                        .bind(id)
                        .bind(&o.client)
                        .bind(&o.url)
                        .bind(change.status.as_str())
                        .bind(&o.payload)
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await?;
                }
                if let (true, TaskStatus::Succeeded, Some(images)) =
                    (archive, change.status, &change.images)
                {
                    for img in images {
                        sqlx::query(archive::ENQUEUE)
                            .bind(id)
                            .bind(i64::from(img.index))
                            .bind(&img.url)
                            .bind(now_ms)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                won[slot] = true;
                changed.push(id);
            }
            if is_postgres {
                // Delivered at commit: other replicas' waiters hear of the changes
                // (storage::feed), a notification per hundred tasks.
                for ids in changed.chunks(feed::IDS_PER_NOTIFICATION) {
                    sqlx::query(dialect::NOTIFY)
                        .bind(feed::CHANNEL)
                        .bind(self.change_payload(ids))
                        .execute(&mut *tx)
                        .await?;
                }
            }
            for (key, (tasks, units_milli)) in &ended.hourly {
                sqlx::query(usage::ADD_HOURLY)
                    .bind(&key.0)
                    .bind(key.1)
                    .bind(&key.2)
                    .bind(key.3)
                    .bind(key.4)
                    .bind(*tasks)
                    .bind(*units_milli)
                    .execute(&mut *tx)
                    .await?;
            }
            for (key, tasks) in &ended.durations {
                sqlx::query(usage::ADD_DURATION)
                    .bind(&key.0)
                    .bind(key.1)
                    .bind(key.2)
                    .bind(key.3)
                    .bind(*tasks)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(won)
        })
    }

    /// Records a dispatch attempt that did not land; the task stays pending.
    pub async fn retry_dispatch(&self, id: &str, now_ms: i64, r: &DispatchRetry) -> Result<()> {
        let _writer = self.writer().await;
        const SQL: &str = "UPDATE tasks SET next_dispatch_at = $2, \
            dispatch_started_at = CASE WHEN $3 = 1 THEN dispatch_started_at ELSE NULL END \
            WHERE id = $1 AND status = 'pending'";
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let done = sqlx::query(SQL)
                .bind(id)
                .bind(r.next_attempt_at_ms)
                .bind(i64::from(r.maybe_sent))
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() > 0 {
                sqlx::query(INSERT_EVENT)
                    .bind(id)
                    .bind(now_ms)
                    .bind(EventSource::Dispatch.as_str())
                    .bind(TaskStatus::Pending.as_str())
                    .bind(None::<String>)
                    .bind(&r.detail)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Tasks upstream holds whose next poll is due, most overdue first.
    pub async fn due_polls(&self, now_ms: i64, limit: i64) -> Result<Vec<PollCandidate>> {
        let rows: Vec<PollRow> = on_pool!(self, p => {
            sqlx::query_as(sql::DUE_POLLS).bind(now_ms).bind(limit).fetch_all(p).await?
        });
        Ok(rows.into_iter().map(PollCandidate::from).collect())
    }

    /// Sets the next poll of a still-open task after a poll that brought no change.
    pub async fn reschedule_poll(&self, id: &str, due_at_ms: i64, poll_count: i64) -> Result<()> {
        let _writer = self.writer().await;
        const SQL: &str = "UPDATE tasks SET poll_due_at = $2, poll_count = $3 \
            WHERE id = $1 AND poll_due_at IS NOT NULL";
        on_pool!(self, p => {
            sqlx::query(SQL).bind(id).bind(due_at_ms).bind(poll_count).execute(p).await?;
            Ok(())
        })
    }

    /// Records a note on the task's timeline (its status unchanged) and, if the task is being
    /// polled, makes its next poll due at `now_ms`. Returns whether a poll was brought forward.
    pub async fn note_and_poll_now(
        &self,
        id: &str,
        now_ms: i64,
        source: EventSource,
        detail: &str,
        upstream_payload: Option<&str>,
    ) -> Result<bool> {
        let _writer = self.writer().await;
        const NOTE: &str = "INSERT INTO task_events \
            (task_id, at, source, status, upstream_status, detail, upstream_payload) \
            SELECT id, $2, $3, status, upstream_status, $4, $5 FROM tasks WHERE id = $1";
        const POLL: &str = "UPDATE tasks SET poll_due_at = $2 \
            WHERE id = $1 AND poll_due_at IS NOT NULL";
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query(NOTE)
                .bind(id)
                .bind(now_ms)
                .bind(source.as_str())
                .bind(detail)
                .bind(upstream_payload)
                .execute(&mut *tx)
                .await?;
            let moved = sqlx::query(POLL).bind(id).bind(now_ms).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(moved.rows_affected() > 0)
        })
    }

    /// The query plan of `sql` with the given parameters, one line per plan step (SQLite's
    /// `EXPLAIN QUERY PLAN`, Postgres's `EXPLAIN` with sequential scans priced out, so a plan
    /// without an index means no index can serve the query).
    pub async fn explain(&self, sql: &str, args: &[ExplainArg]) -> Result<Vec<String>> {
        match &self.pool {
            Pool::Sqlite(p) => {
                let text = format!("EXPLAIN QUERY PLAN {sql}");
                let mut q = sqlx::query_as::<_, (i64, i64, i64, String)>(&text);
                for a in args {
                    q = match a {
                        ExplainArg::Int(v) => q.bind(*v),
                        ExplainArg::Text(v) => q.bind(v.clone()),
                    };
                }
                Ok(q.fetch_all(p).await?.into_iter().map(|r| r.3).collect())
            }
            Pool::Postgres(p) => {
                let mut conn = p.acquire().await?;
                sqlx::query("SET enable_seqscan = off")
                    .execute(&mut *conn)
                    .await?;
                let text = format!("EXPLAIN {sql}");
                let mut q = sqlx::query_scalar::<_, String>(&text);
                for a in args {
                    q = match a {
                        ExplainArg::Int(v) => q.bind(*v),
                        ExplainArg::Text(v) => q.bind(v.clone()),
                    };
                }
                let plan = q.fetch_all(&mut *conn).await;
                sqlx::query("RESET enable_seqscan")
                    .execute(&mut *conn)
                    .await?;
                Ok(plan?)
            }
        }
    }

    /// Open tasks created before `cutoff_ms` (candidates for `timed_out`).
    pub async fn expired_open_tasks(&self, cutoff_ms: i64, limit: i64) -> Result<Vec<String>> {
        on_pool!(self, p => {
            Ok(sqlx::query_scalar(sql::EXPIRED_OPEN).bind(cutoff_ms).bind(limit).fetch_all(p).await?)
        })
    }
}

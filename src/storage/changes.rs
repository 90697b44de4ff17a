//! Around status changes (the changes themselves are in `commits`): dispatch retries, poll
//! scheduling, notes, time-outs and query plans.

use super::*;

impl Store {
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
            Pool::Postgres(PgPools { main: p, .. }) => {
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

//! SQLite: a batch of status changes as a statement per row, in arrival order (statements run
//! in-process, so the batch costs one flush, not a round trip per statement), and its events
//! in one statement.

use super::super::*;

impl Store {
    /// SQLite: the changes one statement each (statements run in-process, so a batch costs one
    /// flush, not a round trip per statement), in arrival order.
    pub(super) async fn commit_rows(
        &self,
        p: &SqlitePool,
        batch: &[Commit<'_>],
    ) -> Result<Vec<bool>> {
        let _writer = self.writer().await;
        {
            let mut tx = p.begin().await?;
            let mut won = vec![false; batch.len()];
            let mut ended = usage::Ended::default();
            // The timeline events of the won changes, in order, written in one statement.
            let mut events: Vec<serde_json::Value> = Vec::with_capacity(batch.len());
            for (slot, c) in batch.iter().enumerate() {
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
                let done: Option<(String, String, Option<i64>, Option<String>)> =
                    sqlx::query_as(SQL)
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
                        .bind(if leaves_pending {
                            change.upstream_updated_at_ms
                        } else {
                            None
                        })
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
                events.push(serde_json::json!([
                    id,
                    now_ms,
                    source.as_str(),
                    change.status.as_str(),
                    upstream_status,
                    change.detail,
                    upstream_payload
                ]));
                if leaves_pending {
                    // Out of pending means upstream has the task or it is over: no dispatch can need
                    // its images again, so they go with the same commit (their summary stays).
                    sqlx::query(DROP_INPUT_IMAGES)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
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
            }
            if !events.is_empty() {
                sqlx::query(INSERT_EVENTS_JSON)
                    .bind(serde_json::Value::Array(events).to_string())
                    .execute(&mut *tx)
                    .await?;
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
        }
    }
}

/// SQLite: timeline events from a JSON array of `[task_id, at, source, status,
/// upstream_status, detail, upstream_payload]`, in the array's order.
const INSERT_EVENTS_JSON: &str = "INSERT INTO task_events \
    (task_id, at, source, status, upstream_status, detail, upstream_payload) \
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
    value ->> 6 FROM json_each($1) ORDER BY key";

//! SQLite: a batch of status changes as one `UPDATE … FROM json_each(…)` per round of rows
//! (each task at most once per round), the events of the batch in one statement, and the
//! rarer parts (input drops, notifications, archive rows) a statement per row.

use super::super::*;

impl Store {
    pub(super) async fn commit_rows(
        &self,
        p: &SqlitePool,
        batch: &[Commit<'_>],
    ) -> Result<Vec<bool>> {
        let _writer = self.writer().await;
        let mut tx = p.begin().await?;
        let mut won = vec![false; batch.len()];
        let mut ended = usage::Ended::default();
        // The timeline events of the won changes, by arrival, written in one statement.
        let mut events: Vec<(usize, serde_json::Value)> = Vec::with_capacity(batch.len());
        for round in super::rounds(batch) {
            let mut rows = Vec::with_capacity(round.len());
            for &slot in &round {
                rows.push(update_row(&batch[slot])?);
            }
            let returned: Vec<WonRow> = sqlx::query_as(UPDATE_JSON)
                .bind(serde_json::Value::Array(rows).to_string())
                .fetch_all(&mut *tx)
                .await?;
            let slot_of: std::collections::HashMap<&str, usize> =
                round.iter().map(|&slot| (batch[slot].id, slot)).collect();
            for (id, client, model, submitted_at, deduction) in returned {
                let slot = *slot_of
                    .get(id.as_str())
                    .ok_or_else(|| StorageError::Corrupt(format!("commit returned {id}")))?;
                let c = &batch[slot];
                let change = c.change;
                won[slot] = true;
                if let Some(f) =
                    super::finished(c, &client, &model, submitted_at, deduction.as_deref())
                {
                    ended.add(f);
                }
                events.push((
                    slot,
                    serde_json::json!([
                        c.id,
                        c.now_ms,
                        c.source.as_str(),
                        change.status.as_str(),
                        change.upstream_status.map(|u| u.as_str()),
                        change.detail,
                        c.upstream_payload
                    ]),
                ));
                if c.leaves_pending {
                    // Out of pending means upstream has the task or it is over: no dispatch can
                    // need its images again, so they go with the same commit (the summary stays).
                    sqlx::query(DROP_INPUT_IMAGES)
                        .bind(c.id)
                        .execute(&mut *tx)
                        .await?;
                }
                if let Some(o) = c.outbox {
                    // The notification is part of the change: both commit, or neither.
                    sqlx::query(deliveries::INSERT_OUTBOX)
                        .bind(&o.id)
                        .bind(c.id)
                        .bind(&o.client)
                        .bind(&o.url)
                        .bind(change.status.as_str())
                        .bind(&o.payload)
                        .bind(c.now_ms)
                        .execute(&mut *tx)
                        .await?;
                }
                for img in super::archived_images(c) {
                    sqlx::query(archive::ENQUEUE)
                        .bind(c.id)
                        .bind(i64::from(img.index))
                        .bind(&img.url)
                        .bind(c.now_ms)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        if !events.is_empty() {
            events.sort_by_key(|(slot, _)| *slot);
            let events: Vec<serde_json::Value> = events.into_iter().map(|(_, e)| e).collect();
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

/// What a won compare-and-set returns: task id, client, model, when it reached upstream (if
/// it did), upstream's deduction.
type WonRow = (String, String, String, Option<i64>, Option<String>);

/// One change as a row of `UPDATE_JSON`'s input.
fn update_row(c: &Commit<'_>) -> Result<serde_json::Value> {
    let change = c.change;
    Ok(serde_json::json!([
        c.id,
        c.expected_version,
        change.status.as_str(),
        change.upstream_status.map(|u| u.as_str()),
        change.bind_upstream_task_id,
        change.upstream_updated_at_ms,
        change.images.as_ref().map(json_text).transpose()?,
        change.error.as_ref().map(|e| e.code.as_str()),
        change.error.as_ref().map(|e| e.message.as_str()),
        c.now_ms,
        change.status.is_final().then_some(c.now_ms),
        c.poll_due_at_ms,
        change.final_unit_deduction,
        c.leaves_pending.then_some(c.now_ms),
        if c.leaves_pending {
            change.upstream_updated_at_ms
        } else {
            None
        },
        c.source.as_str()
    ]))
}

/// A round of compare-and-sets (each task at most once) from a JSON array of rows as
/// `update_row` writes them, onto `update_from_input!` (shared with Postgres). SQLite's
/// `RETURNING` names only the task's columns, so rows are told apart by task id.
const UPDATE_JSON: &str = concat!(
    update_from_input!(),
    "FROM (SELECT value ->> 0 AS id, value ->> 1 AS expected_version, value ->> 2 AS status, \
    value ->> 3 AS upstream_status, value ->> 4 AS bind_upstream_task_id, \
    value ->> 5 AS upstream_updated_at, value ->> 6 AS images, value ->> 7 AS error_code, \
    value ->> 8 AS error_message, value ->> 9 AS now_ms, value ->> 10 AS completed_at, \
    value ->> 11 AS poll_due_at, value ->> 12 AS final_unit_deduction, \
    value ->> 13 AS submitted_at, value ->> 14 AS upstream_started_at, value ->> 15 AS source \
    FROM json_each($1)) AS i \
    WHERE t.id = i.id AND t.version = i.expected_version \
    RETURNING id, COALESCE(client, ''), model_name, \
    CASE WHEN upstream_task_id IS NULL THEN NULL ELSE submitted_at END, final_unit_deduction"
);

/// SQLite: timeline events from a JSON array of `[task_id, at, source, status,
/// upstream_status, detail, upstream_payload]`, in the array's order.
const INSERT_EVENTS_JSON: &str = "INSERT INTO task_events \
    (task_id, at, source, status, upstream_status, detail, upstream_payload) \
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
    value ->> 6 FROM json_each($1) ORDER BY key";

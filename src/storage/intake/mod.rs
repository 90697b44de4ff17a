//! New tasks, many in one transaction (group commit for submits; the queue that gathers them
//! is `service::group_commit::GroupInsert`): each still checked on its own — idempotency key,
//! the pending caps, the client's budgets — against the database and against the tasks before
//! it in the batch, then all that pass stored at once: tasks, inputs, the admitted counters
//! (`pending`) and first events, one statement on Postgres and four on SQLite.

mod client;
mod keys;
mod new_task;
mod pending;

use super::*;
use crate::domain::usage::BudgetStanding;
use client::{load_client, ClientSoFar};
pub use new_task::NewTask;
pub(crate) use pending::PendingBound;
use pending::{batch_caps, Admitted};
use std::collections::HashMap;

/// Tasks waiting, in all and of client `$1`: one pass over the waiting tasks for both, which
/// at a backlog of thousands is most of a batch's time in the database (BENCHMARKS §14).
const PENDING: &str = "SELECT COUNT(*), COUNT(*) FILTER (WHERE client = $1) \
    FROM tasks WHERE status = 'pending'";
/// What intake has admitted, in all and of client `$1` (see `pending`).
const ADMITTED: &str = "SELECT scope, admitted FROM intake_counts WHERE scope = '*' OR scope = $1";

impl Store {
    /// Postgres: refreshes the planner's statistics of `tasks` (`ANALYZE`, which reads a
    /// sample, not the table). Autovacuum analyzes a grown table a minute later at the soonest
    /// (`autovacuum_naptime`); until then a burst of submits is planned on the counts of a table
    /// a fraction of its size, and the dispatch claim's read of held tasks goes through every
    /// pending task (9.7 ms a pass at 8,000 pending, BENCHMARKS §14). Only the columns the
    /// service's queries filter and order on: the prompt, metadata and ids cost two thirds of a
    /// whole-table `ANALYZE` (27 ms against 7–11 ms at 6,000 tasks) and inform no plan here;
    /// autovacuum analyzes them in its time. SQLite: nothing (its planner keeps no statistics
    /// unless asked to).
    pub async fn refresh_task_statistics(&self) -> Result<()> {
        if let Pool::Postgres(PgPools { main, .. }) = &self.pool {
            sqlx::query(
                "ANALYZE tasks (status, client, priority, created_at, submitted_at, \
                 completed_at, next_dispatch_at, dispatch_started_at, poll_due_at, \
                 upstream_started_at)",
            )
            .execute(main)
            .await?;
        }
        Ok(())
    }

    /// Stores new `pending` tasks in one transaction, each with its inputs and first event,
    /// and answers per task as `insert_task` would alone, in order: a task is checked against
    /// the stored tasks and those before it in the batch (a key taken twice in one batch goes
    /// to the first; the caps and budgets count the tasks admitted before). Any database error
    /// stores none of them.
    pub async fn insert_tasks(&self, tasks: &mut [NewTask]) -> Result<Vec<InsertOutcome>> {
        let _writer = self.writer().await;
        // Postgres: the counts and the inserts one atomic step across sessions (SQLite's single
        // writer already is).
        let begin = self.begin_serialised(dialect::Serialised::Submits);
        let key_sql = match self.pool {
            Pool::Postgres(_) => &keys::POSTGRES,
            Pool::Sqlite(_) => &keys::SQLITE,
        };
        on_pool!(self, p => {
            let mut conn = p.acquire().await?;
            let outcome = async {
                // SQLite: the write lock up front, since the checks read before the inserts
                // write, and a deferred transaction whose snapshot went stale cannot upgrade.
                let mut tx = conn.begin_with(begin).await?;
                // Most batches are one client's: its count comes with the total's, and both
                // are bounded without a count while the batch fits well under the caps.
                let first_client = tasks.iter().find_map(|t| t.record.client.clone());
                let mut admitted_now = Admitted::default();
                let scopes: Vec<(String, i64)> = sqlx::query_as(ADMITTED)
                    .bind(first_client.as_deref())
                    .fetch_all(&mut *tx)
                    .await?;
                for (scope, n) in scopes {
                    if scope == pending::ALL {
                        admitted_now.total = n;
                    } else {
                        admitted_now.client = n;
                    }
                }
                let bounded = self.pending_bound().room(
                    &batch_caps(tasks, first_client.as_deref()),
                    admitted_now,
                );
                let (counted, (mut pending, first_pending)) = match bounded {
                    Some(bounds) => (None, bounds),
                    None => {
                        let counts: (i64, i64) = sqlx::query_as(PENDING)
                            .bind(first_client.as_deref())
                            .fetch_one(&mut *tx)
                            .await?;
                        (Some(counts), counts)
                    }
                };
                let mut clients: HashMap<String, ClientSoFar> = HashMap::new();
                // The stored keys, then each admitted task's as the batch goes on.
                let mut taken = keys::stored(&mut tx, key_sql, tasks).await?;
                let mut outcomes = Vec::with_capacity(tasks.len());
                let mut admitted: Vec<usize> = Vec::with_capacity(tasks.len());
                for (slot, task) in tasks.iter().enumerate() {
                    let (t, idempotency, caps) = (&task.record, &task.idempotency, task.caps);
                    if let Some(k) = &idempotency {
                        let scoped = (k.scope.clone(), k.key.clone());
                        if let Some((hash, task_id)) = taken.get(&scoped).cloned() {
                            outcomes.push(InsertOutcome::Existing {
                                task_id,
                                same_request: hash == k.request_hash,
                            });
                            continue;
                        }
                    }
                    if let Some(client) = &t.client {
                        if !clients.contains_key(client) {
                            let counted = (first_client.as_ref() == Some(client))
                                .then_some(first_pending);
                            let loaded = load_client(&mut tx, client, counted).await?;
                            clients.insert(client.clone(), loaded);
                        }
                    }
                    let mut so_far = t.client.as_ref().and_then(|name| clients.get_mut(name));
                    // Budgets first, as alone: a task over budget is refused as such even when
                    // the queue is also full.
                    let mut over: Option<BudgetStanding> = None;
                    if let (Some(client), Some(c)) = (&t.client, so_far.as_deref_mut()) {
                        for &(period, limit_units) in &c.limits {
                            let (start, resets_at_ms) = period.bounds(t.created_at_ms);
                            let known = c
                                .spent
                                .iter()
                                .find(|(p, s, _)| *p == period && *s == start)
                                .map(|(_, _, v)| *v);
                            let spent_milli = match known {
                                Some(v) => v,
                                None => {
                                    let v: i64 = sqlx::query_scalar(usage::UNITS_SPENT)
                                        .bind(client)
                                        .bind(start)
                                        .fetch_one(&mut *tx)
                                        .await?;
                                    c.spent.push((period, start, v));
                                    v
                                }
                            };
                            let standing = BudgetStanding {
                                period,
                                limit_units,
                                spent_milli,
                                reserved_units: c.reserved,
                                resets_at_ms,
                            };
                            if !standing.admits(t.n) {
                                over = Some(standing);
                                break;
                            }
                        }
                    }
                    if let Some(standing) = over {
                        outcomes.push(InsertOutcome::OverBudget(standing));
                        continue;
                    }
                    let client_pending = so_far.as_ref().map_or(0, |c| c.pending);
                    if pending >= caps.total || client_pending >= caps.per_client {
                        outcomes.push(InsertOutcome::QueueFull);
                        continue;
                    }
                    pending += 1;
                    if let Some(c) = so_far {
                        c.pending += 1;
                        c.reserved += t.n;
                    }
                    if let Some(k) = idempotency {
                        taken.insert(
                            (k.scope.clone(), k.key.clone()),
                            (k.request_hash.clone(), t.id.clone()),
                        );
                    }
                    admitted.push(slot);
                    outcomes.push(InsertOutcome::Inserted);
                }
                if !admitted.is_empty() {
                    // The images, owned: sqlx copies a borrowed value to hand it to SQLite's
                    // thread. A task alone (large ones always are) gives its images up, since
                    // no retry needs them; a batch's are small, and copied so a retry has them.
                    let alone = tasks.len() == 1;
                    let mut images: Vec<(String, Option<String>, Option<String>)> =
                        Vec::with_capacity(admitted.len());
                    for &slot in &admitted {
                        let t = &mut tasks[slot];
                        t.prepare()?;
                        images.push(if alone {
                            (
                                t.subjects.take().unwrap_or_default(),
                                t.record.inputs.scene_image.take(),
                                t.record.inputs.style_image.take(),
                            )
                        } else {
                            (
                                t.subjects.clone().unwrap_or_default(),
                                t.record.inputs.scene_image.clone(),
                                t.record.inputs.style_image.clone(),
                            )
                        });
                    }
                    let admitted: Vec<&NewTask> = admitted.iter().map(|&slot| &tasks[slot]).collect();
                    let mut by_scope: Vec<(&str, i64)> = vec![(pending::ALL, 0)];
                    for a in &admitted {
                        by_scope[0].1 += 1;
                        if let Some(client) = a.record.client.as_deref() {
                            match by_scope.iter_mut().find(|(s, _)| *s == client) {
                                Some((_, n)) => *n += 1,
                                None => by_scope.push((client, 1)),
                            }
                        }
                    }
                    // Postgres: the four inserts as one statement (data-modifying `WITH`; the
                    // foreign keys are checked at its end), one round trip on the one writer's
                    // path instead of four. SQLite has no such `WITH`: four statements.
                    let one_statement = matches!(self.pool, Pool::Postgres(_));
                    // Not cached: the text varies with the batch, and a cached SQLite statement
                    // keeps its last bound values (here, possibly megabytes of Base64) until
                    // its next use.
                    let mut q = sqlx::QueryBuilder::new("");
                    if one_statement {
                        q.push("WITH new_tasks AS (");
                    }
                    q.push(
                        "INSERT INTO tasks (id, external_task_id, status, model_name, prompt, n, \
                        aspect_ratio, metadata, created_at, updated_at, next_dispatch_at, client, \
                        notify_url, request_id, priority) ",
                    );
                    q.push_values(&admitted, |mut row, a| {
                        let t = &a.record;
                        row.push_bind(&t.id)
                            .push_bind(&t.external_task_id)
                            .push_bind("pending")
                            .push_bind(&t.model_name)
                            .push_bind(&t.prompt)
                            .push_bind(t.n)
                            .push_bind(&t.aspect_ratio)
                            .push_bind(&a.metadata)
                            .push_bind(t.created_at_ms)
                            .push_bind(t.created_at_ms)
                            .push_bind(t.created_at_ms)
                            .push_bind(&t.client)
                            .push_bind(&t.notify_url)
                            .push_bind(&t.request_id)
                            .push_bind(t.priority.as_str());
                    });
                    if one_statement {
                        q.push("), new_inputs AS (");
                    } else {
                        q.build().persistent(false).execute(&mut *tx).await?;
                        q.reset();
                    }
                    q.push(
                        "INSERT INTO task_inputs (task_id, subject_images, scene_image, \
                        style_image, negative_prompt, watermark_info, summary) ",
                    );
                    q.push_values(admitted.iter().zip(images), |mut row, (a, (subjects, scene, style))| {
                        let i = &a.record.inputs;
                        row.push_bind(&a.record.id)
                            .push_bind(subjects)
                            .push_bind(scene)
                            .push_bind(style)
                            .push_bind(&i.negative_prompt)
                            .push_bind(&a.watermark)
                            .push_bind(&a.summary);
                    });
                    if one_statement {
                        q.push("), counts AS (");
                    } else {
                        q.build().persistent(false).execute(&mut *tx).await?;
                        q.reset();
                    }
                    q.push("INSERT INTO intake_counts (scope, admitted) ");
                    q.push_values(&by_scope, |mut row, (scope, n)| {
                        row.push_bind(*scope).push_bind(*n);
                    });
                    q.push(
                        " ON CONFLICT (scope) DO UPDATE \
                        SET admitted = intake_counts.admitted + excluded.admitted",
                    );
                    if one_statement {
                        q.push(") ");
                    } else {
                        q.build().persistent(false).execute(&mut *tx).await?;
                        q.reset();
                    }
                    q.push(
                        "INSERT INTO task_events (task_id, at, source, status, upstream_status, \
                        detail) ",
                    );
                    q.push_values(&admitted, |mut row, a| {
                        row.push_bind(&a.record.id)
                            .push_bind(a.record.created_at_ms)
                            .push_bind(EventSource::Api.as_str())
                            .push_bind(TaskStatus::Pending.as_str())
                            .push_bind(None::<String>)
                            .push_bind("accepted");
                    });
                    q.build().persistent(false).execute(&mut *tx).await?;
                    keys::claim(&mut tx, key_sql, &admitted).await?;
                    tx.commit().await?;
                } else {
                    // Expired keys deleted above go with the next batch that stores something.
                    tx.rollback().await?;
                }
                if let Some(counts) = counted {
                    self.pending_bound()
                        .counted(first_client.as_deref(), counts, admitted_now);
                }
                Ok::<_, StorageError>(outcomes)
            }
            .await;
            // A Base64 submit grows the connection's buffers to its size; the pool would keep
            // them for as long as the connection lives.
            conn.shrink_buffers();
            outcome
        })
    }
}

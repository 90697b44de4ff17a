//! Postgres: a batch of status changes as a statement per round of rows (arrays unnested into
//! one `UPDATE … FROM` with its events, input drops and notifications as CTEs), then one
//! statement for the archive rows, the usage aggregates and the change feed's notifications,
//! in a transaction. A batch of one round whose changes say what they were decided on is one
//! statement (`whole`).

use super::super::*;
use super::input::SetInput;

impl Store {
    /// Postgres: each round (a task appears at most once per round; a second change to it in
    /// the same batch goes in the next round, decided on the same version, so it loses its
    /// compare-and-set as it would have alone) is one statement for all its changes, events,
    /// input drops and notifications; then one for archive rows, usage and the change feed.
    /// A batch costs a handful of round trips whatever its size, where a round trip costs about
    /// as much as a whole single-row transaction.
    pub(super) async fn commit_set(&self, p: &PgPool, batch: &[Commit<'_>]) -> Result<Vec<bool>> {
        let rounds = super::rounds(batch);
        if let [round] = rounds.as_slice() {
            if batch.iter().all(|c| c.decided_on.is_some()) {
                return self.commit_whole(p, batch, round).await;
            }
        }
        let mut won = vec![false; batch.len()];
        let mut rows: Vec<(usize, WonRow)> = Vec::with_capacity(batch.len());
        let mut tx = p.begin().await?;
        for round in rounds {
            let input = SetInput::of(batch, &round)?;
            let statement = COMMIT_SET[input.variant()];
            let returned: Vec<WonRow> = input
                .bind(sqlx::query_as(statement))
                .fetch_all(&mut *tx)
                .await?;
            for r in returned {
                let slot = usize::try_from(r.slot)
                    .ok()
                    .filter(|s| *s < batch.len())
                    .ok_or_else(|| StorageError::Corrupt(format!("commit slot {}", r.slot)))?;
                won[slot] = true;
                rows.push((slot, r));
            }
        }
        let mut ended = usage::Ended::default();
        let mut images = ImageRows::default();
        for (slot, r) in &rows {
            let c = &batch[*slot];
            if let Some(f) = super::finished(
                c,
                &r.client,
                &r.model_name,
                r.submitted_at,
                r.final_unit_deduction.as_deref(),
            ) {
                ended.add(f);
            }
            for img in super::archived_images(c) {
                images.task.push(c.id);
                images.idx.push(i64::from(img.index));
                images.url.push(img.url.as_str());
                images.at.push(c.now_ms);
            }
        }
        // Delivered at commit: other replicas' waiters hear of the changes (storage::feed).
        let mut changed: Vec<&str> = rows.iter().map(|(slot, _)| batch[*slot].id).collect();
        changed.sort_unstable();
        let payloads: Vec<String> = changed
            .chunks(feed::IDS_PER_NOTIFICATION)
            .map(|ids| self.change_payload(ids))
            .collect();
        if !rows.is_empty() {
            let after = AFTER_CHANGES
                [usize::from(!images.task.is_empty()) * 2 + usize::from(!ended.hourly.is_empty())];
            bind_after(sqlx::query(after), images, &ended, &payloads)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(won)
    }
}

/// What a won compare-and-set returns: what the usage aggregates need.
#[derive(sqlx::FromRow)]
struct WonRow {
    slot: i64,
    client: String,
    model_name: String,
    submitted_at: Option<i64>,
    final_unit_deduction: Option<String>,
}

/// A round of compare-and-sets with their timeline events, the input images of tasks leaving
/// `pending`, and their notifications (unless the client disabled the URL), as CTEs: `upd`
/// returns each won change's slot, `won` is its input row. The compare-and-set itself is
/// `update_from_input!`, shared with SQLite's `commit_rows`. `$parts` are the optional CTEs
/// (`drop_inputs_cte!`, `outbox_cte!`): a data-modifying CTE opens its table and every index of
/// it even when no row reaches it, which cost a round of callbacks (neither part) about a third
/// of its time on Postgres.
macro_rules! round_ctes {
    ($($part:expr),*) => {
        concat!(
            "WITH i AS (SELECT * FROM UNNEST(\
            $1::int8[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::int8[], \
            $8::text[], $9::text[], $10::text[], $11::int8[], $12::int8[], $13::int8[], $14::text[], \
            $15::int8[], $16::int8[], $17::text[], $18::text[], $19::text[], $20::bool[], \
            $21::text[], $22::text[], $23::text[], $24::text[]) \
            AS i(slot, id, expected_version, status, upstream_status, bind_upstream_task_id, \
            upstream_updated_at, images, error_code, error_message, now_ms, completed_at, poll_due_at, \
            final_unit_deduction, submitted_at, upstream_started_at, source, detail, upstream_payload, \
            leaves_pending, outbox_id, outbox_client, outbox_url, outbox_payload)), \
            upd AS (",
            update_from_input!(),
            "FROM i WHERE t.id = i.id AND t.version = i.expected_version \
            RETURNING i.slot, COALESCE(t.client, '') AS client, t.model_name, \
            CASE WHEN t.upstream_task_id IS NULL THEN NULL ELSE t.submitted_at END AS submitted_at, \
            t.final_unit_deduction), \
            won AS (SELECT i.* FROM upd JOIN i ON i.slot = upd.slot), \
            ev AS (INSERT INTO task_events \
            (task_id, at, source, status, upstream_status, detail, upstream_payload) \
            SELECT id, now_ms, source, status, upstream_status, detail, upstream_payload \
            FROM won ORDER BY slot)",
            $($part,)*
        )
    };
}

/// `round_ctes!` returning what the usage aggregates need of each won change.
macro_rules! commit_set {
    ($($part:expr),*) => {
        concat!(
            round_ctes!($($part),*),
            " SELECT slot, client, model_name, submitted_at, final_unit_deduction FROM upd"
        )
    };
}

/// Tasks leaving `pending` drop their input images (the summary stays).
macro_rules! drop_inputs_cte {
    () => {
        ", dropped AS (UPDATE task_inputs ti SET subject_images = '[]', scene_image = NULL, \
        style_image = NULL FROM won \
        WHERE won.leaves_pending AND ti.task_id = won.id AND ti.subject_images <> '[]')"
    };
}

/// The notifications written with the changes, unless the client disabled the URL.
macro_rules! outbox_cte {
    () => {
        ", ob AS (INSERT INTO deliveries (id, task_id, client, url, event_status, payload, state, \
        attempts, next_attempt_at, created_at, updated_at) \
        SELECT outbox_id, id, outbox_client, outbox_url, status, outbox_payload, 'pending', 0, \
        now_ms, now_ms, now_ms FROM won WHERE outbox_id IS NOT NULL AND NOT EXISTS \
        (SELECT 1 FROM disabled_urls d WHERE d.client = won.outbox_client AND d.url = won.outbox_url))"
    };
}

/// `commit_set!` for a round, indexed by `SetInput::variant`.
pub(in crate::storage) const COMMIT_SET: [&str; 4] = [
    commit_set!(),
    commit_set!(outbox_cte!()),
    commit_set!(drop_inputs_cte!()),
    commit_set!(drop_inputs_cte!(), outbox_cte!()),
];

/// `round_ctes!` alone (`whole` adds to them), indexed by `SetInput::variant`.
pub(super) const ROUND_CTES: [&str; 4] = [
    round_ctes!(),
    round_ctes!(outbox_cte!()),
    round_ctes!(drop_inputs_cte!()),
    round_ctes!(drop_inputs_cte!(), outbox_cte!()),
];

/// Everything a batch's won changes add besides the tasks' rows, in one statement (a round
/// trip each cost a third of a batch's commit): archive rows for succeeded tasks' images, the
/// usage aggregates (in key order, so concurrent batches take the aggregate rows' locks in one
/// order), and the notifications other replicas' waiters hear at commit. The inserts are
/// data-modifying CTEs, which run to completion whether or not the notifying SELECT reads them;
/// like `commit_set!`'s parts, each is left out when it has no rows (its parameters stay bound,
/// typed by the binds, and unused).
macro_rules! after_changes {
    ($($cte:expr),*) => {
        concat!($($cte,)* "SELECT pg_notify($17, p) FROM UNNEST($18::text[]) AS p")
    };
}

macro_rules! images_cte {
    () => {
        "WITH images AS (INSERT INTO task_images \
        (task_id, idx, url, state, attempts, next_attempt_at, updated_at) \
        SELECT t, i, u, 'pending', 0, n, n FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[]) \
        AS x(t, i, u, n) ORDER BY t, i ON CONFLICT (task_id, idx) DO NOTHING) "
    };
}

/// The usage aggregates; `$with` is how the CTE list is entered (`WITH` or a comma).
macro_rules! usage_ctes {
    ($with:expr) => {
        concat!(
            $with,
            " hourly AS (INSERT INTO usage_hourly \
            (client, hour_start, model, status, shard, tasks, units_milli) \
            SELECT * FROM UNNEST($5::text[], $6::int8[], $7::text[], $8::text[], $9::int8[], \
            $10::int8[], $11::int8[]) \
            ON CONFLICT (client, hour_start, model, status, shard) DO UPDATE SET \
            tasks = usage_hourly.tasks + excluded.tasks, \
            units_milli = usage_hourly.units_milli + excluded.units_milli), \
            durations AS (INSERT INTO usage_durations \
            (client, hour_start, bin, shard, tasks) \
            SELECT * FROM UNNEST($12::text[], $13::int8[], $14::int8[], $15::int8[], $16::int8[]) \
            ON CONFLICT (client, hour_start, bin, shard) DO UPDATE SET \
            tasks = usage_durations.tasks + excluded.tasks) "
        )
    };
}

/// `after_changes!` for a batch, indexed by (it adds archive rows) * 2 + (it ends tasks).
pub(in crate::storage) const AFTER_CHANGES: [&str; 4] = [
    after_changes!(),
    after_changes!(usage_ctes!("WITH")),
    after_changes!(images_cte!()),
    after_changes!(images_cte!(), usage_ctes!(",")),
];

/// Archive rows to add: one entry per image, as columns.
#[derive(Default)]
struct ImageRows<'a> {
    task: Vec<&'a str>,
    idx: Vec<i64>,
    url: Vec<&'a str>,
    at: Vec<i64>,
}

/// The types `bind_after` binds, in order: a variant leaves some parameters unused, and a
/// `PREPARE` of it (`Store::keyed_plans`) must be told their types.
pub(in crate::storage) const AFTER_PARAM_TYPES: &str = "text[], int8[], text[], int8[], \
    text[], int8[], text[], text[], int8[], int8[], int8[], text[], int8[], int8[], int8[], int8[], \
    text, text[]";

/// Binds [`AFTER_CHANGES`]'s arrays. The usage maps are ordered, so the rows go in key order.
fn bind_after<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    images: ImageRows<'q>,
    ended: &'q usage::Ended,
    payloads: &'q [String],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let mut hourly = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for (k, (tasks, units)) in &ended.hourly {
        hourly.0.push(k.0.as_str());
        hourly.1.push(k.1);
        hourly.2.push(k.2.as_str());
        hourly.3.push(k.3);
        hourly.4.push(k.4);
        hourly.5.push(*tasks);
        hourly.6.push(*units);
    }
    let mut durations = (vec![], vec![], vec![], vec![], vec![]);
    for (k, tasks) in &ended.durations {
        durations.0.push(k.0.as_str());
        durations.1.push(k.1);
        durations.2.push(k.2);
        durations.3.push(k.3);
        durations.4.push(*tasks);
    }
    q.bind(images.task)
        .bind(images.idx)
        .bind(images.url)
        .bind(images.at)
        .bind(hourly.0)
        .bind(hourly.1)
        .bind(hourly.2)
        .bind(hourly.3)
        .bind(hourly.4)
        .bind(hourly.5)
        .bind(hourly.6)
        .bind(durations.0)
        .bind(durations.1)
        .bind(durations.2)
        .bind(durations.3)
        .bind(durations.4)
        .bind(feed::CHANNEL)
        .bind(payloads)
}

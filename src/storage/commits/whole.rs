//! Postgres: a batch of one round as a single statement, without `BEGIN` and `COMMIT`.
//!
//! The transactional path (`set`) costs four round trips a batch: `BEGIN`, the round, the
//! statement for archive rows, usage and the change feed, and `COMMIT`. The one writer makes
//! them one after another, and the database waits for the service between them (BENCHMARKS
//! §16). When every change carries the task it was decided on, what a won change adds besides
//! its row is known before the statement: its archive rows, its usage row and its task id. The
//! statement is given them for every change and keeps those whose compare-and-set won, so one
//! statement, one implicit transaction, does the whole batch.

use super::super::*;
use super::input::SetInput;
use super::set::ROUND_CTES;

impl Store {
    /// [`Store::commit_changes`] for a batch of one round whose changes all carry
    /// `decided_on`: one statement.
    pub(super) async fn commit_whole(
        &self,
        p: &PgPool,
        batch: &[Commit<'_>],
        round: &[usize],
    ) -> Result<Vec<bool>> {
        let input = SetInput::of(batch, round)?;
        let mut adds = Adds::default();
        for &slot in round {
            adds.push(slot as i64, &batch[slot]);
        }
        let statement = &COMMIT_WHOLE[input.variant() * 4
            + usize::from(!adds.image_slot.is_empty()) * 2
            + usize::from(!adds.hourly_slot.is_empty())];
        let returned: Vec<(i64, i64)> = input
            .bind(sqlx::query_as(statement))
            .bind(&adds.image_slot)
            .bind(&adds.image_task)
            .bind(&adds.image_idx)
            .bind(&adds.image_url)
            .bind(&adds.image_at)
            .bind(&adds.hourly_slot)
            .bind(&adds.hourly_client)
            .bind(&adds.hourly_hour)
            .bind(&adds.hourly_model)
            .bind(&adds.hourly_status)
            .bind(&adds.hourly_shard)
            .bind(&adds.hourly_units)
            .bind(&adds.duration_slot)
            .bind(&adds.duration_client)
            .bind(&adds.duration_hour)
            .bind(&adds.duration_bin)
            .bind(&adds.duration_shard)
            .bind(feed::CHANNEL)
            .bind(&*self.instance)
            .fetch_all(p)
            .await?;
        let mut won = vec![false; batch.len()];
        for (slot, _) in returned {
            let slot = usize::try_from(slot)
                .ok()
                .filter(|s| *s < batch.len())
                .ok_or_else(|| StorageError::Corrupt(format!("commit slot {slot}")))?;
            won[slot] = true;
        }
        Ok(won)
    }
}

/// What each change adds if it wins, as columns keyed by its slot.
#[derive(Default)]
struct Adds<'a> {
    image_slot: Vec<i64>,
    image_task: Vec<&'a str>,
    image_idx: Vec<i64>,
    image_url: Vec<&'a str>,
    image_at: Vec<i64>,
    hourly_slot: Vec<i64>,
    hourly_client: Vec<String>,
    hourly_hour: Vec<i64>,
    hourly_model: Vec<String>,
    hourly_status: Vec<&'static str>,
    hourly_shard: Vec<i64>,
    hourly_units: Vec<i64>,
    duration_slot: Vec<i64>,
    duration_client: Vec<String>,
    duration_hour: Vec<i64>,
    duration_bin: Vec<i64>,
    duration_shard: Vec<i64>,
}

impl<'a> Adds<'a> {
    fn push(&mut self, slot: i64, c: &Commit<'a>) {
        let Some(d) = c.decided_on else {
            return;
        };
        let change = c.change;
        // The row as `update_from_input!` leaves it: an upstream id and a submit time are set
        // once, a deduction reported now replaces none.
        let bound = d.upstream_task_id_bound || change.bind_upstream_task_id.is_some();
        let submitted = d.submitted_at_ms.or(c.leaves_pending.then_some(c.now_ms));
        if let Some(f) = super::finished(
            c,
            d.client.as_deref().unwrap_or_default(),
            &d.model_name,
            if bound { submitted } else { None },
            change
                .final_unit_deduction
                .as_deref()
                .or(d.final_unit_deduction.as_deref()),
        ) {
            if let Some(bin) = f.duration_bin {
                self.duration_slot.push(slot);
                self.duration_client.push(f.client.clone());
                self.duration_hour.push(f.hour_start);
                self.duration_bin.push(bin);
                self.duration_shard.push(f.shard);
            }
            self.hourly_slot.push(slot);
            self.hourly_client.push(f.client);
            self.hourly_hour.push(f.hour_start);
            self.hourly_model.push(f.model);
            self.hourly_status.push(f.status);
            self.hourly_shard.push(f.shard);
            self.hourly_units.push(f.units_milli);
        }
        for img in super::archived_images(c) {
            self.image_slot.push(slot);
            self.image_task.push(c.id);
            self.image_idx.push(i64::from(img.index));
            self.image_url.push(img.url.as_str());
            self.image_at.push(c.now_ms);
        }
    }
}

/// Archive rows of won changes (`$25`–`$29`: slot, task, index, URL, time).
const IMAGES: &str = ", images AS (INSERT INTO task_images \
    (task_id, idx, url, state, attempts, next_attempt_at, updated_at) \
    SELECT x.t, x.i, x.u, 'pending', 0, x.n, x.n \
    FROM UNNEST($25::int8[], $26::text[], $27::int8[], $28::text[], $29::int8[]) AS x(s, t, i, u, n) \
    WHERE x.s IN (SELECT slot FROM upd) ORDER BY x.t, x.i ON CONFLICT (task_id, idx) DO NOTHING)";

/// Usage of won changes that end tasks, summed per aggregate row and added in key order, byte
/// order as the transactional path sorts them, so concurrent batches lock the rows in one order
/// (`$30`–`$36` the hourly rows, `$37`–`$41` the durations, each with its change's slot).
const USAGE: &str = ", hourly AS (INSERT INTO usage_hourly \
    (client, hour_start, model, status, shard, tasks, units_milli) \
    SELECT x.c, x.h, x.m, x.st, x.sh, count(*), sum(x.u) \
    FROM UNNEST($30::int8[], $31::text[], $32::int8[], $33::text[], $34::text[], $35::int8[], \
    $36::int8[]) AS x(s, c, h, m, st, sh, u) \
    WHERE x.s IN (SELECT slot FROM upd) \
    GROUP BY x.c, x.h, x.m, x.st, x.sh \
    ORDER BY x.c COLLATE \"C\", x.h, x.m COLLATE \"C\", x.st COLLATE \"C\", x.sh \
    ON CONFLICT (client, hour_start, model, status, shard) DO UPDATE SET \
    tasks = usage_hourly.tasks + excluded.tasks, \
    units_milli = usage_hourly.units_milli + excluded.units_milli), \
    durations AS (INSERT INTO usage_durations (client, hour_start, bin, shard, tasks) \
    SELECT x.c, x.h, x.b, x.sh, count(*) \
    FROM UNNEST($37::int8[], $38::text[], $39::int8[], $40::int8[], $41::int8[]) \
    AS x(s, c, h, b, sh) \
    WHERE x.s IN (SELECT slot FROM upd) \
    GROUP BY x.c, x.h, x.b, x.sh \
    ORDER BY x.c COLLATE \"C\", x.h, x.b, x.sh \
    ON CONFLICT (client, hour_start, bin, shard) DO UPDATE SET \
    tasks = usage_durations.tasks + excluded.tasks)";

/// The change feed's notifications, delivered at commit: "<instance> <task id> …" (`$43` is
/// the instance), at most `feed::IDS_PER_NOTIFICATION` ids each, ids in byte order. The final
/// `SELECT` reads the count, so the CTE runs (a CTE that only reads runs when read).
fn notes_and_result() -> String {
    format!(
        ", notes AS (SELECT pg_notify($42, $43 || string_agg(' ' || w.id, '' ORDER BY w.id COLLATE \"C\")) \
        FROM (SELECT id, (row_number() OVER (ORDER BY id COLLATE \"C\") - 1) / {} AS chunk FROM won) w \
        GROUP BY w.chunk) \
        SELECT slot, (SELECT count(*) FROM notes) AS notified FROM upd",
        feed::IDS_PER_NOTIFICATION
    )
}

/// The whole statement, indexed by `SetInput::variant * 4 + (archive rows) * 2 + (usage)`: a part
/// without rows is left out (its parameters stay bound and unused), as in `set`.
pub(in crate::storage) static COMMIT_WHOLE: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| {
        let mut all = Vec::with_capacity(16);
        for round in ROUND_CTES {
            for images in [false, true] {
                for usage in [false, true] {
                    all.push(format!(
                        "{round}{}{}{}",
                        if images { IMAGES } else { "" },
                        if usage { USAGE } else { "" },
                        notes_and_result()
                    ));
                }
            }
        }
        all
    });

/// The types [`COMMIT_WHOLE`] binds, in order: a variant leaves some parameters unused, and a
/// `PREPARE` of it (`Store::keyed_plans`) must be told their types.
pub(in crate::storage) const WHOLE_PARAM_TYPES: &str = "int8[], text[], int8[], text[], text[], \
    text[], int8[], text[], text[], text[], int8[], int8[], int8[], text[], int8[], int8[], text[], \
    text[], text[], bool[], text[], text[], text[], text[], \
    int8[], text[], int8[], text[], int8[], \
    int8[], text[], int8[], text[], text[], int8[], int8[], \
    int8[], text[], int8[], int8[], int8[], \
    text, text";

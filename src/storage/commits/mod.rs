//! Status changes committed: each a compare-and-set on the task's `version` with its timeline
//! event, notification, archive rows and usage, many in one transaction (group commit; the
//! queue that gathers them is `service::group_commit`), as one statement per round of rows
//! (a task at most once per round) on both backends. Files: `rows` (SQLite), `set` (Postgres),
//! `whole` (Postgres, a batch as one statement), `input` (a round's changes as columns).

use super::*;

/// The compare-and-set's new values, from a round's input row `i` onto its task `t`: one text
/// for both backends (`rows` and `set` add their input and `RETURNING`), so both apply the same
/// rules. `version` moves on with every change; `upstream_task_id`, `submitted_at` and
/// `upstream_started_at` are set once; a deduction names the channel that reported it.
macro_rules! update_from_input {
    () => {
        "UPDATE tasks AS t SET status = i.status, \
        upstream_status = COALESCE(i.upstream_status, t.upstream_status), \
        upstream_task_id = COALESCE(t.upstream_task_id, i.bind_upstream_task_id), \
        upstream_updated_at = i.upstream_updated_at, \
        images = COALESCE(i.images, t.images), \
        error_code = COALESCE(i.error_code, t.error_code), \
        error_message = COALESCE(i.error_message, t.error_message), \
        updated_at = i.now_ms, completed_at = i.completed_at, \
        next_dispatch_at = NULL, dispatch_started_at = NULL, \
        poll_due_at = i.poll_due_at, poll_count = 0, version = t.version + 1, \
        final_unit_deduction = COALESCE(i.final_unit_deduction, t.final_unit_deduction), \
        submitted_at = COALESCE(t.submitted_at, i.submitted_at), \
        upstream_started_at = COALESCE(t.upstream_started_at, i.upstream_started_at), \
        cost_source = CASE WHEN i.final_unit_deduction IS NULL THEN t.cost_source \
        ELSE i.source END "
    };
}

mod input;
mod rows;
mod set;
mod whole;
pub(super) use set::{AFTER_CHANGES, AFTER_PARAM_TYPES, COMMIT_SET};
pub(super) use whole::{COMMIT_WHOLE, WHOLE_PARAM_TYPES};

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
        match &self.pool {
            Pool::Sqlite(p) => self.commit_rows(p, batch).await,
            Pool::Postgres(PgPools { keyed: p, .. }) => self.commit_set(p, batch).await,
        }
    }
}

/// The images a won change queues for the archive: a success's, when the archive is on.
pub(super) fn archived_images<'c>(c: &Commit<'c>) -> &'c [ResultImage] {
    match (c.archive, c.change.status, &c.change.images) {
        (true, TaskStatus::Succeeded, Some(list)) => list,
        _ => &[],
    }
}

/// What a won change adds to the usage aggregates: the task's end, if it ends it, from the row
/// as the change left it (its client, model, submit time once it reached upstream, deduction).
/// A task is counted once: the status machine never moves a final task, and the change won its
/// compare-and-set on a version that was not final.
pub(super) fn finished(
    c: &Commit<'_>,
    client: &str,
    model: &str,
    submitted_at: Option<i64>,
    deduction: Option<&str>,
) -> Option<usage::Finished> {
    c.change.status.is_final().then(|| {
        usage::Finished::new(
            c.id,
            client.to_owned(),
            model.to_owned(),
            c.change.status,
            c.now_ms,
            submitted_at,
            deduction,
        )
    })
}

/// The batch split into rounds in which each task appears once, in arrival order; each round
/// sorted by task id, so concurrent batches lock rows in one order.
pub(super) fn rounds(batch: &[Commit<'_>]) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (slot, c) in batch.iter().enumerate() {
        let r = seen.entry(c.id).or_insert(0);
        if rounds.len() <= *r {
            rounds.push(Vec::new());
        }
        rounds[*r].push(slot);
        *r += 1;
    }
    for round in &mut rounds {
        round.sort_by(|a, b| batch[*a].id.cmp(batch[*b].id));
    }
    rounds
}

//! Status changes committed: each a compare-and-set on the task's `version` with its timeline
//! event, notification, archive rows and usage, many in one transaction (group commit; the
//! queue that gathers them is `service::group_commit`), as one statement per round of rows
//! (a task at most once per round) on both backends. Files: `rows` (SQLite), `set` (Postgres).

use super::*;

mod rows;
mod set;

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
            Pool::Postgres(p) => self.commit_set(p, batch).await,
        }
    }
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

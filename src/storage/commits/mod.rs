//! Status changes committed: each a compare-and-set on the task's `version` with its timeline
//! event, notification, archive rows and usage, many in one transaction (group commit; the
//! queue that gathers them is `service::group_commit`). SQLite runs a statement per row
//! in-process; Postgres runs one statement per round of rows, since there every statement is
//! a round trip. Files: `rows` (SQLite), `set` (Postgres).

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

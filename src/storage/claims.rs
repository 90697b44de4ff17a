//! Taking background work: how any number of replicas share one database without doing paid
//! work twice.
//!
//! Every claim is one short transaction that selects due rows with `FOR UPDATE SKIP LOCKED`
//! (Postgres; SQLite serves one instance and its writers queue on the write lock instead), and
//! moves each claimed row's due time to the end of a lease. While the lease runs, the row is not
//! due for anyone else; if the replica that took it dies, the lease lapses and the row is due
//! again, so another replica takes it over. Leases are sized to outlast the work they cover (one
//! upstream or receiver HTTP call, each with a hard time limit), so they never need renewing, and
//! whatever a late worker still commits goes through the version compare-and-set like any change.
//!
//! Dispatch also shares the upstream concurrency budget: its claim holds a transaction-scoped
//! advisory lock while it sums the units in flight and picks what fits, so two replicas never
//! both spend the same free units. Claimed tasks count as in flight from the commit on.

use super::admission::{StateRow, READ_STATE};
use super::{
    deliveries, dialect, sql, DispatchCandidate, DueDelivery, PollCandidate, PollRow, Pool, Result,
    StorageError, Store, Task, TaskRow, TASK_COLUMNS,
};
use crate::domain::admission::AdmissionState;
use crate::domain::fair_share::{passes_after, ClientShare, Held, Running, Shares};
use crate::domain::Priority;
use std::collections::HashSet;

/// A due task as the dispatch claim reads it.
#[derive(sqlx::FromRow)]
struct DueRow {
    id: String,
    n: i64,
    created_at: i64,
    dispatch_started_at: Option<i64>,
    client: String,
    priority: String,
}

impl DueRow {
    fn into_candidate(self) -> Result<DispatchCandidate> {
        let priority = Priority::parse(&self.priority).ok_or_else(|| {
            StorageError::Corrupt(format!(
                "task {}: unknown priority `{}`",
                self.id, self.priority
            ))
        })?;
        Ok(DispatchCandidate {
            id: self.id,
            client: self.client,
            priority,
            n: self.n,
            created_at_ms: self.created_at,
            in_doubt: self.dispatch_started_at.is_some(),
        })
    }
}

/// Fair share's memory (`domain::fair_share`): a handful of rows, one per client, read whole.
const READ_PASSES: &str = "SELECT client, pass FROM fair_passes";
const READ_CLOCK: &str = "SELECT virtual_time FROM fair_clock WHERE id = 1";
const WRITE_PASS: &str = "INSERT INTO fair_passes (client, pass) VALUES ($1, $2) \
    ON CONFLICT (client) DO UPDATE SET pass = excluded.pass";
const WRITE_CLOCK: &str = "UPDATE fair_clock SET virtual_time = $1 WHERE id = 1";

impl Store {
    /// Claims due pending tasks for one create call each. `decide` gets what admission has
    /// learnt about the account (stored by any replica), what holds the account
    /// (every client's weight, cap and units held upstream, across all replicas, and the running
    /// tasks' `n` and dispatch time, oldest first) and the due tasks,
    /// up to `limit` per client in priority then due order, and names the ones to send, in order; each is marked as possibly in flight (`dispatch_started_at`), so it counts
    /// against the budget at once and a crash mid-call leads to recovery, not a loss, and its next
    /// dispatch moves to `lease_until_ms`. Returns the claimed tasks.
    pub async fn claim_dispatches<F>(
        &self,
        now_ms: i64,
        limit: i64,
        lease_until_ms: i64,
        decide: F,
    ) -> Result<Vec<Task>>
    where
        F: FnOnce(Option<AdmissionState>, Held, Vec<DispatchCandidate>) -> Vec<String>,
    {
        // Most passes find nothing due (a finished task wakes the dispatcher whether or not
        // work waits): one cheap read then, without the write lock or the admission lock.
        let any_due: bool = on_pool!(self, p => {
            sqlx::query_scalar(sql::DISPATCH_BACKLOG).bind(now_ms).fetch_one(p).await?
        });
        if !any_due {
            return Ok(Vec::new());
        }
        let _writer = self.writer().await;
        // No row locks on the select (window functions forbid them): the advisory lock already
        // serialises admission, and the claim's compare-and-set re-checks each row.
        let select = sql::DUE_DISPATCHES;
        // The version bump makes a cancel decided before the claim fail its compare-and-set.
        let claim = format!(
            "UPDATE tasks SET dispatch_started_at = COALESCE(dispatch_started_at, $2), \
            dispatch_attempts = dispatch_attempts + 1, next_dispatch_at = $3, version = version + 1 \
            WHERE id = $1 AND status = 'pending' AND next_dispatch_at IS NOT NULL \
            AND next_dispatch_at <= $2 RETURNING {TASK_COLUMNS}"
        );
        let is_postgres = self.is_postgres();
        let begin = self.begin_claim();
        let rows: Vec<TaskRow> = on_pool!(self, p => {
            let mut tx = p.begin_with(begin).await?;
            if is_postgres {
                sqlx::query(dialect::ADVISORY_XACT_LOCK)
                    .bind(dialect::ADMISSION_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
            }
            let due: Vec<DueRow> = sqlx::query_as(select)
                .bind(now_ms)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
            if due.is_empty() {
                tx.rollback().await?;
                return Ok(Vec::new());
            }
            let holding: Vec<(String, i64, i64)> =
                sqlx::query_as(sql::HOLDING_UNITS).fetch_all(&mut *tx).await?;
            let clients: Vec<(String, i64, Option<i64>)> =
                sqlx::query_as(sql::CLIENT_SHARES).fetch_all(&mut *tx).await?;
            let mut shares = Shares::new();
            for (name, weight, max_units) in clients {
                shares.insert(
                    name,
                    ClientShare {
                        weight,
                        max_units,
                        ..ClientShare::default()
                    },
                );
            }
            let mut running = Vec::with_capacity(holding.len());
            for (client, n, since_ms) in holding {
                shares.entry(client).or_default().in_flight += n;
                running.push(Running { n, since_ms });
            }
            let passes: Vec<(String, i64)> =
                sqlx::query_as(READ_PASSES).fetch_all(&mut *tx).await?;
            for (client, pass) in passes {
                shares.entry(client).or_default().pass = pass;
            }
            let virtual_time: Option<i64> =
                sqlx::query_scalar(READ_CLOCK).fetch_optional(&mut *tx).await?;
            let held = Held {
                shares,
                running,
                virtual_time: virtual_time.unwrap_or(0),
            };
            let learnt: Option<StateRow> =
                sqlx::query_as(READ_STATE).fetch_optional(&mut *tx).await?;
            let mut candidates = Vec::with_capacity(due.len());
            for r in due {
                candidates.push(r.into_candidate()?);
            }
            // What fair share needs afterwards: who waited for a first dispatch, with what
            // (a task in doubt was counted when it was first claimed).
            let waiting: Vec<(String, String, i64)> = candidates
                .iter()
                .filter(|c| !c.in_doubt)
                .map(|c| (c.id.clone(), c.client.clone(), c.n))
                .collect();
            let before = held.clone();
            let mut claimed = Vec::new();
            for id in decide(learnt.map(AdmissionState::from), held, candidates) {
                let row: Option<TaskRow> = sqlx::query_as(&claim)
                    .bind(&id)
                    .bind(now_ms)
                    .bind(lease_until_ms)
                    .fetch_optional(&mut *tx)
                    .await?;
                claimed.extend(row);
            }
            let sent: HashSet<&str> = claimed.iter().map(|r| r.id.as_str()).collect();
            let (went, stayed): (Vec<_>, Vec<_>) = waiting
                .iter()
                .partition(|(id, _, _)| sent.contains(id.as_str()));
            let passes = passes_after(
                &before,
                went.iter().map(|(_, client, n)| (client.as_str(), *n)),
                stayed.iter().map(|(_, client, _)| client.as_str()),
            );
            for (client, pass) in &passes.by_client {
                sqlx::query(WRITE_PASS)
                    .bind(client)
                    .bind(pass)
                    .execute(&mut *tx)
                    .await?;
            }
            if passes.virtual_time != before.virtual_time {
                sqlx::query(WRITE_CLOCK)
                    .bind(passes.virtual_time)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            claimed
        });
        rows.into_iter().map(Task::try_from).collect()
    }

    /// Claims up to `limit` tasks whose poll is due, most overdue first; their next poll moves to
    /// `lease_until_ms` until the poll reschedules or changes them.
    pub async fn claim_due_polls(
        &self,
        now_ms: i64,
        limit: i64,
        lease_until_ms: i64,
    ) -> Result<Vec<PollCandidate>> {
        let _writer = self.writer().await;
        let claim = format!(
            "UPDATE tasks SET poll_due_at = $3 WHERE id IN (SELECT id FROM tasks \
            WHERE poll_due_at IS NOT NULL AND poll_due_at <= $1 \
            ORDER BY poll_due_at LIMIT $2{}) \
            RETURNING id, upstream_task_id, external_task_id, created_at, poll_count",
            self.skip_locked()
        );
        let rows: Vec<PollRow> = on_pool!(self, p => {
            sqlx::query_as(&claim)
                .bind(now_ms)
                .bind(limit)
                .bind(lease_until_ms)
                .fetch_all(p)
                .await?
        });
        Ok(rows.into_iter().map(PollCandidate::from).collect())
    }

    /// Claims due deliveries for one attempt each. `take` sees each due delivery, oldest first,
    /// and returns what holds its place (a free delivery slot) or None to leave it for later.
    /// A claimed delivery's next attempt moves to `lease_until_ms`, so a crash mid-attempt leads
    /// to another attempt, never to a lost notification.
    pub async fn claim_deliveries<T, F>(
        &self,
        now_ms: i64,
        limit: i64,
        lease_until_ms: i64,
        mut take: F,
    ) -> Result<Vec<(DueDelivery, T)>>
    where
        F: FnMut(&DueDelivery) -> Option<T>,
    {
        let _writer = self.writer().await;
        let select = format!("{}{}", sql::DUE_DELIVERIES, self.skip_locked());
        let begin = self.begin_claim();
        const CLAIM: &str = "UPDATE deliveries SET next_attempt_at = $3, attempts = attempts + 1, \
            updated_at = $2 WHERE id = $1 AND state = 'pending' AND next_attempt_at <= $2";
        on_pool!(self, p => {
            let mut tx = p.begin_with(begin).await?;
            let due: Vec<deliveries::DueRow> = sqlx::query_as(&select)
                .bind(now_ms)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
            let mut claimed = Vec::new();
            for d in due.into_iter().map(DueDelivery::from) {
                let Some(slot) = take(&d) else { continue };
                let done = sqlx::query(CLAIM)
                    .bind(&d.id)
                    .bind(now_ms)
                    .bind(lease_until_ms)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 1 {
                    claimed.push((d, slot));
                }
            }
            tx.commit().await?;
            Ok(claimed)
        })
    }
}

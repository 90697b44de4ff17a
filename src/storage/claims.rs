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

use super::{
    deliveries, dialect, sql, DispatchCandidate, DueDelivery, PollCandidate, PollRow, Pool, Result,
    StorageError, Store, Task, TaskRow, TASK_COLUMNS,
};
use crate::domain::admission::AdmissionState;
use crate::domain::fair_share::{passes_after, Held, Running, Shares};
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

/// A row of `sql::ACCOUNT_SHARES`: what its columns hold depends on `kind`.
#[derive(sqlx::FromRow)]
struct AccountRow {
    kind: String,
    name: String,
    a: Option<i64>,
    b: Option<i64>,
    c: Option<i64>,
    d: Option<i64>,
    e: Option<i64>,
    f: Option<i64>,
    task: Option<String>,
}

/// What holds and shares the account, and what admission has learnt, from the rows of
/// `sql::ACCOUNT_SHARES`. A task in `finishing` holds nothing: see `claim_dispatches_beside`.
fn read_account(
    rows: Vec<AccountRow>,
    finishing: &HashSet<String>,
) -> Result<(Held, Option<AdmissionState>)> {
    let mut shares = Shares::new();
    let mut running = Vec::new();
    let mut virtual_time = 0;
    let mut learnt = None;
    for r in rows {
        let a =
            r.a.ok_or_else(|| StorageError::Corrupt(format!("{} row without a value", r.kind)))?;
        match r.kind.as_str() {
            "held" if r.task.as_ref().is_some_and(|t| finishing.contains(t)) => {}
            "held" => {
                shares.entry(r.name).or_default().in_flight += a;
                running.push(Running {
                    n: a,
                    since_ms: r.b.unwrap_or(0),
                });
            }
            "client" => {
                let share = shares.entry(r.name).or_default();
                share.weight = a;
                share.max_units = r.b;
            }
            "pass" => shares.entry(r.name).or_default().pass = a,
            "clock" => virtual_time = a,
            "state" => {
                let [Some(paused_until_ms), Some(busy_streak), Some(finished_units), Some(last_refused_ms)] =
                    [r.b, r.c, r.d, r.f]
                else {
                    return Err(StorageError::Corrupt("admission state with a null".into()));
                };
                learnt = Some(AdmissionState {
                    working: a,
                    paused_until_ms,
                    busy_streak,
                    finished_units,
                    refused_at: r.e,
                    last_refused_ms,
                });
            }
            other => {
                return Err(StorageError::Corrupt(format!(
                    "account row of kind {other}"
                )))
            }
        }
    }
    // Oldest first, as backfilling reads them (a union keeps no order).
    running.sort_by_key(|r| r.since_ms);
    let held = Held {
        shares,
        running,
        virtual_time,
    };
    Ok((held, learnt))
}

/// `UPDATE … WHERE id IN ($3, $4, …)` for `k` ids (`$1` the claim's time, `$2` the lease's
/// end): the dispatch claim of `k` tasks in one statement.
fn claim_statement(k: usize) -> String {
    let ids: Vec<String> = (0..k).map(|i| format!("${}", i + 3)).collect();
    // The version bump makes a cancel decided before the claim fail its compare-and-set.
    format!(
        "UPDATE tasks SET dispatch_started_at = COALESCE(dispatch_started_at, $1), \
        dispatch_attempts = dispatch_attempts + 1, next_dispatch_at = $2, version = version + 1 \
        WHERE status = 'pending' AND next_dispatch_at IS NOT NULL AND next_dispatch_at <= $1 \
        AND id IN ({}) RETURNING {TASK_COLUMNS}",
        ids.join(", ")
    )
}

/// Fair share's passes after a claim, one statement for all clients (names are unique).
fn write_passes_statement(k: usize) -> String {
    let rows: Vec<String> = (0..k)
        .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
        .collect();
    format!(
        "INSERT INTO fair_passes (client, pass) VALUES {} \
        ON CONFLICT (client) DO UPDATE SET pass = excluded.pass",
        rows.join(", ")
    )
}

const WRITE_CLOCK: &str = "UPDATE fair_clock SET virtual_time = $1 WHERE id = 1";

impl Store {
    /// Claims due pending tasks for one create call each. `decide` gets what admission has
    /// learnt about the account (stored by any replica), what holds the account
    /// (every client's weight, cap and units held upstream, across all replicas, and the running
    /// tasks' `n` and dispatch time, oldest first) and the due tasks,
    /// up to `limit` per client in priority then due order, and names the ones to send, in order; each is marked as possibly in flight (`dispatch_started_at`), so it counts
    /// against the budget at once and a crash mid-call leads to recovery, not a loss, and its next
    /// dispatch moves to `lease_until_ms`. Returns the claimed tasks, in `decide`'s order.
    /// `expect_due` skips the cheap look for due work first (the last pass left some waiting).
    pub async fn claim_dispatches<F>(
        &self,
        now_ms: i64,
        limit: i64,
        lease_until_ms: i64,
        expect_due: bool,
        decide: F,
    ) -> Result<Vec<Task>>
    where
        F: FnOnce(Option<AdmissionState>, Held, Vec<DispatchCandidate>) -> Vec<String>,
    {
        let none = HashSet::new();
        self.claim_dispatches_beside(now_ms, limit, lease_until_ms, expect_due, &none, decide)
            .await
    }

    /// [`Store::claim_dispatches`], with the tasks in `finishing` counted as holding no units:
    /// tasks whose final report (a verified callback, a poll's answer) is being committed by
    /// this replica at this moment. Upstream freed their units when it sent that report, so a
    /// claim need not wait for the commit to use them; if the commit fails, the task counts as
    /// holding its units again, which only leaves room unused.
    pub async fn claim_dispatches_beside<F>(
        &self,
        now_ms: i64,
        limit: i64,
        lease_until_ms: i64,
        expect_due: bool,
        finishing: &HashSet<String>,
        decide: F,
    ) -> Result<Vec<Task>>
    where
        F: FnOnce(Option<AdmissionState>, Held, Vec<DispatchCandidate>) -> Vec<String>,
    {
        // Most passes find nothing due (a finished task wakes the dispatcher whether or not
        // work waits): one cheap read then, without the write lock or the admission lock.
        if !expect_due {
            let any_due: bool = on_pool!(self, p => {
                sqlx::query_scalar(sql::DISPATCH_BACKLOG).bind(now_ms).fetch_one(p).await?
            });
            if !any_due {
                return Ok(Vec::new());
            }
        }
        let _writer = self.writer().await;
        // No row locks on the select (window functions forbid them): the advisory lock already
        // serialises admission, and the claim's compare-and-set re-checks each row.
        let select = self.due_dispatches();
        let begin = self.begin_serialised(dialect::Serialised::Admission);
        let rows: Vec<TaskRow> = on_pool!(self, p => {
            let mut tx = p.begin_with(begin).await?;
            let due: Vec<DueRow> = sqlx::query_as(select)
                .bind(now_ms)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
            if due.is_empty() {
                tx.rollback().await?;
                return Ok(Vec::new());
            }
            let account: Vec<AccountRow> =
                sqlx::query_as(sql::ACCOUNT_SHARES).fetch_all(&mut *tx).await?;
            let (held, learnt) = read_account(account, finishing)?;
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
            let chosen = decide(learnt, held, candidates);
            let mut claimed: Vec<TaskRow> = Vec::new();
            if !chosen.is_empty() {
                let claim = claim_statement(chosen.len());
                let mut q = sqlx::query_as(&claim)
                    .bind(now_ms)
                    .bind(lease_until_ms);
                for id in &chosen {
                    q = q.bind(id);
                }
                claimed = q.fetch_all(&mut *tx).await?;
                let place: std::collections::HashMap<&str, usize> =
                    chosen.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
                claimed.sort_by_key(|r| place.get(r.id.as_str()).copied());
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
            if !passes.by_client.is_empty() {
                let write = write_passes_statement(passes.by_client.len());
                let mut q = sqlx::query(&write);
                for (client, pass) in &passes.by_client {
                    q = q.bind(client).bind(pass);
                }
                q.execute(&mut *tx).await?;
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

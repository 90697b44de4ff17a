//! Dispatch: sending pending tasks upstream, within the account's concurrency, exactly once.
//!
//! Each pass counts the units our tasks hold upstream (from the database, so a restart does not
//! reset it), asks the admission controller which waiting tasks fit, and claims those; the
//! dispatcher worker then sends them, a bounded number at a time.
//!
//! Before each create call the task is claimed: `dispatch_started_at` marks that the call may
//! reach upstream and `next_dispatch_at` moves past the call's time limit (a lease). A task whose
//! create may have landed (in doubt) is never re-sent blindly: it is first looked up by its
//! `external_task_id`; only when upstream answers that it does not have it, or cannot say, is the
//! create sent again with the same id, which upstream refuses as a duplicate if it has it after all.
//! See ARCHITECTURE.md, "Exactly once upstream".

mod recover;
mod send;

use super::{ms, Relay, ServiceError};
use crate::domain::admission::Candidate;
use crate::domain::Task;
use crate::storage::DispatchCandidate;
use crate::upstream::UpstreamError;
use send::dispatch_one;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

/// Waiting tasks considered per client and pass, in priority then age order (enough for small
/// tasks to backfill around large ones).
const CANDIDATES_PER_CLIENT: i64 = 64;

fn jitter() -> f64 {
    rand::random::<f64>()
}

impl Relay {
    /// How many tasks this dispatch pass may work on at once: `dispatch.concurrency`, or while
    /// dispatch is halted none (or one, when a create is the probe that shows upstream is back).
    pub async fn dispatch_allowance(&self) -> Option<usize> {
        let concurrency = self.settings.dispatch.concurrency.max(1);
        if self.halt_reason().is_none() {
            return Some(concurrency);
        }
        match halted_allowance(self).await {
            Some(n) => Some(n),
            None if self.halt_reason().is_some() => None,
            // The probe passed: dispatch as usual.
            None => Some(concurrency),
        }
    }

    /// Claims, under a lease, the tasks in doubt and the waiting tasks that fit the upstream
    /// budget, at most `limit` (only what starts now, so no lease runs out while its task waits
    /// for a slot). `now` is the claim's time; pass it to `dispatch_claimed`.
    pub async fn claim_for_dispatch(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<Task>, ServiceError> {
        // Past any answer the pass can still get: a lookup and a create, each within the call's
        // time limit, and a second for the commit. See `storage::claims` on leases.
        let lease_until = now + 2 * ms(self.settings.cometapi.timeout) + 1000;
        // Nothing due (the closure is not called) leaves nothing waiting.
        let mut left_waiting = false;
        let mut units_full = false;
        let finishing = self.finishing_marks().clone();
        let claimed = self
            .store
            .claim_dispatches_beside(
                now,
                CANDIDATES_PER_CLIENT,
                lease_until,
                self.work_waiting(),
                &finishing,
                |learnt, held, candidates| {
                    // Tasks in doubt already count in the units in flight, and finding out costs
                    // nothing upstream, so they do not wait for room.
                    let (in_doubt, waiting): (Vec<DispatchCandidate>, Vec<DispatchCandidate>) =
                        candidates.into_iter().partition(|c| c.in_doubt);
                    let mut work: Vec<String> = in_doubt.into_iter().map(|c| c.id).collect();
                    let waiting: Vec<Candidate> =
                        waiting.into_iter().map(Candidate::from).collect();
                    let chosen = self.select_for_dispatch(now, learnt, &held, &waiting);
                    left_waiting = chosen.len() < waiting.len();
                    work.extend(chosen);
                    if work.len() > limit {
                        work.truncate(limit);
                        left_waiting = true;
                    }
                    let sent_units: i64 = waiting
                        .iter()
                        .filter(|c| work.contains(&c.id))
                        .map(|c| c.n)
                        .sum();
                    units_full = self.fills_working_limit(held.in_flight() + sent_units);
                    work
                },
            )
            .await?;
        self.work_waiting.store(left_waiting, Ordering::Relaxed);
        self.units_full.store(units_full, Ordering::Relaxed);
        Ok(claimed)
    }

    /// Whether the last dispatch pass found every unit of the working limit held, counting
    /// what it sent. A new task cannot go then, so a submit does not wake the dispatcher (at a
    /// burst of submits it ran a pass per insert batch, each reading the account under the
    /// admission lock, for nothing): whatever frees units wakes it itself (a final status, a
    /// create's answer, the working limit growing), and other replicas' finishes reach it at
    /// its idle tick, as before. A pass that fails, or finds nothing due, leaves it unset.
    pub fn units_full(&self) -> bool {
        self.units_full.load(Ordering::Relaxed)
    }

    /// Whether the last dispatch pass left due work waiting for units: a change that frees
    /// units then commits at once rather than in a fuller batch.
    pub fn work_waiting(&self) -> bool {
        self.work_waiting.load(Ordering::Relaxed)
    }

    /// Marks task `id`'s units free to this replica's dispatch claims until the mark is
    /// dropped: held while the task's final report commits.
    pub(super) fn finishing(&self, id: &str) -> Finishing<'_> {
        self.finishing_marks().insert(id.to_owned());
        Finishing {
            relay: self,
            id: id.to_owned(),
        }
    }

    fn finishing_marks(&self) -> MutexGuard<'_, HashSet<String>> {
        // A set of ids stays consistent even if a holder panicked.
        self.finishing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends one task claimed at `now_claimed` upstream (after recovering it, if an earlier
    /// create may have landed), and tells local waiters.
    pub async fn dispatch_claimed(&self, task: Task, now_claimed: i64) {
        let id = task.id.clone();
        if let Err(e) = dispatch_one(self, task, now_claimed).await {
            tracing::error!(task_id = %id, error = %e, "dispatch failed");
        }
        self.publish(&id);
    }
}

/// While dispatch is halted, whether this pass may send anything: None sends nothing, Some(n)
/// at most n tasks (a probe by create lets one through).
async fn halted_allowance(relay: &Relay) -> Option<usize> {
    relay.halt_reason()?;
    let reason = relay.take_halt_probe(jitter())?;
    if !reason.probed_by_query() {
        // Only a create shows that credit (or the route) is back; refused, it costs nothing.
        return Some(1);
    }
    // A made-up id: a key that works answers task_not_exist, a refused one the same refusal.
    let probe_id = format!("klr-probe-{}", uuid::Uuid::now_v7());
    match relay.upstream.query(&probe_id).await {
        Ok(_) => relay.resume_dispatch(),
        Err(UpstreamError::Halt {
            reason,
            code,
            message,
        }) => relay.halt_dispatch(reason, &code, &message),
        Err(e) => tracing::info!(error = %e, "dispatch halt probe got no verdict"),
    }
    None
}

/// A task's units counted free by dispatch claims while its final report commits; dropping it
/// (after the commit, whether it landed or failed) ends that.
pub(super) struct Finishing<'a> {
    relay: &'a Relay,
    id: String,
}

impl Drop for Finishing<'_> {
    fn drop(&mut self) {
        self.relay.finishing_marks().remove(&self.id);
    }
}

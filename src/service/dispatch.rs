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

use super::{ms, now_ms, Relay, ServiceError};
use crate::domain::admission::Candidate;
use crate::domain::schedule::backoff;
use crate::domain::{EventSource, Task, TaskError, TaskStatus, UpstreamReport, UpstreamStatus};
use crate::storage::{DispatchCandidate, DispatchRetry};
use crate::upstream::{CreateRequest, Lookup, UpstreamError};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::Duration;

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

/// Sends one claimed task upstream (after recovering it, if an earlier create may have landed).
async fn dispatch_one(relay: &Relay, task: Task, now_claimed: i64) -> Result<(), ServiceError> {
    let id = task.id.as_str();
    // The mark predates this claim: an earlier create may have landed.
    let was_in_doubt = task
        .dispatch_started_at_ms
        .is_some_and(|t| t != now_claimed);
    if was_in_doubt && bind_if_upstream_has_it(relay, &task).await? {
        return Ok(());
    }
    // Large Base64 inputs take their turn in the byte budget that large submits share, held
    // until the create call is done with them.
    let _budget = relay.reserve_dispatch_bytes(id).await?;
    let Some(inputs) = relay.store.get_inputs(id).await? else {
        relay
            .refuse(
                id,
                TaskError::new(
                    "inputs_missing",
                    "the task's input images are no longer stored",
                ),
            )
            .await?;
        return Ok(());
    };
    let request = CreateRequest {
        model_name: &task.model_name,
        prompt: task.prompt.as_deref(),
        n: task.n,
        aspect_ratio: task.aspect_ratio.as_deref(),
        inputs: &inputs,
        callback_url: relay.callback_url(id),
        external_task_id: &task.external_task_id,
        request_id: task.request_id.as_deref(),
    };
    match relay.upstream.create(&request).await {
        Ok(report) => {
            relay.resume_dispatch();
            relay.admission_accepted().await;
            relay
                .apply_report(id, EventSource::Dispatch, &report)
                .await?;
        }
        Err(UpstreamError::Retryable {
            reason,
            retry_after,
            maybe_sent,
            busy,
        }) => {
            let now = now_ms();
            let (next_attempt_at_ms, detail) = if busy {
                // The account is full: the working limit shrinks and this task backs off (all
                // dispatch too, after refusals in a row); it keeps its age, so its place in line.
                let others = relay.store.units_in_flight().await? - task.n;
                let pause = relay
                    .admission_busy(now_claimed, others.max(0), task.n, retry_after, jitter())
                    .await;
                tracing::warn!(task_id = %id, %reason, task_wait = ?pause.task, all_paused = ?pause.all, "upstream concurrency full");
                let detail = if pause.all.is_zero() {
                    format!(
                        "upstream concurrency full ({reason}); retrying in {}, other tasks go on within the smaller working limit",
                        human(pause.task)
                    )
                } else {
                    format!(
                        "upstream concurrency full ({reason}); dispatch paused for {}",
                        human(pause.all)
                    )
                };
                (now + ms(pause.task), detail)
            } else {
                let delay = retry_delay(relay, &task).max(retry_after.unwrap_or_default());
                tracing::warn!(task_id = %id, %reason, retry_in = ?delay, "dispatch will be retried");
                (
                    now + ms(delay),
                    format!(
                        "attempt {} not accepted ({reason}); retrying in {}",
                        task.dispatch_attempts,
                        human(delay)
                    ),
                )
            };
            // An earlier attempt still in doubt stays in doubt, whatever this one did.
            put_back(
                relay,
                id,
                next_attempt_at_ms,
                maybe_sent || was_in_doubt,
                detail,
            )
            .await?;
        }
        Err(UpstreamError::Halt {
            reason,
            code,
            message,
        }) => {
            // The setup is refused, not the task: it keeps its place and waits, not in doubt
            // (upstream refused the call), unless an earlier attempt was.
            relay.halt_dispatch(reason, &code, &message);
            let detail = format!(
                "dispatch halted ({}, upstream {code}: {message}); the task waits",
                reason.as_str()
            );
            put_back(relay, id, now_ms(), was_in_doubt, detail).await?;
        }
        Err(UpstreamError::Unknown { code, message })
            if task.dispatch_attempts >= relay.settings.cometapi.unknown_code_attempts =>
        {
            tracing::warn!(task_id = %id, %code, %message, attempts = task.dispatch_attempts, "upstream keeps answering a code outside its published table; failing the task");
            relay
                .finish(
                    id,
                    EventSource::Dispatch,
                    TaskStatus::Failed,
                    TaskError::new(code, message),
                )
                .await?;
        }
        Err(UpstreamError::Unknown { code, message }) => {
            let delay = retry_delay(relay, &task);
            tracing::warn!(task_id = %id, %code, %message, retry_in = ?delay, "upstream answered a code outside its published table; retrying");
            let detail = format!(
                "attempt {} answered unknown code {code} ({message}); retrying in {}",
                task.dispatch_attempts,
                human(delay)
            );
            // Nothing says the call was refused before it landed.
            put_back(relay, id, now_ms() + ms(delay), true, detail).await?;
        }
        Err(UpstreamError::Rejected { code, message }) => {
            tracing::warn!(task_id = %id, %code, %message, "upstream refused the task");
            relay.refuse(id, TaskError::new(code, message)).await?;
        }
        Err(UpstreamError::DuplicateExternalId { message }) => {
            recover_existing(relay, &task, &message).await?;
        }
    }
    Ok(())
}

/// The backoff before a task's next attempt, from how many it has had.
fn retry_delay(relay: &Relay, task: &Task) -> Duration {
    let s = &relay.settings.dispatch;
    let attempt = u32::try_from(task.dispatch_attempts.saturating_sub(1)).unwrap_or(u32::MAX);
    backoff(attempt, s.retry_initial, s.retry_max, jitter())
}

/// Returns a task to waiting after an attempt that did not land, with a timeline entry.
async fn put_back(
    relay: &Relay,
    id: &str,
    next_attempt_at_ms: i64,
    maybe_sent: bool,
    detail: String,
) -> Result<(), ServiceError> {
    let retry = DispatchRetry {
        next_attempt_at_ms,
        maybe_sent,
        detail,
    };
    Ok(relay.store.retry_dispatch(id, now_ms(), &retry).await?)
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// For a task in doubt: asks upstream for it by `external_task_id` and binds it if found.
/// Returns false when upstream does not have it or cannot say, so the create may be sent again.
async fn bind_if_upstream_has_it(relay: &Relay, task: &Task) -> Result<bool, ServiceError> {
    match relay
        .upstream
        .query_by_external_id(&task.external_task_id)
        .await
    {
        Ok(Lookup::Found(report)) => {
            tracing::info!(task_id = %task.id, "task in doubt found upstream; bound");
            relay
                .apply_report(&task.id, EventSource::Dispatch, &report)
                .await?;
            Ok(true)
        }
        Ok(Lookup::NotExist) => Ok(false),
        Err(e) => {
            tracing::info!(task_id = %task.id, error = %e, "lookup by external_task_id unavailable; re-sending under the same id");
            Ok(false)
        }
    }
}

/// Upstream already holds this task (an earlier call landed but its answer was lost): bind it
/// instead of creating a second, paid, task.
async fn recover_existing(relay: &Relay, task: &Task, message: &str) -> Result<(), ServiceError> {
    tracing::warn!(task_id = %task.id, "upstream already has this external_task_id; recovering it");
    let report = match relay
        .upstream
        .query_by_external_id(&task.external_task_id)
        .await
    {
        Ok(Lookup::Found(report)) => report,
        // No lookup by external id here: the task is upstream, so treat it as submitted without
        // an upstream id. Its callback carries our task id in the URL and binds it; the poller
        // keeps trying the lookup.
        other => {
            tracing::info!(task_id = %task.id, lookup = ?other, "lookup by external_task_id unavailable");
            UpstreamReport {
                task_id: None,
                external_task_id: Some(task.external_task_id.clone()),
                status: UpstreamStatus::Submitted,
                status_msg: Some(format!(
                    "upstream already holds this external_task_id ({message}); awaiting its callback"
                )),
                updated_at_ms: None,
                images: Vec::new(),
                final_unit_deduction: None,
                raw: None,
            }
        }
    };
    relay
        .apply_report(&task.id, EventSource::Dispatch, &report)
        .await?;
    Ok(())
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

//! Sending one claimed task: the create call, and what each of its answers does to the task.

use super::jitter;
use super::recover::{bind_if_upstream_has_it, recover_existing};
use crate::domain::schedule::backoff;
use crate::domain::{EventSource, Task, TaskError, TaskStatus};
use crate::service::{ms, now_ms, Relay, ServiceError};
use crate::storage::DispatchRetry;
use crate::upstream::{CreateRequest, UpstreamError};
use std::time::Duration;

/// Sends one claimed task upstream (after recovering it, if an earlier create may have landed).
pub(super) async fn dispatch_one(
    relay: &Relay,
    task: Task,
    now_claimed: i64,
) -> Result<(), ServiceError> {
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

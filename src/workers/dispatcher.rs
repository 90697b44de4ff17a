//! Sends pending tasks upstream.
//!
//! Before each create call the task is claimed: `dispatch_started_at` marks that the call may
//! reach upstream and `next_dispatch_at` moves past the call's time limit (a lease). If the process
//! dies mid-call, the lease lapses and the task is dispatched again with the same
//! `external_task_id`; upstream refuses that id as a duplicate if the first call landed, and the
//! task is then found by its `external_task_id` (or by its callback) instead of paid for twice.

use super::{for_each_bounded, jitter};
use crate::domain::schedule::backoff;
use crate::domain::{EventSource, TaskError, TaskStatus, UpstreamReport, UpstreamStatus};
use crate::service::{ms, now_ms, Relay, ServiceError};
use crate::storage::DispatchRetry;
use crate::upstream::{CreateRequest, Lookup, UpstreamError};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest sleep between passes when nothing wakes the dispatcher.
const IDLE: Duration = Duration::from_secs(1);

pub async fn run(relay: Arc<Relay>, shutdown: CancellationToken) {
    tracing::info!("dispatcher started");
    while !shutdown.is_cancelled() {
        let busy = match step(&relay).await {
            Ok(n) => n >= batch_size(&relay),
            Err(e) => {
                tracing::error!(error = %e, "dispatcher pass failed");
                false
            }
        };
        if busy {
            continue;
        }
        tokio::select! {
            _ = relay.dispatch_wake.notified() => {}
            _ = tokio::time::sleep(IDLE) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    tracing::info!("dispatcher stopped");
}

fn batch_size(relay: &Relay) -> usize {
    relay.settings.dispatch.concurrency * 4
}

/// One pass: dispatches every task that is due now. Returns how many were attempted.
pub async fn step(relay: &Arc<Relay>) -> Result<usize, ServiceError> {
    let due = relay
        .store
        .due_dispatches(now_ms(), batch_size(relay) as i64)
        .await?;
    let n = due.len();
    let r = relay.clone();
    for_each_bounded(due, relay.settings.dispatch.concurrency, move |id| {
        let relay = r.clone();
        async move {
            if let Err(e) = dispatch_one(&relay, &id).await {
                tracing::error!(task_id = %id, error = %e, "dispatch failed");
            }
            relay.publish(&id);
        }
    })
    .await;
    Ok(n)
}

async fn dispatch_one(relay: &Relay, id: &str) -> Result<(), ServiceError> {
    let now_claimed = now_ms();
    let timeout = relay.settings.cometapi.timeout;
    // Past any answer the call can still get: twice its time limit, and a second for the commit.
    let lease_until = now_claimed + 2 * ms(timeout) + 1000;
    let Some(task) = relay
        .store
        .claim_dispatch(id, now_claimed, lease_until)
        .await?
    else {
        return Ok(()); // someone else took it, or it is no longer pending
    };
    let Some(inputs) = relay.store.get_inputs(id).await? else {
        relay
            .finish(
                id,
                EventSource::Dispatch,
                TaskStatus::Failed,
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
    };
    match relay.upstream.create(&request).await {
        Ok(report) => {
            relay
                .apply_report(id, EventSource::Dispatch, &report)
                .await?;
        }
        Err(UpstreamError::Retryable {
            reason,
            retry_after,
            maybe_sent,
        }) => {
            let s = &relay.settings.dispatch;
            let attempt =
                u32::try_from(task.dispatch_attempts.saturating_sub(1)).unwrap_or(u32::MAX);
            let mut delay = backoff(attempt, s.retry_initial, s.retry_max, jitter());
            if let Some(ra) = retry_after {
                delay = delay.max(ra);
            }
            tracing::warn!(task_id = %id, %reason, retry_in = ?delay, "dispatch will be retried");
            let now = now_ms();
            relay
                .store
                .retry_dispatch(
                    id,
                    now,
                    &DispatchRetry {
                        next_attempt_at_ms: now + ms(delay),
                        // An earlier attempt still in doubt stays in doubt, whatever this one did.
                        maybe_sent: maybe_sent
                            || task
                                .dispatch_started_at_ms
                                .is_some_and(|t| t != now_claimed),
                        detail: format!(
                            "attempt {} not accepted ({reason}); retrying in {}",
                            task.dispatch_attempts,
                            humantime::format_duration(Duration::from_millis(
                                delay.as_millis() as u64
                            ))
                        ),
                    },
                )
                .await?;
        }
        Err(UpstreamError::Rejected { code, message }) => {
            tracing::warn!(task_id = %id, %code, %message, "upstream refused the task");
            relay
                .finish(
                    id,
                    EventSource::Dispatch,
                    TaskStatus::Failed,
                    TaskError::new(code, message),
                )
                .await?;
        }
        Err(UpstreamError::DuplicateExternalId { message }) => {
            recover_existing(relay, id, &task.external_task_id, &message).await?;
        }
    }
    Ok(())
}

/// Upstream already holds this task (an earlier call landed but its answer was lost): bind it
/// instead of creating a second, paid, task.
async fn recover_existing(
    relay: &Relay,
    id: &str,
    external_task_id: &str,
    message: &str,
) -> Result<(), ServiceError> {
    tracing::warn!(task_id = %id, "upstream already has this external_task_id; recovering it");
    let report = match relay.upstream.query_by_external_id(external_task_id).await {
        Ok(Lookup::Found(report)) => report,
        // No lookup by external id here: the task is upstream, so treat it as submitted without
        // an upstream id. Its callback carries our task id in the URL and binds it; the poller
        // keeps trying the lookup.
        other => {
            tracing::info!(task_id = %id, lookup = ?other, "lookup by external_task_id unavailable");
            UpstreamReport {
                task_id: None,
                external_task_id: Some(external_task_id.to_owned()),
                status: UpstreamStatus::Submitted,
                status_msg: Some(format!(
                    "upstream already holds this external_task_id ({message}); awaiting its callback"
                )),
                updated_at_ms: None,
                images: Vec::new(),
            }
        }
    };
    relay
        .apply_report(id, EventSource::Dispatch, &report)
        .await?;
    Ok(())
}

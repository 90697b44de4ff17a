//! The polling fallback: asks upstream about tasks that have had no news for a while, backing off
//! per task, and times out tasks that never reach a final status.

use super::{for_each_bounded, jitter};
use crate::domain::halt::HaltReason;
use crate::domain::schedule::backoff;
use crate::domain::{EventSource, TaskError, TaskStatus};
use crate::service::{ms, now_ms, ApplyOutcome, Relay, ServiceError};
use crate::storage::PollCandidate;
use crate::upstream::{Lookup, UpstreamError};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Rounds of `poller.concurrency` polls a pass may run before it times out old tasks.
const ROUNDS_PER_PASS: usize = 8;

pub async fn run(relay: Arc<Relay>, shutdown: CancellationToken) {
    tracing::info!("poller started");
    while !shutdown.is_cancelled() {
        if let Err(e) = step(&relay).await {
            tracing::error!(error = %e, "poller pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(relay.settings.poller.tick) => {}
            _ = relay.poll_wake.notified() => {}
            _ = shutdown.cancelled() => {}
        }
    }
    tracing::info!("poller stopped");
}

/// One pass: polls what is due and times out what is too old. Returns (polled, timed out).
pub async fn step(relay: &Arc<Relay>) -> Result<(usize, usize), ServiceError> {
    let s = &relay.settings.poller;
    let batch = s.concurrency.max(1);
    let mut polled = 0;
    // Claim one round at a time, so every lease starts when its poll does; a busy pass goes
    // round again, up to ROUNDS_PER_PASS times.
    for _ in 0..ROUNDS_PER_PASS {
        let now = now_ms();
        // Outlasts the poll's one upstream call and its commit; see `storage::claims` on leases.
        let lease_until = now + ms(relay.settings.cometapi.timeout) + 5_000;
        let due = relay
            .store
            .claim_due_polls(now, batch as i64, lease_until)
            .await?;
        let round = due.len();
        polled += round;
        let r = relay.clone();
        for_each_bounded(due, batch, move |c| {
            let relay = r.clone();
            async move {
                let id = c.id.clone();
                if let Err(e) = poll_one(&relay, c).await {
                    tracing::error!(task_id = %id, error = %e, "poll failed");
                }
            }
        })
        .await;
        if round < batch {
            break;
        }
    }
    let timed_out = time_out_expired(relay).await?;
    relay
        .store
        .delete_expired_idempotency_keys(now_ms() - ms(crate::service::IDEMPOTENCY_TTL), 1000)
        .await?;
    Ok((polled, timed_out))
}

async fn poll_one(relay: &Relay, c: PollCandidate) -> Result<(), ServiceError> {
    let s = &relay.settings.poller;
    let lookup = match &c.upstream_task_id {
        Some(task_id) => relay.upstream.query(task_id).await,
        None => {
            relay
                .upstream
                .query_by_external_id(&c.external_task_id)
                .await
        }
    };
    let now = now_ms();
    let outcome =
        |o: &'static str| metrics::counter!("klr_polls_total", "outcome" => o).increment(1);
    match &lookup {
        Ok(Lookup::NotExist) => outcome("not_exist"),
        Err(_) => outcome("error"),
        Ok(Lookup::Found(_)) => {}
    }
    // Polls are free calls with the same key: their answers say whether the key works.
    match &lookup {
        Ok(_) if relay.halt_reason().is_some_and(HaltReason::probed_by_query) => {
            relay.resume_dispatch()
        }
        Err(UpstreamError::Halt {
            reason,
            code,
            message,
        }) if reason.probed_by_query() => relay.halt_dispatch(*reason, code, message),
        _ => {}
    }
    match lookup {
        Ok(Lookup::Found(report)) => {
            match relay.apply_report(&c.id, EventSource::Poll, &report).await {
                Ok(ApplyOutcome::Applied(_)) => {
                    outcome("changed");
                    return Ok(());
                }
                Ok(ApplyOutcome::Ignored(_)) => outcome("unchanged"),
                Err(ServiceError::Mismatch(e)) => {
                    tracing::error!(task_id = %c.id, error = %e, "poll answer does not match the task");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Lookup::NotExist) if now - c.created_at_ms > ms(s.not_found_grace) => {
            relay
                .finish(
                    &c.id,
                    EventSource::Poll,
                    TaskStatus::Failed,
                    TaskError::new(
                        "task_not_exist",
                        "upstream has no record of this task (task_not_exist)",
                    ),
                )
                .await?;
            return Ok(());
        }
        Ok(Lookup::NotExist) => {}
        Err(e) => tracing::warn!(task_id = %c.id, error = %e, "poll did not get an answer"),
    }
    let next = c.poll_count + 1;
    let attempt = u32::try_from(c.poll_count).unwrap_or(u32::MAX);
    let delay = backoff(attempt, s.interval, s.max_interval, jitter());
    relay
        .store
        .reschedule_poll(&c.id, now + ms(delay), next)
        .await?;
    Ok(())
}

async fn time_out_expired(relay: &Relay) -> Result<usize, ServiceError> {
    let give_up = relay.settings.poller.give_up_after;
    let expired = relay
        .store
        .expired_open_tasks(now_ms() - ms(give_up), 100)
        .await?;
    let n = expired.len();
    for id in expired {
        let error = TaskError::new(
            "timed_out",
            format!(
                "no final status within {}",
                humantime::format_duration(give_up)
            ),
        );
        relay
            .finish(&id, EventSource::System, TaskStatus::TimedOut, error)
            .await?;
    }
    Ok(n)
}

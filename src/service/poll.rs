//! Polling, the fallback for news: asking upstream about tasks that have had no news for a while,
//! backing off per task, and timing out tasks that never reach a final status.
//!
//! While work waits for upstream units, running tasks past their expected finish (learned from
//! the history, `domain::durations`) are polled every `poller.eager_interval`, so their units are
//! reused as soon as they free; queries never exceed `poller.max_queries_per_second` (all
//! replicas together). A pass says how long to pause before the next: until the next poll is
//! due (at most `tick`), not a fixed tick. The poller worker is the loop around `Poller::pass`.

use super::{for_each_bounded, ms, now_ms, ApplyOutcome, Relay, ServiceError};
use crate::domain::durations::{eager_polls, interval_within_per_second, DurationEstimates};
use crate::domain::halt::HaltReason;
use crate::domain::schedule::backoff;
use crate::domain::{EventSource, TaskError, TaskStatus};
use crate::storage::PollCandidate;
use crate::upstream::{Lookup, UpstreamError};
use std::sync::Arc;
use std::time::Duration;

fn jitter() -> f64 {
    rand::random::<f64>()
}

/// Rounds of `poller.concurrency` polls a pass may run before it times out old tasks.
const ROUNDS_PER_PASS: usize = 8;

/// How often the learned durations are read again from the history (a read of at most
/// DURATION_SAMPLES rows by an index): soon after a start, the first finished tasks already count.
const ESTIMATES_REFRESH: Duration = Duration::from_secs(5);
/// Recent succeeded tasks the durations are learned from.
const DURATION_SAMPLES: i64 = 500;
/// Shortest pause between passes, so a poll that cannot be claimed yet never spins.
const MIN_PAUSE: Duration = Duration::from_millis(10);

/// The poller's memory between passes: what it learned of durations.
pub struct Poller {
    estimates: DurationEstimates,
    refreshed: Option<tokio::time::Instant>,
}

/// The name of the upstream query rate in `rate_limits`, shared by every replica.
const QUERY_RATE: &str = "upstream_queries";
/// Queries handed out at once: a quarter second's worth, so a pass takes a batch. The rate's
/// interval makes room for it (`interval_within_per_second`), so no second ever holds more than
/// `poller.max_queries_per_second`, and the long-run rate is four fifths of it.
const QUERY_BURST_US: i64 = 250_000;

/// The shared query rate's interval: `poller.max_queries_per_second` in every second.
fn query_interval_us(relay: &Relay) -> i64 {
    interval_within_per_second(relay.settings.poller.max_queries_per_second, QUERY_BURST_US)
}

/// Where polls take their share of `poller.max_queries_per_second`.
enum Rate {
    /// The database's rate, shared by every replica.
    Shared,
    /// No rate (`step`, for tests that drive single passes).
    Unlimited,
}

impl Rate {
    async fn take(&mut self, relay: &Relay, now: i64, want: usize) -> Result<usize, ServiceError> {
        match self {
            Rate::Unlimited => Ok(want),
            Rate::Shared => {
                let want = i64::try_from(want).unwrap_or(i64::MAX);
                let (n, _) = relay
                    .store
                    .take_from_rate(
                        QUERY_RATE,
                        now,
                        want,
                        query_interval_us(relay),
                        QUERY_BURST_US,
                    )
                    .await?;
                Ok(usize::try_from(n).unwrap_or(0))
            }
        }
    }

    async fn give_back(&mut self, relay: &Relay, unused: usize) -> Result<(), ServiceError> {
        match self {
            Rate::Unlimited => {}
            Rate::Shared => {
                let unused = i64::try_from(unused).unwrap_or(0);
                relay
                    .store
                    .give_back_to_rate(QUERY_RATE, unused, query_interval_us(relay))
                    .await?;
            }
        }
        Ok(())
    }

    fn wait_ms(&self, relay: &Relay) -> i64 {
        match self {
            Rate::Unlimited => 0,
            // One query's interval: the shared rate frees a slot at least that often.
            Rate::Shared => query_interval_us(relay) / 1000,
        }
    }
}

impl Poller {
    pub fn new(_relay: &Relay) -> Poller {
        Poller {
            estimates: DurationEstimates::default(),
            refreshed: None,
        }
    }

    /// One pass (see `step`), after bringing forward the polls of running tasks that are likely
    /// done while work waits for their units. Returns how long to pause before the next: the
    /// eager interval while work waits, else until the next poll is due, at most `tick`.
    pub async fn pass(&mut self, relay: &Arc<Relay>) -> Result<Duration, ServiceError> {
        let s = &relay.settings.poller;
        metrics::counter!("klr_poller_passes_total").increment(1);
        if self
            .refreshed
            .is_none_or(|t| t.elapsed() >= ESTIMATES_REFRESH)
        {
            let samples = relay.store.recent_durations(DURATION_SAMPLES).await?;
            self.estimates = DurationEstimates::from_samples(&samples);
            self.refreshed = Some(tokio::time::Instant::now());
        }
        let now = now_ms();
        let eager_ms = ms(s.eager_interval);
        let backlog = !self.estimates.is_empty() && relay.store.dispatch_backlog(now).await?;
        if backlog {
            let running = relay.store.running_tasks().await?;
            let ids = eager_polls(now, true, &running, &self.estimates, eager_ms);
            let moved = relay.store.bring_polls_forward(&ids, now).await?;
            metrics::counter!("klr_eager_polls_total").increment(moved);
        }
        let mut rate = Rate::Shared;
        let (_, _, rate_limited) = step_within(relay, &mut rate).await?;
        let mut pause = if backlog {
            s.eager_interval.min(s.tick)
        } else {
            s.tick
        };
        if let Some(due) = relay.store.next_poll_due().await? {
            let until_due = u64::try_from(due - now_ms()).unwrap_or(0);
            pause = pause.min(Duration::from_millis(until_due));
        }
        if rate_limited {
            let wait = u64::try_from(rate.wait_ms(relay)).unwrap_or(0);
            pause = pause.max(Duration::from_millis(wait));
        }
        Ok(pause.max(MIN_PAUSE))
    }
}

/// One pass: polls what is due and times out what is too old. Returns (polled, timed out).
pub async fn step(relay: &Arc<Relay>) -> Result<(usize, usize), ServiceError> {
    let (polled, timed_out, _) = step_within(relay, &mut Rate::Unlimited).await?;
    Ok((polled, timed_out))
}

/// A pass within the query rate. Returns (polled, timed out, whether the rate held polls back).
async fn step_within(
    relay: &Arc<Relay>,
    rate: &mut Rate,
) -> Result<(usize, usize, bool), ServiceError> {
    let s = &relay.settings.poller;
    let batch = s.concurrency.max(1);
    let mut polled = 0;
    let mut rate_limited = false;
    // Nothing due: no share of the query rate is taken (that costs a write per pass).
    let due_now = relay
        .store
        .next_poll_due()
        .await?
        .is_some_and(|due| due <= now_ms());
    // Claim one round at a time, so every lease starts when its poll does; a busy pass goes
    // round again, up to ROUNDS_PER_PASS times.
    for _ in 0..if due_now { ROUNDS_PER_PASS } else { 0 } {
        let now = now_ms();
        let allowed = rate.take(relay, now, batch).await?;
        if allowed == 0 {
            rate_limited = true;
            break;
        }
        // Outlasts the poll's one upstream call and its commit; see `storage::claims` on leases.
        let lease_until = now + ms(relay.settings.cometapi.timeout) + 5_000;
        let due = relay
            .store
            .claim_due_polls(now, allowed as i64, lease_until)
            .await?;
        let round = due.len();
        // Tokens not used by this round go back: nothing was sent for them.
        rate.give_back(relay, allowed - round).await?;
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
        if round < allowed {
            break;
        }
        if allowed < batch {
            rate_limited = true;
            break;
        }
    }
    let timed_out = time_out_expired(relay).await?;
    relay
        .store
        .delete_expired_idempotency_keys(now_ms() - ms(crate::service::IDEMPOTENCY_TTL), 1000)
        .await?;
    relay.fold_usage().await?;
    relay.sample_units().await?;
    Ok((polled, timed_out, rate_limited))
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

//! The dispatcher: a loop that asks the relay what it may send (`Relay::dispatch_allowance`,
//! `Relay::claim_for_dispatch`), sends it a bounded number at a time (`Relay::dispatch_claimed`),
//! and sleeps until woken or a short idle time passes. The rules are in `service::dispatch`.
//!
//! Passes overlap the creates of earlier passes: a claim marks its tasks as possibly in flight,
//! so the next pass counts their units whether or not their creates have answered, and units
//! that free while creates are under way are claimed at once instead of after the slowest of
//! them (a finished task's commit waited 7 ms for its claim at the 90th percentile before).

use super::for_each_bounded;
use crate::domain::Task;
use crate::service::{now_ms, Relay, ServiceError};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Longest sleep between passes when nothing wakes the dispatcher.
const IDLE: Duration = Duration::from_millis(500);

pub async fn run(relay: Arc<Relay>, shutdown: CancellationToken) {
    tracing::info!("dispatcher started");
    let mut sending: JoinSet<()> = JoinSet::new();
    while !shutdown.is_cancelled() {
        while sending.try_join_next().is_some() {}
        let claimed = match claim(&relay, sending.len()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "dispatcher pass failed");
                None
            }
        };
        if let Some((now, tasks)) = claimed {
            for task in tasks {
                let relay = relay.clone();
                sending.spawn(async move { relay.dispatch_claimed(task, now).await });
            }
            continue;
        }
        tokio::select! {
            _ = relay.dispatch_wake.notified() => {}
            // A create that answered: a refusal or a failure may have freed units.
            Some(_) = sending.join_next(), if !sending.is_empty() => {}
            _ = tokio::time::sleep(IDLE) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    // Creates under way are left to answer, so their tasks are stored as sent (or refused)
    // rather than left in doubt for the next start to look up.
    while sending.join_next().await.is_some() {}
    tracing::info!("dispatcher stopped");
}

/// A pass while `sending` creates are under way: the claim's time and its tasks, or None when
/// nothing was claimed.
async fn claim(relay: &Relay, sending: usize) -> Result<Option<(i64, Vec<Task>)>, ServiceError> {
    // While dispatch is halted, one probe at a time, as a pass on its own sends it.
    if sending > 0 && relay.halt_reason().is_some() {
        return Ok(None);
    }
    let Some(concurrency) = relay.dispatch_allowance().await else {
        return Ok(None);
    };
    let room = concurrency.saturating_sub(sending);
    if room == 0 {
        return Ok(None);
    }
    let now = now_ms();
    let claimed = relay.claim_for_dispatch(now, room).await?;
    Ok((!claimed.is_empty()).then_some((now, claimed)))
}

/// One pass: claims what may go now and sends it. Returns how many tasks it worked on.
pub async fn step(relay: &Arc<Relay>) -> Result<usize, ServiceError> {
    let Some((now, claimed)) = claim(relay, 0).await? else {
        return Ok(0);
    };
    let n = claimed.len();
    let r = relay.clone();
    for_each_bounded(claimed, n, move |task| {
        let relay = r.clone();
        async move { relay.dispatch_claimed(task, now).await }
    })
    .await;
    Ok(n)
}

//! The dispatcher: a loop that asks the relay what it may send (`Relay::dispatch_allowance`,
//! `Relay::claim_for_dispatch`), sends it a bounded number at a time (`Relay::dispatch_claimed`),
//! and sleeps until woken or a short idle time passes. The rules are in `service::dispatch`.

use super::for_each_bounded;
use crate::service::{now_ms, Relay, ServiceError};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest sleep between passes when nothing wakes the dispatcher.
const IDLE: Duration = Duration::from_millis(500);

pub async fn run(relay: Arc<Relay>, shutdown: CancellationToken) {
    tracing::info!("dispatcher started");
    while !shutdown.is_cancelled() {
        let sent_something = match step(&relay).await {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::error!(error = %e, "dispatcher pass failed");
                false
            }
        };
        if sent_something {
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

/// One pass: claims what may go now and sends it. Returns how many tasks it worked on.
pub async fn step(relay: &Arc<Relay>) -> Result<usize, ServiceError> {
    let Some(concurrency) = relay.dispatch_allowance().await else {
        return Ok(0);
    };
    let now = now_ms();
    let claimed = relay.claim_for_dispatch(now, concurrency).await?;
    let n = claimed.len();
    let r = relay.clone();
    for_each_bounded(claimed, concurrency, move |task| {
        let relay = r.clone();
        async move { relay.dispatch_claimed(task, now).await }
    })
    .await;
    Ok(n)
}

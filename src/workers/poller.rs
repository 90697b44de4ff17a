//! The poller: a loop around `service::poll::Poller::pass` (what to poll, the query rate, time-outs
//! are the service's), sleeping for the pause the pass asks for, or until woken.

use crate::service::poll::Poller;
use crate::service::Relay;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub async fn run(relay: Arc<Relay>, shutdown: CancellationToken) {
    tracing::info!("poller started");
    let mut poller = Poller::new(&relay);
    while !shutdown.is_cancelled() {
        let pause = match poller.pass(&relay).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "poller pass failed");
                relay.settings.poller.tick
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = relay.poll_wake.notified() => {}
            _ = shutdown.cancelled() => {}
        }
    }
    tracing::info!("poller stopped");
}

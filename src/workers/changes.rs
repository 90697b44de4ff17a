//! Wakes this replica's long-poll and SSE waiters when another replica changes a task
//! (Postgres only; see `storage::feed`). Without it a waiter would hear only of changes made by
//! its own process and sit out its whole wait when a webhook landed on another replica.

use crate::domain::FeedEvent;
use crate::service::Relay;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Pause before trying again when the database cannot be reached.
const RETRY: Duration = Duration::from_secs(1);

pub async fn run(relay: Arc<Relay>, shutdown: CancellationToken) {
    let mut feed = loop {
        match relay.other_replicas_changes().await {
            Ok(Some(feed)) => break feed,
            Ok(None) => return, // SQLite: one instance, nothing to hear
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other replicas' changes yet");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    };
    tracing::info!("listening for other replicas' changes");
    loop {
        let event = tokio::select! {
            e = feed.next() => e,
            _ = shutdown.cancelled() => break,
        };
        match event {
            Ok(FeedEvent::Changed(id)) => relay.publish(&id),
            Ok(FeedEvent::Gap) => {
                tracing::warn!("change feed interrupted; waiters re-read");
                relay.publish_all();
            }
            Err(e) => {
                tracing::warn!(error = %e, "change feed cannot reconnect yet");
                relay.publish_all();
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    tracing::info!("change feed stopped");
}

//! Background loops: the dispatcher sends pending tasks upstream, the poller asks upstream about
//! tasks with no news and times out the ones that never finish. Each loop takes a shutdown token
//! and exposes its single step, so tests can drive it deterministically.

pub mod changes;
pub mod dispatcher;
pub mod notifier;
pub mod poller;

use std::future::Future;

/// Runs `work` for every item, at most `limit` at a time, and waits for all of them.
pub(crate) async fn for_each_bounded<T, F, Fut>(items: Vec<T>, limit: usize, work: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for item in items {
        if set.len() >= limit.max(1) {
            set.join_next().await;
        }
        set.spawn(work(item));
    }
    while set.join_next().await.is_some() {}
}

pub(crate) fn jitter() -> f64 {
    rand::random::<f64>()
}

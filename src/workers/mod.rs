//! Background loops: the dispatcher sends pending tasks upstream, the poller asks upstream about
//! tasks with no news and times out the ones that never finish. Each loop takes a shutdown token
//! and exposes its single step, so tests can drive it deterministically.

pub mod archiver;
pub mod changes;
pub mod dispatcher;
pub mod notifier;
pub mod poller;

use crate::domain::notify::NetworkPolicy;
pub(crate) use crate::service::for_each_bounded;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::SocketAddr;

pub(crate) fn jitter() -> f64 {
    rand::random::<f64>()
}

/// Resolves names and keeps only addresses the policy allows, so a name cannot be pointed at a
/// forbidden address after it was checked.
pub(crate) struct PolicyResolver {
    pub policy: NetworkPolicy,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| policy.check_host(name.as_str(), a.ip()).is_ok())
                .collect();
            if addrs.is_empty() {
                return Err(format!("{} resolves to no allowed address", name.as_str()).into());
            }
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

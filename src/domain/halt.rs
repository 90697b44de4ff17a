//! Halting all dispatch when upstream refuses the operator's setup rather than a task: a bad or
//! rotated key, an IP not on the allow-list, an account out of credit, a create path that does
//! not exist. Failing queued tasks one by one for the operator's mistake would lose them; instead
//! every task waits, the reason is shown, and upstream is probed at a backoff until it passes.

use super::schedule::backoff;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HaltReason {
    /// 1000-1004, HTTP 401/403: the key (or Kling's JWT) is refused.
    Authentication,
    /// 1304: the server's IP is not on the account's allow-list.
    IpWhitelist,
    /// 1100-1102: account exception, arrears, resource pack depleted or expired.
    Account,
    /// The create path answers "no such route" (HTTP 404 without a service code).
    Route,
}

impl HaltReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HaltReason::Authentication => "authentication",
            HaltReason::IpWhitelist => "ip_whitelist",
            HaltReason::Account => "account",
            HaltReason::Route => "route",
        }
    }

    pub const ALL: [HaltReason; 4] = [
        HaltReason::Authentication,
        HaltReason::IpWhitelist,
        HaltReason::Account,
        HaltReason::Route,
    ];

    /// What the operator should do.
    pub fn advice(self) -> &'static str {
        match self {
            HaltReason::Authentication => {
                "upstream refuses the credentials: check cometapi.api_key (COMETAPI_KEY) or, for the kling profile, the access and secret keys"
            }
            HaltReason::IpWhitelist => {
                "upstream refuses this server's IP address: add it to the account's IP allow-list"
            }
            HaltReason::Account => {
                "the upstream account cannot pay for tasks (arrears, or resource pack depleted or expired): top it up"
            }
            HaltReason::Route => {
                "the create path does not exist upstream: check cometapi.profile and cometapi.create_path (kling-relay doctor)"
            }
        }
    }

    /// Whether a free query shows the problem is gone. Credit and routes are only shown by a
    /// create: one waiting task is let through as the probe (refused, it costs nothing).
    pub fn probed_by_query(self) -> bool {
        matches!(self, HaltReason::Authentication | HaltReason::IpWhitelist)
    }
}

/// Dispatch is halted: why, since when, and when upstream is next asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Halt {
    pub reason: HaltReason,
    pub since_ms: i64,
    pub upstream_code: String,
    pub message: String,
    pub next_probe_ms: i64,
    probes_failed: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct HaltConfig {
    pub probe_initial: Duration,
    pub probe_max: Duration,
}

/// The halt state of one process.
#[derive(Debug, Clone)]
pub struct DispatchHalt {
    cfg: HaltConfig,
    current: Option<Halt>,
}

impl DispatchHalt {
    pub fn new(cfg: HaltConfig) -> Self {
        DispatchHalt { cfg, current: None }
    }

    pub fn current(&self) -> Option<&Halt> {
        self.current.as_ref()
    }

    /// Upstream refused the setup. A halt already in force keeps its start and its probe
    /// schedule (refusals of calls already in flight are the same news), but takes the newer
    /// reason.
    pub fn halt(&mut self, now_ms: i64, reason: HaltReason, code: &str, message: &str) {
        match &mut self.current {
            Some(h) => {
                h.reason = reason;
                h.upstream_code = code.to_owned();
                h.message = message.to_owned();
            }
            None => {
                self.current = Some(Halt {
                    reason,
                    since_ms: now_ms,
                    upstream_code: code.to_owned(),
                    message: message.to_owned(),
                    next_probe_ms: now_ms + ms(self.cfg.probe_initial),
                    probes_failed: 0,
                })
            }
        }
    }

    /// Whether a probe is due now; if so, the next one is scheduled (a probe that hangs must not
    /// let a second one start).
    pub fn take_probe(&mut self, now_ms: i64, jitter: f64) -> Option<HaltReason> {
        let cfg = self.cfg;
        let h = self.current.as_mut()?;
        if now_ms < h.next_probe_ms {
            return None;
        }
        h.probes_failed = h.probes_failed.saturating_add(1);
        let delay = backoff(h.probes_failed, cfg.probe_initial, cfg.probe_max, jitter);
        h.next_probe_ms = now_ms + ms(delay);
        Some(h.reason)
    }

    /// Upstream accepted a call that a halt would have refused: dispatch resumes.
    pub fn resume(&mut self) -> Option<Halt> {
        self.current.take()
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn halt() -> DispatchHalt {
        DispatchHalt::new(HaltConfig {
            probe_initial: Duration::from_secs(5),
            probe_max: Duration::from_secs(60),
        })
    }

    #[test]
    fn probes_back_off_and_a_pass_resumes() {
        let mut h = halt();
        assert!(h.take_probe(0, 0.5).is_none());
        h.halt(
            1_000,
            HaltReason::Authentication,
            "1002",
            "Authorization is invalid",
        );
        assert!(h.take_probe(5_999, 0.5).is_none());
        assert_eq!(h.take_probe(6_000, 0.5), Some(HaltReason::Authentication));
        // The next probe is later than the first delay, and never past the cap (plus jitter).
        let next = h.current().unwrap().next_probe_ms;
        assert!(next > 6_000 + 5_000 && next <= 6_000 + 2 * 60_000, "{next}");
        assert!(h.take_probe(6_001, 0.5).is_none());
        h.halt(7_000, HaltReason::Account, "1102", "resource pack depleted");
        let cur = h.current().unwrap();
        assert_eq!((cur.since_ms, cur.reason), (1_000, HaltReason::Account));
        assert!(h.resume().is_some());
        assert!(h.current().is_none());
    }

    #[test]
    fn only_key_and_network_problems_are_probed_by_a_query() {
        assert!(HaltReason::Authentication.probed_by_query());
        assert!(HaltReason::IpWhitelist.probed_by_query());
        assert!(!HaltReason::Account.probed_by_query());
        assert!(!HaltReason::Route.probed_by_query());
    }
}

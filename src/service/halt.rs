//! Halting all dispatch when upstream refuses the setup, and resuming it (`domain::halt`).

use super::*;

impl Relay {
    /// The halt in force, if upstream refuses the setup.
    pub fn halted(&self) -> Option<Halt> {
        self.halt_state().current().cloned()
    }

    /// Why dispatch is halted, if it is (without copying the halt's texts).
    pub fn halt_reason(&self) -> Option<HaltReason> {
        self.halt_state().current().map(|h| h.reason)
    }

    fn halt_state(&self) -> MutexGuard<'_, DispatchHalt> {
        self.halt.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Upstream refused the setup: every dispatch stops until a probe passes.
    pub fn halt_dispatch(&self, reason: HaltReason, code: &str, message: &str) {
        let first = {
            let mut state = self.halt_state();
            let first = state.current().is_none();
            state.halt(now_ms(), reason, code, message);
            first
        };
        if first {
            tracing::error!(
                reason = reason.as_str(),
                upstream_code = code,
                upstream_message = message,
                advice = reason.advice(),
                "dispatch halted: upstream refuses the setup; every task waits, none fails"
            );
        }
        for r in HaltReason::ALL {
            metrics::gauge!("klr_dispatch_halted", "reason" => r.as_str()).set(if r == reason {
                1.0
            } else {
                0.0
            });
        }
    }

    /// A probe (or any call) passed: dispatch resumes.
    pub fn resume_dispatch(&self) {
        if let Some(h) = self.halt_state().resume() {
            tracing::warn!(
                reason = h.reason.as_str(),
                halted_for_ms = now_ms() - h.since_ms,
                "dispatch resumed: upstream accepts the setup again"
            );
            self.dispatch_wake.notify_one();
        }
    }

    /// Whether a probe is due now (and if so, the next is scheduled): the reason to probe.
    pub fn take_halt_probe(&self, jitter: f64) -> Option<HaltReason> {
        self.halt_state().take_probe(now_ms(), jitter)
    }
}

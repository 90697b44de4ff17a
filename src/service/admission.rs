//! Dispatch admission as the whole service sees it: the controller's learnt state lives in the
//! database (`storage::admission`), so every replica shrinks, pauses and regrows together.
//! Each replica keeps a copy, refreshed on every dispatch claim and every change it makes.

use super::{now_ms, Relay, ServiceError};
use crate::domain::admission::{
    Admission, AdmissionSnapshot, AdmissionState, BusyPause, Candidate,
};
use crate::domain::fair_share::Held;
use std::sync::MutexGuard;
use std::time::Duration;

impl Relay {
    fn admission(&self) -> MutexGuard<'_, Admission> {
        // The controller's state stays consistent even if a holder panicked.
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which waiting tasks take the free units now, given what the claim read: the stored
    /// admission state (adopted first) and what holds the account.
    pub fn select_for_dispatch(
        &self,
        now_ms: i64,
        learnt: Option<AdmissionState>,
        held: &Held,
        waiting: &[Candidate],
    ) -> Vec<String> {
        let mut admission = self.admission();
        if let Some(state) = learnt {
            admission.adopt(state);
        }
        admission.select(now_ms, held, waiting)
    }

    /// Whether `units` in flight leave no room under the working limit (as last adopted).
    pub(super) fn fills_working_limit(&self, units: i64) -> bool {
        units >= self.admission().state().working
    }

    /// The stored admission state, as every replica sees it.
    pub async fn admission_snapshot(&self) -> Result<AdmissionSnapshot, ServiceError> {
        if let Some(state) = self.store.admission_state().await? {
            self.admission().adopt(state);
        }
        Ok(self.admission().snapshot())
    }

    /// Upstream refused a create for concurrency (see `Admission::on_busy`). Returns how long
    /// the refused task waits, and how long dispatch pauses on every replica.
    pub async fn admission_busy(
        &self,
        claimed_at_ms: i64,
        in_flight: i64,
        attempted: i64,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> BusyPause {
        let now = now_ms();
        self.change_admission(|a| {
            a.on_busy(
                now,
                claimed_at_ms,
                in_flight,
                attempted,
                retry_after,
                jitter,
            )
        })
        .await
    }

    /// A create was accepted: the streak of refusals is over. Costs a write only after one.
    pub async fn admission_accepted(&self) {
        if self.admission().state().busy_streak > 0 {
            self.change_admission(Admission::on_accepted).await;
        }
    }

    /// A task that held `units` ended cleanly. Costs a write only while the working limit is
    /// below its maximum (regrowing after a refusal). Returns whether the working limit grew.
    pub async fn admission_finished(&self, units: i64) -> bool {
        if !self.admission().is_regrowing() {
            return false;
        }
        self.change_admission(|a| {
            let before = a.snapshot().working_limit;
            a.on_finished(units);
            a.snapshot().working_limit > before
        })
        .await
    }

    /// Applies `change` to the stored state (taking turns with other replicas) and adopts the
    /// result. If the database cannot be reached the change still holds in this replica, so a
    /// refusal pauses at least here.
    async fn change_admission<R>(&self, change: impl Fn(&mut Admission) -> R) -> R {
        let mut working = self.admission().clone();
        let fresh = AdmissionState::fresh(working.config().max_units);
        let stored = self
            .store
            .update_admission(now_ms(), fresh, |current| {
                working.adopt(current);
                let result = change(&mut working);
                (working.state(), result)
            })
            .await;
        match stored {
            Ok((state, result)) => {
                self.admission().adopt(state);
                result
            }
            Err(e) => {
                tracing::warn!(error = %e, "admission state not stored; this replica keeps it alone");
                change(&mut self.admission())
            }
        }
    }
}

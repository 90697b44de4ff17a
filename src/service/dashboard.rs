//! What the dashboard shows beyond the API's own reads: a task's inputs and the overview.

use super::{now_ms, Relay, ServiceError};
use crate::domain::client::Caller;
use crate::domain::InputImage;

/// The overview page's figures.
#[derive(Debug, Clone)]
pub struct Overview {
    /// Tasks created in the last 24 hours, per status.
    pub status_counts: Vec<(String, i64)>,
    /// (code, a message, count) of failures in the last 24 hours, most frequent first.
    pub failure_reasons: Vec<(String, String, i64)>,
    pub units_in_flight: i64,
    pub working_limit: i64,
    pub max_units: i64,
    pub pending: i64,
    /// Why all dispatch is halted, if it is.
    pub halted: Option<crate::domain::halt::Halt>,
    /// How the account's units are shared between clients.
    pub clients: Vec<crate::resource::ClientUsageView>,
    /// Tasks that ended in each of the last 60 minutes: (minute start, status, count).
    pub finished_per_minute: Vec<(i64, String, i64)>,
    /// Upstream duration per hour over the last 24 hours: (hour start, p50 s, p95 s).
    pub durations: Vec<(i64, Option<f64>, Option<f64>)>,
    /// Units in flight against the working limit over the last hour, as this process sampled
    /// them: (time, units, limit).
    pub units_history: Vec<UnitsSample>,
    /// When these figures were read.
    pub now_ms: i64,
}

/// Units in flight and the working limit at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitsSample {
    pub at_ms: i64,
    pub units: i64,
    pub limit: i64,
}

/// How far back the units chart reaches, and how often it is sampled.
pub const UNITS_HISTORY_MS: i64 = 3_600_000;
pub const UNITS_SAMPLE_EVERY_MS: i64 = 15_000;
/// Tasks finishing in the last hour were created at most this long before (longer ones are
/// timed out by the poller well before), which bounds what the per-minute chart reads.
const FINISHED_LOOKBACK_MS: i64 = 25 * 3_600_000;

const DAY_MS: i64 = 24 * 3600 * 1000;

impl Relay {
    /// Keeps `sample` for the overview's units chart (at most one per sampling interval; the
    /// oldest beyond an hour are dropped).
    pub fn record_units_sample(&self, sample: UnitsSample) {
        let mut h = self.units_history.lock().unwrap_or_else(|e| e.into_inner());
        if h.back()
            .is_some_and(|last| sample.at_ms - last.at_ms < UNITS_SAMPLE_EVERY_MS / 2)
        {
            return;
        }
        h.push_back(sample);
        while h
            .front()
            .is_some_and(|first| sample.at_ms - first.at_ms > UNITS_HISTORY_MS)
        {
            h.pop_front();
        }
    }

    fn units_history(&self) -> Vec<UnitsSample> {
        self.units_history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Samples units in flight for the overview's chart; the poller calls it every round.
    pub async fn sample_units(&self) -> Result<(), ServiceError> {
        let last = self
            .units_history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .back()
            .map(|s| s.at_ms);
        let now = now_ms();
        if last.is_some_and(|at| now - at < UNITS_SAMPLE_EVERY_MS) {
            return Ok(());
        }
        let d = self.dispatch_status().await?;
        self.record_units_sample(UnitsSample {
            at_ms: now,
            units: d.units_in_flight,
            limit: d.admission.working_limit,
        });
        Ok(())
    }

    /// What the input images of one of the caller's tasks were (URLs, or Base64 sizes): never
    /// the Base64 itself, which is megabytes and gone once the task has left pending.
    pub async fn input_summary(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<Vec<InputImage>, ServiceError> {
        self.get(caller, id).await?;
        if let Some(summary) = self.store.input_summary(id).await? {
            return Ok(summary);
        }
        // Stored before summaries were kept: what is left of the inputs says it.
        Ok(self
            .store
            .get_inputs(id)
            .await?
            .map(|i| i.summary())
            .unwrap_or_default())
    }

    /// The last 24 hours of the caller's tasks, and the upstream budget (shared by everyone).
    pub async fn overview(&self, caller: &Caller) -> Result<Overview, ServiceError> {
        let since = now_ms() - DAY_MS;
        let status_counts = self
            .store
            .status_counts_since(caller.scope(), since)
            .await?;
        let failure_reasons = self
            .store
            .failure_reasons_since(caller.scope(), since, 10)
            .await?;
        let d = self.dispatch_status().await?;
        let clients = crate::resource::client_usage_views(&self.client_usage().await?);
        let now = now_ms();
        let hour_ago = now - 3_600_000;
        let finished_per_minute = self
            .store
            .finished_per_minute(
                caller.scope(),
                now - FINISHED_LOOKBACK_MS,
                hour_ago - 60_000,
            )
            .await?;
        let day = crate::service::usage::UsageQuery {
            from_ms: crate::domain::usage::Granularity::Hour.floor(now) - 23 * 3_600_000,
            to_ms: now,
            granularity: crate::domain::usage::Granularity::Hour,
        };
        let durations = self
            .usage(caller, day)
            .await?
            .buckets
            .iter()
            .map(|b| (b.start_ms, b.duration_p50_s, b.duration_p95_s))
            .collect();
        self.record_units_sample(UnitsSample {
            at_ms: now,
            units: d.units_in_flight,
            limit: d.admission.working_limit,
        });
        Ok(Overview {
            finished_per_minute,
            durations,
            units_history: self.units_history(),
            now_ms: now,
            clients,
            status_counts,
            failure_reasons,
            units_in_flight: d.units_in_flight,
            working_limit: d.admission.working_limit,
            max_units: d.admission.max_units,
            pending: d.pending,
            halted: d.halted,
        })
    }
}

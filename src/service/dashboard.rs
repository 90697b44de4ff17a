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
}

const DAY_MS: i64 = 24 * 3600 * 1000;

impl Relay {
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
        Ok(Overview {
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

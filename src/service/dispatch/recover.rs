//! Tasks in doubt (a create that may have landed): found upstream by `external_task_id` and
//! bound, never created a second time.

use crate::domain::{EventSource, Task, UpstreamReport, UpstreamStatus};
use crate::service::{Relay, ServiceError};
use crate::upstream::Lookup;

/// For a task in doubt: asks upstream for it by `external_task_id` and binds it if found.
/// Returns false when upstream does not have it or cannot say, so the create may be sent again.
pub(super) async fn bind_if_upstream_has_it(
    relay: &Relay,
    task: &Task,
) -> Result<bool, ServiceError> {
    match relay
        .upstream
        .query_by_external_id(&task.external_task_id)
        .await
    {
        Ok(Lookup::Found(report)) => {
            tracing::info!(task_id = %task.id, "task in doubt found upstream; bound");
            relay
                .apply_report(&task.id, EventSource::Dispatch, &report)
                .await?;
            Ok(true)
        }
        Ok(Lookup::NotExist) => Ok(false),
        Err(e) => {
            tracing::info!(task_id = %task.id, error = %e, "lookup by external_task_id unavailable; re-sending under the same id");
            Ok(false)
        }
    }
}

/// Upstream already holds this task (an earlier call landed but its answer was lost): bind it
/// instead of creating a second, paid, task.
pub(super) async fn recover_existing(
    relay: &Relay,
    task: &Task,
    message: &str,
) -> Result<(), ServiceError> {
    tracing::warn!(task_id = %task.id, "upstream already has this external_task_id; recovering it");
    let report = match relay
        .upstream
        .query_by_external_id(&task.external_task_id)
        .await
    {
        Ok(Lookup::Found(report)) => report,
        // No lookup by external id here: the task is upstream, so treat it as submitted without
        // an upstream id. Its callback carries our task id in the URL and binds it; the poller
        // keeps trying the lookup.
        other => {
            tracing::info!(task_id = %task.id, lookup = ?other, "lookup by external_task_id unavailable");
            UpstreamReport {
                task_id: None,
                external_task_id: Some(task.external_task_id.clone()),
                status: UpstreamStatus::Submitted,
                status_msg: Some(format!(
                    "upstream already holds this external_task_id ({message}); awaiting its callback"
                )),
                updated_at_ms: None,
                images: Vec::new(),
                final_unit_deduction: None,
                raw: None,
            }
        }
    };
    relay
        .apply_report(&task.id, EventSource::Dispatch, &report)
        .await?;
    Ok(())
}

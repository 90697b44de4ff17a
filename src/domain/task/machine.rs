//! The one status machine every source of news goes through (`apply_report`), with the two
//! changes the service makes on its own (cancel, finish with an error).

use super::{TaskStatus, UpstreamStatus};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    pub code: String,
    pub message: String,
}

impl TaskError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError {
            code: code.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultImage {
    pub index: u32,
    pub url: String,
}

/// What one upstream message (a callback, a query answer or a create answer) says about a task.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamReport {
    pub task_id: Option<String>,
    pub external_task_id: Option<String>,
    pub status: UpstreamStatus,
    pub status_msg: Option<String>,
    /// Upstream's own `updated_at`, Unix milliseconds.
    pub updated_at_ms: Option<i64>,
    pub images: Vec<ResultImage>,
    /// Units upstream deducted (`final_unit_deduction`), as upstream wrote it.
    pub final_unit_deduction: Option<String>,
    /// The task object as upstream sent it, kept with the change it causes.
    pub raw: Option<serde_json::Value>,
}

/// The part of a stored task the status machine needs to decide.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    pub status: TaskStatus,
    pub upstream_task_id: Option<String>,
    pub external_task_id: String,
    pub upstream_updated_at_ms: Option<i64>,
    /// A create call may have reached upstream.
    pub dispatch_started: bool,
}

/// A change to write: the new status and everything that goes with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub status: TaskStatus,
    pub upstream_status: Option<UpstreamStatus>,
    /// Bound when the task had no upstream id yet.
    pub bind_upstream_task_id: Option<String>,
    pub upstream_updated_at_ms: Option<i64>,
    /// Replaces the stored images when set (only on success).
    pub images: Option<Vec<ResultImage>>,
    pub error: Option<TaskError>,
    pub detail: Option<String>,
    /// Units upstream deducted, when the report said.
    pub final_unit_deduction: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoreReason {
    /// The same status again: nothing new.
    Duplicate,
    /// Older than what is stored (lower in the status order, or an older upstream timestamp).
    Stale,
    /// The task is already final; nothing moves it.
    AlreadyFinal,
}

impl IgnoreReason {
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoreReason::Duplicate => "duplicate",
            IgnoreReason::Stale => "stale",
            IgnoreReason::AlreadyFinal => "already_final",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Apply(Change),
    Ignore(IgnoreReason),
}

/// A report that cannot belong to the task it was delivered for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportMismatch {
    #[error("report is for upstream task `{got}`, but this task is upstream task `{expected}`")]
    TaskId { expected: String, got: String },
    #[error("report carries external_task_id `{got}`, but this task's is `{expected}`")]
    ExternalTaskId { expected: String, got: String },
}

/// The status machine for news from upstream. Webhooks, polls and dispatch all go through here,
/// so the same report has the same effect whichever way it arrives:
/// - a final task never changes;
/// - a report lower in the order `pending < submitted < processing < final` is stale;
/// - the same status again is a duplicate, unless it is newer and carries something new;
/// - a report for another upstream task is refused.
pub fn apply_report(
    state: &TaskState,
    report: &UpstreamReport,
) -> Result<Transition, ReportMismatch> {
    if let (Some(expected), Some(got)) = (&state.upstream_task_id, &report.task_id) {
        if expected != got {
            return Err(ReportMismatch::TaskId {
                expected: expected.clone(),
                got: got.clone(),
            });
        }
    }
    if let Some(got) = &report.external_task_id {
        if !got.is_empty() && *got != state.external_task_id {
            return Err(ReportMismatch::ExternalTaskId {
                expected: state.external_task_id.clone(),
                got: got.clone(),
            });
        }
    }
    if state.status.is_final() {
        return Ok(Transition::Ignore(IgnoreReason::AlreadyFinal));
    }
    let target = report.status.to_task_status();
    let older_than_stored = matches!(
        (report.updated_at_ms, state.upstream_updated_at_ms),
        (Some(new), Some(old)) if new < old
    );
    if target.rank() < state.status.rank() {
        return Ok(Transition::Ignore(IgnoreReason::Stale));
    }
    if target == state.status {
        return Ok(Transition::Ignore(if older_than_stored {
            IgnoreReason::Stale
        } else {
            IgnoreReason::Duplicate
        }));
    }
    // A higher status with an older upstream timestamp is still progress: status order is the
    // one signal that cannot be reordered by clocks, so it wins.
    let (images, error) = match report.status {
        UpstreamStatus::Succeed => {
            let mut images = report.images.clone();
            images.sort_by_key(|i| i.index);
            images.dedup_by_key(|i| i.index);
            (Some(images), None)
        }
        UpstreamStatus::Failed => {
            let message = report
                .status_msg
                .clone()
                .filter(|m| !m.trim().is_empty())
                .unwrap_or_else(|| "upstream reported the task as failed".to_owned());
            (None, Some(TaskError::new("upstream_failed", message)))
        }
        _ => (None, None),
    };
    Ok(Transition::Apply(Change {
        status: target,
        upstream_status: Some(report.status),
        bind_upstream_task_id: match &state.upstream_task_id {
            None => report.task_id.clone(),
            Some(_) => None,
        },
        upstream_updated_at_ms: match (report.updated_at_ms, state.upstream_updated_at_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        },
        images,
        error,
        detail: report.status_msg.clone().filter(|m| !m.is_empty()),
        final_unit_deduction: report.final_unit_deduction.clone(),
    }))
}

/// Why a task cannot be canceled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    #[error("the task has been sent upstream, which offers no cancel")]
    AlreadySent,
    #[error("the task is already {0}")]
    AlreadyFinal(TaskStatus),
}

/// Cancels a task that has not been sent upstream. Canceling a canceled task changes nothing.
pub fn cancel(state: &TaskState) -> Result<Transition, CancelRefused> {
    match state.status {
        TaskStatus::Canceled => Ok(Transition::Ignore(IgnoreReason::AlreadyFinal)),
        s if s.is_final() => Err(CancelRefused::AlreadyFinal(s)),
        TaskStatus::Pending if !state.dispatch_started => Ok(Transition::Apply(Change {
            status: TaskStatus::Canceled,
            upstream_status: None,
            bind_upstream_task_id: None,
            upstream_updated_at_ms: state.upstream_updated_at_ms,
            images: None,
            error: None,
            detail: Some("canceled by the client before dispatch".into()),
            final_unit_deduction: None,
        })),
        _ => Err(CancelRefused::AlreadySent),
    }
}

/// Ends a non-final task with the given status and error (timeouts, refusals, lost tasks).
pub fn finish_with_error(state: &TaskState, status: TaskStatus, error: TaskError) -> Transition {
    debug_assert!(status.is_final());
    if state.status.is_final() {
        return Transition::Ignore(IgnoreReason::AlreadyFinal);
    }
    Transition::Apply(Change {
        status,
        upstream_status: None,
        bind_upstream_task_id: None,
        upstream_updated_at_ms: state.upstream_updated_at_ms,
        images: None,
        detail: Some(error.message.clone()),
        error: Some(error),
        final_unit_deduction: None,
    })
}

//! Where a task is in its life, as this service and as upstream name it, and who brought the news.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A task status: where a task is in its life, as this service reports it.
// The OpenAPI schema derives from this type (named `StatusSchema` there, as before), so the two
// cannot drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = StatusSchema)]
pub enum TaskStatus {
    /// Stored here, not yet accepted upstream.
    Pending,
    /// Accepted upstream (we know its upstream `task_id`, or a dispatch is known to have landed).
    Submitted,
    Processing,
    Succeeded,
    Failed,
    TimedOut,
    /// Withdrawn by the client before it was sent upstream.
    Canceled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Pending,
        TaskStatus::Submitted,
        TaskStatus::Processing,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::TimedOut,
        TaskStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Submitted => "submitted",
            TaskStatus::Processing => "processing",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Canceled => "canceled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded
                | TaskStatus::Failed
                | TaskStatus::TimedOut
                | TaskStatus::Canceled
        )
    }

    /// Whether a task in this status holds units of the upstream account's concurrency.
    pub fn holds_upstream_units(self) -> bool {
        matches!(self, TaskStatus::Submitted | TaskStatus::Processing)
    }

    /// Position in the only order a task may move in. Final statuses share the top rank: once one is
    /// reached nothing moves the task again.
    pub fn rank(self) -> u8 {
        match self {
            TaskStatus::Pending => 0,
            TaskStatus::Submitted => 1,
            TaskStatus::Processing => 2,
            TaskStatus::Succeeded
            | TaskStatus::Failed
            | TaskStatus::TimedOut
            | TaskStatus::Canceled => 3,
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown status `{0}`")]
pub struct UnknownStatus(pub String);

impl FromStr for TaskStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// A task status as the upstream spells it (`succeed`, not `succeeded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamStatus {
    Submitted,
    Processing,
    Succeed,
    Failed,
}

impl UpstreamStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamStatus::Submitted => "submitted",
            UpstreamStatus::Processing => "processing",
            UpstreamStatus::Succeed => "succeed",
            UpstreamStatus::Failed => "failed",
        }
    }

    pub fn to_task_status(self) -> TaskStatus {
        match self {
            UpstreamStatus::Submitted => TaskStatus::Submitted,
            UpstreamStatus::Processing => TaskStatus::Processing,
            UpstreamStatus::Succeed => TaskStatus::Succeeded,
            UpstreamStatus::Failed => TaskStatus::Failed,
        }
    }
}

impl FromStr for UpstreamStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // "succeeded" is not in the docs but costs nothing to accept from a relay that normalises.
        match s {
            "submitted" => Ok(UpstreamStatus::Submitted),
            "processing" => Ok(UpstreamStatus::Processing),
            "succeed" | "succeeded" => Ok(UpstreamStatus::Succeed),
            "failed" => Ok(UpstreamStatus::Failed),
            other => Err(UnknownStatus(other.to_owned())),
        }
    }
}

/// Who brought a piece of news about a task; shown in the task's event timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    Api,
    Dispatch,
    Webhook,
    Poll,
    System,
}

impl EventSource {
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Api => "api",
            EventSource::Dispatch => "dispatch",
            EventSource::Webhook => "webhook",
            EventSource::Poll => "poll",
            EventSource::System => "system",
        }
    }
}

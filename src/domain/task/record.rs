//! A task as stored, its timeline entries, and what the change feed reports of it.

use super::{Change, EventSource, ResultImage, TaskError, TaskState, TaskStatus};
use serde::{Deserialize, Serialize};

/// How a task ranks among its own client's waiting tasks (never against other clients': their
/// share is set by weights). Submit field `priority`, default `normal`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// A task as stored: what clients asked for and everything learnt since.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    pub external_task_id: String,
    pub upstream_task_id: Option<String>,
    pub status: TaskStatus,
    pub upstream_status: Option<String>,
    pub model_name: String,
    pub prompt: Option<String>,
    pub n: i64,
    pub aspect_ratio: Option<String>,
    /// Order among the client's own waiting tasks.
    pub priority: Priority,
    pub metadata: Option<serde_json::Value>,
    pub images: Vec<ResultImage>,
    pub error: Option<TaskError>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub completed_at_ms: Option<i64>,
    pub upstream_updated_at_ms: Option<i64>,
    /// Bumped by every status change; a change commits only against the version it was decided on.
    pub version: i64,
    pub dispatch_attempts: i64,
    /// Set while a create call may have reached upstream without its answer being recorded.
    pub dispatch_started_at_ms: Option<i64>,
    pub poll_count: i64,
    /// The client that owns the task (None when submitted without authentication).
    pub client: Option<String>,
    /// Where status changes are notified, if the task names a destination of its own.
    pub notify_url: Option<String>,
    /// The request id of the submit, carried upstream with the create call.
    pub request_id: Option<String>,
    /// Units upstream deducted for the task, once it said (`final_unit_deduction`).
    pub final_unit_deduction: Option<String>,
    /// Which channel reported the deduction (`webhook`, `poll`, `dispatch`: the event sources).
    pub cost_source: Option<String>,
    /// When the task left `pending` for upstream (the start of its upstream time).
    pub submitted_at_ms: Option<i64>,
}

/// What a task cost, never guessed: upstream's deduction as reported (0 for a create upstream
/// refused, recorded by the dispatcher), 0 for a task canceled before it was sent, unknown
/// (None) otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    pub units_milli: Option<i64>,
    /// `webhook`, `poll` or `dispatch` (which reported it), or `not_sent`.
    pub source: Option<String>,
}

impl Task {
    pub fn cost(&self) -> Cost {
        if let Some(milli) = self
            .final_unit_deduction
            .as_deref()
            .and_then(crate::domain::usage::parse_units_milli)
        {
            return Cost {
                units_milli: Some(milli),
                source: Some(
                    self.cost_source
                        .clone()
                        .unwrap_or_else(|| "upstream".into()),
                ),
            };
        }
        if self.status == TaskStatus::Canceled {
            // Canceled only while pending and never sent (see `cancel`).
            return Cost {
                units_milli: Some(0),
                source: Some("not_sent".into()),
            };
        }
        Cost {
            units_milli: None,
            source: None,
        }
    }

    /// The task as it is once `change`, reported by `source`, is committed at `now_ms`; what
    /// notifications carry.
    pub fn after(&self, change: &Change, source: EventSource, now_ms: i64) -> Task {
        let mut t = self.clone();
        if change.final_unit_deduction.is_some() {
            t.cost_source = Some(source.as_str().to_owned());
        }

        t.status = change.status;
        if let Some(s) = change.upstream_status {
            t.upstream_status = Some(s.as_str().to_owned());
        }
        if t.upstream_task_id.is_none() {
            t.upstream_task_id = change.bind_upstream_task_id.clone();
        }
        t.upstream_updated_at_ms = change.upstream_updated_at_ms;
        if let Some(images) = &change.images {
            t.images = images.clone();
        }
        if change.error.is_some() {
            t.error = change.error.clone();
        }
        if change.final_unit_deduction.is_some() {
            t.final_unit_deduction = change.final_unit_deduction.clone();
        }
        t.updated_at_ms = now_ms;
        if change.status.is_final() {
            t.completed_at_ms = Some(now_ms);
        }
        t.version += 1;
        t.dispatch_started_at_ms = None;
        t
    }

    pub fn state(&self) -> TaskState {
        TaskState {
            status: self.status,
            upstream_task_id: self.upstream_task_id.clone(),
            external_task_id: self.external_task_id.clone(),
            upstream_updated_at_ms: self.upstream_updated_at_ms,
            dispatch_started: self.dispatch_started_at_ms.is_some(),
        }
    }
}

/// One entry of a task's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    pub at_ms: i64,
    pub source: String,
    pub status: String,
    pub upstream_status: Option<String>,
    pub detail: Option<String>,
    /// What upstream sent with this change, as JSON text (None for our own changes).
    pub upstream_payload: Option<String>,
}

/// What the change feed heard of other replicas' commits (`storage::feed` listens).
#[derive(Debug, PartialEq, Eq)]
pub enum FeedEvent {
    /// Another replica committed a change of this task.
    Changed(String),
    /// Changes may have been missed (the connection was lost and is being re-established).
    Gap,
}

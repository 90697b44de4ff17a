//! The records storage reads and writes: task rows and their conversion to domain tasks, the
//! shapes of new tasks, filters, candidates and status-change commits, and the statements several
//! table groups share.

use super::*;

pub(super) const TASK_COLUMNS: &str = "id, external_task_id, upstream_task_id, status, upstream_status, \
    model_name, prompt, n, aspect_ratio, metadata, images, error_code, error_message, created_at, \
    updated_at, completed_at, upstream_updated_at, version, dispatch_attempts, dispatch_started_at, \
    poll_count, client, notify_url, request_id, final_unit_deduction, priority, cost_source, \
    submitted_at";

#[derive(sqlx::FromRow)]
pub(super) struct TaskRow {
    pub(super) id: String,
    pub(super) external_task_id: String,
    pub(super) upstream_task_id: Option<String>,
    pub(super) status: String,
    pub(super) upstream_status: Option<String>,
    pub(super) model_name: String,
    pub(super) prompt: Option<String>,
    pub(super) n: i64,
    pub(super) aspect_ratio: Option<String>,
    pub(super) metadata: Option<String>,
    pub(super) images: Option<String>,
    pub(super) error_code: Option<String>,
    pub(super) error_message: Option<String>,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) completed_at: Option<i64>,
    pub(super) upstream_updated_at: Option<i64>,
    pub(super) version: i64,
    pub(super) dispatch_attempts: i64,
    pub(super) dispatch_started_at: Option<i64>,
    pub(super) poll_count: i64,
    pub(super) client: Option<String>,
    pub(super) notify_url: Option<String>,
    pub(super) request_id: Option<String>,
    pub(super) final_unit_deduction: Option<String>,
    pub(super) priority: String,
    pub(super) cost_source: Option<String>,
    pub(super) submitted_at: Option<i64>,
}

impl TryFrom<TaskRow> for Task {
    type Error = StorageError;
    fn try_from(r: TaskRow) -> Result<Task> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StorageError::Corrupt(format!("task {}: {what}: {e}", r.id))
        };
        let status = TaskStatus::from_str(&r.status).map_err(|e| corrupt("status", &e))?;
        let priority = Priority::parse(&r.priority)
            .ok_or_else(|| corrupt("priority", &format!("unknown priority `{}`", r.priority)))?;
        let metadata = match &r.metadata {
            Some(m) => Some(serde_json::from_str(m).map_err(|e| corrupt("metadata", &e))?),
            None => None,
        };
        let images: Vec<ResultImage> = match &r.images {
            Some(i) => serde_json::from_str(i).map_err(|e| corrupt("images", &e))?,
            None => Vec::new(),
        };
        let error = match (r.error_code, r.error_message) {
            (Some(code), message) => Some(TaskError {
                code,
                message: message.unwrap_or_default(),
            }),
            _ => None,
        };
        Ok(Task {
            id: r.id,
            external_task_id: r.external_task_id,
            upstream_task_id: r.upstream_task_id,
            status,
            upstream_status: r.upstream_status,
            model_name: r.model_name,
            prompt: r.prompt,
            n: r.n,
            aspect_ratio: r.aspect_ratio,
            priority,
            metadata,
            images,
            error,
            created_at_ms: r.created_at,
            updated_at_ms: r.updated_at,
            completed_at_ms: r.completed_at,
            upstream_updated_at_ms: r.upstream_updated_at,
            version: r.version,
            dispatch_attempts: r.dispatch_attempts,
            dispatch_started_at_ms: r.dispatch_started_at,
            poll_count: r.poll_count,
            client: r.client,
            notify_url: r.notify_url,
            request_id: r.request_id,
            final_unit_deduction: r.final_unit_deduction,
            cost_source: r.cost_source,
            submitted_at_ms: r.submitted_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct EventRow {
    pub(super) at: i64,
    pub(super) source: String,
    pub(super) status: String,
    pub(super) upstream_status: Option<String>,
    pub(super) detail: Option<String>,
    pub(super) upstream_payload: Option<String>,
}

#[derive(sqlx::FromRow)]
pub(super) struct InputsRow {
    pub(super) subject_images: String,
    pub(super) scene_image: Option<String>,
    pub(super) style_image: Option<String>,
    pub(super) negative_prompt: Option<String>,
    pub(super) watermark_info: Option<String>,
}

/// A new task to store, already validated.
#[derive(Debug, Clone)]
pub struct NewTaskRecord {
    pub id: String,
    pub external_task_id: String,
    pub model_name: String,
    pub prompt: Option<String>,
    pub n: i64,
    pub aspect_ratio: Option<String>,
    pub priority: Priority,
    pub metadata: Option<serde_json::Value>,
    pub inputs: TaskInputs,
    pub created_at_ms: i64,
    pub client: Option<String>,
    pub notify_url: Option<String>,
    pub request_id: Option<String>,
}

/// Limits checked atomically with the insert.
#[derive(Debug, Clone, Copy)]
pub struct PendingCaps {
    /// Tasks waiting for dispatch, all clients together.
    pub total: i64,
    /// Tasks waiting for dispatch for this task's client.
    pub per_client: i64,
}

/// The history query, as storage runs it (the type is the domain's `TaskQuery`).
pub type ListFilter = crate::domain::TaskQuery;

/// A task the poller should ask upstream about.
#[derive(Debug, Clone)]
pub struct PollCandidate {
    pub id: String,
    pub upstream_task_id: Option<String>,
    pub external_task_id: String,
    pub created_at_ms: i64,
    pub poll_count: i64,
}

#[derive(sqlx::FromRow)]
pub(super) struct PollRow {
    pub(super) id: String,
    pub(super) upstream_task_id: Option<String>,
    pub(super) external_task_id: String,
    pub(super) created_at: i64,
    pub(super) poll_count: i64,
}

impl From<PollRow> for PollCandidate {
    fn from(r: PollRow) -> PollCandidate {
        PollCandidate {
            id: r.id,
            upstream_task_id: r.upstream_task_id,
            external_task_id: r.external_task_id,
            created_at_ms: r.created_at,
            poll_count: r.poll_count,
        }
    }
}

/// A pending task the dispatcher may send.
#[derive(Debug, Clone)]
pub struct DispatchCandidate {
    pub id: String,
    /// `""` for a task without a client.
    pub client: String,
    pub priority: Priority,
    pub n: i64,
    pub created_at_ms: i64,
    /// An earlier create may have landed: recover before sending again.
    pub in_doubt: bool,
}

impl From<DispatchCandidate> for crate::domain::admission::Candidate {
    /// A task waiting for room, as admission sees it (it waits from its creation).
    fn from(c: DispatchCandidate) -> Self {
        crate::domain::admission::Candidate {
            id: c.id,
            client: c.client,
            priority: c.priority,
            n: c.n,
            waiting_since_ms: c.created_at_ms,
        }
    }
}

/// An `Idempotency-Key` to take for a new task.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    /// Whose key it is (the caller); empty while callers are not authenticated.
    pub scope: String,
    pub key: String,
    pub request_hash: String,
    /// A key taken before this time has expired and may be taken again.
    pub expired_before_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// The key was taken by `task_id`, with the same request or another.
    Existing {
        task_id: String,
        same_request: bool,
    },
    /// `max_pending` tasks already wait for dispatch.
    QueueFull,
    /// The task's `n` would take its client over this budget (spent + reserved + n).
    OverBudget(crate::domain::usage::BudgetStanding),
}

/// A status change to commit.
#[derive(Debug, Clone, Copy)]
pub struct Commit<'a> {
    pub id: &'a str,
    /// The version the change was decided on.
    pub expected_version: i64,
    pub change: &'a Change,
    pub source: EventSource,
    pub now_ms: i64,
    /// When to poll next (set while submitted/processing).
    pub poll_due_at_ms: Option<i64>,
    /// The notification written with the change.
    pub outbox: Option<&'a OutboxEntry>,
    /// Queue the images of a success for the archive, in the same transaction.
    pub archive: bool,
    /// What upstream sent, kept with the event (JSON text).
    pub upstream_payload: Option<&'a str>,
    /// The change takes the task out of `pending` (decided on `expected_version`): its input
    /// images go in the same transaction.
    pub leaves_pending: bool,
    /// The task as read when the change was decided. With it, a Postgres batch commits as one
    /// statement (its usage rows are worked out before, for the changes that win); without it,
    /// as a transaction that reads them from the rows it changed.
    pub decided_on: Option<&'a DecidedOn>,
}

/// What a change's usage rows need of the task it was decided on. A compare-and-set that wins
/// finds the row as it was read: every write to these columns moves `version` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecidedOn {
    pub client: Option<String>,
    pub model_name: String,
    pub upstream_task_id_bound: bool,
    pub submitted_at_ms: Option<i64>,
    pub final_unit_deduction: Option<String>,
}

impl DecidedOn {
    pub fn of(t: &Task) -> DecidedOn {
        DecidedOn {
            client: t.client.clone(),
            model_name: t.model_name.clone(),
            upstream_task_id_bound: t.upstream_task_id.is_some(),
            submitted_at_ms: t.submitted_at_ms,
            final_unit_deduction: t.final_unit_deduction.clone(),
        }
    }
}

/// A parameter for [`Store::explain`].
#[derive(Debug, Clone)]
pub enum ExplainArg {
    Int(i64),
    Text(String),
}

/// A dispatch attempt that did not land, to record against a still-pending task.
#[derive(Debug, Clone)]
pub struct DispatchRetry {
    pub next_attempt_at_ms: i64,
    /// Keep the in-flight mark: the failed call may have reached upstream.
    pub maybe_sent: bool,
    pub detail: String,
}

pub(super) fn json_text<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StorageError::Corrupt(e.to_string()))
}

/// `%text%` in lower case, with LIKE's own wildcards escaped.
pub(super) fn like_pattern(text: &str) -> String {
    let mut p = String::from("%");
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

pub(super) const INSERT_EVENT: &str =
    "INSERT INTO task_events (task_id, at, source, status, upstream_status, detail) \
    VALUES ($1, $2, $3, $4, $5, $6)";
/// A task's images once it has left pending; its summary, prompt text and watermark stay.
pub(super) const DROP_INPUT_IMAGES: &str = "UPDATE task_inputs SET subject_images = '[]', \
    scene_image = NULL, style_image = NULL WHERE task_id = $1 AND subject_images <> '[]'";

//! Task statuses and the one status machine that every source of news goes through.
//!
//! Longer than 400 lines: the task's types and its status machine (`apply_report`, cancel, finish)
//! are one set of rules that must be read together.

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
            .and_then(super::usage::parse_units_milli)
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

/// The request's images, kept until the task leaves `pending` (sent upstream, or final): after
/// that no dispatch can need them again, and a Base64 image is megabytes per task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskInputs {
    pub subject_images: Vec<String>,
    pub scene_image: Option<String>,
    pub style_image: Option<String>,
    pub negative_prompt: Option<String>,
    pub watermark_info: Option<serde_json::Value>,
}

/// What an input image was, kept for as long as the task: its URL, or the size of its Base64.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputImage {
    /// `subject`, `scene` or `style`.
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub url: Option<String>,
    /// Decoded size of a Base64 image.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub base64_bytes: Option<u64>,
    /// `png` or `jpeg`, with the size in pixels, read from a Base64 image's header.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub height: Option<u32>,
}

/// Format and pixel size of a Base64 image, from a decoded prefix (the header is near the
/// start; a JPEG's may follow up to 64 KB of metadata).
fn header_of(raw: &str) -> Option<(&'static str, u32, u32)> {
    use base64::Engine;
    let prefix = &raw.as_bytes()[..raw.len().min(87_384)];
    let usable = prefix.len() / 4 * 4;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&prefix[..usable])
        .ok()?;
    let format = if bytes.starts_with(b"\x89PNG") {
        "png"
    } else {
        "jpeg"
    };
    let (w, h) = super::image_header::dimensions(&bytes).ok()?;
    Some((format, w, h))
}

/// Bytes the summarized images take as Base64 (URLs count nothing).
pub fn base64_len(summary: &[InputImage]) -> usize {
    summary
        .iter()
        .filter_map(|i| i.base64_bytes)
        .map(|b| usize::try_from(b.div_ceil(3) * 4).unwrap_or(usize::MAX))
        .fold(0, usize::saturating_add)
}

impl TaskInputs {
    /// One entry per image, in request order: the summary that outlives the images.
    pub fn summary(&self) -> Vec<InputImage> {
        let entry = |role: &str, raw: &str| {
            let is_url = raw.starts_with("http://") || raw.starts_with("https://");
            let header = (!is_url).then(|| header_of(raw)).flatten();
            InputImage {
                role: role.to_owned(),
                url: is_url.then(|| raw.to_owned()),
                base64_bytes: (!is_url).then(|| {
                    let padding = raw.bytes().rev().take_while(|b| *b == b'=').count();
                    ((raw.len() / 4 * 3).saturating_sub(padding)) as u64
                }),
                format: header.map(|(f, _, _)| f.to_owned()),
                width: header.map(|(_, w, _)| w),
                height: header.map(|(_, _, h)| h),
            }
        };
        let mut out: Vec<InputImage> = self
            .subject_images
            .iter()
            .map(|s| entry("subject", s))
            .collect();
        if let Some(s) = &self.scene_image {
            out.push(entry("scene", s));
        }
        if let Some(s) = &self.style_image {
            out.push(entry("style", s));
        }
        out
    }
}

/// What the change feed heard of other replicas' commits (`storage::feed` listens).
#[derive(Debug, PartialEq, Eq)]
pub enum FeedEvent {
    /// Another replica committed a change of this task.
    Changed(String),
    /// Changes may have been missed (the connection was lost and is being re-established).
    Gap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_summary_keeps_what_the_images_were_without_them() {
        use base64::Engine;
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&1024u32.to_be_bytes());
        png.extend_from_slice(&768u32.to_be_bytes());
        png.resize(3_000_000, 7);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let inputs = TaskInputs {
            subject_images: vec!["https://example.com/a.png".into(), b64.clone()],
            scene_image: None,
            style_image: Some("bm90IGFuIGltYWdl".into()),
            negative_prompt: None,
            watermark_info: None,
        };
        let s = inputs.summary();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].url.as_deref(), Some("https://example.com/a.png"));
        assert_eq!(s[0].base64_bytes, None);
        assert_eq!(s[1].base64_bytes, Some(3_000_000));
        assert_eq!(
            (s[1].format.as_deref(), s[1].width, s[1].height),
            (Some("png"), Some(1024), Some(768))
        );
        assert_eq!(
            (s[2].role.as_str(), s[2].format.as_deref()),
            ("style", None)
        );
        assert_eq!(base64_len(&s), b64.len() + 16);
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.len() < 300, "{text}");
    }

    fn state(status: TaskStatus, upstream: Option<&str>, updated: Option<i64>) -> TaskState {
        TaskState {
            status,
            upstream_task_id: upstream.map(str::to_owned),
            external_task_id: "ext-1".into(),
            upstream_updated_at_ms: updated,
            dispatch_started: false,
        }
    }

    fn report(status: UpstreamStatus, task_id: &str, updated: i64) -> UpstreamReport {
        UpstreamReport {
            task_id: Some(task_id.into()),
            external_task_id: Some("ext-1".into()),
            status,
            status_msg: None,
            updated_at_ms: Some(updated),
            images: vec![],
            final_unit_deduction: None,
            raw: None,
        }
    }

    #[test]
    fn moves_forward_and_binds_the_upstream_id() {
        let s = state(TaskStatus::Pending, None, None);
        let t = apply_report(&s, &report(UpstreamStatus::Processing, "u1", 10)).unwrap();
        let Transition::Apply(c) = t else {
            panic!("expected a change")
        };
        assert_eq!(c.status, TaskStatus::Processing);
        assert_eq!(c.bind_upstream_task_id.as_deref(), Some("u1"));
        assert_eq!(c.upstream_updated_at_ms, Some(10));
    }

    #[test]
    fn never_moves_backwards_or_out_of_a_final_status() {
        let s = state(TaskStatus::Processing, Some("u1"), Some(20));
        assert_eq!(
            apply_report(&s, &report(UpstreamStatus::Submitted, "u1", 30)).unwrap(),
            Transition::Ignore(IgnoreReason::Stale)
        );
        let done = state(TaskStatus::Succeeded, Some("u1"), Some(20));
        assert_eq!(
            apply_report(&done, &report(UpstreamStatus::Failed, "u1", 40)).unwrap(),
            Transition::Ignore(IgnoreReason::AlreadyFinal)
        );
    }

    #[test]
    fn same_status_is_a_duplicate_and_older_same_status_is_stale() {
        let s = state(TaskStatus::Processing, Some("u1"), Some(20));
        assert_eq!(
            apply_report(&s, &report(UpstreamStatus::Processing, "u1", 20)).unwrap(),
            Transition::Ignore(IgnoreReason::Duplicate)
        );
        assert_eq!(
            apply_report(&s, &report(UpstreamStatus::Processing, "u1", 5)).unwrap(),
            Transition::Ignore(IgnoreReason::Stale)
        );
    }

    #[test]
    fn refuses_a_report_for_another_task() {
        let s = state(TaskStatus::Submitted, Some("u1"), None);
        assert!(matches!(
            apply_report(&s, &report(UpstreamStatus::Succeed, "u2", 1)),
            Err(ReportMismatch::TaskId { .. })
        ));
        let mut r = report(UpstreamStatus::Succeed, "u1", 1);
        r.external_task_id = Some("ext-other".into());
        assert!(matches!(
            apply_report(&s, &r),
            Err(ReportMismatch::ExternalTaskId { .. })
        ));
    }

    #[test]
    fn success_sorts_images_and_failure_carries_the_reason() {
        let s = state(TaskStatus::Processing, Some("u1"), None);
        let mut r = report(UpstreamStatus::Succeed, "u1", 1);
        r.images = vec![
            ResultImage {
                index: 1,
                url: "b".into(),
            },
            ResultImage {
                index: 0,
                url: "a".into(),
            },
        ];
        let Transition::Apply(c) = apply_report(&s, &r).unwrap() else {
            panic!("expected a change")
        };
        let idx: Vec<u32> = c.images.unwrap().iter().map(|i| i.index).collect();
        assert_eq!(idx, vec![0, 1]);

        let mut f = report(UpstreamStatus::Failed, "u1", 2);
        f.status_msg = Some("content moderation".into());
        let Transition::Apply(c) = apply_report(&s, &f).unwrap() else {
            panic!("expected a change")
        };
        assert_eq!(c.status, TaskStatus::Failed);
        assert_eq!(c.error.unwrap().message, "content moderation");
    }

    #[test]
    fn finishing_a_final_task_changes_nothing() {
        let s = state(TaskStatus::Failed, None, None);
        assert_eq!(
            finish_with_error(&s, TaskStatus::TimedOut, TaskError::new("timed_out", "x")),
            Transition::Ignore(IgnoreReason::AlreadyFinal)
        );
    }

    #[test]
    fn cancel_only_before_dispatch() {
        let mut s = state(TaskStatus::Pending, None, None);
        assert!(matches!(cancel(&s), Ok(Transition::Apply(c)) if c.status == TaskStatus::Canceled));
        s.dispatch_started = true;
        assert_eq!(cancel(&s), Err(CancelRefused::AlreadySent));
        let sent = state(TaskStatus::Submitted, Some("u"), None);
        assert_eq!(cancel(&sent), Err(CancelRefused::AlreadySent));
        let done = state(TaskStatus::Succeeded, Some("u"), None);
        assert_eq!(
            cancel(&done),
            Err(CancelRefused::AlreadyFinal(TaskStatus::Succeeded))
        );
        let canceled = state(TaskStatus::Canceled, None, None);
        assert_eq!(
            cancel(&canceled),
            Ok(Transition::Ignore(IgnoreReason::AlreadyFinal))
        );
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>().unwrap(), s);
        }
        assert!("succeed".parse::<TaskStatus>().is_err());
    }
}

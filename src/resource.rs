//! The JSON representation of tasks, events and deliveries: what the REST API answers and what
//! notifications carry, so both always agree.
//!
//! Longer than 400 lines: every JSON shape of the API and of notifications with its OpenAPI schema,
//! kept in one place so the document and the answers agree.

use crate::domain::archive::{ArchiveState, ArchivedImage};
use crate::domain::delivery::{Delivery, DeliveryAttempt};
use crate::domain::{Priority, ResultImage, Task, TaskError, TaskEvent, TaskStatus};
use serde::Serialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::ToSchema;

/// RFC 3339 in UTC from Unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// A result image; upstream clears its `url` after about 30 days, `archived_url` is our copy.
#[derive(Serialize, ToSchema)]
pub struct ImageView {
    #[schema(example = 0)]
    index: u32,
    /// Upstream's URL.
    #[schema(example = "https://cdn.example/0.png")]
    url: String,
    /// Our archived copy (`GET /v1/tasks/{id}/images/{index}`, relative to this service), once
    /// it is stored; null before, after a failure, and after the retention sweep.
    #[schema(example = "/v1/tasks/01a20ba8-cf40-726e-9ab2-608b4835a844/images/0")]
    archived_url: Option<String>,
    /// Where the image stands in the archive; null when archiving was off as the task succeeded.
    archive: Option<ArchiveView>,
}

/// One image's archive record.
#[derive(Serialize, ToSchema)]
pub struct ArchiveView {
    state: ArchiveState,
    /// Why the last fetch failed (kept while retrying, and once failed).
    error: Option<String>,
    /// `image/png` or `image/jpeg`, from the bytes themselves.
    content_type: Option<String>,
    size_bytes: Option<i64>,
    /// Hex SHA-256 of the bytes; the image route's ETag.
    sha256: Option<String>,
    attempts: i64,
    stored_at: Option<String>,
    /// When the retention sweep removed our copy.
    deleted_at: Option<String>,
}

impl TaskView {
    /// Adds the archive records of this task's images (records of other tasks are ignored).
    pub fn with_archive(mut self, records: &[ArchivedImage]) -> TaskView {
        for img in &mut self.images {
            let Some(r) = records
                .iter()
                .find(|r| r.task_id == self.id && r.index == img.index)
            else {
                continue;
            };
            if r.state == ArchiveState::Stored {
                img.archived_url = Some(format!("/v1/tasks/{}/images/{}", self.id, img.index));
            }
            img.archive = Some(ArchiveView {
                state: r.state,
                error: r.error.clone(),
                content_type: r.content_type.clone(),
                size_bytes: r.size_bytes,
                sha256: r.sha256.clone(),
                attempts: r.attempts,
                stored_at: r.stored_at_ms.map(rfc3339),
                deleted_at: r.deleted_at_ms.map(rfc3339),
            });
        }
        self
    }
}

/// Why a task failed.
#[derive(Serialize, ToSchema)]
pub struct ErrorView {
    /// Upstream's code for a refused create (e.g. `1201`), or `upstream_failed`,
    /// `task_not_exist`, `timed_out`, `inputs_missing`.
    #[schema(example = "upstream_failed")]
    code: String,
    #[schema(example = "content moderation: the prompt was flagged")]
    message: String,
}

/// A task: what was asked and everything learnt since.
#[derive(Serialize, ToSchema)]
pub struct TaskView {
    /// UUIDv7, made by this service.
    #[schema(example = "01a20ba8-cf40-726e-9ab2-608b4835a844")]
    id: String,
    status: TaskStatus,
    #[schema(example = "878106242831892487")]
    upstream_task_id: Option<String>,
    #[schema(example = "klr-01a20ba8-cf40-726e-9ab2-608b4835a844")]
    external_task_id: String,
    #[schema(example = "kling-v2-1")]
    model_name: String,
    prompt: Option<String>,
    #[schema(example = 2)]
    n: i64,
    /// Units upstream deducted for the task (`final_unit_deduction`, as upstream wrote it);
    /// null until upstream says.
    #[schema(example = "2")]
    final_unit_deduction: Option<String>,
    cost: CostView,
    #[schema(example = "1:1")]
    aspect_ratio: Option<String>,
    /// Order among the client's own waiting tasks.
    priority: Priority,
    images: Vec<ImageView>,
    error: Option<ErrorView>,
    /// The caller's own JSON object, returned as given.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    /// The owning client's name (only ever the caller's own).
    client: Option<String>,
    notify_url: Option<String>,
    /// RFC 3339, UTC.
    #[schema(example = "2026-11-24T03:45:42.208Z")]
    created_at: String,
    updated_at: String,
    completed_at: Option<String>,
}

/// What a task cost, never guessed.
#[derive(Serialize, ToSchema)]
pub struct CostView {
    /// Units upstream deducted (its `final_unit_deduction` as a number); 0 for a task that ended
    /// without reaching upstream; null while unknown (not ended, or upstream did not say).
    #[schema(example = 2.0)]
    units: Option<f64>,
    /// Which channel reported the deduction (`webhook`: upstream's callback, `poll`,
    /// `dispatch`: a lookup while recovering), or `not_sent`; null while unknown.
    #[schema(example = "webhook")]
    source: Option<String>,
}

impl From<Task> for TaskView {
    fn from(t: Task) -> Self {
        let cost = t.cost();
        TaskView {
            cost: CostView {
                units: cost.units_milli.map(crate::domain::usage::milli_to_units),
                source: cost.source,
            },
            created_at: rfc3339(t.created_at_ms),
            updated_at: rfc3339(t.updated_at_ms),
            completed_at: t.completed_at_ms.map(rfc3339),
            id: t.id,
            status: t.status,
            upstream_task_id: t.upstream_task_id,
            external_task_id: t.external_task_id,
            model_name: t.model_name,
            prompt: t.prompt,
            n: t.n,
            final_unit_deduction: t.final_unit_deduction,
            aspect_ratio: t.aspect_ratio,
            priority: t.priority,
            images: t.images.into_iter().map(ImageView::from).collect(),
            error: t.error.map(ErrorView::from),
            metadata: t.metadata,
            client: t.client,
            notify_url: t.notify_url,
        }
    }
}

impl From<ResultImage> for ImageView {
    fn from(i: ResultImage) -> Self {
        ImageView {
            index: i.index,
            url: i.url,
            archived_url: None,
            archive: None,
        }
    }
}

impl From<TaskError> for ErrorView {
    fn from(e: TaskError) -> Self {
        ErrorView {
            code: e.code,
            message: e.message,
        }
    }
}

/// A page of tasks, newest first.
#[derive(Serialize, ToSchema)]
pub struct TaskPage {
    pub tasks: Vec<TaskView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// One entry of a task's timeline.
#[derive(Serialize, ToSchema)]
pub struct EventView {
    at: String,
    /// `api`, `dispatch`, `webhook`, `poll` or `system`.
    #[schema(example = "webhook")]
    source: String,
    #[schema(example = "processing")]
    status: String,
    #[schema(example = "processing")]
    upstream_status: Option<String>,
    detail: Option<String>,
}

impl From<TaskEvent> for EventView {
    fn from(e: TaskEvent) -> Self {
        EventView {
            at: rfc3339(e.at_ms),
            source: e.source,
            status: e.status,
            upstream_status: e.upstream_status,
            detail: e.detail,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct EventList {
    pub events: Vec<EventView>,
}

#[derive(Serialize, ToSchema)]
pub struct AttemptView {
    at: String,
    status_code: Option<i64>,
    error: Option<String>,
    duration_ms: i64,
}

impl From<DeliveryAttempt> for AttemptView {
    fn from(a: DeliveryAttempt) -> Self {
        AttemptView {
            at: rfc3339(a.at_ms),
            status_code: a.status_code,
            error: a.error,
            duration_ms: a.duration_ms,
        }
    }
}

/// One notification of a status change to the client.
#[derive(Serialize, ToSchema)]
pub struct DeliveryView {
    /// The Standard Webhooks `webhook-id`, stable across attempts.
    #[schema(example = "msg_01a20bc5f57876a2b6994633fad7e034")]
    id: String,
    /// The task status this notification reports.
    event: String,
    url: String,
    /// `pending`, `delivered`, `dead` or `disabled`.
    #[schema(example = "delivered")]
    state: String,
    attempts: i64,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    next_attempt_at: Option<String>,
    created_at: String,
    delivered_at: Option<String>,
    attempt_log: Vec<AttemptView>,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        DeliveryView {
            id: d.id,
            event: d.event_status,
            url: d.url,
            state: d.state,
            attempts: d.attempts,
            last_status_code: d.last_status_code,
            last_error: d.last_error,
            next_attempt_at: d.next_attempt_at_ms.map(rfc3339),
            created_at: rfc3339(d.created_at_ms),
            delivered_at: d.delivered_at_ms.map(rfc3339),
            attempt_log: d.attempt_log.into_iter().map(AttemptView::from).collect(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryView>,
}

/// Upstream concurrency and the dispatch queue.
#[derive(Serialize, ToSchema)]
pub struct DispatchView {
    pub max_concurrency: i64,
    pub working_limit: i64,
    pub units_in_flight: i64,
    pub pending: i64,
    /// End of a pause after `1303`/429, or null.
    pub paused_until: Option<String>,
    /// Null, or why all dispatch is halted: upstream refuses the setup (key, IP, account,
    /// route), so every task waits and none fails.
    pub halted: Option<HaltView>,
}

/// Why dispatch is halted.
#[derive(Serialize, ToSchema)]
pub struct HaltView {
    /// `authentication`, `ip_whitelist`, `account` or `route`.
    #[schema(example = "account")]
    pub reason: &'static str,
    /// When the halt began (RFC 3339).
    pub since: String,
    /// Upstream's code (`1102`, or `http_401` when it sent none).
    #[schema(example = "1102")]
    pub upstream_code: String,
    /// Upstream's message.
    pub message: String,
    /// What the operator should do.
    pub advice: &'static str,
    /// When upstream is next asked whether the problem is gone (RFC 3339).
    pub next_probe: String,
}

#[derive(Serialize, ToSchema)]
pub struct StatusView {
    pub dispatch: DispatchView,
    /// Every client with work now or in the last hour: how the account's units are shared.
    pub clients: Vec<ClientUsageView>,
}

/// One client's share of the upstream account.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClientUsageView {
    /// The client's name (null for tasks submitted with authentication off).
    pub client: Option<String>,
    /// Units its tasks hold upstream now.
    pub units_in_use: i64,
    /// Its tasks waiting for dispatch now.
    pub tasks_waiting: i64,
    /// Its share (0 to 1) of the unit-seconds all clients held upstream in the last hour.
    pub share_last_hour: f64,
}

impl From<&crate::domain::usage::ClientUsage> for ClientUsageView {
    fn from(u: &crate::domain::usage::ClientUsage) -> Self {
        ClientUsageView {
            client: u.client.clone(),
            units_in_use: u.units_in_use,
            tasks_waiting: u.waiting,
            share_last_hour: 0.0,
        }
    }
}

/// Each client's usage with its share of the total unit-time.
pub fn client_usage_views(usage: &[crate::domain::usage::ClientUsage]) -> Vec<ClientUsageView> {
    let total: i64 = usage.iter().map(|u| u.unit_ms).sum();
    usage
        .iter()
        .map(|u| ClientUsageView {
            share_last_hour: if total > 0 {
                u.unit_ms as f64 / total as f64
            } else {
                0.0
            },
            ..ClientUsageView::from(u)
        })
        .collect()
}

/// One Server-Sent Event of `/v1/tasks/{id}/stream`.
#[derive(ToSchema)]
#[allow(dead_code)] // describes the stream's events
pub struct StatusEvent {
    /// Always `status`.
    #[schema(example = "status")]
    event: String,
    /// The task (a `TaskView`) as JSON text.
    data: String,
    /// The task's version: increases with every change.
    id: Option<String>,
}

/// What a callback did.
#[derive(Serialize, ToSchema)]
pub struct CallbackOutcome {
    /// `applied`, `duplicate`, `stale`, `already_final`, or `polling` (the callback's ids do not
    /// match the task: nothing was applied, and the task is polled at once).
    #[schema(example = "applied")]
    pub outcome: &'static str,
    pub status: Option<TaskStatus>,
}

/// One failing field.
#[derive(Serialize, ToSchema)]
pub struct FieldErrorView {
    #[schema(example = "subject_image_list[1].subject_image")]
    pub field: String,
    #[schema(example = "decoded image is larger than 10485760 bytes (10 MB)")]
    pub message: String,
}

/// RFC 9457 problem details (`application/problem+json`).
#[derive(Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    #[schema(example = "/problems/validation")]
    pub kind: String,
    #[schema(example = "Unprocessable Entity")]
    pub title: String,
    #[schema(example = 422)]
    pub status: u16,
    pub detail: String,
    /// Every failing field, for validation errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldErrorView>>,
}

/// An image: an http(s) URL, or raw Base64 of a JPEG or PNG (at most 10 MB decoded, no `data:`
/// prefix).
#[derive(ToSchema)]
#[allow(dead_code)] // describes the request body, which is validated field by field
pub struct SubjectImage {
    #[schema(example = "https://example.com/a.png")]
    subject_image: String,
}

/// A task to create. Unknown fields are refused by name.
#[derive(ToSchema)]
#[schema(example = json!({"subject_image_list": [{"subject_image": "https://example.com/a.png"}, {"subject_image": "https://example.com/b.png"}], "prompt": "two cats at a tea party", "n": 2, "aspect_ratio": "1:1"}))]
#[allow(dead_code)]
pub struct TaskRequest {
    /// 1 to 4 subject images (2 to 4 under the `cometapi-generations` profile). Base64 images
    /// must be JPEG or PNG, each side at least 300 px, aspect ratio within 1:2.5 to 2.5:1.
    #[schema(min_items = 1, max_items = 4)]
    subject_image_list: Vec<SubjectImage>,
    /// At most 2500 characters.
    #[schema(max_length = 2500)]
    prompt: Option<String>,
    /// What the images should not show; at most 2500 characters.
    #[schema(max_length = 2500)]
    negative_prompt: Option<String>,
    /// Upstream's watermark switch, forwarded as given, e.g. `{"enabled": true}`.
    #[schema(value_type = Option<Object>)]
    watermark_info: Option<Value>,
    /// Sent upstream under `cometapi.scene_image_field`; `scence_image` is accepted too.
    scene_image: Option<String>,
    style_image: Option<String>,
    /// Number of images, 1 to 9.
    #[schema(minimum = 1, maximum = 9, default = 1)]
    n: Option<u8>,
    /// One of 16:9, 9:16, 1:1, 4:3, 3:4, 3:2, 2:3, 21:9.
    #[schema(example = "1:1")]
    aspect_ratio: Option<String>,
    /// One of `cometapi.models`; default `cometapi.default_model` (the profile's: `kling-v2-1`,
    /// or `kling-v2` under `cometapi-generations`).
    #[schema(example = "kling-v2-1")]
    model_name: Option<String>,
    /// Any JSON object of at most 4 KiB, returned as given.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    /// Where to POST the task on every status change (Standard Webhooks signed).
    notify_url: Option<String>,
    /// Order among the caller's own waiting tasks (`high` first, then `normal`, then `low`;
    /// oldest first within each). Other clients' tasks are not affected: the share of units
    /// between clients follows their weights.
    #[schema(default = "normal")]
    priority: Option<Priority>,
}

/// The task resource as JSON text (the body of a notification). A task that cannot be written
/// as JSON is an error, never an empty `{}` sent as if it were the task.
pub fn task_json(task: Task) -> Result<String, serde_json::Error> {
    serde_json::to_string(&TaskView::from(task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_722_769_557_708), "2024-08-04T11:05:57.708Z");
    }
}

//! The JSON representation of tasks, events and deliveries: what the REST API answers and what
//! notifications carry, so both always agree.

use crate::domain::{ResultImage, Task, TaskError, TaskEvent, TaskStatus};
use crate::storage::{Delivery, DeliveryAttempt};
use serde::Serialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// RFC 3339 in UTC from Unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[derive(Serialize)]
pub struct TaskView {
    id: String,
    status: TaskStatus,
    upstream_task_id: Option<String>,
    external_task_id: String,
    model_name: String,
    prompt: Option<String>,
    n: i64,
    aspect_ratio: Option<String>,
    images: Vec<ResultImage>,
    error: Option<TaskError>,
    metadata: Option<Value>,
    /// The owning client's name (only ever the caller's own).
    client: Option<String>,
    notify_url: Option<String>,
    created_at: String,
    updated_at: String,
    completed_at: Option<String>,
}

impl From<Task> for TaskView {
    fn from(t: Task) -> Self {
        TaskView {
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
            aspect_ratio: t.aspect_ratio,
            images: t.images,
            error: t.error,
            metadata: t.metadata,
            client: t.client,
            notify_url: t.notify_url,
        }
    }
}

#[derive(Serialize)]
pub struct EventView {
    at: String,
    source: String,
    status: String,
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

#[derive(Serialize)]
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

#[derive(Serialize)]
pub struct DeliveryView {
    id: String,
    event: String,
    url: String,
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

/// The task resource as JSON text (the body of a notification).
pub fn task_json(task: Task) -> String {
    serde_json::to_string(&TaskView::from(task)).unwrap_or_else(|_| "{}".into())
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

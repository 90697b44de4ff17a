//! `/v1/tasks`: submit, read and list tasks, and read a task's timeline.

use super::error::ApiError;
use super::{parse_json, require_json, AppState};
use crate::domain::{ResultImage, Task, TaskError, TaskEvent, TaskStatus};
use crate::storage::ListFilter;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Serialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

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
    created_at: String,
    updated_at: String,
    completed_at: Option<String>,
}

pub fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
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
        }
    }
}

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(k.to_owned()))
        }
        _ => Err(ApiError::BadRequest {
            detail: "invalid Idempotency-Key".into(),
            errors: vec![field_error(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            )],
        }),
    }
}

pub async fn submit(
    State(relay): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let key = idempotency_key(&headers)?;
    let body = parse_json(&body)?;
    // Callers are not authenticated yet, so every key shares one scope.
    let submitted = relay.submit(&body, key.as_deref().map(|k| ("", k))).await?;
    let location = format!("/v1/tasks/{}", submitted.task.id);
    let status = if submitted.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(TaskView::from(submitted.task)),
    )
        .into_response())
}

pub async fn cancel(
    State(relay): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    Ok(Json(relay.cancel(&id).await?.into()))
}

pub async fn status(State(relay): State<AppState>) -> Result<Json<Value>, ApiError> {
    let d = relay.dispatch_status().await?;
    Ok(Json(serde_json::json!({
        "dispatch": {
            "max_concurrency": d.admission.max_units,
            "working_limit": d.admission.working_limit,
            "units_in_flight": d.units_in_flight,
            "pending": d.pending,
            "paused_until": (d.admission.paused_until_ms > crate::service::now_ms())
                .then(|| rfc3339(d.admission.paused_until_ms)),
        }
    })))
}

pub async fn get(
    State(relay): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    Ok(Json(relay.get(&id).await?.into()))
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

pub async fn events(
    State(relay): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let events: Vec<EventView> = relay
        .events(&id)
        .await?
        .into_iter()
        .map(EventView::from)
        .collect();
    Ok(Json(serde_json::json!({ "events": events })))
}

#[derive(Serialize)]
pub struct TaskPage {
    tasks: Vec<TaskView>,
    next_cursor: Option<String>,
}

pub async fn list(
    State(relay): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<TaskPage>, ApiError> {
    let filter = parse_list_query(query.as_deref().unwrap_or(""))?;
    let tasks = relay.list(&filter).await?;
    let next_cursor = if tasks.len() as i64 == filter.limit {
        tasks.last().map(|t| encode_cursor(t.created_at_ms, &t.id))
    } else {
        None
    };
    Ok(Json(TaskPage {
        tasks: tasks.into_iter().map(TaskView::from).collect(),
        next_cursor,
    }))
}

fn encode_cursor(created_at_ms: i64, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at_ms}:{id}"))
}

fn decode_cursor(s: &str) -> Option<(i64, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (at, id) = text.split_once(':')?;
    let id = uuid::Uuid::parse_str(id).ok()?;
    Some((at.parse().ok()?, id.to_string()))
}

fn parse_time(field: &str, value: &str) -> Result<i64, crate::domain::FieldError> {
    OffsetDateTime::parse(value, &Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| {
            field_error(
                field,
                "must be an RFC 3339 time such as 2026-01-31T12:00:00Z",
            )
        })
}

fn field_error(field: &str, message: &str) -> crate::domain::FieldError {
    crate::domain::FieldError {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

/// Parses `status` (repeatable or comma-separated), `created_after`, `created_before`, `limit` and
/// `cursor`; anything else, or any bad value, is a 400 listing every problem.
pub fn parse_list_query(query: &str) -> Result<ListFilter, ApiError> {
    let mut f = ListFilter {
        limit: DEFAULT_LIMIT,
        ..ListFilter::default()
    };
    let mut errors = Vec::new();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "status" => {
                for s in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match s.parse::<TaskStatus>() {
                        Ok(st) if !f.statuses.contains(&st) => f.statuses.push(st),
                        Ok(_) => {}
                        Err(_) => errors.push(field_error(
                            "status",
                            &format!(
                                "`{s}` is not a status; use pending, submitted, processing, succeeded, failed, timed_out or canceled"
                            ),
                        )),
                    }
                }
            }
            "created_after" => match parse_time("created_after", &value) {
                Ok(v) => f.created_after_ms = Some(v),
                Err(e) => errors.push(e),
            },
            "created_before" => match parse_time("created_before", &value) {
                Ok(v) => f.created_before_ms = Some(v),
                Err(e) => errors.push(e),
            },
            "limit" => match value.parse::<i64>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => f.limit = n,
                _ => errors.push(field_error(
                    "limit",
                    &format!("must be an integer from 1 to {MAX_LIMIT}"),
                )),
            },
            "cursor" => match decode_cursor(&value) {
                Some(c) => f.before = Some(c),
                None => errors.push(field_error("cursor", "is not a cursor this service issued")),
            },
            other => errors.push(field_error(other, "unknown query parameter")),
        }
    }
    if errors.is_empty() {
        Ok(f)
    } else {
        Err(ApiError::BadRequest {
            detail: "invalid query parameters".into(),
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let id = uuid::Uuid::now_v7().to_string();
        let c = encode_cursor(1234, &id);
        assert_eq!(decode_cursor(&c), Some((1234, id)));
        assert!(decode_cursor("nope").is_none());
        assert!(parse_list_query("cursor=nope").is_err());
    }

    #[test]
    fn list_query_rules() {
        let f = parse_list_query("status=succeeded,failed&status=failed&limit=20").unwrap();
        assert_eq!(f.statuses, vec![TaskStatus::Succeeded, TaskStatus::Failed]);
        assert_eq!(f.limit, 20);
        for bad in [
            "limit=0",
            "limit=201",
            "status=done",
            "created_after=yesterday",
            "x=1",
        ] {
            assert!(parse_list_query(bad).is_err(), "{bad}");
        }
        let f = parse_list_query("created_after=2026-01-01T00:00:00%2B01:00").unwrap();
        assert_eq!(f.created_after_ms, Some(1_767_222_000_000));
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_722_769_557_708), "2024-08-04T11:05:57.708Z");
    }
}

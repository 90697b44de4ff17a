//! `/v1/tasks`: submit, read and list tasks, and read a task's timeline.
//!
//! Longer than 400 lines: the task routes' OpenAPI annotations (parameters, answers, examples) are
//! a third of it, and belong beside the handlers they describe.

use super::cursor::{decode_cursor, encode_cursor};
use super::error::ApiError;
use super::{parse_json, require_json, AppState};
use crate::domain::client::Caller;
use crate::domain::TaskQuery;
use crate::domain::TaskStatus;
use crate::resource::{
    rfc3339, DeliveryList, DeliveryView, DispatchView, EventList, EventView, Problem, StatusView,
    TaskPage, TaskRequest, TaskView,
};
use crate::service::live::MAX_WAIT;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

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

/// What a submit's `Prefer` header (RFC 7240) asks for: `respond-async` (answer once the task
/// is stored, without waiting for its dispatch) or `wait=N` (wait at most N seconds for it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Prefer {
    respond_async: bool,
    wait_secs: Option<u64>,
}

impl Prefer {
    fn from_headers(headers: &HeaderMap) -> Prefer {
        let mut p = Prefer::default();
        for value in headers.get_all("prefer") {
            let Ok(text) = value.to_str() else { continue };
            for pref in text.split(',') {
                // A preference's parameters (after `;`) are ignored, as RFC 7240 allows.
                let token = pref.split(';').next().unwrap_or("").trim();
                let (name, value) = match token.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                    None => (token, None),
                };
                if name.eq_ignore_ascii_case("respond-async") {
                    p.respond_async = true;
                } else if name.eq_ignore_ascii_case("wait") {
                    p.wait_secs = value.and_then(|v| v.parse().ok()).or(p.wait_secs);
                }
            }
        }
        p
    }

    fn max_wait(self) -> Option<std::time::Duration> {
        if self.respond_async {
            Some(std::time::Duration::ZERO)
        } else {
            self.wait_secs.map(std::time::Duration::from_secs)
        }
    }

    /// The `Preference-Applied` answer.
    fn applied(self) -> Option<HeaderValue> {
        if self.respond_async {
            Some(HeaderValue::from_static("respond-async"))
        } else {
            self.wait_secs
                .and_then(|w| HeaderValue::from_str(&format!("wait={w}")).ok())
        }
    }
}

/// Create a task.
///
/// The task is stored before anything is sent upstream; the answer comes after at most
/// `dispatch.wait`, usually already `submitted`. With `Prefer: respond-async` it comes as soon
/// as the task is stored (`pending`); `Prefer: wait=N` waits at most N seconds.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "The same key and body within 24 h return the first task (200)"),
        ("Prefer" = Option<String>, Header, description = "RFC 7240: `respond-async` answers once the task is stored, without waiting for its dispatch; `wait=N` waits at most N seconds"),
    ),
    request_body(content = TaskRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted and stored", body = TaskView),
        (status = 200, description = "An earlier task with this Idempotency-Key", body = TaskView),
        (status = 400, description = "Not JSON, or a bad Idempotency-Key", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not declared as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Every failing field, or a reused Idempotency-Key with another body", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many tasks waiting, or too many submits", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn submit(
    State(relay): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let key = idempotency_key(&headers)?;
    let limit = relay.settings.server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        ApiError::PayloadTooLarge("the request body is larger than server.max_body_bytes".into())
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // Large bodies take turns (a byte budget) before a byte of them is read; the share is held
    // until the task is stored.
    let budget = relay.reserve_body_bytes(declared.unwrap_or(limit)).await;
    let bytes = read_body(body, declared, limit).await?;
    let body = parse_json(&bytes)?;
    drop(bytes);
    let request_id = headers
        .get(&super::REQUEST_ID)
        .and_then(|v| v.to_str().ok());
    let prefer = Prefer::from_headers(&headers);
    let submitted = relay
        .submit(
            &caller,
            body,
            key.as_deref(),
            request_id,
            prefer.max_wait(),
            budget,
        )
        .await?;
    let location = format!("/v1/tasks/{}", submitted.task.id);
    let status = if submitted.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let applied = prefer.applied();
    Ok((
        status,
        [(header::LOCATION, location)],
        applied.map(|a| [(HeaderName::from_static("preference-applied"), a)]),
        Json(TaskView::from(submitted.task)),
    )
        .into_response())
}

/// Reads a body of at most `limit` bytes into one buffer, sized up front from its declared
/// length: each chunk is copied in and freed at once, so reading costs the body once (collecting
/// the chunks first and joining them cost it four times over for a large Base64 submit).
async fn read_body(
    body: axum::body::Body,
    declared: Option<usize>,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    use futures_util::StreamExt;
    let too_large = || {
        ApiError::PayloadTooLarge("the request body is larger than server.max_body_bytes".into())
    };
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::bad_request("the request body was cut short"))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Cancel a task that has not been sent upstream.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "Canceled (or already canceled)", body = TaskView),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already sent upstream, or already final", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn cancel(
    State(relay): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    Ok(Json(relay.cancel(&caller, &id).await?.into()))
}

/// The task's notifications, with their attempts.
#[utoipa::path(get, path = "/v1/tasks/{id}/deliveries", tag = "notifications",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "Deliveries, oldest first", body = DeliveryList),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn deliveries(
    State(relay): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<DeliveryList>, ApiError> {
    let list: Vec<DeliveryView> = relay
        .deliveries(&caller, &id)
        .await?
        .into_iter()
        .map(DeliveryView::from)
        .collect();
    Ok(Json(DeliveryList { deliveries: list }))
}

/// Send one notification again, under its original `webhook-id`.
#[utoipa::path(post, path = "/v1/tasks/{id}/deliveries/{delivery_id}/retry", tag = "notifications",
    params(("id" = String, Path, description = "Task id"), ("delivery_id" = String, Path, description = "Delivery id (the webhook-id)")),
    responses(
        (status = 202, description = "Queued for delivery", body = DeliveryView),
        (status = 404, description = "No such task or delivery", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn retry_delivery(
    State(relay): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, delivery_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let d = relay.retry_delivery(&caller, &id, &delivery_id).await?;
    Ok((StatusCode::ACCEPTED, Json(DeliveryView::from(d))).into_response())
}

/// Upstream concurrency and the dispatch queue.
#[utoipa::path(get, path = "/v1/status", tag = "operations",
    responses((status = 200, description = "Dispatch state", body = StatusView)),
    security(("api_key" = [])))]
pub async fn status(State(relay): State<AppState>) -> Result<Json<StatusView>, ApiError> {
    let d = relay.dispatch_status().await?;
    let usage = relay.client_usage().await?;
    Ok(Json(StatusView {
        clients: crate::resource::client_usage_views(&usage),
        dispatch: DispatchView {
            max_concurrency: d.admission.max_units,
            working_limit: d.admission.working_limit,
            units_in_flight: d.units_in_flight,
            pending: d.pending,
            paused_until: (d.admission.paused_until_ms > crate::service::now_ms())
                .then(|| rfc3339(d.admission.paused_until_ms)),
            halted: d.halted.map(|h| crate::resource::HaltView {
                reason: h.reason.as_str(),
                since: rfc3339(h.since_ms),
                upstream_code: h.upstream_code,
                message: h.message,
                advice: h.reason.advice(),
                next_probe: rfc3339(h.next_probe_ms),
            }),
        },
    }))
}

/// Get a task, optionally waiting for it to change (long-poll).
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task id"),
        ("wait" = Option<u32>, Query, minimum = 0, maximum = 60, description = "Seconds to wait for a change"),
        ("status_not" = Option<crate::domain::TaskStatus>, Query, description = "Answer once the status differs from this (default: the current status)"),
    ),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 400, description = "Bad query parameters", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn get(
    State(relay): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<TaskView>, ApiError> {
    let mut wait = None;
    let mut status_not = None;
    let mut errors = Vec::new();
    for (key, value) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "wait" => match value.parse::<u64>() {
                Ok(s) if s <= MAX_WAIT.as_secs() => wait = Some(Duration::from_secs(s)),
                _ => errors.push(field_error(
                    "wait",
                    "must be a whole number of seconds from 0 to 60",
                )),
            },
            "status_not" => match value.parse::<TaskStatus>() {
                Ok(s) => status_not = Some(s),
                Err(_) => errors.push(field_error("status_not", "is not a status")),
            },
            other => errors.push(field_error(other, "unknown query parameter")),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::BadRequest {
            detail: "invalid query parameters".into(),
            errors,
        });
    }
    let task = match wait {
        Some(w) => relay.wait_for_change(&caller, &id, status_not, w).await?,
        None => relay.get(&caller, &id).await?,
    };
    let archive = relay.archive_records(std::slice::from_ref(&task)).await?;
    Ok(Json(TaskView::from(task).with_archive(&archive)))
}

/// The task's timeline, oldest first.
#[utoipa::path(get, path = "/v1/tasks/{id}/events", tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "Events", body = EventList),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn events(
    State(relay): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<EventList>, ApiError> {
    let events: Vec<EventView> = relay
        .events(&caller, &id)
        .await?
        .into_iter()
        .map(EventView::from)
        .collect();
    Ok(Json(EventList { events }))
}

/// List your tasks, newest first, with keyset paging.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    params(
        ("status" = Option<Vec<crate::domain::TaskStatus>>, Query, explode = true, description = "Only these statuses (repeat, or comma-separate)"),
        ("created_after" = Option<String>, Query, description = "RFC 3339 time, inclusive"),
        ("created_before" = Option<String>, Query, description = "RFC 3339 time, exclusive"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200, description = "Page size, default 50"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of tasks", body = TaskPage),
        (status = 400, description = "Bad query parameters", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn list(
    State(relay): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Json<TaskPage>, ApiError> {
    let filter = parse_list_query(query.as_deref().unwrap_or(""))?;
    let tasks = relay.list(&caller, &filter).await?;
    let next_cursor = if tasks.len() as i64 == filter.limit {
        tasks.last().map(|t| encode_cursor(t.created_at_ms, &t.id))
    } else {
        None
    };
    let archive = relay.archive_records(&tasks).await?;
    Ok(Json(TaskPage {
        tasks: tasks
            .into_iter()
            .map(|t| TaskView::from(t).with_archive(&archive))
            .collect(),
        next_cursor,
    }))
}

pub(super) fn parse_time(field: &str, value: &str) -> Result<i64, crate::domain::FieldError> {
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
pub fn parse_list_query(query: &str) -> Result<TaskQuery, ApiError> {
    let mut f = TaskQuery {
        limit: DEFAULT_LIMIT,
        ..TaskQuery::default()
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
    fn a_cursor_this_service_did_not_issue_is_refused() {
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
}

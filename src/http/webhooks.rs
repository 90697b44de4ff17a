//! `/webhooks/cometapi/{id}/{token}`: upstream's callbacks. The token is a path segment because
//! proxies and gateways drop query strings; `/webhooks/cometapi/{id}?token=...` stays accepted
//! for tasks dispatched before the change.
//!
//! The token is checked before anything else is read, and 2xx is answered only once the change
//! is committed, so a sender that sees an error can retry. A callback with a valid token whose
//! upstream ids do not match the task is not applied: it is noted on the timeline and the task
//! is polled at once, so the query settles it.

use super::error::ApiError;
use super::{parse_json, require_json, AppState};
use crate::domain::EventSource;
use crate::resource::{CallbackOutcome, Problem};
use crate::service::ApplyOutcome;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;

/// Upstream's callback for one task (the `callback_url` sent with the create call).
#[utoipa::path(post, path = "/webhooks/cometapi/{id}/{token}", tag = "webhooks",
    params(("id" = String, Path, description = "Task id"), ("token" = String, Path, description = "The task's callback token")),
    request_body(content = Object, content_type = "application/json", description = "The task object, bare or in the {code, message, data} envelope"),
    responses(
        (status = 200, description = "Committed, changed nothing, or (outcome `polling`) ids that do not match: the task is polled at once", body = CallbackOutcome),
        (status = 400, description = "Not JSON, or not a task callback", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Wrong token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Larger than server.max_webhook_body_bytes", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not declared as JSON", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cometapi_path_token(
    State(relay): State<AppState>,
    Path((id, token)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<CallbackOutcome>, ApiError> {
    receive(relay, id, token, headers, body).await
}

/// The older form of the callback URL, with the token in the query string.
#[utoipa::path(post, path = "/webhooks/cometapi/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Task id"), ("token" = Option<String>, Query, description = "The task's callback token")),
    request_body(content = Object, content_type = "application/json", description = "The task object, bare or in the {code, message, data} envelope"),
    responses(
        (status = 200, description = "Committed (or changed nothing)", body = CallbackOutcome),
        (status = 400, description = "Not JSON, or not a task callback", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not declared as JSON", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cometapi(
    State(relay): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<CallbackOutcome>, ApiError> {
    let token = url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    receive(relay, id, token, headers, body).await
}

/// The body is a stream until the token has been checked: an unauthenticated sender costs no
/// more than its headers, and an authenticated one at most `server.max_webhook_body_bytes`.
async fn receive(
    relay: AppState,
    id: String,
    token: String,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<CallbackOutcome>, ApiError> {
    let rejected = |reason: &'static str| {
        metrics::counter!("klr_webhooks_total", "outcome" => format!("rejected_{reason}"))
            .increment(1);
    };
    if token.is_empty() || !relay.verify_webhook_token(&id, &token) {
        rejected("token");
        return Err(ApiError::Unauthorized(
            "missing or invalid callback token".into(),
        ));
    }
    require_json(&headers).inspect_err(|_| rejected("content_type"))?;
    let limit = relay.settings.server.max_webhook_body_bytes;
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        rejected("too_large");
        ApiError::PayloadTooLarge(format!(
            "a callback body is at most server.max_webhook_body_bytes ({limit} bytes)"
        ))
    })?;
    let body = parse_json(&body).inspect_err(|_| rejected("malformed"))?;
    let report = relay.read_callback(&body).ok_or_else(|| {
        rejected("not_a_callback");
        ApiError::bad_request("not a task callback: expected task_id and a known task_status")
    })?;
    let outcome = match relay.apply_report(&id, EventSource::Webhook, &report).await {
        Err(crate::service::ServiceError::Mismatch(m)) => {
            relay
                .poll_after_mismatch(&id, EventSource::Webhook, &m, report.raw.as_ref())
                .await?;
            metrics::counter!("klr_webhooks_total", "outcome" => "mismatch_polled").increment(1);
            tracing::warn!(task_id = %id, mismatch = %m, "callback ids do not match the task; polling it");
            return Ok(Json(CallbackOutcome {
                outcome: "polling",
                status: None,
            }));
        }
        other => other.inspect_err(|e| {
            rejected(match e {
                crate::service::ServiceError::NotFound => "unknown_task",
                _ => "error",
            })
        })?,
    };
    let (outcome, status) = match outcome {
        ApplyOutcome::Applied(s) => ("applied", Some(s)),
        ApplyOutcome::Ignored(reason) => (reason.as_str(), None),
    };
    metrics::counter!("klr_webhooks_total", "outcome" => outcome).increment(1);
    tracing::info!(task_id = %id, outcome, "callback received");
    Ok(Json(CallbackOutcome { outcome, status }))
}

/// What `kling-relay doctor` fetches through `server.public_url`: its own one-time nonce back,
/// and the query string as it arrived (did a proxy keep it?).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct DoctorEcho {
    pub nonce: String,
    /// The query string as received, or null when none arrived.
    pub query: Option<String>,
}

/// Answers `kling-relay doctor`'s reachability probe (only for a nonce it left in the database).
#[utoipa::path(get, path = "/webhooks/doctor/{nonce}", tag = "webhooks",
    params(("nonce" = String, Path, description = "The nonce doctor left for this instance")),
    responses(
        (status = 200, description = "This instance holds the nonce", body = DoctorEcho),
        (status = 404, description = "Unknown or expired nonce", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn doctor_echo(
    State(relay): State<AppState>,
    Path(nonce): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<DoctorEcho>, ApiError> {
    if !relay.doctor_nonce_valid(&nonce).await? {
        return Err(ApiError::NotFound("no such doctor nonce".into()));
    }
    Ok(Json(DoctorEcho { nonce, query }))
}

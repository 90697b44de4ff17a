//! `/webhooks/cometapi/{id}?token=...`: CometAPI's callbacks.
//!
//! The token is checked before anything else is read, and 2xx is answered only once the change
//! is committed, so a sender that sees an error can retry.

use super::error::ApiError;
use super::{parse_json, require_json, AppState};
use crate::domain::EventSource;
use crate::resource::{CallbackOutcome, Problem};
use crate::service::ApplyOutcome;
use crate::upstream::parse_callback;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;

/// CometAPI's callback for one task (the `callback_url` sent with the create call).
#[utoipa::path(post, path = "/webhooks/cometapi/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Task id"), ("token" = Option<String>, Query, description = "The task's callback token")),
    request_body(content = Object, content_type = "application/json", description = "The task object, bare or in the {code, message, data} envelope"),
    responses(
        (status = 200, description = "Committed (or changed nothing)", body = CallbackOutcome),
        (status = 400, description = "Not JSON, or not a task callback", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The payload belongs to another task", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not declared as JSON", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cometapi(
    State(relay): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<CallbackOutcome>, ApiError> {
    let token = url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
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
    let body = parse_json(&body).inspect_err(|_| rejected("malformed"))?;
    let report = parse_callback(&body).ok_or_else(|| {
        rejected("not_a_callback");
        ApiError::bad_request("not a task callback: expected task_id and a known task_status")
    })?;
    let outcome = relay
        .apply_report(&id, EventSource::Webhook, &report)
        .await
        .inspect_err(|e| {
            rejected(match e {
                crate::service::ServiceError::Mismatch(_) => "mismatch",
                crate::service::ServiceError::NotFound => "unknown_task",
                _ => "error",
            })
        })?;
    let (outcome, status) = match outcome {
        ApplyOutcome::Applied(s) => ("applied", Some(s)),
        ApplyOutcome::Ignored(reason) => (reason.as_str(), None),
    };
    metrics::counter!("klr_webhooks_total", "outcome" => outcome).increment(1);
    tracing::info!(task_id = %id, outcome, "callback received");
    Ok(Json(CallbackOutcome { outcome, status }))
}

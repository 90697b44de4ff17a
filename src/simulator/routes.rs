//! The simulator's routes for each profile, and who it lets in.
//!
//! | profile | multi-image create and query | text-to-image route | auth |
//! |---|---|---|---|
//! | `cometapi` | `/kling/v1/images/multi-image2image` | `/kling/v1/images/generations` | Bearer key |
//! | `cometapi-generations` | `/kling/v1/images/generations` | (the same route) | Bearer key |
//! | `kling` | `/v1/images/multi-image2image` | `/v1/images/generations` | HS256 JWT |
//!
//! Any other path is a route error (HTTP 404, no service code), as a gateway answers it.

use super::{error_answer, lock, query, query_by_external, start_task, take_create_fault, Inner};
use crate::config::UpstreamProfile;
use crate::upstream::profile::{
    COMETAPI_MULTI_IMAGE_PATH, COMETAPI_TEXT_TO_IMAGE_PATH, KLING_MULTI_IMAGE_PATH,
    KLING_TEXT_TO_IMAGE_PATH,
};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

/// (multi-image route, text-to-image route if it is another one).
fn paths(p: UpstreamProfile) -> (&'static str, Option<&'static str>) {
    match p {
        UpstreamProfile::Cometapi => (COMETAPI_MULTI_IMAGE_PATH, Some(COMETAPI_TEXT_TO_IMAGE_PATH)),
        UpstreamProfile::CometapiGenerations => (COMETAPI_TEXT_TO_IMAGE_PATH, None),
        UpstreamProfile::Kling => (KLING_MULTI_IMAGE_PATH, Some(KLING_TEXT_TO_IMAGE_PATH)),
    }
}

/// Subject images accepted and the default model, per the profile's page.
pub(super) fn subject_bounds(p: UpstreamProfile) -> (usize, usize, &'static str) {
    match p {
        UpstreamProfile::CometapiGenerations => (2, 4, "kling-v2"),
        _ => (1, 4, "kling-v2-1"),
    }
}

pub(super) fn router(inner: Arc<Inner>) -> Router {
    let (multi, text_to_image) = paths(inner.cfg.profile);
    let mut r = Router::new()
        .route(multi, get(query_by_external).post(super::create))
        .route(&format!("{multi}/{{task_id}}"), get(query));
    if let Some(t2i) = text_to_image {
        r = r
            .route(t2i, axum::routing::post(create_text_to_image))
            .route(&format!("{t2i}/{{task_id}}"), get(query));
    }
    r.route("/sim/images/{task_id}/{file}", get(super::image))
        .route(
            "/_sim/faults",
            get(super::get_faults).put(super::put_faults),
        )
        .route("/_sim/stats", get(super::stats))
        .fallback(no_route)
        // Upstream takes six images of 10 MB in Base64 in one create call.
        .layer(axum::extract::DefaultBodyLimit::max(128 * 1024 * 1024))
        .with_state(inner)
}

/// What a gateway answers for a path it does not serve: no service code, OpenAI-style.
async fn no_route(method: Method, uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(
            json!({"error": {"message": format!("Invalid URL ({method} {})", uri.path()),
            "type": "invalid_request_error"}}),
        ),
    )
        .into_response()
}

/// The text-to-image route of the current pages: `prompt` is required and
/// `subject_image_list` is not a field (ignored, like every unknown field). A multi-image job
/// sent here with a prompt runs as a paid text-to-image task that ignores its subjects.
async fn create_text_to_image(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let _under_way = super::tasks::UnderWay::start(&inner);
    lock(&inner.state).stats.create_calls += 1;
    let body = match super::admit_create(&inner, &headers, &body) {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    let prompt = body
        .get("prompt")
        .and_then(Value::as_str)
        .filter(|p| !p.trim().is_empty())
        .map(str::to_owned);
    let Some(prompt) = prompt else {
        return error_answer(
            &inner,
            StatusCode::BAD_REQUEST,
            1201,
            "invalid parameters: prompt is required",
        );
    };
    if let Some(refused) = refuse_account(&inner) {
        return refused;
    }
    let (failure, delay, lose_response) = take_create_fault(&inner);
    if let Some(f) = failure {
        return super::failure_response(&inner, f);
    }
    let n = body
        .get("n")
        .and_then(Value::as_u64)
        .and_then(|n| u8::try_from(n).ok())
        .filter(|n| (1..=9).contains(n))
        .unwrap_or(1);
    lock(&inner.state).stats.text_to_image_tasks += 1;
    start_task(&inner, &body, n, Some(&prompt), delay, lose_response).await
}

/// Refuses a caller whose credentials (or address) upstream would refuse; None lets it in.
pub(super) fn refuse_caller(inner: &Inner, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    lock(&inner.state).stats.last_authorization = given.clone();
    let faults = lock(&inner.faults).clone();
    let refusal = if faults.ip_not_allowed {
        Some((
            StatusCode::TOO_MANY_REQUESTS,
            1304,
            "IP whitelisting policy triggered: the caller's IP is not allowed",
        ))
    } else if faults.key_revoked {
        Some((StatusCode::UNAUTHORIZED, 1002, "Authorization is invalid"))
    } else {
        check_credentials(inner, given.as_deref())
    };
    let (status, code, message) = refusal?;
    lock(&inner.state).stats.auth_failures += 1;
    Some(error_answer(inner, status, code, message))
}

fn check_credentials(
    inner: &Inner,
    given: Option<&str>,
) -> Option<(StatusCode, i64, &'static str)> {
    let unauthorized = StatusCode::UNAUTHORIZED;
    let Some(token) = given.and_then(|g| g.strip_prefix("Bearer ")) else {
        return Some((unauthorized, 1001, "Authorization is empty"));
    };
    if inner.cfg.profile != UpstreamProfile::Kling {
        return (token != inner.cfg.api_key).then_some((
            unauthorized,
            1000,
            "Authentication failed",
        ));
    }
    let Some(claims) = crate::upstream::jwt::verify_hs256(token, inner.cfg.secret_key.as_bytes())
    else {
        return Some((unauthorized, 1002, "Authorization is invalid"));
    };
    let now = super::now_ms() / 1000;
    let num = |k: &str| claims.get(k).and_then(Value::as_i64);
    if claims.get("iss").and_then(Value::as_str) != Some(inner.cfg.access_key.as_str()) {
        return Some((unauthorized, 1002, "Authorization is invalid"));
    }
    if num("nbf").is_some_and(|nbf| nbf > now) {
        return Some((unauthorized, 1003, "Authorization is not yet valid"));
    }
    match num("exp") {
        Some(exp) if exp > now => None,
        _ => Some((unauthorized, 1004, "Authorization has expired")),
    }
}

/// The account cannot pay: creates are refused with 1102.
pub(super) fn refuse_account(inner: &Inner) -> Option<Response> {
    // Read before answering: `error_answer` takes the same lock.
    let out_of_credit = lock(&inner.faults).out_of_credit;
    out_of_credit.then(|| {
        error_answer(
            inner,
            StatusCode::TOO_MANY_REQUESTS,
            1102,
            "Resource pack depleted or expired",
        )
    })
}

//! The HTTP layer: routes, request parsing and response shapes. Handlers stay thin and call the
//! service; errors become problem+json in `error`.

mod cursor;
pub mod docs;
pub mod error;
mod images;
mod live;
pub mod openapi;
mod ops;
pub use ops::metrics_router;
pub mod server;
mod tasks;
mod ui;
mod usage;
mod webhooks;

use crate::service::Relay;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use std::sync::Arc;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub type AppState = Arc<Relay>;

pub fn router(relay: Arc<Relay>) -> Router {
    let body_limit = relay.settings.server.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/tasks", post(tasks::submit).get(tasks::list))
        .route("/v1/tasks/{id}", get(tasks::get))
        .route("/v1/tasks/{id}/events", get(tasks::events))
        .route("/v1/tasks/{id}/images/{index}", get(images::image))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/v1/tasks/{id}/stream", get(live::stream))
        .route("/v1/tasks/{id}/deliveries", get(tasks::deliveries))
        .route(
            "/v1/tasks/{id}/deliveries/{delivery_id}/retry",
            post(tasks::retry_delivery),
        )
        .route("/v1/status", get(tasks::status))
        .route("/v1/usage", get(usage::usage))
        .route_layer(middleware::from_fn_with_state(relay.clone(), authenticate));
    let request_timeout = relay.settings.server.request_timeout;
    // /metrics is served here unless it has a listener of its own.
    let metrics_here = if relay.settings.server.metrics_listen.is_empty() {
        Router::new().route("/metrics", get(ops::metrics))
    } else {
        Router::new()
    };
    Router::new()
        .merge(v1)
        .route(
            &format!("{}/{{id}}", crate::domain::CALLBACK_PATH),
            post(webhooks::cometapi),
        )
        .route(
            &format!("{}/{{id}}/{{token}}", crate::domain::CALLBACK_PATH),
            post(webhooks::cometapi_path_token),
        )
        .route("/webhooks/doctor/{nonce}", get(webhooks::doctor_echo))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/docs", get(docs::docs))
        .route("/docs/docs.js", get(docs::script))
        .route("/docs/docs.css", get(docs::style))
        .merge(metrics_here)
        .merge(ui::routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(record_http_metrics))
        // Outermost last: the request id exists before the span, the span covers everything,
        // and bare 408/413 answers pass through the problem+json mapper.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(middleware::from_fn(problem_for_bare_errors))
        .layer(middleware::from_fn(nosniff))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(
            // Spans name the route template, never the URI: callback URLs carry tokens.
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let route = route_of(req);
                let request_id = req
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::info_span!("http", method = %req.method(), route = %route, request_id = %request_id)
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .with_state(relay)
}

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Answers that axum or tower produce on their own (body too large, timeout) become
/// problem+json like every other error.
async fn problem_for_bare_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if is_problem {
        return resp;
    }
    match resp.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(
            "the request body is larger than server.max_body_bytes".into(),
        )
        .into_response(),
        StatusCode::REQUEST_TIMEOUT => {
            ApiError::RequestTimeout("the request took longer than server.request_timeout".into())
                .into_response()
        }
        _ => resp,
    }
}

/// The matched route template, for spans and metric labels (never the URI: it may carry ids
/// and callback tokens).
fn route_of(req: &Request) -> String {
    req.extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into())
}

/// The method as a metric label: the standard ones by name, anything a caller made up as
/// `other`, so made-up methods cannot grow the series without bound.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// `X-Content-Type-Options: nosniff` on every answer: no browser guesses a type we did not say.
async fn nosniff(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    resp
}

async fn record_http_metrics(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = method_label(req.method());
    let route = route_of(&req);
    let resp = next.run(req).await;
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    // The access log: the route template, never the URI (callback URLs carry tokens); the
    // request id is on the enclosing span.
    let client = match resp.extensions().get::<crate::domain::client::Caller>() {
        Some(crate::domain::client::Caller::Client(name)) => name.as_str(),
        _ => "",
    };
    tracing::info!(
        target: "kling_relay::access",
        method,
        route = %route,
        status,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        client,
        "request"
    );
    metrics::counter!("klr_http_requests_total", "method" => method, "route" => route.clone(), "status" => status.to_string()).increment(1);
    metrics::histogram!("klr_http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
    resp
}

/// Every `/v1/` request carries `Authorization: Bearer <key>`; the caller it names is handed to
/// the handler. Any failure is one 401 that reveals nothing about existing clients.
async fn authenticate(
    State(relay): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let bearer = match req.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|_| unauthorized())?;
            let (scheme, key) = v.split_once(' ').ok_or_else(unauthorized)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(unauthorized());
            }
            Some(key.to_owned())
        }
    };
    let caller = relay.authenticate(bearer.as_deref()).await?;
    req.extensions_mut().insert(caller.clone());
    let mut resp = next.run(req).await;
    // For the access log, written outside this layer.
    resp.extensions_mut().insert(caller);
    Ok(resp)
}

fn unauthorized() -> ApiError {
    ApiError::Unauthorized("missing, unknown or revoked API key".into())
}

/// Refuses a body that is not declared as JSON.
pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(
            "the body must be JSON (content-type: application/json)".into(),
        ))
    }
}

pub(crate) fn parse_json(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

//! The operator's routes: liveness, readiness and Prometheus metrics (also served alone on
//! `server.metrics_listen`, see `metrics_router`).

use super::error::ApiError;
use super::AppState;
use crate::resource::Problem;
use crate::service::Relay;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = String, content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers and its migrations are current. Says why not, and nothing
/// about the configuration.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "Not ready, with the reason", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn readyz(State(relay): State<AppState>) -> Response {
    match relay.readiness().await {
        Ok(()) => "ready".into_response(),
        Err(reason) => ApiError::Unavailable(format!("not ready: {reason}")).into_response(),
    }
}

/// Prometheus metrics (text format). On `server.metrics_listen` instead when that is set.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text", body = String, content_type = "text/plain")))]
pub async fn metrics(State(relay): State<AppState>) -> Response {
    let handle = crate::telemetry::metrics::handle();
    let g = relay.gauges().await;
    if let Some(d) = g.dispatch {
        metrics::gauge!("klr_dispatch_units_in_flight").set(d.units_in_flight as f64);
        metrics::gauge!("klr_dispatch_working_limit").set(d.admission.working_limit as f64);
        metrics::gauge!("klr_dispatch_max_units").set(d.admission.max_units as f64);
        metrics::gauge!("klr_dispatch_pending").set(d.pending as f64);
        let halted = d.halted.as_ref().map(|h| h.reason);
        for r in crate::domain::halt::HaltReason::ALL {
            metrics::gauge!("klr_dispatch_halted", "reason" => r.as_str())
                .set(if halted == Some(r) { 1.0 } else { 0.0 });
        }
    }
    if let Some(open) = g.open_tasks {
        for status in ["pending", "submitted", "processing"] {
            let n = open
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            metrics::gauge!("klr_tasks", "status" => status).set(n as f64);
        }
    }
    if let Some(usage) = g.clients {
        // Labels are client names: bounded by the number of clients, never task ids.
        for u in &usage {
            let client = u.client.clone().unwrap_or_default();
            metrics::gauge!("klr_client_units_in_use", "client" => client.clone())
                .set(u.units_in_use as f64);
            metrics::gauge!("klr_client_tasks_waiting", "client" => client).set(u.waiting as f64);
        }
    }
    if let Some(u) = g.usage {
        for (client, units) in u.reserved {
            metrics::gauge!("klr_units_reserved", "client" => client).set(units as f64);
        }
        for (client, period, left) in u.budget_remaining {
            metrics::gauge!("klr_budget_remaining_units", "client" => client, "period" => period)
                .set(left);
        }
    }
    if let Some(n) = g.notification_backlog {
        metrics::gauge!("klr_notification_backlog").set(n as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// The metrics endpoint alone, for `server.metrics_listen`.
pub fn metrics_router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(relay)
}

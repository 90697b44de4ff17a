//! The OpenAPI 3.1 document, generated from the handlers' annotations and the resource types so
//! it cannot drift from the code, and `/docs`, a reference page rendered from it on the server
//! (no script, no internet).

use super::{images, live, tasks, usage, webhooks};
use crate::resource::{
    ArchiveStateSchema, ArchiveView, AttemptView, CallbackOutcome, ClientUsageView, DeliveryList,
    DeliveryView, DispatchView, ErrorView, EventList, EventView, FieldErrorView, HaltView,
    ImageView, Problem, StatusEvent, StatusSchema, StatusView, SubjectImage, TaskPage, TaskRequest,
    TaskView,
};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use std::sync::OnceLock;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kling-relay",
        description = "A durable relay in front of CometAPI's Kling multi-image-to-image generation. \
            Submit image tasks, follow them by long-poll, SSE or signed notifications, and read their history.",
    ),
    paths(
        tasks::submit, tasks::list, tasks::get, tasks::events, tasks::cancel, live::stream,
        tasks::deliveries, tasks::retry_delivery, tasks::status, usage::usage, webhooks::cometapi, webhooks::cometapi_path_token, webhooks::doctor_echo,
        images::image,
        healthz, readyz, metrics, openapi_json, docs,
    ),
    components(schemas(
        TaskRequest, SubjectImage, TaskView, ImageView, ArchiveView, ArchiveStateSchema,
        ErrorView, StatusSchema, crate::domain::Priority, TaskPage,
        EventView, EventList, DeliveryView, AttemptView, DeliveryList, DispatchView, HaltView, StatusView, ClientUsageView, webhooks::DoctorEcho,
        CallbackOutcome, Problem, FieldErrorView, StatusEvent, usage::UsageView, usage::UsageBucketView,
    )),
    modifiers(&Security, &CommonProblems),
    tags(
        (name = "tasks", description = "Submit and follow image tasks"),
        (name = "notifications", description = "Signed status notifications to your notify URL"),
        (name = "webhooks", description = "CometAPI's callbacks to this service"),
        (name = "usage", description = "What your tasks cost"),
        (name = "operations", description = "Health, readiness, metrics and this description"),
    ),
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A client API key from `kling-relay clients create`"))
                    .build(),
            ),
        );
    }
}

/// Answers any operation can give, added everywhere so none is forgotten: 401 where a key is
/// needed, 413 where a body is read, 408, 500 and 503 always.
struct CommonProblems;

fn problem(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                        "Problem",
                    ))))
                    .build(),
            )
            .build(),
    )
}

fn add_common(op: &mut Operation, has_body: bool) {
    let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
    let r = &mut op.responses.responses;
    if secured {
        r.entry("401".into())
            .or_insert_with(|| problem("Missing, unknown or revoked API key"));
    }
    if has_body {
        r.entry("413".into())
            .or_insert_with(|| problem("Body larger than server.max_body_bytes"));
    }
    r.entry("408".into())
        .or_insert_with(|| problem("Took longer than server.request_timeout"));
    r.entry("503".into())
        .or_insert_with(|| problem("Database unavailable; retry later"));
    r.entry("500".into())
        .or_insert_with(|| problem("Stored data is corrupt (logged); retrying will not help"));
}

impl Modify for CommonProblems {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") && !path.starts_with("/webhooks/") {
                continue;
            }
            if let Some(op) = item.get.as_mut() {
                add_common(op, false);
            }
            if let Some(op) = item.post.as_mut() {
                add_common(op, true);
            }
        }
    }
}

/// The document, built once.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null))
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = String, content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers and its migrations are current.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "Not ready, with the reason", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn readyz(state: axum::extract::State<super::AppState>) -> Response {
    super::readyz(state).await
}

/// Prometheus metrics (text format). On `server.metrics_listen` instead when that is set.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text", body = String, content_type = "text/plain")))]
pub async fn metrics(state: axum::extract::State<super::AppState>) -> Response {
    super::render_metrics(state).await
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
pub async fn openapi_json() -> Response {
    Json(document()).into_response()
}

/// A readable reference of this API.
#[utoipa::path(get, path = "/docs", tag = "operations",
    responses((status = 200, description = "HTML", body = String, content_type = "text/html")))]
pub async fn docs() -> Html<String> {
    static PAGE: OnceLock<String> = OnceLock::new();
    Html(PAGE.get_or_init(|| render(document())).clone())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn schema_name(v: &Value) -> String {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(name));
    }
    if let Some(items) = v.get("items") {
        return format!("array of {}", schema_name(items));
    }
    if let Some(one) = v.get("oneOf").and_then(Value::as_array) {
        return one.iter().map(schema_name).collect::<Vec<_>>().join(" | ");
    }
    match v.get("type") {
        Some(Value::String(t)) => esc(t),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .map(esc)
            .collect::<Vec<_>>()
            .join(" | "),
        _ => "object".into(),
    }
}

/// Renders the document as one HTML page: operations by path, then schemas.
fn render(doc: &Value) -> String {
    let mut h = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>kling-relay API</title><style>\
         body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#111;line-height:1.45}\
         code,pre{background:#f3f3f3;padding:.1rem .3rem;border-radius:3px}\
         .op{border:1px solid #ccc;border-radius:6px;margin:1rem 0;padding:.6rem 1rem}\
         .m{font-weight:700;text-transform:uppercase;margin-right:.5rem}\
         table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.25rem .4rem;text-align:left;vertical-align:top}\
         </style></head><body>",
    );
    let info = &doc["info"];
    h.push_str(&format!(
        "<h1>{}</h1><p>{}</p><p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI {}). \
         Authenticate with <code>Authorization: Bearer &lt;client API key&gt;</code>.</p><h2>Operations</h2>",
        esc(info["title"].as_str().unwrap_or("API")),
        esc(info["description"].as_str().unwrap_or("")),
        esc(doc["openapi"].as_str().unwrap_or("3.1"))
    ));
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            h.push_str(&format!(
                "<div class=\"op\"><p><span class=\"m\">{}</span><code>{}</code></p><p><b>{}</b></p><p>{}</p>",
                esc(method),
                esc(path),
                esc(op["summary"].as_str().unwrap_or("")),
                esc(op["description"].as_str().unwrap_or(""))
            ));
            if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
                h.push_str("<table><tr><th>parameter</th><th>in</th><th>type</th><th>description</th></tr>");
                for p in params {
                    h.push_str(&format!(
                        "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(p["name"].as_str().unwrap_or("")),
                        if p["required"] == true {
                            " (required)"
                        } else {
                            ""
                        },
                        esc(p["in"].as_str().unwrap_or("")),
                        schema_name(&p["schema"]),
                        esc(p["description"].as_str().unwrap_or(""))
                    ));
                }
                h.push_str("</table>");
            }
            if let Some(body) = op["requestBody"]["content"].as_object() {
                for (ct, c) in body {
                    h.push_str(&format!(
                        "<p>Body (<code>{}</code>): {}</p>",
                        esc(ct),
                        schema_name(&c["schema"])
                    ));
                }
            }
            h.push_str("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>");
            for (code, r) in op["responses"].as_object().into_iter().flatten() {
                let body = r["content"]
                    .as_object()
                    .and_then(|c| c.iter().next())
                    .map(|(ct, c)| {
                        format!("{} <code>{}</code>", schema_name(&c["schema"]), esc(ct))
                    })
                    .unwrap_or_default();
                h.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(code),
                    esc(r["description"].as_str().unwrap_or("")),
                    body
                ));
            }
            h.push_str("</table></div>");
        }
    }
    h.push_str("<h2>Schemas</h2>");
    for (name, schema) in doc["components"]["schemas"]
        .as_object()
        .into_iter()
        .flatten()
    {
        h.push_str(&format!(
            "<h3 id=\"schema-{0}\">{0}</h3><p>{1}</p>",
            esc(name),
            esc(schema["description"].as_str().unwrap_or(""))
        ));
        if let Some(props) = schema["properties"].as_object() {
            let required: Vec<&str> = schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            h.push_str("<table><tr><th>field</th><th>type</th><th>description</th></tr>");
            for (field, p) in props {
                h.push_str(&format!(
                    "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(field),
                    if required.contains(&field.as_str()) {
                        " (required)"
                    } else {
                        ""
                    },
                    schema_name(p),
                    esc(p["description"].as_str().unwrap_or(""))
                ));
            }
            h.push_str("</table>");
        } else if let Some(values) = schema["enum"].as_array() {
            let list: Vec<String> = values
                .iter()
                .filter_map(Value::as_str)
                .map(|v| format!("<code>{}</code>", esc(v)))
                .collect();
            h.push_str(&format!("<p>One of {}</p>", list.join(", ")));
        }
    }
    h.push_str("</body></html>");
    h
}

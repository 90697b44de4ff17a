//! The OpenAPI 3.1 document, generated from the handlers' annotations and the resource types so
//! it cannot drift from the code (`/docs`, the reference page built from it, is in `docs.rs`).

use super::{images, live, tasks, usage, webhooks};
use crate::resource::{
    ArchiveView, AttemptView, CallbackOutcome, ClientUsageView, DeliveryList, DeliveryView,
    DispatchView, ErrorView, EventList, EventView, FieldErrorView, HaltView, ImageView, Problem,
    StatusEvent, StatusView, SubjectImage, TaskPage, TaskRequest, TaskView,
};
use axum::response::{IntoResponse, Response};
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
        super::ops::healthz, super::ops::readyz, super::ops::metrics, openapi_json, super::docs::docs,
    ),
    components(schemas(
        TaskRequest, SubjectImage, TaskView, ImageView, ArchiveView, crate::domain::archive::ArchiveState,
        ErrorView, crate::domain::TaskStatus, crate::domain::Priority, TaskPage,
        EventView, EventList, DeliveryView, AttemptView, DeliveryList, DispatchView, HaltView, StatusView, ClientUsageView, webhooks::DoctorEcho,
        CallbackOutcome, Problem, FieldErrorView, StatusEvent, usage::UsageView, usage::UsageBucketView,
    )),
    modifiers(&Security, &CommonProblems, &BinaryImages),
    servers((url = "/", description = "This service: the origin this document was fetched from")),
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

/// Image answers are bytes, not the array of integers `Vec<u8>` would describe.
struct BinaryImages;

impl Modify for BinaryImages {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaFormat, SchemaType, Type};
        for item in openapi.paths.paths.values_mut() {
            let Some(op) = item.get.as_mut() else {
                continue;
            };
            for response in op.responses.responses.values_mut() {
                let RefOr::T(response) = response else {
                    continue;
                };
                for (media, content) in response.content.iter_mut() {
                    if media.starts_with("image/") {
                        content.schema = Some(RefOr::T(
                            ObjectBuilder::new()
                                .schema_type(SchemaType::Type(Type::String))
                                .format(Some(SchemaFormat::Custom("binary".into())))
                                .content_media_type(media.clone())
                                .into(),
                        ));
                    }
                }
            }
        }
    }
}

/// The document, built once.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
pub async fn openapi_json() -> Response {
    Json(document()).into_response()
}

#[cfg(test)]
mod tests {
    use super::document;
    use crate::domain::validation::{API_ONLY_FIELDS, ASPECT_RATIOS, TASK_FIELDS};
    use crate::domain::{Priority, TaskStatus};
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn schema(name: &str) -> &'static Value {
        &document()["components"]["schemas"][name]
    }

    fn enum_of(name: &str) -> Vec<String> {
        schema(name)["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no enum: {}", schema(name)))
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    fn as_json_strings<T: serde::Serialize>(values: &[T]) -> Vec<String> {
        values
            .iter()
            .filter_map(|v| serde_json::to_value(v).ok())
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    #[test]
    fn the_documents_enums_are_the_types_values() {
        assert_eq!(enum_of("StatusSchema"), as_json_strings(&TaskStatus::ALL));
        assert_eq!(enum_of("Priority"), as_json_strings(&Priority::ALL));
        assert_eq!(
            enum_of("ArchiveStateSchema"),
            ["pending", "stored", "failed", "deleted"]
        );
    }

    /// The request body is described field by field beside the validator that reads it: the
    /// document must name exactly the fields the API accepts (the `scence_image` alias aside).
    #[test]
    fn the_request_schema_names_exactly_the_fields_the_api_accepts() {
        let documented: BTreeSet<&str> = schema("TaskRequest")["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let accepted: BTreeSet<&str> = TASK_FIELDS
            .iter()
            .chain(API_ONLY_FIELDS.iter())
            .copied()
            .filter(|f| *f != "scence_image")
            .collect();
        assert_eq!(documented, accepted);
        let ratio = schema("TaskRequest")["properties"]["aspect_ratio"]["description"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(
            ratio,
            format!("One of {}.", ASPECT_RATIOS.join(", ")),
            "the aspect ratios the document lists"
        );
    }
}

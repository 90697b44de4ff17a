//! `GET /v1/tasks/{id}/images/{index}`: our archived copy of a result image.

use super::error::ApiError;
use super::AppState;
use crate::domain::client::Caller;
use crate::resource::Problem;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;

/// Archived copies never change under their ETag; only the caller may cache them.
const CACHE_CONTROL: &str = "private, max-age=31536000, immutable";

/// An archived result image, streamed with its content type, `ETag` (its SHA-256) and cache
/// headers. `If-None-Match` with that ETag answers `304`.
#[utoipa::path(get, path = "/v1/tasks/{id}/images/{index}", tag = "tasks",
    params(
        ("id" = String, Path, description = "Task id"),
        ("index" = u32, Path, description = "The image's `index` in the task"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier answer"),
    ),
    responses(
        (status = 200, description = "The image", content(
            (Vec<u8> = "image/png"),
            (Vec<u8> = "image/jpeg"),
        ), headers(
            ("ETag" = String, description = "Quoted hex SHA-256 of the bytes"),
            ("Cache-Control" = String, description = "private, max-age=31536000, immutable"),
        )),
        (status = 304, description = "Not modified (the ETag matched)"),
        (status = 400, description = "The index is not a number", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task, or this image is not (or no longer) archived", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn image(
    State(relay): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, index)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(&relay, &caller, &id, &index, &headers).await
}

/// Streams image `index` of task `id` as `caller` may see it (the API's route and the
/// dashboard's).
pub(super) async fn serve(
    relay: &AppState,
    caller: &Caller,
    id: &str,
    index: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let Ok(index) = index.parse::<u32>() else {
        return Err(ApiError::bad_request(
            "the image index must be a whole number from 0",
        ));
    };
    let (record, object) = relay.archived_image(caller, id, index).await?;
    let etag = format!("\"{}\"", record.sha256.as_deref().unwrap_or_default());
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::CACHE_CONTROL, CACHE_CONTROL);
    let response = if matches {
        builder.status(StatusCode::NOT_MODIFIED).body(Body::empty())
    } else {
        builder
            .status(StatusCode::OK)
            .header(
                header::CONTENT_TYPE,
                record
                    .content_type
                    .as_deref()
                    .unwrap_or("application/octet-stream"),
            )
            .header(header::CONTENT_LENGTH, object.size)
            .body(Body::from_stream(object.bytes))
    };
    response.map_err(|e| ApiError::Unavailable(format!("cannot build the answer: {e}")))
}

//! The simulator's read routes: queries by id and by `external_task_id`, result images, and the
//! `/_sim` fault switches and statistics.

use super::*;

/// A query by id; under the `kling` profile the id slot also takes an `external_task_id`.
pub(super) async fn query(
    State(inner): State<Arc<Inner>>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    lock(&inner.state).stats.query_calls += 1;
    if let Some(refused) = routes::refuse_caller(&inner, &headers) {
        return refused;
    }
    if let Some(r) = query_fault(&inner).await {
        return r;
    }
    let id = {
        let mut st = lock(&inner.state);
        if st.tasks.contains_key(&task_id) {
            Some(task_id)
        } else if inner.cfg.profile == UpstreamProfile::Kling && inner.cfg.lookup_by_external_id {
            st.stats.external_lookups += 1;
            st.by_external.get(&task_id).cloned()
        } else {
            None
        }
    };
    answer_task(&inner, id)
}

/// `GET <create path>`: the lookup by `?external_task_id=` where the profile has it, else
/// Kling's task list (empty here).
pub(super) async fn query_by_external(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    lock(&inner.state).stats.query_calls += 1;
    if let Some(refused) = routes::refuse_caller(&inner, &headers) {
        return refused;
    }
    if inner.cfg.profile == UpstreamProfile::Kling || !inner.cfg.lookup_by_external_id {
        // The list of tasks: the external_task_id parameter is not one it knows.
        return reply(StatusCode::OK, envelope(json!(0), "SUCCEED", json!([])));
    }
    lock(&inner.state).stats.external_lookups += 1;
    if let Some(r) = query_fault(&inner).await {
        return r;
    }
    let Some(ext) = q.get("external_task_id") else {
        return error_answer(
            &inner,
            StatusCode::BAD_REQUEST,
            1201,
            "external_task_id is required",
        );
    };
    let id = lock(&inner.state).by_external.get(ext).cloned();
    answer_task(&inner, id)
}

pub(super) async fn image(
    State(inner): State<Arc<Inner>>,
    Path((task_id, file)): Path<(String, String)>,
) -> Response {
    let known = {
        let mut st = lock(&inner.state);
        st.stats.image_requests += 1;
        st.tasks.contains_key(&task_id)
    };
    let (fault, delay) = {
        let f = lock(&inner.faults);
        (f.image_fault, f.image_delay_ms)
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if !known || !file.ends_with(".png") {
        return StatusCode::NOT_FOUND.into_response();
    }
    match fault {
        None => {}
        Some(ImageFault::NotFound) => return StatusCode::NOT_FOUND.into_response(),
        Some(ImageFault::Unavailable) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Some(ImageFault::Html) => {
            return (
                [(header::CONTENT_TYPE, "text/html")],
                "<!doctype html><title>Expired</title><p>This link has expired.",
            )
                .into_response()
        }
        Some(ImageFault::Huge) => {
            let mut body = b"\x89PNG\r\n\x1a\n".to_vec();
            body.resize(2 * 1024 * 1024, 0);
            return ([(header::CONTENT_TYPE, "image/png")], body).into_response();
        }
        Some(ImageFault::RedirectToMetadata) => {
            return (
                StatusCode::FOUND,
                [(header::LOCATION, "http://169.254.169.254/latest/meta-data/")],
            )
                .into_response()
        }
    }
    match base64::engine::general_purpose::STANDARD.decode(PNG_BASE64) {
        Ok(png) => ([(header::CONTENT_TYPE, "image/png")], png).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

pub(super) async fn get_faults(State(inner): State<Arc<Inner>>) -> Json<Faults> {
    Json(lock(&inner.faults).clone())
}

pub(super) async fn put_faults(
    State(inner): State<Arc<Inner>>,
    Json(f): Json<Faults>,
) -> Json<Faults> {
    *lock(&inner.faults) = f.clone();
    Json(f)
}

pub(super) async fn stats(State(inner): State<Arc<Inner>>) -> Json<SimStats> {
    Json(lock(&inner.state).stats.clone())
}

//! How the simulator answers: the `{code, message, request_id, data}` envelope, Kling's error
//! statuses, the faults' broken answers, and a task as each query returns it.

use super::*;

pub(super) fn envelope(code: Value, message: &str, data: Value) -> Value {
    json!({
        "code": code,
        "message": message,
        "request_id": uuid::Uuid::new_v4().to_string(),
        "data": data,
    })
}

pub(super) fn reply(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// An error answer in the configured style: Kling's HTTP status and service code, or the
/// gateway's HTTP 400 `{"code": "task_failed"}`.
pub(super) fn error_answer(
    inner: &Inner,
    status: StatusCode,
    code: i64,
    message: &str,
) -> Response {
    if lock(&inner.faults).answer_style == AnswerStyle::Relay {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"code": "task_failed", "message": message, "data": null}),
        );
    }
    reply(status, envelope(json!(code), message, Value::Null))
}

pub(super) fn failure_response(inner: &Inner, f: Failure) -> Response {
    match f {
        Failure::Http500 => error_answer(
            inner,
            StatusCode::INTERNAL_SERVER_ERROR,
            5000,
            "internal error",
        ),
        Failure::Http503 => error_answer(
            inner,
            StatusCode::SERVICE_UNAVAILABLE,
            5001,
            "service unavailable",
        ),
        Failure::Http429 => {
            let mut r = error_answer(
                inner,
                StatusCode::TOO_MANY_REQUESTS,
                1302,
                "rate limit exceeded",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
        Failure::Code1303 => error_answer(
            inner,
            StatusCode::TOO_MANY_REQUESTS,
            CODE_CONCURRENCY_FULL,
            CONCURRENCY_FULL_MESSAGE,
        ),
    }
}

/// Takes one use of the create fault, if any is armed: (failure, answer delay, lose the answer).
pub(super) fn take_create_fault(inner: &Inner) -> (Option<Failure>, u64, bool) {
    let mut f = lock(&inner.faults);
    let mut rng = rand::thread_rng();
    if f.create_error_rate > 0.0 && rng.gen::<f64>() < f.create_error_rate {
        return (Some(Failure::Http500), 0, false);
    }
    if f.create_hang_rate > 0.0 && rng.gen::<f64>() < f.create_hang_rate {
        return (None, f.create_hang_ms, f.create_lose_response);
    }
    let failure = f.create_fail;
    if failure.is_some() {
        if let Some(left) = f.create_fail_times.as_mut() {
            *left = left.saturating_sub(1);
            if *left == 0 {
                f.create_fail = None;
                f.create_fail_times = None;
            }
        }
    }
    (failure, f.create_delay_ms, f.create_lose_response)
}

pub(super) fn task_json(t: &SimTask, base_url: &str) -> Value {
    let mut data = json!({
        "task_id": t.task_id,
        "task_status": t.status,
        "task_status_msg": t.status_msg,
        "task_info": { "external_task_id": t.external_task_id.clone().unwrap_or_default() },
        "created_at": t.created_at,
        "updated_at": t.updated_at,
    });
    if t.status == "succeed" || t.status == "failed" {
        data["final_unit_deduction"] = json!(if t.status == "succeed" {
            t.n.to_string()
        } else {
            "0".into()
        });
    }
    if t.status == "succeed" {
        let images: Vec<Value> = t
            .images
            .iter()
            .enumerate()
            .map(|(i, _)| json!({ "index": i, "url": format!("{base_url}/sim/images/{}/{i}.png", t.task_id) }))
            .collect();
        data["task_result"] = json!({ "images": images });
    }
    data
}

pub(super) async fn query_fault(inner: &Inner) -> Option<Response> {
    let (failure, delay, garbage) = {
        let f = lock(&inner.faults);
        (f.query_fail, f.query_delay_ms, f.query_garbage)
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(g) = garbage {
        return Some(garbage_response(g));
    }
    failure.map(|f| failure_response(inner, f))
}

pub(super) fn garbage_response(g: Garbage) -> Response {
    match g {
        Garbage::MalformedJson => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "{\"code\": 0, \"data\": {\"task_status\": ",
        )
            .into_response(),
        Garbage::UnknownStatus => reply(
            StatusCode::OK,
            envelope(
                json!(0),
                "SUCCEED",
                json!({"task_id": "whatever", "task_status": "teleporting", "created_at": 1, "updated_at": 2}),
            ),
        ),
        Garbage::OtherTask => reply(
            StatusCode::OK,
            envelope(
                json!(0),
                "SUCCEED",
                json!({"task_id": "someone-elses-task", "task_status": "succeed", "created_at": 1, "updated_at": 2,
                       "task_result": {"images": [{"index": 0, "url": "https://elsewhere.example/x.png"}]}}),
            ),
        ),
    }
}

pub(super) fn not_exist() -> Response {
    // CometAPI answers unknown ids with a string code and HTTP 400.
    reply(
        StatusCode::BAD_REQUEST,
        json!({"code": "task_not_exist", "message": "task_not_exist", "data": null}),
    )
}

pub(super) fn answer_task(inner: &Inner, task_id: Option<String>) -> Response {
    let st = lock(&inner.state);
    match task_id.and_then(|id| st.tasks.get(&id)) {
        Some(t) => reply(
            StatusCode::OK,
            envelope(json!(0), "SUCCEED", task_json(t, &inner.base_url)),
        ),
        None => not_exist(),
    }
}

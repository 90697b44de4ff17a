//! A task's life in the simulator: a create admitted under the profile's rules and the account's
//! n-weighted concurrency, its run through `submitted`, `processing` and the end, and the
//! callbacks on every change.

use super::*;

/// Counts a create call, on either create route, as under way until it is answered (tests
/// check the relay's bound on them).
pub(super) struct UnderWay(Arc<Inner>);

impl UnderWay {
    pub(super) fn start(inner: &Arc<Inner>) -> UnderWay {
        let mut st = lock(&inner.state);
        st.stats.creates_under_way += 1;
        st.stats.peak_creates_under_way = st
            .stats
            .peak_creates_under_way
            .max(st.stats.creates_under_way);
        UnderWay(inner.clone())
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        lock(&self.0.state).stats.creates_under_way -= 1;
    }
}

/// The multi-image create route of the profile.
pub(super) async fn create(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let _under_way = UnderWay::start(&inner);
    {
        let mut st = lock(&inner.state);
        st.stats.create_calls += 1;
        st.stats.last_create_request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
    }
    let body = match admit_create(&inner, &headers, &body) {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    let (failure, delay, lose_response) = take_create_fault(&inner);
    if let Some(f) = failure {
        return failure_response(&inner, f);
    }
    if let Some(refused) = routes::refuse_account(&inner) {
        return refused;
    }
    let (min, max, default_model) = routes::subject_bounds(inner.cfg.profile);
    let task = match validate_new_task(&body, Rules::upstream((min, max), default_model)) {
        Ok(t) => t,
        Err(errors) => {
            let msg = errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            return error_answer(
                &inner,
                StatusCode::BAD_REQUEST,
                1201,
                &format!("invalid parameters: {msg}"),
            );
        }
    };
    if !SIM_MODELS.contains(&task.model_name.as_str()) {
        return error_answer(
            &inner,
            StatusCode::BAD_REQUEST,
            1201,
            &format!(
                "invalid parameters: model_name `{}` is not supported",
                task.model_name
            ),
        );
    }
    let unknown_code = lock(&inner.faults).create_unknown_code;
    if let Some(code) = unknown_code {
        return reply(
            StatusCode::OK,
            envelope(json!(code), "an answer no table lists", Value::Null),
        );
    }
    start_task(
        &inner,
        &body,
        task.n,
        task.prompt.as_deref(),
        delay,
        lose_response,
    )
    .await
}

/// What every create route does first: the caller's credentials, then the body as JSON (kept
/// for the tests as the last create body).
pub(super) fn admit_create(
    inner: &Inner,
    headers: &HeaderMap,
    body: &str,
) -> Result<Value, Box<Response>> {
    if let Some(refused) = routes::refuse_caller(inner, headers) {
        return Err(Box::new(refused));
    }
    let Ok(body) = serde_json::from_str::<Value>(body) else {
        return Err(Box::new(error_answer(
            inner,
            StatusCode::BAD_REQUEST,
            1200,
            "invalid request body: not JSON",
        )));
    };
    lock(&inner.state).stats.last_create_body = Some(body.clone());
    Ok(body)
}

/// Creates a task (its units counted, its run started) and answers the create call.
pub(super) async fn start_task(
    inner: &Arc<Inner>,
    body: &Value,
    n: u8,
    prompt: Option<&str>,
    delay: u64,
    lose_response: bool,
) -> Response {
    let external = body
        .get("external_task_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let callback_url = body
        .get("callback_url")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let n = i64::from(n);
    let now = now_ms();
    // Read before the state lock: the two locks are never held together.
    let elsewhere = lock(&inner.faults).units_held_elsewhere.max(0);
    let sim_task = {
        let mut st = lock(&inner.state);
        if let Some(ext) = &external {
            if st.by_external.contains_key(ext) {
                drop(st);
                return error_answer(
                    inner,
                    StatusCode::BAD_REQUEST,
                    1201,
                    "external_task_id already exists for this account",
                );
            }
        }
        if st.stats.units_in_use + elsewhere + n > inner.cfg.concurrency_units {
            st.stats.busy_answers += 1;
            drop(st);
            return failure_response(inner, Failure::Code1303);
        }
        let task_id = loop {
            let id = rand::thread_rng()
                .gen_range(100_000_000_000_000_000u64..1_000_000_000_000_000_000u64)
                .to_string();
            if !st.tasks.contains_key(&id) {
                break id;
            }
        };
        let failing = prompt.is_some_and(|p| p.contains(&inner.cfg.fail_marker));
        let t = SimTask {
            task_id: task_id.clone(),
            external_task_id: external.clone(),
            status: "submitted",
            status_msg: String::new(),
            created_at: now,
            updated_at: now,
            n,
            callback_url,
            images: (0..n).map(|i| i.to_string()).collect(),
        };
        st.stats.units_in_use += n;
        st.stats.peak_units_in_use = st.stats.peak_units_in_use.max(st.stats.units_in_use);
        log_units(&mut st, now_ms(), n);
        st.stats.tasks_created += 1;
        if let Some(ext) = external {
            st.by_external.insert(ext, task_id.clone());
        }
        st.tasks.insert(task_id.clone(), t.clone());
        tokio::spawn(run_task(inner.clone(), task_id, failing));
        t
    };
    // The delay comes after the task exists, as with a real slow answer: a caller that gives up
    // waiting has still started a paid task.
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if lose_response {
        return failure_response(inner, Failure::Http500);
    }
    let mut data = task_json(&sim_task, &inner.base_url);
    if lock(&inner.faults).create_without_status {
        // CometAPI's current example: the id alone.
        data = json!({ "task_id": sim_task.task_id });
    }
    reply(StatusCode::OK, envelope(json!(0), "SUCCEED", data))
}

/// Moves one task through `submitted` → `processing` → `succeed` | `failed`, calling back at each
/// change, and frees its units at the end.
pub(super) async fn run_task(inner: Arc<Inner>, task_id: String, failing: bool) {
    let mut held: Vec<(Option<String>, Value)> = Vec::new();
    // Each change at its time from the create, as upstream's work does not wait for our callbacks:
    // sleeping after sending one added its round trip to the task's duration.
    let created = tokio::time::Instant::now();
    let steps: [(Duration, &'static str); 2] = [
        (inner.cfg.processing_after, "processing"),
        (
            inner.cfg.processing_after + inner.cfg.finish_after,
            if failing { "failed" } else { "succeed" },
        ),
    ];
    for (after, status) in steps {
        tokio::select! {
            _ = tokio::time::sleep_until(created + after) => {}
            _ = inner.shutdown.cancelled() => return,
        }
        let (url, payload) = {
            let mut st = lock(&inner.state);
            let Some(t) = st.tasks.get_mut(&task_id) else {
                return;
            };
            t.status = status;
            // Strictly later than the previous change, even within one millisecond.
            t.updated_at = now_ms().max(t.updated_at + 1);
            if status == "failed" {
                t.status_msg = "content moderation: the prompt was flagged".into();
            }
            let payload = task_json(t, &inner.base_url);
            let url = t.callback_url.clone();
            if status != "processing" {
                let n = t.n;
                st.stats.units_in_use -= n;
                log_units(&mut st, now_ms(), -n);
            }
            (url, payload)
        };
        let faults = lock(&inner.faults).clone();
        if faults.reorder_callbacks && status == "processing" {
            held.push((url, payload));
            continue;
        }
        send_callback(&inner, &faults, url, payload).await;
        for (u, p) in held.drain(..) {
            send_callback(&inner, &faults, u, p).await;
        }
    }
}

pub(super) async fn send_callback(
    inner: &Arc<Inner>,
    faults: &Faults,
    url: Option<String>,
    data: Value,
) {
    let Some(mut url) = url else { return };
    if faults.drop_callbacks > 0.0 && rand::thread_rng().gen::<f64>() < faults.drop_callbacks {
        return;
    }
    if faults.strip_callback_query {
        if let Some((path, _)) = url.split_once('?') {
            url = path.to_owned();
        }
    }
    let mut data = data;
    if faults.callback_task_id_renamed {
        let renamed = format!("renamed-{}", data["task_id"].as_str().unwrap_or_default());
        data["task_id"] = json!(renamed);
    }
    let about = (
        data["task_id"].as_str().unwrap_or_default().to_owned(),
        data["task_status"].as_str().unwrap_or_default().to_owned(),
    );
    let body = if faults.callback_envelope {
        envelope(json!(0), "SUCCEED", data)
    } else {
        data
    };
    let copies = if faults.duplicate_callbacks { 2 } else { 1 };
    let delay = Duration::from_millis(faults.callback_delay_ms);
    let inner = inner.clone();
    let send = async move {
        tokio::time::sleep(delay).await;
        for _ in 0..copies {
            // Upstream promises no retry, so neither do we: the receiver must cope.
            let sent = inner.http.post(&url).json(&body).send().await;
            let mut st = lock(&inner.state);
            match sent {
                Ok(r) if r.status().is_success() => st.acknowledged.push(about.clone()),
                Ok(_) => {}
                // Without the URL: it carries the receiver's callback token.
                Err(e) => tracing::debug!(error = %e.without_url(), "simulator callback failed"),
            }
            st.stats.callbacks_sent += 1;
        }
    };
    if delay.is_zero() {
        send.await;
    } else {
        tokio::spawn(send);
    }
}

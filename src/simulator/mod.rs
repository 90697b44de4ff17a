//! A simulator of the upstream that follows `shared/reference/cometapi-kling.md` for each
//! profile (`cometapi`, `cometapi-generations`, `kling`): its create and query routes, and what
//! the real API refuses (a wrong path is a route error; on the text-to-image route a
//! multi-image job without a prompt is refused, with one it runs as a paid text-to-image task),
//! the `{code, message, request_id, data}` envelope with the HTTP statuses of Kling's error
//! table, millisecond timestamps, unique `external_task_id` per account, the n-weighted
//! concurrency limit answering `1303`, `task_not_exist`, callbacks on every status change, Kling's
//! JWT, and small valid PNGs for the results.
//!
//! Fault switches (`faults`) are set through [`Simulator::set_faults`] or `PUT /_sim/faults`.

mod faults;
mod routes;

pub use faults::{AnswerStyle, Failure, Faults, Garbage, ImageFault};

use crate::config::UpstreamProfile;
use crate::domain::{validate_new_task, Rules};
use crate::upstream::{CODE_CONCURRENCY_FULL, CONCURRENCY_FULL_MESSAGE};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// The multi-image models upstream knows; any other name is refused like a bad parameter.
const SIM_MODELS: [&str; 2] = ["kling-v2", "kling-v2-1"];

/// A 1x1 PNG; every result image is this picture.
const PNG_BASE64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Which upstream to behave as: routes, field names, subject bounds and authentication.
    pub profile: UpstreamProfile,
    /// Bearer key expected by the CometAPI profiles.
    pub api_key: String,
    /// Access key and secret key of the `kling` profile (its JWT is checked against them).
    pub access_key: String,
    pub secret_key: String,
    /// Time from `submitted` to `processing`.
    pub processing_after: Duration,
    /// Time from `processing` to the final status.
    pub finish_after: Duration,
    /// Account concurrency in units (a task holds `n`).
    pub concurrency_units: i64,
    /// A prompt containing this word ends `failed` with a moderation message.
    pub fail_marker: String,
    /// Whether tasks are found by `external_task_id`: in the query string of the create path
    /// (the CometAPI profiles) or in the query path's id slot (`kling`).
    pub lookup_by_external_id: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            profile: UpstreamProfile::Cometapi,
            api_key: "sk-simulator".into(),
            access_key: "ak-simulator".into(),
            secret_key: "sk-simulator-secret".into(),
            processing_after: Duration::from_millis(500),
            finish_after: Duration::from_secs(2),
            concurrency_units: 20,
            fail_marker: "forbidden".into(),
            lookup_by_external_id: true,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SimStats {
    pub create_calls: u64,
    pub tasks_created: u64,
    pub query_calls: u64,
    /// Queries by `external_task_id` (a subset of `query_calls`).
    pub external_lookups: u64,
    /// Create calls answered `1303`.
    pub busy_answers: u64,
    /// Highest `units_in_use` seen.
    pub peak_units_in_use: i64,
    /// The `x-request-id` of the last create call, if it had one.
    pub last_create_request_id: Option<String>,
    pub callbacks_sent: u64,
    /// Requests for result images.
    pub image_requests: u64,
    pub units_in_use: i64,
    /// Paid text-to-image tasks created on the text-to-image route (a multi-image job sent to
    /// the wrong route with a prompt): money spent on the wrong thing.
    pub text_to_image_tasks: u64,
    /// Requests refused for their credentials.
    pub auth_failures: u64,
    /// The `Authorization` header of the last request (tests decode Kling's JWT from it).
    pub last_authorization: Option<String>,
    /// The body of the last create call, as sent.
    pub last_create_body: Option<Value>,
}

#[derive(Debug, Clone)]
struct SimTask {
    task_id: String,
    external_task_id: Option<String>,
    status: &'static str,
    status_msg: String,
    created_at: i64,
    updated_at: i64,
    n: i64,
    callback_url: Option<String>,
    images: Vec<String>,
}

struct Inner {
    cfg: SimConfig,
    base_url: String,
    faults: Mutex<Faults>,
    state: Mutex<SimState>,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct SimState {
    tasks: HashMap<String, SimTask>,
    by_external: HashMap<String, String>,
    stats: SimStats,
    /// (task_id, task_status) of every callback the receiver answered with 2xx.
    acknowledged: Vec<(String, String)>,
    /// (Unix ms, units): +n when a create takes units, -n when a task frees them; the first
    /// UNIT_LOG_MAX changes only (the benchmark reads it: how soon freed units are reused).
    unit_log: Vec<(i64, i64)>,
}

const UNIT_LOG_MAX: usize = 200_000;

fn log_units(st: &mut SimState, at_ms: i64, units: i64) {
    if st.unit_log.len() < UNIT_LOG_MAX {
        st.unit_log.push((at_ms, units));
    }
}

/// A running simulator; dropping it does not stop it, [`Simulator::stop`] does.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the simulator down with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Simulator {
    /// Serves the simulator on `listener` until [`Simulator::stop`].
    pub async fn start(cfg: SimConfig, listener: tokio::net::TcpListener) -> std::io::Result<Self> {
        Self::start_with_faults(cfg, Faults::default(), listener).await
    }

    /// Starts with `faults` already switched on, so not even the first request escapes them.
    pub async fn start_with_faults(
        cfg: SimConfig,
        faults: Faults,
        listener: tokio::net::TcpListener,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(std::io::Error::other)?;
        let inner = Arc::new(Inner {
            cfg,
            base_url: format!("http://{addr}"),
            faults: Mutex::new(faults),
            state: Mutex::new(SimState::default()),
            http,
            shutdown: CancellationToken::new(),
        });
        let app = routes::router(inner.clone());
        let token = inner.shutdown.clone();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "simulator server stopped");
            }
        });
        Ok(Simulator { inner, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    pub fn api_key(&self) -> &str {
        &self.inner.cfg.api_key
    }

    pub fn set_faults(&self, f: Faults) {
        *lock(&self.inner.faults) = f;
    }

    pub fn faults(&self) -> Faults {
        lock(&self.inner.faults).clone()
    }

    pub fn stats(&self) -> SimStats {
        lock(&self.inner.state).stats.clone()
    }

    /// (task_id, task_status) of every callback the receiver acknowledged with a 2xx, in order.
    pub fn acknowledged_callbacks(&self) -> Vec<(String, String)> {
        lock(&self.inner.state).acknowledged.clone()
    }

    /// The upstream status of a task, as the simulator holds it.
    pub fn task_status(&self, task_id: &str) -> Option<&'static str> {
        lock(&self.inner.state).tasks.get(task_id).map(|t| t.status)
    }

    /// Every change of the units in use, as (Unix ms, +n taken | -n freed), oldest first.
    pub fn unit_log(&self) -> Vec<(i64, i64)> {
        lock(&self.inner.state).unit_log.clone()
    }

    /// When upstream finished a task (its final `updated_at`, Unix ms), if it has.
    pub fn finished_at(&self, task_id: &str) -> Option<i64> {
        lock(&self.inner.state)
            .tasks
            .get(task_id)
            .filter(|t| t.status == "succeed" || t.status == "failed")
            .map(|t| t.updated_at)
    }

    /// Forgets every task, as upstream does when records expire: queries then answer
    /// `task_not_exist` and no more callbacks are sent.
    pub fn expire_all(&self) {
        let mut st = lock(&self.inner.state);
        st.tasks.clear();
        st.stats.units_in_use = 0;
    }

    pub fn stop(&self) {
        self.inner.shutdown.cancel();
    }
}

fn envelope(code: Value, message: &str, data: Value) -> Value {
    json!({
        "code": code,
        "message": message,
        "request_id": uuid::Uuid::new_v4().to_string(),
        "data": data,
    })
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// An error answer in the configured style: Kling's HTTP status and service code, or the
/// gateway's HTTP 400 `{"code": "task_failed"}`.
fn error_answer(inner: &Inner, status: StatusCode, code: i64, message: &str) -> Response {
    if lock(&inner.faults).answer_style == AnswerStyle::Relay {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"code": "task_failed", "message": message, "data": null}),
        );
    }
    reply(status, envelope(json!(code), message, Value::Null))
}

fn failure_response(inner: &Inner, f: Failure) -> Response {
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
fn take_create_fault(inner: &Inner) -> (Option<Failure>, u64, bool) {
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

fn task_json(t: &SimTask, base_url: &str) -> Value {
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

/// The multi-image create route of the profile.
async fn create(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: String) -> Response {
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
fn admit_create(inner: &Inner, headers: &HeaderMap, body: &str) -> Result<Value, Box<Response>> {
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
async fn start_task(
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
async fn run_task(inner: Arc<Inner>, task_id: String, failing: bool) {
    let mut held: Vec<(Option<String>, Value)> = Vec::new();
    let steps: [(Duration, &'static str); 2] = [
        (inner.cfg.processing_after, "processing"),
        (
            inner.cfg.finish_after,
            if failing { "failed" } else { "succeed" },
        ),
    ];
    for (delay, status) in steps {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
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

async fn send_callback(inner: &Arc<Inner>, faults: &Faults, url: Option<String>, data: Value) {
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

async fn query_fault(inner: &Inner) -> Option<Response> {
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

fn garbage_response(g: Garbage) -> Response {
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

fn not_exist() -> Response {
    // CometAPI answers unknown ids with a string code and HTTP 400.
    reply(
        StatusCode::BAD_REQUEST,
        json!({"code": "task_not_exist", "message": "task_not_exist", "data": null}),
    )
}

fn answer_task(inner: &Inner, task_id: Option<String>) -> Response {
    let st = lock(&inner.state);
    match task_id.and_then(|id| st.tasks.get(&id)) {
        Some(t) => reply(
            StatusCode::OK,
            envelope(json!(0), "SUCCEED", task_json(t, &inner.base_url)),
        ),
        None => not_exist(),
    }
}

/// A query by id; under the `kling` profile the id slot also takes an `external_task_id`.
async fn query(
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
async fn query_by_external(
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

async fn image(
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

async fn get_faults(State(inner): State<Arc<Inner>>) -> Json<Faults> {
    Json(lock(&inner.faults).clone())
}

async fn put_faults(State(inner): State<Arc<Inner>>, Json(f): Json<Faults>) -> Json<Faults> {
    *lock(&inner.faults) = f.clone();
    Json(f)
}

async fn stats(State(inner): State<Arc<Inner>>) -> Json<SimStats> {
    Json(lock(&inner.state).stats.clone())
}

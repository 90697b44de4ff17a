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

mod answers;
mod faults;
mod reads;
mod routes;
mod tasks;

use answers::*;
use reads::*;
use tasks::*;

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
    /// Create calls not yet answered, and the most seen at once.
    pub creates_under_way: i64,
    pub peak_creates_under_way: i64,
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

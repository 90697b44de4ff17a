//! A webhook receiver for notification tests: records every request, answers per path from a
//! script (default 200), can hang, and can check the task's committed status at receipt.
#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: String,
    pub at: Instant,
    /// The task's status in the service when the request arrived.
    pub committed_status: Option<String>,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

#[derive(Default)]
struct Inner {
    received: Vec<Received>,
    script: HashMap<String, VecDeque<u16>>,
    hang: HashMap<String, Duration>,
    in_flight: HashMap<String, usize>,
    max_in_flight: HashMap<String, usize>,
    /// Base URL and client to read the task's status at receipt.
    service: Option<(String, reqwest::Client)>,
}

#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Mutex<Inner>>,
    pub base: String,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Receiver {
    pub async fn start() -> Receiver {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/{*path}", post(handle))
            .with_state(inner.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", l.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(l, app).await });
        Receiver { inner, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    /// The next answers for `path`, then 200.
    pub fn script(&self, path: &str, codes: &[u16]) {
        lock(&self.inner).script.insert(
            path.trim_start_matches('/').to_owned(),
            codes.iter().copied().collect(),
        );
    }

    pub fn hang(&self, path: &str, d: Duration) {
        lock(&self.inner)
            .hang
            .insert(path.trim_start_matches('/').to_owned(), d);
    }

    /// Look up each notified task in the service when its notification arrives.
    pub fn check_against(&self, base: &str, http: reqwest::Client) {
        lock(&self.inner).service = Some((base.to_owned(), http));
    }

    pub fn received(&self, path: &str) -> Vec<Received> {
        let p = path.trim_start_matches('/');
        lock(&self.inner)
            .received
            .iter()
            .filter(|r| r.path == p)
            .cloned()
            .collect()
    }

    pub fn max_in_flight(&self, path: &str) -> usize {
        *lock(&self.inner)
            .max_in_flight
            .get(path.trim_start_matches('/'))
            .unwrap_or(&0)
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let body = String::from_utf8_lossy(&body).into_owned();
    let (code, hang, service) = {
        let mut g = lock(&inner);
        let code = g
            .script
            .get_mut(&path)
            .and_then(VecDeque::pop_front)
            .unwrap_or(200);
        let n = g.in_flight.entry(path.clone()).or_insert(0);
        *n += 1;
        let now = *n;
        let max = g.max_in_flight.entry(path.clone()).or_insert(0);
        *max = (*max).max(now);
        (code, g.hang.get(&path).copied(), g.service.clone())
    };
    let committed_status = match (&service, serde_json::from_str::<Value>(&body)) {
        (Some((base, http)), Ok(v)) => match v["id"].as_str() {
            Some(id) => status_in_service(http, base, id).await,
            None => None,
        },
        _ => None,
    };
    if let Some(d) = hang {
        tokio::time::sleep(d).await;
    }
    {
        let mut g = lock(&inner);
        if let Some(n) = g.in_flight.get_mut(&path) {
            *n -= 1;
        }
        g.received.push(Received {
            path: path.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body,
            at,
            committed_status,
        });
    }
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    if code == 302 {
        return (status, [("location", "http://127.0.0.1:1/elsewhere")]).into_response();
    }
    status.into_response()
}

async fn status_in_service(http: &reqwest::Client, base: &str, id: &str) -> Option<String> {
    let r = http
        .get(format!("{base}/v1/tasks/{id}"))
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    v["status"].as_str().map(str::to_owned)
}

/// Checks a Standard Webhooks request, written from the specification independently of the
/// service's signer: HMAC-SHA256 under the base64-decoded secret over `id.timestamp.body`, any of
/// the space-separated `v1,` signatures matching, timestamp within five minutes.
pub fn verify_standard_webhook(secret: &str, r: &Received) -> Result<(), String> {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let id = r.header("webhook-id");
    let ts = r.header("webhook-timestamp");
    let sigs = r.header("webhook-signature");
    if id.is_empty() || ts.is_empty() || sigs.is_empty() {
        return Err("missing webhook headers".into());
    }
    let ts_num: i64 = ts.parse().map_err(|_| "timestamp not an integer")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    if (now - ts_num).abs() > 300 {
        return Err(format!("timestamp {ts_num} too far from now {now}"));
    }
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .map_err(|e| e.to_string())?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{ts}.{}", r.body).as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    if sigs
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|s| s == expected)
    {
        Ok(())
    } else {
        Err(format!("no signature matches in `{sigs}`"))
    }
}

/// Also checks with the `standardwebhooks` package from PyPI (see `tools::reference_python`).
pub fn verify_with_reference_library(secret: &str, r: &Received) -> Result<(), String> {
    let python = super::tools::reference_python();
    let run = super::tools::require(
        super::tools::Tool::Python,
        python.is_some(),
        "a Python with the `standardwebhooks` package",
    );
    let Some(python) = python.filter(|_| run) else {
        return Ok(());
    };
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
req = json.load(sys.stdin)
Webhook(req["secret"]).verify(req["body"], req["headers"])
"#;
    let input = serde_json::json!({"secret": secret, "body": r.body, "headers": r.headers});
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        stdin
            .write_all(input.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

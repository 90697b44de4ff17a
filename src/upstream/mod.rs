//! The upstream client: CometAPI (two wire forms) or Kling's own API, as `cometapi.profile`
//! selects (`profile`), answers read tolerantly (`wire`) and classified by the published error
//! table (`classify`), Kling's JWT in `jwt`.
//!
//! Dispatch and polls only see: accepted, retryable (and whether the call may have reached
//! upstream), refused for this task, a duplicate id, a halt (the setup is refused, not the task),
//! or an unknown code.

pub mod classify;
pub mod jwt;
pub mod profile;
pub mod wire;

pub use classify::{
    classify_create, classify_query, CODE_CONCURRENCY_FULL, CONCURRENCY_FULL_MESSAGE,
};
pub use profile::{Auth, ExternalLookup, Wire};
pub use wire::parse_callback;

use crate::domain::halt::HaltReason;
use crate::domain::{TaskInputs, UpstreamReport};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum UpstreamError {
    /// Worth trying again later. `maybe_sent`: the request may have reached upstream. `busy`:
    /// the account's concurrency is full (`1303`, 1302, or 429), so all dispatch should slow down.
    #[error("retryable upstream failure: {reason}")]
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
        maybe_sent: bool,
        busy: bool,
    },
    /// Upstream refused the request; sending it again as is will not help.
    #[error("upstream refused the request ({code}): {message}")]
    Rejected { code: String, message: String },
    /// Upstream already holds a task with this `external_task_id`.
    #[error("upstream already has a task with this external_task_id: {message}")]
    DuplicateExternalId { message: String },
    /// Upstream refused the operator's setup (key, IP, account, route), not the task.
    #[error("upstream refused the setup ({}, {code}): {message}", reason.as_str())]
    Halt {
        reason: HaltReason,
        code: String,
        message: String,
    },
    /// A code outside the published table.
    #[error("upstream answered an unknown code ({code}): {message}")]
    Unknown { code: String, message: String },
}

/// Outcome of a query.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Found(UpstreamReport),
    /// Upstream answered `task_not_exist`.
    NotExist,
}

/// What to send to create one task.
pub struct CreateRequest<'a> {
    pub model_name: &'a str,
    pub prompt: Option<&'a str>,
    pub n: i64,
    pub aspect_ratio: Option<&'a str>,
    pub inputs: &'a TaskInputs,
    pub callback_url: Option<String>,
    pub external_task_id: &'a str,
    /// Sent as `x-request-id`, so one id follows the task across both services.
    pub request_id: Option<&'a str>,
}

/// The create call's body, serialized from the task's inputs in place.
struct CreateBody<'a> {
    scene_field: &'a str,
    req: &'a CreateRequest<'a>,
}

impl serde::Serialize for CreateBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        #[derive(serde::Serialize)]
        struct Subject<'a> {
            subject_image: &'a str,
        }
        let (req, inputs) = (self.req, &self.req.inputs);
        let mut m = s.serialize_map(None)?;
        let subjects: Vec<Subject<'_>> = inputs
            .subject_images
            .iter()
            .map(|s| Subject { subject_image: s })
            .collect();
        m.serialize_entry("subject_image_list", &subjects)?;
        m.serialize_entry("model_name", req.model_name)?;
        if let Some(p) = req.prompt {
            m.serialize_entry("prompt", p)?;
        }
        if let Some(p) = &inputs.negative_prompt {
            m.serialize_entry("negative_prompt", p)?;
        }
        if let Some(img) = &inputs.scene_image {
            m.serialize_entry(self.scene_field, img)?;
        }
        if let Some(img) = &inputs.style_image {
            m.serialize_entry("style_image", img)?;
        }
        m.serialize_entry("n", &req.n)?;
        if let Some(a) = req.aspect_ratio {
            m.serialize_entry("aspect_ratio", a)?;
        }
        if let Some(w) = &inputs.watermark_info {
            m.serialize_entry("watermark_info", w)?;
        }
        if let Some(c) = &req.callback_url {
            m.serialize_entry("callback_url", c)?;
        }
        m.serialize_entry("external_task_id", req.external_task_id)?;
        m.end()
    }
}

/// A raw answer, for `doctor`'s probes.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub body: Option<Value>,
    /// The `Date` header, Unix seconds (for clock skew).
    pub date_s: Option<i64>,
}

#[derive(Clone)]
pub struct CometClient {
    http: reqwest::Client,
    wire: Arc<Wire>,
    tokens: Option<Arc<jwt::KlingTokens>>,
}

impl CometClient {
    pub fn new(wire: Wire, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let tokens = match &wire.auth {
            Auth::KlingJwt {
                access_key,
                secret_key,
            } => Some(Arc::new(jwt::KlingTokens::new(
                access_key.clone(),
                secret_key.clone(),
            ))),
            Auth::Bearer(_) => None,
        };
        Ok(CometClient {
            http,
            wire: Arc::new(wire),
            tokens,
        })
    }

    pub fn wire(&self) -> &Wire {
        &self.wire
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.wire.base_url, path)
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match (&self.wire.auth, &self.tokens) {
            (_, Some(tokens)) => req.bearer_auth(tokens.token(now_s()).expose()),
            (Auth::Bearer(key), None) => req.bearer_auth(key.expose()),
            (Auth::KlingJwt { .. }, None) => req,
        }
    }

    /// The JSON body of a create call.
    /// The create call's JSON, as a value (for inspection; the call itself serializes
    /// `CreateBody` straight to bytes, so Base64 images are not copied twice).
    pub fn create_body(&self, req: &CreateRequest<'_>) -> Value {
        serde_json::to_value(CreateBody {
            scene_field: &self.wire.scene_image_field,
            req,
        })
        .unwrap_or(Value::Null)
    }

    pub async fn create(&self, req: &CreateRequest<'_>) -> Result<UpstreamReport, UpstreamError> {
        let started = std::time::Instant::now();
        let body = serde_json::to_vec(&CreateBody {
            scene_field: &self.wire.scene_image_field,
            req,
        })
        // Strings and JSON values always encode; were one not to, no retry would help.
        .map_err(|e| UpstreamError::Rejected {
            code: "encode".into(),
            message: format!("cannot encode the create call: {e}"),
        })?;
        let mut call = self
            .authorize(self.http.post(self.url(&self.wire.create_path)))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(id) = req.request_id {
            call = call.header("x-request-id", id);
        }
        let answer = match read(call.send().await).await {
            Ok(a) => classify_create(a.status, a.retry_after, &a.body),
            Err(e) => Err(e),
        };
        record(
            "create",
            started,
            match &answer {
                Ok(_) => "accepted",
                Err(e) => error_label(e),
            },
        );
        answer
    }

    pub async fn query(&self, task_id: &str) -> Result<Lookup, UpstreamError> {
        let url = self.url(&self.wire.query_path_for(task_id));
        self.lookup("query", self.http.get(url)).await
    }

    /// Finds a task by its `external_task_id`, in the form the profile (or
    /// `cometapi.external_lookup`) names.
    pub async fn query_by_external_id(&self, external_id: &str) -> Result<Lookup, UpstreamError> {
        let req = match self.wire.external_lookup {
            ExternalLookup::Query => self
                .http
                .get(self.url(&self.wire.create_path))
                .query(&[("external_task_id", external_id)]),
            ExternalLookup::Path => self
                .http
                .get(self.url(&self.wire.query_path_for(external_id))),
            ExternalLookup::None => {
                return Err(UpstreamError::Retryable {
                    reason: "no lookup by external_task_id is configured".into(),
                    retry_after: None,
                    maybe_sent: false,
                    busy: false,
                })
            }
        };
        self.lookup("query_by_external_id", req).await
    }

    async fn lookup(
        &self,
        endpoint: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<Lookup, UpstreamError> {
        let started = std::time::Instant::now();
        let answer = match read(self.authorize(req).send().await).await {
            Ok(a) => classify_query(a.status, a.retry_after, &a.body),
            Err(e) => Err(e),
        };
        record(
            endpoint,
            started,
            match &answer {
                Ok(Lookup::Found(_)) => "found",
                Ok(Lookup::NotExist) => "not_exist",
                Err(e) => error_label(e),
            },
        );
        answer
    }

    /// One authenticated call, answered as is (for `doctor`, which reads answers itself).
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<RawAnswer, UpstreamError> {
        let mut req = self.authorize(self.http.request(method, self.url(path_and_query)));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(transport_error)?;
        let date_s = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(httpdate_to_unix);
        let a = read(Ok(resp)).await?;
        Ok(RawAnswer {
            status: a.status,
            body: a.body,
            date_s,
        })
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`) as Unix seconds.
fn httpdate_to_unix(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc2822).ok()?;
    Some(t.unix_timestamp())
}

fn error_label(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Retryable { busy: true, .. } => "busy",
        UpstreamError::Retryable { .. } => "retryable",
        UpstreamError::Rejected { .. } => "rejected",
        UpstreamError::DuplicateExternalId { .. } => "duplicate",
        UpstreamError::Halt { .. } => "halt",
        UpstreamError::Unknown { .. } => "unknown",
    }
}

fn record(endpoint: &'static str, started: std::time::Instant, result: &'static str) {
    metrics::counter!("klr_upstream_requests_total", "endpoint" => endpoint, "result" => result)
        .increment(1);
    metrics::histogram!("klr_upstream_request_duration_seconds", "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
}

struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Option<Value>,
}

async fn read(resp: reqwest::Result<reqwest::Response>) -> Result<Answer, UpstreamError> {
    let resp = resp.map_err(transport_error)?;
    let status = resp.status().as_u16();
    let retry_after = retry_after(resp.headers());
    let bytes = resp.bytes().await.map_err(transport_error)?;
    Ok(Answer {
        status,
        retry_after,
        body: serde_json::from_slice(&bytes).ok(),
    })
}

/// A `Retry-After` given in seconds (the HTTP-date form is not used by these peers).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::domain::schedule::retry_after_seconds)
}

fn transport_error(e: reqwest::Error) -> UpstreamError {
    UpstreamError::Retryable {
        reason: format!("transport: {}", describe(&e)),
        retry_after: None,
        // A refused connection never reached upstream; anything later may have.
        maybe_sent: !e.is_connect(),
        busy: false,
    }
}

fn describe(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reading the answer failed"
    } else {
        "request failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            httpdate_to_unix("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(httpdate_to_unix("yesterday"), None);
    }
}

//! The CometAPI client and the upstream wire format (envelopes, task data, callbacks).
//!
//! Every answer is classified once here, so the dispatcher and poller only see: accepted,
//! retryable (with whether the call may have reached upstream), refused, or a duplicate id.

use crate::config::Secret;
use crate::domain::{ResultImage, TaskInputs, UpstreamReport, UpstreamStatus};
use serde_json::{json, Map, Value};
use std::time::Duration;

pub const CREATE_PATH: &str = "/kling/v1/images/generations";
/// Upstream code for "account concurrency is full".
pub const CODE_CONCURRENCY_FULL: i64 = 1303;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum UpstreamError {
    /// Worth trying again later. `maybe_sent`: the request may have reached upstream. `busy`:
    /// the account's concurrency is full (`1303`, or 429), so all dispatch should slow down.
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

#[derive(Clone)]
pub struct CometClient {
    http: reqwest::Client,
    base_url: String,
    api_key: Secret,
    scene_image_field: String,
}

impl CometClient {
    pub fn new(
        base_url: &str,
        api_key: Secret,
        timeout: Duration,
        scene_image_field: &str,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(CometClient {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            scene_image_field: scene_image_field.to_owned(),
        })
    }

    /// The JSON body of a create call.
    pub fn create_body(&self, req: &CreateRequest<'_>) -> Value {
        let mut body = Map::new();
        body.insert(
            "subject_image_list".into(),
            Value::Array(
                req.inputs
                    .subject_images
                    .iter()
                    .map(|s| json!({ "subject_image": s }))
                    .collect(),
            ),
        );
        body.insert("model_name".into(), json!(req.model_name));
        if let Some(p) = req.prompt {
            body.insert("prompt".into(), json!(p));
        }
        if let Some(s) = &req.inputs.scene_image {
            body.insert(self.scene_image_field.clone(), json!(s));
        }
        if let Some(s) = &req.inputs.style_image {
            body.insert("style_image".into(), json!(s));
        }
        body.insert("n".into(), json!(req.n));
        if let Some(a) = req.aspect_ratio {
            body.insert("aspect_ratio".into(), json!(a));
        }
        if let Some(c) = &req.callback_url {
            body.insert("callback_url".into(), json!(c));
        }
        body.insert("external_task_id".into(), json!(req.external_task_id));
        Value::Object(body)
    }

    pub async fn create(&self, req: &CreateRequest<'_>) -> Result<UpstreamReport, UpstreamError> {
        let url = format!("{}{}", self.base_url, CREATE_PATH);
        let started = std::time::Instant::now();
        let mut call = self
            .http
            .post(url)
            .bearer_auth(self.api_key.expose())
            .json(&self.create_body(req));
        if let Some(id) = req.request_id {
            call = call.header("x-request-id", id);
        }
        let resp = call.send().await;
        let answer = match read(resp).await {
            Ok((status, retry_after, body)) => classify_create(status, retry_after, &body),
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
        let url = format!(
            "{}{}/{}",
            self.base_url,
            CREATE_PATH,
            urlencode_segment(task_id)
        );
        self.lookup("query", self.http.get(url)).await
    }

    /// Kling's form of the query by `external_task_id`; CometAPI may or may not relay it.
    pub async fn query_by_external_id(&self, external_id: &str) -> Result<Lookup, UpstreamError> {
        let url = format!("{}{}", self.base_url, CREATE_PATH);
        self.lookup(
            "query_by_external_id",
            self.http
                .get(url)
                .query(&[("external_task_id", external_id)]),
        )
        .await
    }

    async fn lookup(
        &self,
        endpoint: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<Lookup, UpstreamError> {
        let started = std::time::Instant::now();
        let resp = req.bearer_auth(self.api_key.expose()).send().await;
        let answer = match read(resp).await {
            Ok((status, retry_after, body)) => classify_query(status, retry_after, &body),
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
}

fn error_label(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Retryable { busy: true, .. } => "busy",
        UpstreamError::Retryable { .. } => "retryable",
        UpstreamError::Rejected { .. } => "rejected",
        UpstreamError::DuplicateExternalId { .. } => "duplicate",
    }
}

fn record(endpoint: &'static str, started: std::time::Instant, result: &'static str) {
    metrics::counter!("klr_upstream_requests_total", "endpoint" => endpoint, "result" => result)
        .increment(1);
    metrics::histogram!("klr_upstream_request_duration_seconds", "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
}

fn urlencode_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn read(
    resp: reqwest::Result<reqwest::Response>,
) -> Result<(u16, Option<Duration>, Option<Value>), UpstreamError> {
    let resp = resp.map_err(transport_error)?;
    let status = resp.status().as_u16();
    let retry_after = retry_after(resp.headers());
    let bytes = resp.bytes().await.map_err(transport_error)?;
    Ok((status, retry_after, serde_json::from_slice(&bytes).ok()))
}

/// A `Retry-After` given in seconds (the HTTP-date form is not used by these peers).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
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

/// `code` as text: upstream sends numbers, some relays send strings.
fn code_of(body: &Value) -> Option<String> {
    match body.get("code")? {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn message_of(body: &Value) -> String {
    body.get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

fn is_task_not_exist(body: &Value) -> bool {
    let hit = |s: String| s.to_ascii_lowercase().contains("task_not_exist");
    code_of(body).is_some_and(hit) || hit(message_of(body))
}

fn is_duplicate_external_id(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("external_task_id") && (m.contains("exist") || m.contains("duplicate"))
}

pub fn classify_create(
    status: u16,
    retry_after: Option<Duration>,
    body: &Option<Value>,
) -> Result<UpstreamReport, UpstreamError> {
    let retry = |reason: String, maybe_sent: bool, busy: bool| UpstreamError::Retryable {
        reason,
        retry_after,
        maybe_sent,
        busy,
    };
    // 1303 arrives with HTTP 200 or 429; either way it is load, not a bad request.
    if body
        .as_ref()
        .and_then(code_of)
        .is_some_and(|c| c == CODE_CONCURRENCY_FULL.to_string())
    {
        let message = body.as_ref().map(message_of).unwrap_or_default();
        return Err(retry(format!("code 1303: {message}"), false, true));
    }
    if status == 429 {
        return Err(retry("HTTP 429 rate limited".into(), false, true));
    }
    if status >= 500 {
        return Err(retry(format!("HTTP {status}"), true, false));
    }
    let Some(body) = body else {
        if (200..300).contains(&status) {
            return Err(retry(
                format!("HTTP {status} with an unreadable body"),
                true,
                false,
            ));
        }
        return Err(UpstreamError::Rejected {
            code: format!("http_{status}"),
            message: format!("upstream answered HTTP {status}"),
        });
    };
    let code = code_of(body).unwrap_or_else(|| "missing".into());
    let message = message_of(body);
    if code != "0" || !(200..300).contains(&status) {
        if is_duplicate_external_id(&message) {
            return Err(UpstreamError::DuplicateExternalId { message });
        }
        let code = if code == "0" || code == "missing" {
            format!("http_{status}")
        } else {
            code
        };
        return Err(UpstreamError::Rejected { code, message });
    }
    body.get("data").and_then(parse_task_data).ok_or_else(|| {
        retry(
            "accepted, but the answer has no readable task".into(),
            true,
            false,
        )
    })
}

pub fn classify_query(
    status: u16,
    retry_after: Option<Duration>,
    body: &Option<Value>,
) -> Result<Lookup, UpstreamError> {
    if let Some(b) = body {
        if is_task_not_exist(b) {
            return Ok(Lookup::NotExist);
        }
    }
    if (200..300).contains(&status) {
        if let Some(b) = body {
            if code_of(b).as_deref() == Some("0") {
                if let Some(report) = b.get("data").and_then(parse_task_data) {
                    return Ok(Lookup::Found(report));
                }
            }
        }
    }
    Err(UpstreamError::Retryable {
        reason: format!(
            "query answered HTTP {status}{}",
            body.as_ref()
                .map(|b| format!(" code {}", code_of(b).unwrap_or_default()))
                .unwrap_or_default()
        ),
        retry_after,
        maybe_sent: false,
        busy: status == 429,
    })
}

/// Reads a callback: the bare task object, or the same object inside a `{code, message, data}`
/// envelope. None when it is neither.
pub fn parse_callback(body: &Value) -> Option<UpstreamReport> {
    match body.get("data") {
        Some(data) if data.is_object() && body.get("task_status").is_none() => {
            parse_task_data(data)
        }
        _ => parse_task_data(body),
    }
}

fn text_or_number(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn millis(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Reads upstream's task object (`data` of a create or query answer, or a callback body).
pub fn parse_task_data(data: &Value) -> Option<UpstreamReport> {
    let status: UpstreamStatus = data.get("task_status")?.as_str()?.parse().ok()?;
    let images = data
        .get("task_result")
        .and_then(|r| r.get("images"))
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .enumerate()
                .filter_map(|(i, img)| {
                    let url = img.get("url")?.as_str()?.to_owned();
                    let index = img
                        .get("index")
                        .and_then(Value::as_u64)
                        .and_then(|x| u32::try_from(x).ok())
                        .unwrap_or(i as u32);
                    Some(ResultImage { index, url })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(UpstreamReport {
        task_id: text_or_number(data.get("task_id")),
        external_task_id: data
            .get("task_info")
            .and_then(|i| text_or_number(i.get("external_task_id"))),
        status,
        status_msg: data
            .get("task_status_msg")
            .and_then(Value::as_str)
            .map(str::to_owned),
        updated_at_ms: millis(data.get("updated_at")),
        images,
        raw: Some(data.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_answers_are_classified() {
        let ok = json!({"code": 0, "message": "SUCCEED", "data": {"task_id": 878106242831892487u64,
            "task_status": "submitted", "created_at": 1, "updated_at": 2}});
        let r = classify_create(200, None, &Some(ok)).unwrap();
        assert_eq!(r.task_id.as_deref(), Some("878106242831892487"));
        assert_eq!(r.status, UpstreamStatus::Submitted);

        let full = json!({"code": 1303, "message": "parallel task over resource pack limit"});
        assert!(matches!(
            classify_create(200, None, &Some(full)),
            Err(UpstreamError::Retryable {
                maybe_sent: false,
                ..
            })
        ));
        assert!(matches!(
            classify_create(502, None, &None),
            Err(UpstreamError::Retryable {
                maybe_sent: true,
                ..
            })
        ));
        let bad = json!({"code": 1201, "message": "invalid prompt"});
        assert_eq!(
            classify_create(200, None, &Some(bad)),
            Err(UpstreamError::Rejected {
                code: "1201".into(),
                message: "invalid prompt".into()
            })
        );
        let dup = json!({"code": 1201, "message": "external_task_id already exists"});
        assert!(matches!(
            classify_create(400, None, &Some(dup)),
            Err(UpstreamError::DuplicateExternalId { .. })
        ));
    }

    #[test]
    fn task_not_exist_is_recognised_in_code_or_message() {
        let a = json!({"code": "task_not_exist", "message": "task_not_exist", "data": null});
        assert_eq!(classify_query(400, None, &Some(a)), Ok(Lookup::NotExist));
        let b = json!({"code": 1203, "message": "task_not_exist"});
        assert_eq!(classify_query(200, None, &Some(b)), Ok(Lookup::NotExist));
    }

    #[test]
    fn callbacks_are_read_bare_or_enveloped() {
        let bare = json!({"task_id": "7", "task_status": "succeed", "updated_at": "5",
            "task_info": {"external_task_id": "e"},
            "task_result": {"images": [{"index": 1, "url": "u1"}, {"index": 0, "url": "u0"}]}});
        let r = parse_callback(&bare).unwrap();
        assert_eq!(r.updated_at_ms, Some(5));
        assert_eq!(r.images.len(), 2);
        let wrapped = json!({"code": 0, "message": "SUCCEED", "data": bare});
        assert_eq!(parse_callback(&wrapped), Some(r));
        assert!(parse_callback(&json!({"task_status": "weird"})).is_none());
    }
}

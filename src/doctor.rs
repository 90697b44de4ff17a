//! `kling-relay doctor`: whether this configuration works against the real upstream, found out
//! with calls that cost nothing. No valid create is ever sent: the path probe is a create with an
//! empty `subject_image_list` and no prompt, which every route refuses, and what the refusal
//! says tells a multi-image route from a text-to-image one (or from no route at all).
//!
//! Checks: the credentials (a query of a made-up id answers `task_not_exist` only to a key it
//! accepts), the create and query paths, the lookup by `external_task_id`, whether
//! `server.public_url` reaches this instance (a nonce left in the database, served by the running
//! service) and keeps a query string, and the clock against upstream's.
//!
//! Longer than 400 lines: each probe is a few dozen lines and they run, and read, top to bottom in
//! the order the report prints them.

use crate::config::{Settings, UpstreamProfile};
use crate::storage::Store;
use crate::upstream::classify::{self, classify_error, ErrorClass};
use crate::upstream::wire::{code_of, data_of, message_of};
use crate::upstream::{CometClient, ExternalLookup, RawAnswer, UpstreamError, Wire};
use reqwest::Method;
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub result: Verdict,
    pub detail: String,
    /// What to change; empty when nothing.
    pub advice: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub profile: &'static str,
    pub base_url: String,
    pub checks: Vec<Check>,
    /// Settings to use, as `key = value` lines for the config file.
    pub settings: Vec<String>,
}

fn check(
    check: &'static str,
    result: Verdict,
    detail: impl Into<String>,
    advice: impl Into<String>,
) -> Check {
    Check {
        check,
        result,
        detail: detail.into(),
        advice: advice.into(),
    }
}

fn made_up_id(what: &str) -> String {
    format!("klr-doctor-{what}-{}", uuid::Uuid::now_v7())
}

fn is_task_not_exist(a: &RawAnswer) -> bool {
    a.body.as_ref().is_some_and(classify::is_task_not_exist)
}

fn class_of(a: &RawAnswer) -> ErrorClass {
    let body = a.body.as_ref();
    let code = body.and_then(code_of);
    let message = body.map(message_of).unwrap_or_default();
    classify_error(a.status, code.as_deref(), &message)
}

fn summary(a: &RawAnswer) -> String {
    let body = a.body.as_ref();
    let code = body.and_then(code_of).unwrap_or_else(|| "-".into());
    let message = body.map(message_of).unwrap_or_default();
    format!(
        "HTTP {}, code {code}{}",
        a.status,
        if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        }
    )
}

fn transport(e: &UpstreamError) -> String {
    format!("no answer ({e})")
}

/// What a create path is, from its answer to an invalid create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteKind {
    MultiImage,
    TextToImage,
    Missing,
    /// The account cannot pay (1100-1102): upstream refused before looking at the route.
    Account,
    Unclear,
}

fn route_kind(a: &RawAnswer) -> RouteKind {
    let message = a
        .body
        .as_ref()
        .map(message_of)
        .unwrap_or_default()
        .to_ascii_lowercase();
    if message.contains("subject_image") {
        return RouteKind::MultiImage;
    }
    if message.contains("prompt") {
        return RouteKind::TextToImage;
    }
    match class_of(a) {
        ErrorClass::Halt(crate::domain::halt::HaltReason::Route) => RouteKind::Missing,
        ErrorClass::Halt(crate::domain::halt::HaltReason::Account) => RouteKind::Account,
        _ => RouteKind::Unclear,
    }
}

pub async fn run(settings: &Settings, store: Option<&Store>) -> Report {
    let wire = Wire::resolve(&settings.cometapi);
    let mut checks = Vec::new();
    let mut advised: Vec<String> = Vec::new();
    let client = match CometClient::new(
        wire.clone(),
        settings.cometapi.timeout.min(Duration::from_secs(20)),
    ) {
        Ok(c) => c,
        Err(e) => {
            checks.push(check(
                "client",
                Verdict::Fail,
                format!("cannot build an HTTP client: {e}"),
                "",
            ));
            return finish(&wire, checks, advised);
        }
    };
    checks.push(credentials(settings));

    // The key and the query path, with one free call.
    let probe = made_up_id("task");
    let query = client
        .raw(Method::GET, &wire.query_path_for(&probe), None)
        .await;
    let key_ok = key_and_query_path(&query, &wire, &mut checks);

    // The create path, and the others this API has, each with an invalid create.
    create_paths(&client, &wire, key_ok, &mut checks, &mut advised).await;
    if key_ok {
        external_lookup(&client, &wire, &mut checks, &mut advised).await;
    }
    checks.push(public_url(settings, store).await);
    checks.push(clock(&query, wire.profile));
    finish(&wire, checks, advised)
}

fn finish(wire: &Wire, checks: Vec<Check>, advised: Vec<String>) -> Report {
    let ok = checks.iter().all(|c| c.result != Verdict::Fail);
    Report {
        ok,
        profile: wire.profile.as_str(),
        base_url: wire.base_url.clone(),
        checks,
        settings: advised,
    }
}

fn credentials(settings: &Settings) -> Check {
    let c = &settings.cometapi;
    let missing = match c.profile {
        UpstreamProfile::Kling if c.access_key.is_empty() || c.secret_key.is_empty() => {
            Some("set KLING_ACCESS_KEY and KLING_SECRET_KEY (or cometapi.access_key / secret_key)")
        }
        UpstreamProfile::Kling => None,
        _ if c.api_key.is_empty() => Some("set COMETAPI_KEY (or cometapi.api_key)"),
        _ => None,
    };
    match missing {
        Some(advice) => check(
            "credentials",
            Verdict::Fail,
            "no credentials configured",
            advice,
        ),
        None => check("credentials", Verdict::Pass, "configured", ""),
    }
}

/// Returns whether upstream accepts the key.
fn key_and_query_path(
    query: &Result<RawAnswer, UpstreamError>,
    wire: &Wire,
    checks: &mut Vec<Check>,
) -> bool {
    let a = match query {
        Ok(a) => a,
        Err(e) => {
            checks.push(check(
                "key",
                Verdict::Fail,
                format!("{} does not answer: {}", wire.base_url, transport(e)),
                "check cometapi.base_url and this machine's outbound network",
            ));
            return false;
        }
    };
    if is_task_not_exist(a) {
        checks.push(check(
            "key",
            Verdict::Pass,
            "accepted (a made-up task id answers task_not_exist)",
            "",
        ));
        checks.push(check(
            "query_path",
            Verdict::Pass,
            format!("GET {} answers", wire.query_path),
            "",
        ));
        return true;
    }
    match class_of(a) {
        ErrorClass::Halt(reason) if reason != crate::domain::halt::HaltReason::Route => {
            checks.push(check(
                "key",
                Verdict::Fail,
                format!("refused ({})", summary(a)),
                reason.advice(),
            ));
            false
        }
        ErrorClass::Halt(_) => {
            checks.push(check(
                "key",
                Verdict::Warn,
                "not determined: the query path does not exist",
                "",
            ));
            checks.push(check(
                "query_path",
                Verdict::Fail,
                format!("GET {} is not a route ({})", wire.query_path, summary(a)),
                format!(
                    "set cometapi.query_path to \"{}/{{task_id}}\"",
                    wire.multi_image_path()
                ),
            ));
            // The key may still be fine; the create probe tells.
            true
        }
        _ => {
            checks.push(check(
                "key",
                Verdict::Warn,
                format!("unexpected answer to a query ({})", summary(a)),
                "",
            ));
            true
        }
    }
}

async fn create_paths(
    client: &CometClient,
    wire: &Wire,
    key_ok: bool,
    checks: &mut Vec<Check>,
    advised: &mut Vec<String>,
) {
    if !key_ok {
        checks.push(check(
            "create_path",
            Verdict::Warn,
            "not checked: the key is refused",
            "",
        ));
        return;
    }
    // Invalid on purpose: no subjects and no prompt, so no route can start a paid task.
    let body = json!({
        "subject_image_list": [],
        "model_name": wire.default_model,
        "external_task_id": made_up_id("create"),
    });
    let mut candidates = vec![wire.create_path.clone()];
    for p in [wire.multi_image_path(), wire.text_to_image_path()] {
        if !candidates.iter().any(|c| c == p) {
            candidates.push(p.to_owned());
        }
    }
    let mut kinds = Vec::new();
    for path in &candidates {
        let kind = match client.raw(Method::POST, path, Some(&body)).await {
            Ok(a) if a.body.as_ref().and_then(code_of).as_deref() == Some("0") => {
                // An empty subject list accepted: nothing we can reason about.
                checks.push(check(
                    "create_path",
                    Verdict::Fail,
                    format!(
                        "POST {path} accepted an empty subject_image_list ({})",
                        summary(&a)
                    ),
                    "report this upstream behaviour; do not dispatch against it",
                ));
                return;
            }
            Ok(a) => (route_kind(&a), summary(&a)),
            Err(e) => (RouteKind::Unclear, transport(&e)),
        };
        kinds.push((path.clone(), kind));
    }
    let multi = kinds
        .iter()
        .find(|(p, (k, _))| *k == RouteKind::MultiImage && *p != wire.create_path)
        .map(|(p, _)| p.clone());
    let (configured, (kind, said)) = &kinds[0];
    let use_multi = |advised: &mut Vec<String>| -> String {
        match &multi {
            Some(p) => {
                advised.push(format!("cometapi.create_path = \"{p}\""));
                advised.push(format!("cometapi.query_path = \"{p}/{{task_id}}\""));
                format!("use the multi-image route: cometapi.create_path = \"{p}\" (cometapi.profile = \"cometapi\" sends to multi-image2image)")
            }
            None => format!(
                "use the multi-image route {} (cometapi.profile = \"cometapi\" or \"kling\")",
                wire.multi_image_path()
            ),
        }
    };
    let result = match kind {
        RouteKind::MultiImage => check(
            "create_path",
            Verdict::Pass,
            format!("POST {configured} knows subject_image_list ({said})"),
            "",
        ),
        RouteKind::TextToImage => {
            let advice = use_multi(advised);
            check(
                "create_path",
                Verdict::Fail,
                format!("POST {configured} is the text-to-image route: it asks for a prompt and ignores subject_image_list ({said}); multi-image jobs sent there are refused or run as paid text-to-image jobs"),
                advice,
            )
        }
        RouteKind::Missing => {
            let advice = use_multi(advised);
            check("create_path", Verdict::Fail, format!("POST {configured} is not a route ({said})"), advice)
        }
        RouteKind::Account => check(
            "account",
            Verdict::Fail,
            format!("upstream refuses creates for the account ({said})"),
            crate::domain::halt::HaltReason::Account.advice(),
        ),
        RouteKind::Unclear => check(
            "create_path",
            Verdict::Warn,
            format!("POST {configured} refused the probe without naming subject_image_list or prompt ({said})"),
            "",
        ),
    };
    checks.push(result);
}

async fn external_lookup(
    client: &CometClient,
    wire: &Wire,
    checks: &mut Vec<Check>,
    advised: &mut Vec<String>,
) {
    let id = made_up_id("external");
    let by_query = client
        .raw(
            Method::GET,
            &format!("{}?external_task_id={id}", wire.create_path),
            None,
        )
        .await;
    let query_form = matches!(&by_query, Ok(a) if is_task_not_exist(a));
    let answered_list = matches!(&by_query, Ok(a) if a.body.as_ref().is_some_and(|b| code_of(b).as_deref() == Some("0") && data_of(b).is_none()));
    let result = match (wire.external_lookup, query_form) {
        (ExternalLookup::Query, true) => check(
            "external_lookup",
            Verdict::Pass,
            "GET <create_path>?external_task_id= answers (lost create answers are recovered by lookup)",
            "",
        ),
        (ExternalLookup::Query, false) => {
            check(
                "external_lookup",
                Verdict::Warn,
                format!(
                    "the ?external_task_id= form is not answered ({}); recovery still works through duplicate refusals and callbacks",
                    if answered_list { "a task list came back".to_owned() } else { by_query.as_ref().map(summary).unwrap_or_else(transport) }
                ),
                "try cometapi.external_lookup = \"path\" (Kling's form), or \"none\"",
            )
        }
        (ExternalLookup::Path, _) => check(
            "external_lookup",
            Verdict::Pass,
            "the id slot of the query path is used (Kling's form); a made-up id cannot confirm it, a real lost answer will",
            "",
        ),
        (ExternalLookup::None, true) => {
            advised.push("cometapi.external_lookup = \"query\"".into());
            check(
                "external_lookup",
                Verdict::Warn,
                "off, but upstream answers the ?external_task_id= form",
                "set cometapi.external_lookup = \"query\" so lost create answers are found at once",
            )
        }
        (ExternalLookup::None, false) => check("external_lookup", Verdict::Pass, "off", ""),
    };
    checks.push(result);
}

async fn public_url(settings: &Settings, store: Option<&Store>) -> Check {
    let base = settings.server.public_url.trim_end_matches('/');
    if base.is_empty() {
        return check(
            "public_url",
            Verdict::Warn,
            "server.public_url is empty: no callbacks, polling carries every task",
            "set server.public_url to the URL at which upstream reaches this service",
        );
    }
    let Some(store) = store else {
        return check(
            "public_url",
            Verdict::Warn,
            "not checked: the database cannot be opened",
            "",
        );
    };
    let nonce = uuid::Uuid::new_v4().to_string();
    let now = crate::service::now_ms();
    if let Err(e) = store.put_doctor_nonce(&nonce, now + 60_000).await {
        return check("public_url", Verdict::Warn, format!("not checked: {e}"), "");
    }
    let probe = format!("probe={}", uuid::Uuid::new_v4().simple());
    let url = format!("{base}/webhooks/doctor/{nonce}?{probe}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build();
    let answer = match http {
        Ok(h) => h.get(&url).send().await,
        Err(e) => Err(e),
    };
    let _ = store.delete_doctor_nonce(&nonce).await;
    let resp = match answer {
        Ok(r) => r,
        Err(e) => return check(
            "public_url",
            Verdict::Fail,
            format!("{base} does not answer ({})", e.without_url()),
            "start the service (kling-relay serve), then check that server.public_url points at it",
        ),
    };
    let status = resp.status().as_u16();
    let body: Option<Value> = resp.json().await.ok();
    let echoed = body
        .as_ref()
        .and_then(|b| b.get("nonce"))
        .and_then(Value::as_str)
        == Some(nonce.as_str());
    if status != 200 || !echoed {
        return check(
            "public_url",
            Verdict::Fail,
            format!("{base} answered HTTP {status}, but not as this instance"),
            "server.public_url must reach this service (the one on this database), not another server",
        );
    }
    let query = body
        .as_ref()
        .and_then(|b| b.get("query"))
        .and_then(Value::as_str);
    if query == Some(probe.as_str()) {
        check(
            "public_url",
            Verdict::Pass,
            "reaches this instance; a query string survives the trip",
            "",
        )
    } else {
        check(
            "public_url",
            Verdict::Warn,
            "reaches this instance, but the query string was dropped on the way (callbacks carry their token in the path, so they still land)",
            "",
        )
    }
}

fn clock(query: &Result<RawAnswer, UpstreamError>, profile: UpstreamProfile) -> Check {
    let Some(their) = query.as_ref().ok().and_then(|a| a.date_s) else {
        return check(
            "clock",
            Verdict::Warn,
            "upstream sent no Date header; skew unknown",
            "",
        );
    };
    let ours = crate::service::now_ms() / 1000;
    let skew = ours - their;
    // Kling's JWT is valid from 5 s before its making: a clock ahead by more fails it.
    let limit = if profile == UpstreamProfile::Kling {
        5
    } else {
        60
    };
    if skew.abs() <= limit {
        check(
            "clock",
            Verdict::Pass,
            format!("{skew:+} s against upstream"),
            "",
        )
    } else {
        check(
            "clock",
            if profile == UpstreamProfile::Kling {
                Verdict::Fail
            } else {
                Verdict::Warn
            },
            format!("{skew:+} s against upstream"),
            "synchronise this machine's clock (NTP)",
        )
    }
}

/// The report as a table for people.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "kling-relay doctor: profile {} at {}\n\n",
        r.profile, r.base_url
    );
    out.push_str(&format!(
        "{:<16} {:<6} {}\n",
        "CHECK", "RESULT", "DETAIL / WHAT TO CHANGE"
    ));
    for c in &r.checks {
        out.push_str(&format!(
            "{:<16} {:<6} {}\n",
            c.check,
            c.result.label(),
            c.detail
        ));
        if !c.advice.is_empty() {
            out.push_str(&format!("{:<16} {:<6} -> {}\n", "", "", c.advice));
        }
    }
    if !r.settings.is_empty() {
        out.push_str("\nSettings to use:\n");
        for s in &r.settings {
            out.push_str(&format!("  {s}\n"));
        }
    }
    out.push_str(if r.ok {
        "\nEvery check passed.\n"
    } else {
        "\nSome checks failed.\n"
    });
    out
}

//! The dashboard at `/ui`: server-rendered HTML (see `pages`) and one small script, both
//! compiled into the binary, so it works with no network beyond this service.
//!
//! Sign-in takes a client API key, checks it like the API does, and opens a server-side session
//! whose random id (never the key) goes in a cookie (`HttpOnly`, `SameSite=Strict`, `Secure`
//! behind https, no expiry: it ends with the browser session). The session ends on sign-out, when
//! its client is revoked, and after `auth.session_idle_timeout` / `auth.session_lifetime`. Every
//! page then sees exactly what that key sees through `/v1/`. With
//! `auth.required = false` no sign-in is needed and every task is shown. State-changing requests
//! (sign-out, replay, cancel) are POSTs that a cross-site page cannot make with the cookie
//! (`SameSite=Strict`) and whose `Origin`, when sent, must be this service.

mod actions;
mod charts;
mod notifications_page;
mod pages;
mod usage_page;

use super::cursor::{decode_cursor, encode_cursor};
use super::error::ApiError;
use super::AppState;
use crate::domain::client::Caller;
use crate::domain::usage::{Granularity, DAY_MS};
use crate::domain::TaskQuery;
use crate::domain::TaskStatus;
use crate::resource::TaskView;
use crate::service::usage::UsageQuery;
use crate::service::ServiceError;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use pages::{ListForm, TaskPage};

const COOKIE: &str = "klr_session";
const CSS: &str = include_str!("ui.css");
const JS: &str = include_str!("ui.js");
const PAGE_SIZE: i64 = 25;
/// Largest sign-in form read, in bytes.
const LOGIN_BODY_LIMIT: usize = 4096;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/tasks") }))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/overview", get(overview))
        .route("/ui/usage", get(usage))
        .route("/ui/tasks", get(task_list))
        .route("/ui/tasks/{id}", get(task_page))
        .route("/ui/tasks/{id}/images/{index}", get(image))
        .route("/ui/tasks/{id}/cancel", post(actions::cancel))
        .route("/ui/notifications", get(actions::notifications))
        .route("/ui/notifications/replay-dead", post(actions::replay_dead))
        .route(
            "/ui/tasks/{id}/deliveries/{delivery_id}/replay",
            post(actions::replay),
        )
        .route("/ui/assets/ui.css", get(|| asset(CSS, "text/css")))
        .route("/ui/assets/ui.js", get(|| asset(JS, "text/javascript")))
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Why a page was not shown.
enum UiError {
    /// No valid session: go and sign in.
    SignIn,
    /// A cross-site state-changing request.
    Forbidden,
    Api(Option<String>, ApiError),
}

impl From<ServiceError> for UiError {
    fn from(e: ServiceError) -> Self {
        UiError::Api(None, e.into())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        match self {
            UiError::SignIn => Redirect::to("/ui/login").into_response(),
            UiError::Forbidden => html(
                StatusCode::FORBIDDEN,
                pages::error_page(None, 403, "This request did not come from the dashboard."),
            ),
            UiError::Api(who, e) => {
                let status = e.status();
                html(
                    status,
                    pages::error_page(who.as_deref(), status.as_u16(), &e.to_string()),
                )
            }
        }
    }
}

fn html(status: StatusCode, page: maud::Markup) -> Response {
    let mut r = (status, Html(page.into_string())).into_response();
    // Pages carry the caller's data: never stored by shared caches, never framed.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut()
        .insert("x-frame-options", HeaderValue::from_static("DENY"));
    r.headers_mut().insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' https: http: data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
        ),
    );
    r
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The signed-in caller and the name the header shows.
async fn session(relay: &AppState, headers: &HeaderMap) -> Result<(Caller, String), UiError> {
    match relay.session_caller(cookie(headers, COOKIE)).await {
        Ok(Caller::Client(name)) => Ok((Caller::Client(name.clone()), name)),
        Ok(Caller::Anyone) => Ok((Caller::Anyone, "everyone (auth off)".into())),
        Err(ServiceError::Unauthorized) => Err(UiError::SignIn),
        Err(e) => Err(e.into()),
    }
}

/// A POST is refused when the browser says it came from another origin.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    url::Url::parse(origin).is_ok_and(|u| {
        let authority = match u.port() {
            Some(p) => format!("{}:{p}", u.host_str().unwrap_or("")),
            None => u.host_str().unwrap_or("").to_owned(),
        };
        authority.eq_ignore_ascii_case(host)
    })
}

async fn login_form() -> Response {
    html(StatusCode::OK, pages::login(None))
}

/// A sign-in form is a few bytes: a larger one is refused from its declared length, before
/// anything is read, and no more than `LOGIN_BODY_LIMIT` is ever read.
async fn login(
    State(relay): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    if !same_origin(&headers) {
        return UiError::Forbidden.into_response();
    }
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "a sign-in form is at most 4 KB",
        )
            .into_response()
    };
    if declared.is_some_and(|n| n > LOGIN_BODY_LIMIT) {
        return too_large();
    }
    let Ok(body) = axum::body::to_bytes(body, LOGIN_BODY_LIMIT).await else {
        return too_large();
    };
    let key = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "api_key")
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let refused = || {
        html(
            StatusCode::UNAUTHORIZED,
            pages::login(Some("That key is not valid (unknown or revoked).")),
        )
    };
    // Only characters a key can have: anything else is refused unread.
    let plausible = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !plausible {
        return refused();
    }
    let session = match relay.sign_in(&key).await {
        Ok(id) => id,
        Err(ServiceError::Unauthorized) => return refused(),
        Err(e) => return UiError::from(e).into_response(),
    };
    let secure = if relay.settings.server.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!("{COOKIE}={session}; Path=/ui; HttpOnly; SameSite=Strict{secure}");
    let mut r = Redirect::to("/ui/tasks").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(relay): State<AppState>, headers: HeaderMap) -> Response {
    if !same_origin(&headers) {
        return UiError::Forbidden.into_response();
    }
    if let Some(id) = cookie(&headers, COOKIE).filter(|id| !id.is_empty()) {
        if let Err(e) = relay.sign_out(id).await {
            // The session stays valid on the server: say so rather than pretend.
            return UiError::from(e).into_response();
        }
    }
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("klr_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// `YYYY-MM-DDTHH:MM[:SS]` from a datetime-local input, read as UTC.
fn parse_local_time(v: &str) -> Option<i64> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    let full = if v.len() == 16 {
        format!("{v}:00Z")
    } else {
        format!("{v}Z")
    };
    time::OffsetDateTime::parse(&full, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

async fn task_list(
    State(relay): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, UiError> {
    let (caller, who) = session(&relay, &headers).await?;
    let mut form = ListForm::default();
    let mut filter = TaskQuery {
        limit: PAGE_SIZE,
        ..TaskQuery::default()
    };
    let mut kept: Vec<(String, String)> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "status" => {
                if let Ok(s) = v.parse::<TaskStatus>() {
                    if !form.statuses.contains(&s) {
                        form.statuses.push(s);
                    }
                }
            }
            "created_after" => form.created_after = v.to_string(),
            "created_before" => form.created_before = v.to_string(),
            "q" => form.q = v.to_string(),
            "cursor" => filter.before = decode_cursor(&v),
            _ => continue,
        }
        if k != "cursor" {
            kept.push((k.to_string(), v.to_string()));
        }
    }
    filter.statuses = form.statuses.clone();
    filter.created_after_ms = parse_local_time(&form.created_after);
    filter.created_before_ms = parse_local_time(&form.created_before);
    filter.text = Some(form.q.trim().to_owned()).filter(|q| !q.is_empty());
    let tasks = relay.list(&caller, &filter).await?;
    let archive = relay.archive_records(&tasks).await?;
    let older = (tasks.len() as i64 == PAGE_SIZE)
        .then(|| tasks.last())
        .flatten()
        .map(|t| {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in &kept {
                q.append_pair(k, v);
            }
            q.append_pair("cursor", &encode_cursor(t.created_at_ms, &t.id));
            format!("/ui/tasks?{}", q.finish())
        });
    Ok(html(
        StatusCode::OK,
        pages::task_list(&who, &form, &tasks, &archive, older),
    ))
}

async fn task_page(
    State(relay): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, UiError> {
    let (caller, who) = session(&relay, &headers).await?;
    let with_who = |e: ServiceError| UiError::Api(Some(who.clone()), e.into());
    let task = relay.get(&caller, &id).await.map_err(with_who)?;
    let inputs = relay.input_summary(&caller, &id).await.unwrap_or_default();
    let archive = relay
        .archive_records(std::slice::from_ref(&task))
        .await
        .map_err(with_who)?;
    let events = relay.events(&caller, &id).await.map_err(with_who)?;
    let deliveries = relay.deliveries(&caller, &id).await.map_err(with_who)?;
    let raw_task =
        serde_json::to_string_pretty(&TaskView::from(task.clone()).with_archive(&archive))
            .unwrap_or_default();
    let said = |flag: &str| query.as_deref().is_some_and(|q| q.contains(flag));
    let notice = if said("replayed=1") {
        Some("Notification queued for another delivery.")
    } else if said("canceled=1") {
        Some("Task canceled: it was never sent upstream, and nothing was charged.")
    } else {
        None
    };
    let page = TaskPage {
        task: &task,
        inputs: &inputs,
        archive: &archive,
        events: &events,
        deliveries: &deliveries,
        raw_task,
        notice,
    };
    Ok(html(StatusCode::OK, pages::task_page(&who, &page)))
}

async fn overview(State(relay): State<AppState>, headers: HeaderMap) -> Result<Response, UiError> {
    let (caller, who) = session(&relay, &headers).await?;
    let o = relay.overview(&caller).await?;
    Ok(html(StatusCode::OK, pages::overview(&who, &o)))
}

async fn usage(State(relay): State<AppState>, headers: HeaderMap) -> Result<Response, UiError> {
    let (caller, who) = session(&relay, &headers).await?;
    let with_who = |e: ServiceError| UiError::Api(Some(who.clone()), e.into());
    let now = crate::service::now_ms();
    let today = Granularity::Day.floor(now);
    let q = UsageQuery {
        from_ms: today - 29 * DAY_MS,
        to_ms: today + DAY_MS,
        granularity: Granularity::Day,
    };
    let report = relay.usage(&caller, q).await.map_err(with_who)?;
    let budgets = match caller.scope() {
        Some(client) => relay.budget_standings(client).await.map_err(with_who)?,
        None => Vec::new(),
    };
    Ok(html(
        StatusCode::OK,
        usage_page::usage(&who, &report, &budgets),
    ))
}

async fn image(
    State(relay): State<AppState>,
    headers: HeaderMap,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, UiError> {
    let (caller, _) = session(&relay, &headers).await?;
    super::images::serve(&relay, &caller, &id, &index, &headers)
        .await
        .map_err(|e| UiError::Api(None, e))
}

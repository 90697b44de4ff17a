//! The dashboard's notifications view and its state-changing buttons: send a notification again
//! (one, or every dead one), cancel a task not yet sent. Each button is a POST from a form of
//! this service (see `same_origin`), then a redirect back with a notice.

use super::{html, notifications_page, same_origin, session, UiError};
use crate::http::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

/// Most notifications the view lists.
const TROUBLED_SHOWN: i64 = 200;

pub(super) async fn notifications(
    State(relay): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, UiError> {
    let (caller, who) = session(&relay, &headers).await?;
    let troubled = relay
        .troubled_deliveries(&caller, TROUBLED_SHOWN)
        .await
        .map_err(|e| UiError::Api(Some(who.clone()), e.into()))?;
    let notice = url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "replayed")
        .map(|(_, n)| match n.parse::<u64>() {
            Ok(1) => "1 notification queued for another delivery.".to_owned(),
            Ok(n) => format!("{n} notifications queued for another delivery."),
            Err(_) => "Notification queued for another delivery.".to_owned(),
        });
    Ok(html(
        StatusCode::OK,
        notifications_page::notifications(&who, &troubled, notice),
    ))
}

pub(super) async fn replay_dead(
    State(relay): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    if !same_origin(&headers) {
        return Err(UiError::Forbidden);
    }
    let (caller, who) = session(&relay, &headers).await?;
    let n = relay
        .retry_dead_deliveries(&caller)
        .await
        .map_err(|e| UiError::Api(Some(who), e.into()))?;
    Ok(Redirect::to(&format!("/ui/notifications?replayed={n}")).into_response())
}

pub(super) async fn replay(
    State(relay): State<AppState>,
    headers: HeaderMap,
    Path((id, delivery_id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, UiError> {
    if !same_origin(&headers) {
        return Err(UiError::Forbidden);
    }
    let (caller, who) = session(&relay, &headers).await?;
    relay
        .retry_delivery(&caller, &id, &delivery_id)
        .await
        .map_err(|e| UiError::Api(Some(who), e.into()))?;
    if query.as_deref() == Some("from=notifications") {
        return Ok(Redirect::to("/ui/notifications?replayed=1").into_response());
    }
    Ok(Redirect::to(&format!("/ui/tasks/{id}?replayed=1#deliveries")).into_response())
}

/// Cancels a task still waiting for dispatch; one already sent answers the API's 409 page.
pub(super) async fn cancel(
    State(relay): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    if !same_origin(&headers) {
        return Err(UiError::Forbidden);
    }
    let (caller, who) = session(&relay, &headers).await?;
    let task = relay
        .cancel(&caller, &id)
        .await
        .map_err(|e| UiError::Api(Some(who), e.into()))?;
    Ok(Redirect::to(&format!("/ui/tasks/{}?canceled=1", task.id)).into_response())
}

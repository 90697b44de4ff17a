//! `GET /v1/tasks/{id}/stream`: Server-Sent Events, one `status` event per status change (the
//! first is the task as it is now), closing after the final one.

use super::error::ApiError;
use super::AppState;
use crate::domain::client::Caller;
use crate::domain::TaskStatus;
use crate::resource::TaskView;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Extension;
use futures_util::stream::{self, Stream};
use std::convert::Infallible;
use std::time::Duration;

struct StreamState {
    recheck: tokio::time::Interval,
    relay: AppState,
    caller: Caller,
    id: String,
    changes: tokio::sync::broadcast::Receiver<String>,
    last: Option<TaskStatus>,
    done: bool,
}

/// Server-Sent Events: a `status` event (data: the task) now and at every change, closing after
/// the final one.
#[utoipa::path(get, path = "/v1/tasks/{id}/stream", tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "An event stream; each `status` event's data is the task", body = crate::resource::StatusEvent, content_type = "text/event-stream"),
        (status = 404, description = "No such task", body = crate::resource::Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn stream(
    State(relay): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Subscribe before the first read, so a change in between is not missed.
    let changes = relay.subscribe();
    relay.get(&caller, &id).await?;
    let recheck = relay.recheck_timer();
    let state = StreamState {
        recheck,
        relay,
        caller,
        id,
        changes,
        last: None,
        done: false,
    };
    let events = stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            if st.last.is_some() {
                let shutdown = st.relay.shutdown.clone();
                tokio::select! {
                    _ = st.relay.next_change_of(&mut st.changes, &st.id) => {}
                    // The service is stopping: end the stream; the client reconnects elsewhere.
                    _ = shutdown.cancelled() => return None,
                    // A revoked key's stream ends (a reconnect is then refused with a 401).
                    _ = st.recheck.tick() => {
                        match st.relay.still_authorized(&st.caller).await {
                            Ok(true) => continue,
                            Ok(false) | Err(_) => return None,
                        }
                    }
                }
            }
            let task = match st.relay.get(&st.caller, &st.id).await {
                Ok(t) => t,
                // The task vanished or the database failed: end the stream; the client reconnects.
                Err(_) => return None,
            };
            if st.last == Some(task.status) {
                continue;
            }
            st.last = Some(task.status);
            st.done = task.status.is_final();
            let archive = st
                .relay
                .archive_records(std::slice::from_ref(&task))
                .await
                .unwrap_or_default();
            let event = Event::default()
                .event("status")
                .id(task.version.to_string())
                .json_data(TaskView::from(task).with_archive(&archive))
                .unwrap_or_else(|_| Event::default().event("error"));
            return Some((Ok(event), st));
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

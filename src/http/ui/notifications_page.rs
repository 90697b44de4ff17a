//! The notifications view: every notification in trouble across the caller's tasks (dead,
//! disabled by a 410, or failing and waiting for its next attempt), with a replay button on each
//! and one that sends every dead one again.

use super::pages::{layout, relative_time, Nav};
use crate::domain::delivery::Delivery;
use maud::{html, Markup};

pub fn notifications(who: &str, troubled: &[Delivery], notice: Option<String>) -> Markup {
    let dead = troubled.iter().filter(|d| d.state == "dead").count();
    layout(
        "Notifications",
        Some(who),
        Nav::Notifications,
        html! {
            h1 { "Notifications in trouble" }
            @if let Some(n) = notice { p role="status" { (n) } }
            p.muted {
                "Notifications to your notify URLs that failed for good (dead), were refused with "
                code { "410" } " (disabled), or are failing and will be tried again. Delivered ones are on each task's page."
            }
            @if dead > 0 {
                form.replay-all method="post" action="/ui/notifications/replay-dead" {
                    button type="submit" { "Replay all dead (" (dead) ")" }
                }
            }
            @if troubled.is_empty() {
                p #no-trouble { "Every notification was delivered." }
            } @else {
                table.cards #troubled {
                    thead { tr {
                        th scope="col" { "State" } th scope="col" { "Event" } th scope="col" { "Task" }
                        th scope="col" { "URL" } th scope="col" { "Attempts" } th scope="col" { "Last answer" }
                        th scope="col" { "Created" } th scope="col" { span.visually-hidden { "Action" } }
                    } }
                    tbody {
                        @for d in troubled {
                            tr data-delivery=(d.id) data-state=(d.state) {
                                td data-label="State" { span class={ "badge " (state_class(&d.state)) } { (d.state) } }
                                td data-label="Event" { (d.event_status) }
                                td data-label="Task" { a href={ "/ui/tasks/" (d.task_id) "#deliveries" } { (d.task_id.get(..8).unwrap_or(&d.task_id)) "…" } }
                                td data-label="URL" { code { (d.url) } }
                                td data-label="Attempts" { (d.attempts) }
                                td data-label="Last answer" {
                                    @let code = d.last_status_code.map(|c| format!("HTTP {c}"));
                                    @if let Some(c) = &code { (c) }
                                    // The error often just repeats the status ("HTTP 500").
                                    @if let Some(e) = d.last_error.as_ref().filter(|e| Some(*e) != code.as_ref()) { " " (e) }
                                    @if d.last_status_code.is_none() && d.last_error.is_none() { "—" }
                                }
                                td data-label="Created" { (relative_time(d.created_at_ms)) }
                                td {
                                    form method="post" action={ "/ui/tasks/" (d.task_id) "/deliveries/" (d.id) "/replay?from=notifications" } {
                                        button.secondary type="submit" aria-label={ "Replay notification " (d.id) } { "Replay" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// Badge colours shared with task statuses: dead reads as failed, failing as running.
fn state_class(state: &str) -> &'static str {
    match state {
        "dead" => "failed",
        "disabled" => "canceled",
        _ => "processing",
    }
}

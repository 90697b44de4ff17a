//! The dashboard's HTML, server-rendered with maud. Every control has a label, status is shown
//! in words (colour only repeats it), and tables turn into cards on narrow screens.
//!
//! Longer than 400 lines: every dashboard page's markup, one function per page over shared pieces
//! (layout, tables, badges); a page that grows moves out, as usage, notifications and charts did.

use crate::domain::archive::{ArchiveState, ArchivedImage};
use crate::domain::delivery::Delivery;
use crate::domain::{InputImage, Task, TaskEvent, TaskStatus};
use crate::resource::rfc3339;
use crate::service::dashboard::Overview;
use maud::{html, Markup, DOCTYPE};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Tasks,
    Usage,
    Notifications,
    None,
}

pub fn layout(title: &str, who: Option<&str>, current: Nav, body: Markup) -> Markup {
    let here = |n: Nav| (current == n).then_some("page");
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · kling-relay" }
                link rel="stylesheet" href="/ui/assets/ui.css";
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "kling-relay" }
                    @if let Some(who) = who {
                        nav aria-label="Main" {
                            ul {
                                li { a href="/ui/overview" aria-current=[here(Nav::Overview)] { "Overview" } }
                                li { a href="/ui/tasks" aria-current=[here(Nav::Tasks)] { "Tasks" } }
                                li { a href="/ui/usage" aria-current=[here(Nav::Usage)] { "Usage" } }
                                li { a href="/ui/notifications" aria-current=[here(Nav::Notifications)] { "Notifications" } }
                            }
                        }
                        div.who {
                            span { "Signed in as " strong { (who) } }
                            form method="post" action="/ui/logout" {
                                button.secondary type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main tabindex="-1" { (body) }
                script src="/ui/assets/ui.js" defer {}
            }
        }
    }
}

pub fn login(error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        Nav::None,
        html! {
            form.login method="post" action="/ui/login" {
                h1 { "Sign in" }
                p.muted { "Use a client API key (from " code { "kling-relay clients create" } "). It is kept in this browser session only." }
                @if let Some(e) = error {
                    p.error role="alert" { (e) }
                }
                label for="api_key" { "API key"
                    input #api_key name="api_key" type="password" autocomplete="current-password" required autofocus;
                }
                button type="submit" { "Sign in" }
            }
        },
    )
}

pub fn error_page(who: Option<&str>, status: u16, message: &str) -> Markup {
    layout(
        "Error",
        who,
        Nav::None,
        html! {
            h1 { "Error " (status) }
            p role="alert" { (message) }
            p { a href="/ui/tasks" { "Back to tasks" } }
        },
    )
}

fn badge(status: TaskStatus) -> Markup {
    html! { span class={ "badge " (status.as_str()) } { (status.as_str().replace('_', " ")) } }
}

/// A time as people read it on a busy page ("3 min ago"), the exact UTC time on hover.
pub fn relative_time(ms: i64) -> Markup {
    time(ms)
}

fn time(ms: i64) -> Markup {
    let t = rfc3339(ms);
    let exact = format!("{} UTC", t.get(..19).unwrap_or(&t).replace('T', " "));
    html! { time datetime=(t) title=(exact) { (relative(crate::service::now_ms() - ms)) } }
}

/// `ago_ms` as "just now", "42 s ago", "5 min ago", "3 h ago", "2 days ago" (or "in …").
fn relative(ago_ms: i64) -> String {
    let secs = ago_ms.abs() / 1000;
    let amount = match secs {
        0..=4 => return "just now".into(),
        5..=59 => format!("{secs} s"),
        60..=3_599 => format!("{} min", secs / 60),
        3_600..=86_399 => format!("{} h", secs / 3_600),
        _ => match secs / 86_400 {
            1 => "1 day".into(),
            d => format!("{d} days"),
        },
    };
    if ago_ms < 0 {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

fn stored<'a>(archive: &'a [ArchivedImage], task: &str, index: u32) -> Option<&'a ArchivedImage> {
    archive
        .iter()
        .find(|a| a.task_id == task && a.index == index && a.state == ArchiveState::Stored)
}

/// The values the list's filter form shows (as typed).
#[derive(Default)]
pub struct ListForm {
    pub statuses: Vec<TaskStatus>,
    pub created_after: String,
    pub created_before: String,
    pub q: String,
}

pub fn task_list(
    who: &str,
    form: &ListForm,
    tasks: &[Task],
    archive: &[ArchivedImage],
    older: Option<String>,
) -> Markup {
    let running = tasks.iter().any(|t| !t.status.is_final());
    layout(
        "Tasks",
        Some(who),
        Nav::Tasks,
        html! {
            h1 { "Tasks" }
            form.filters method="get" action="/ui/tasks" role="search" {
                fieldset {
                    legend { "Status" }
                    @for s in TaskStatus::ALL {
                        label.check {
                            input type="checkbox" name="status" value=(s.as_str()) checked[form.statuses.contains(&s)];
                            (s.as_str().replace('_', " "))
                        }
                    }
                }
                label { "Created after (UTC)"
                    input type="datetime-local" name="created_after" value=(form.created_after);
                }
                label { "Created before (UTC)"
                    input type="datetime-local" name="created_before" value=(form.created_before);
                }
                label { "Search prompt and metadata"
                    input type="search" name="q" value=(form.q);
                }
                button type="submit" { "Filter" }
                a href="/ui/tasks" { "Clear" }
            }
            div data-refresh=(if running { "running" } else { "idle" }) aria-live="polite" {
                @if tasks.is_empty() {
                    p.muted { "No tasks match." }
                } @else {
                    table.cards #tasks {
                        caption { "Newest first" @if running { " · running tasks refresh by themselves" } }
                        thead { tr { th scope="col" { "Status" } th scope="col" { "Created" } th scope="col" { "Prompt" } th scope="col" { "Images" } th scope="col" { "Task" } } }
                        tbody {
                            @for t in tasks {
                                tr data-task=(t.id) data-status=(t.status.as_str()) {
                                    td data-label="Status" {
                                        (badge(t.status))
                                        @if let Some(e) = &t.error {
                                            div.reason title=(e.message) { code { (e.code) } " " (truncate(&e.message, 60)) }
                                        }
                                    }
                                    td data-label="Created" { (time(t.created_at_ms)) }
                                    td data-label="Prompt" { (t.prompt.as_deref().map(|p| truncate(p, 80)).unwrap_or_default()) }
                                    td data-label="Images" {
                                        div.thumbs {
                                            @for img in &t.images {
                                                @if stored(archive, &t.id, img.index).is_some() {
                                                    img src={ "/ui/tasks/" (t.id) "/images/" (img.index) } alt={ "Result image " (img.index + 1) } loading="lazy" width="56" height="56";
                                                }
                                            }
                                            @if t.images.is_empty() { span.muted { "—" } }
                                        }
                                    }
                                    td data-label="Task" { a href={ "/ui/tasks/" (t.id) } { "Open " span.muted { (short_id(&t.id)) } } }
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(href) = older {
                p.pager { a href=(href) rel="next" { "Older tasks →" } }
            }
        },
    )
}

/// JSON text, indented (as stored when it does not parse).
fn pretty(raw: &str) -> String {
    serde_json::from_str::<serde_json::Value>(raw)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| raw.to_owned())
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

fn short_id(id: &str) -> &str {
    id.get(id.len().saturating_sub(8)..).unwrap_or(id)
}

/// The URL, if it is an absolute http(s) URL.
fn web_url(raw: &str) -> Option<&str> {
    url::Url::parse(raw)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .map(|_| raw)
}

fn input_label(input: &InputImage, position: usize) -> String {
    match input.role.as_str() {
        "scene" => "Scene image".to_owned(),
        "style" => "Style image".to_owned(),
        _ => format!("Subject image {}", position + 1),
    }
}

/// "PNG 1024×1024, 7.5 MB (Base64)": what a Base64 input was, without its bytes.
fn base64_description(input: &InputImage) -> String {
    let bytes = input.base64_bytes.unwrap_or(0);
    let size = if bytes >= 1_000_000 {
        format!("{:.1} MB", bytes as f64 / 1_000_000.0)
    } else {
        format!("{:.1} KB", bytes as f64 / 1000.0)
    };
    match (&input.format, input.width, input.height) {
        (Some(f), Some(w), Some(h)) => format!("{} {w}×{h}, {size} (Base64)", f.to_uppercase()),
        _ => format!("{size} (Base64)"),
    }
}

pub struct TaskPage<'a> {
    pub task: &'a Task,
    pub inputs: &'a [InputImage],
    pub archive: &'a [ArchivedImage],
    pub events: &'a [TaskEvent],
    pub deliveries: &'a [Delivery],
    pub raw_task: String,
    pub notice: Option<&'a str>,
}

pub fn task_page(who: &str, p: &TaskPage<'_>) -> Markup {
    let t = p.task;
    let running = !t.status.is_final();
    layout(
        &format!("Task {}", short_id(&t.id)),
        Some(who),
        Nav::Tasks,
        html! {
            p { a href="/ui/tasks" { "← All tasks" } }
            div data-refresh=(if running { "running" } else { "idle" }) aria-live="polite" {
                h1 { "Task " (t.id) " " (badge(t.status)) }
                @if let Some(n) = p.notice { p role="status" { (n) } }
                @if t.status == TaskStatus::Pending {
                    form.cancel method="post" action={ "/ui/tasks/" (t.id) "/cancel" } {
                        button type="submit" { "Cancel task" }
                        span.muted { " Not sent upstream yet: canceling costs nothing." }
                    }
                }
                dl.facts {
                    dt { "Status" } dd { (t.status.as_str()) @if let Some(u) = &t.upstream_status { span.muted { " (upstream: " (u) ")" } } }
                    @if let Some(e) = &t.error { dt { "Error" } dd.error { code { (e.code) } " " (e.message) } }
                    dt { "Model" } dd { (t.model_name) }
                    dt { "Images requested" } dd { (t.n) }
                    dt { "Aspect ratio" } dd { (t.aspect_ratio.as_deref().unwrap_or("default")) }
                    dt { "Created" } dd { (time(t.created_at_ms)) }
                    dt { "Updated" } dd { (time(t.updated_at_ms)) }
                    @if let Some(c) = t.completed_at_ms { dt { "Completed" } dd { (time(c)) } }
                    dt { "Upstream task" } dd { (t.upstream_task_id.as_deref().unwrap_or("—")) }
                    dt { "external_task_id" } dd { (t.external_task_id) }
                }
                h2 { "Prompt" }
                p { (t.prompt.as_deref().unwrap_or("(none)")) }
                h2 { "Results" }
                @if t.images.is_empty() {
                    p.muted { "No result images yet." }
                } @else {
                    div.full #results {
                        @for img in &t.images {
                            @let ours = stored(p.archive, &t.id, img.index);
                            @let state = p.archive.iter().find(|a| a.index == img.index);
                            figure {
                                // Upstream's URLs are shown as links and images only when they are
                                // http(s): a `javascript:` or `file:` URL is text, nothing more.
                                @let web = web_url(&img.url);
                                @let src = if ours.is_some() { Some(format!("/ui/tasks/{}/images/{}", t.id, img.index)) } else { web.map(str::to_owned) };
                                @if let Some(src) = src { img src=(src) alt={ "Result image " (img.index + 1) }; }
                                figcaption {
                                    "Image " (img.index + 1) " · "
                                    @match state {
                                        Some(a) => { "archive: " (a.state.as_str()) @if let Some(e) = &a.error { " (" (e) ")" } }
                                        None => { "not archived" }
                                    }
                                    @match web {
                                        Some(u) => { " · " a href=(u) { "upstream URL" } }
                                        None => { " · upstream URL (not http): " code { (img.url) } }
                                    }
                                }
                            }
                        }
                    }
                }
                h2 { "Timeline" }
                table.cards #timeline {
                    thead { tr { th scope="col" { "When" } th scope="col" { "Source" } th scope="col" { "Status" } th scope="col" { "Upstream" } th scope="col" { "Detail" } } }
                    tbody {
                        @for e in p.events {
                            tr {
                                td data-label="When" { (time(e.at_ms)) }
                                td data-label="Source" { (e.source) }
                                td data-label="Status" { (e.status) }
                                td data-label="Upstream" { (e.upstream_status.as_deref().unwrap_or("")) }
                                td data-label="Detail" { (e.detail.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
            @if !p.inputs.is_empty() {
                h2 { "Inputs" }
                div.thumbs #inputs {
                    @for (i, input) in p.inputs.iter().enumerate() {
                        @let label = input_label(input, i);
                        @match input.url.as_deref().and_then(web_url) {
                            Some(url) => a href=(url) { img src=(url) alt=(label); },
                            None => span.input-b64 title=(label) {
                                (label) ": " (base64_description(input))
                                @if p.task.status == TaskStatus::Pending { " (kept until dispatch)" }
                                @else { " (not kept once sent upstream)" }
                            },
                        }
                    }
                }
            }
            h2 #deliveries { "Notifications" }
            @if p.deliveries.is_empty() {
                p.muted { "No notifications for this task." }
            } @else {
                table.cards {
                    thead { tr { th scope="col" { "Event" } th scope="col" { "To" } th scope="col" { "State" } th scope="col" { "Attempts" } th scope="col" { "Last answer" } th scope="col" { span.skip { "Actions" } } } }
                    tbody {
                        @for d in p.deliveries {
                            tr data-delivery=(d.id) {
                                td data-label="Event" { (d.event_status) }
                                td data-label="To" { (d.url) }
                                td data-label="State" { (d.state) }
                                td data-label="Attempts" { (d.attempts) }
                                td data-label="Last answer" {
                                    @if let Some(c) = d.last_status_code { "HTTP " (c) }
                                    @if let Some(e) = &d.last_error { " " (e) }
                                }
                                td {
                                    form method="post" action={ "/ui/tasks/" (t.id) "/deliveries/" (d.id) "/replay" } {
                                        button type="submit" aria-label={ "Replay the " (d.event_status) " notification" } { "Replay" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Raw data" }
            details #raw-task {
                summary { "The task as the API returns it (JSON)" }
                pre { code { (p.raw_task) } }
            }
            @for (i, e) in p.events.iter().enumerate() {
                @if let Some(raw) = &e.upstream_payload {
                    details.upstream-payload id={ "payload-" (i) } {
                        summary { "What upstream sent: " (e.source) ", " (e.upstream_status.as_deref().unwrap_or(&e.status)) ", " (time(e.at_ms)) }
                        pre { code { (pretty(raw)) } }
                    }
                }
            }
        },
    )
}

pub fn overview(who: &str, o: &Overview) -> Markup {
    let total: i64 = o.status_counts.iter().map(|(_, n)| n).sum();
    let pct = |n: i64, of: i64| {
        if of > 0 {
            (n * 100 / of).clamp(0, 100)
        } else {
            0
        }
    };
    layout(
        "Overview",
        Some(who),
        Nav::Overview,
        html! {
            h1 { "Overview" }
            // Always current: the region is fetched again every few seconds (ui.js).
            div data-refresh="running" aria-live="polite" {
            @if let Some(h) = &o.halted {
                div #halted.banner role="alert" {
                    strong { "Dispatch is halted (" (h.reason.as_str()) ")." }
                    " Upstream answered " code { (h.upstream_code) } ": " (h.message) ". "
                    (h.reason.advice()) ". Every task waits; none fails. Upstream is asked again "
                    "at a backoff, and dispatch resumes by itself once it accepts."
                }
            }
            h2 { "Tasks in the last 24 hours" }
            @if total == 0 {
                p.muted { "No tasks in the last 24 hours." }
            } @else {
                table #status-counts {
                    caption { (total) @if total == 1 { " task" } @else { " tasks" } }
                    thead { tr { th scope="col" { "Status" } th scope="col" { "Tasks" } th scope="col" { "Share" } } }
                    tbody {
                        @for s in TaskStatus::ALL {
                            @let n = o.status_counts.iter().find(|(k, _)| k == s.as_str()).map_or(0, |(_, n)| *n);
                            @if n > 0 {
                                tr {
                                    td { (badge(s)) }
                                    td { (n) }
                                    // SVG attributes, not an inline style: the Content Security Policy
                                    // blocks inline styles, which drew every bar full width.
                                    td { svg.share role="img" aria-label={ (pct(n, total)) " percent" } viewBox="0 0 100 10" preserveAspectRatio="none" {
                                        rect.track x="0" y="0" width="100" height="10" {}
                                        rect.fill x="0" y="0" width=(pct(n, total)) height="10" {}
                                    } }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Over time" }
            (super::charts::finished_per_minute(&o.finished_per_minute, o.now_ms))
            (super::charts::units(&o.units_history, o.now_ms))
            (super::charts::durations(&o.durations))
            h2 { "Upstream concurrency" }
            p #units {
                label for="units-meter" { (o.units_in_flight) " of " (o.working_limit) " units in flight" }
                " "
                meter #units-meter min="0" max=(o.working_limit.max(1)) value=(o.units_in_flight) {}
                @if o.working_limit < o.max_units {
                    span.muted { " (limit lowered from " (o.max_units) " after upstream said it was full)" }
                }
            }
            p { (o.pending) " tasks waiting for dispatch." }
            @if !o.clients.is_empty() {
                h2 { "Clients sharing the account" }
                table #clients {
                    thead { tr { th scope="col" { "Client" } th scope="col" { "Units in use" } th scope="col" { "Tasks waiting" } th scope="col" { "Share of the last hour" } } }
                    tbody {
                        @for c in &o.clients {
                            tr {
                                td { (c.client.as_deref().unwrap_or("(no client)")) }
                                td { (c.units_in_use) }
                                td { (c.tasks_waiting) }
                                td { (format!("{:.0} %", c.share_last_hour * 100.0)) }
                            }
                        }
                    }
                }
            }
            h2 { "Failure reasons (last 24 hours)" }
            @if o.failure_reasons.is_empty() {
                p.muted { "No failures." }
            } @else {
                table #failures {
                    thead { tr { th scope="col" { "Code" } th scope="col" { "Example message" } th scope="col" { "Tasks" } } }
                    tbody {
                        @for (code, message, n) in &o.failure_reasons {
                            tr { td { code { (code) } } td { (message) } td { (n) } }
                        }
                    }
                }
            }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::relative;

    #[test]
    fn times_read_relative() {
        assert_eq!(relative(1_000), "just now");
        assert_eq!(relative(42_000), "42 s ago");
        assert_eq!(relative(5 * 60_000 + 10), "5 min ago");
        assert_eq!(relative(3 * 3_600_000), "3 h ago");
        assert_eq!(relative(86_400_000), "1 day ago");
        assert_eq!(relative(3 * 86_400_000), "3 days ago");
        assert_eq!(relative(-90_000), "in 1 min");
    }
}

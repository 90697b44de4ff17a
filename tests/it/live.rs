//! Issue 4: live updates — long-poll with `?wait=` and the SSE stream wake within 100 ms of a
//! committed status change (measured here, asserted with slack).

use crate::common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The slack over the 100 ms goal: a loaded 2-core CI machine runs these beside other tests.
const WAKE_LIMIT: Duration = Duration::from_millis(300);

fn upstream_id(t: &Value) -> String {
    t["upstream_task_id"]
        .as_str()
        .expect("upstream id")
        .to_owned()
}

fn far_future(step: i64) -> i64 {
    4_000_000_000_000 + step
}

async fn long_poll_wakes_on_a_status_change(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let id = app.submit_ok(&valid_body()).await;
    let t = app.task(&id).await;
    assert_eq!(t["status"], "submitted");

    let http = app.http.clone();
    let url = format!("{}/v1/tasks/{id}?wait=20&status_not=submitted", app.base);
    let waiter = tokio::spawn(async move {
        let r = http.get(url).send().await.expect("long-poll");
        let answered = Instant::now();
        (answered, r.json::<Value>().await.expect("json"))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "still waiting before any change");
    let (status, _) = app
        .post_callback(
            &app.callback_url(&id),
            &callback(&upstream_id(&t), "processing", far_future(1)),
        )
        .await;
    let committed = Instant::now();
    assert_eq!(status, 200);
    let (answered, task) = waiter.await.unwrap();
    let latency = answered.saturating_duration_since(committed);
    eprintln!("long-poll woke {latency:?} after the change was committed");
    assert_eq!(task["status"], "processing");
    assert!(latency < WAKE_LIMIT, "woke after {latency:?}");
}

async fn long_poll_edges(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let id = app.submit_ok(&valid_body()).await;
    // No change: answers when the wait ends, with the task as it is.
    let start = Instant::now();
    let (status, t) = app.get_json(&format!("/v1/tasks/{id}?wait=1")).await;
    assert_eq!(status, 200);
    assert_eq!(t["status"], "submitted");
    assert!(start.elapsed() >= Duration::from_millis(900));
    // Already different from status_not: at once.
    let start = Instant::now();
    let (_, t) = app
        .get_json(&format!("/v1/tasks/{id}?wait=30&status_not=pending"))
        .await;
    assert_eq!(t["status"], "submitted");
    assert!(start.elapsed() < Duration::from_secs(1));
    // Final: at once, whatever status_not says.
    let upstream = upstream_id(&t);
    app.post_callback(
        &app.callback_url(&id),
        &callback(&upstream, "succeed", far_future(2)),
    )
    .await;
    let start = Instant::now();
    let (_, t) = app
        .get_json(&format!("/v1/tasks/{id}?wait=30&status_not=succeeded"))
        .await;
    assert_eq!(t["status"], "succeeded");
    assert!(start.elapsed() < Duration::from_secs(1));
    for bad in [
        "wait=61",
        "wait=-1",
        "wait=soon",
        "status_not=done",
        "wait=1&x=2",
    ] {
        let (status, _) = app.get_json(&format!("/v1/tasks/{id}?{bad}")).await;
        assert_eq!(status, 400, "{bad}");
    }
}

/// Reads SSE events (`event:` + `data:` blocks) from a streaming response.
struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

impl SseReader {
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = e.trim().to_owned();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                if event.is_empty() {
                    continue; // keep-alive comment
                }
                return Some((event, serde_json::from_str(&data).ok()?));
            }
            let chunk = self.resp.chunk().await.ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

async fn sse_streams_each_change_and_closes_after_the_final_one(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let id = app.submit_ok(&valid_body()).await;
    let upstream = upstream_id(&app.task(&id).await);
    let resp = app
        .http
        .get(format!("{}/v1/tasks/{id}/stream", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut sse = SseReader {
        resp,
        buf: String::new(),
    };
    let (event, first) = sse.next().await.expect("first event");
    assert_eq!(event, "status");
    assert_eq!(first["status"], "submitted");

    let mut latencies = Vec::new();
    for (step, (upstream_status, ours)) in [("processing", "processing"), ("succeed", "succeeded")]
        .into_iter()
        .enumerate()
    {
        let (status, _) = app
            .post_callback(
                &app.callback_url(&id),
                &callback(&upstream, upstream_status, far_future(step as i64 + 1)),
            )
            .await;
        let committed = Instant::now();
        assert_eq!(status, 200);
        let (_, task) = tokio::time::timeout(Duration::from_secs(5), sse.next())
            .await
            .expect("event in time")
            .expect("event");
        latencies.push(committed.elapsed());
        assert_eq!(task["status"], ours);
    }
    eprintln!("SSE events arrived {latencies:?} after their changes were committed");
    assert!(latencies.iter().all(|l| *l < WAKE_LIMIT), "{latencies:?}");
    // The stream ends after the final status.
    let end = tokio::time::timeout(Duration::from_secs(5), sse.next()).await;
    assert!(matches!(end, Ok(None)), "stream closed");
}

on_both_backends!(
    long_poll_wakes_on_a_status_change,
    long_poll_edges,
    sse_streams_each_change_and_closes_after_the_final_one,
);

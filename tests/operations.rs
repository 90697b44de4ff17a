//! Issue 5: running it like production — health and readiness, request ids, and the problem+json
//! answers for bodies too large, requests too slow and methods not allowed.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

async fn health_and_readiness(b: Backend) {
    let app = TestApp::spawn(b).await;
    for (path, body) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let r = app
            .anonymous
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} needs no key");
        assert_eq!(r.text().await.unwrap(), body);
    }
    // A migration this binary expects is missing: not ready, with the reason, and nothing about
    // the configuration.
    app.db
        .exec("DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)")
        .await;
    let r = app
        .anonymous
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let text = r.text().await.unwrap();
    assert!(text.contains("migration"), "{text}");
    for secret in [app.db.url.as_str(), app.sim.api_key(), WEBHOOK_SECRET] {
        assert!(!text.contains(secret), "readyz leaks {secret}");
    }
    let r = app
        .anonymous
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "alive all the same");
}

async fn request_ids_are_returned(b: Backend) {
    let app = TestApp::spawn(b).await;
    let r = app
        .http
        .get(format!("{}/v1/tasks", app.base))
        .send()
        .await
        .unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let r = app
        .http
        .get(format!("{}/v1/tasks/nope", app.base))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.headers()["x-request-id"],
        "trace-me-42",
        "kept when given"
    );
}

async fn limits_answer_in_problem_json(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| {
                s.server.max_body_bytes = 4096;
                s.server.request_timeout = Duration::from_millis(300);
            }),
            ..Options::stalled()
        },
    )
    .await;
    let mut big = valid_body();
    big["prompt"] = Value::String("x".repeat(5000));
    let r = app.submit(&big).await;
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], 413);

    let id = app.submit_ok(&valid_body()).await;
    let r = app
        .http
        .get(format!("{}/v1/tasks/{id}?wait=5", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 408);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    let r = app
        .http
        .delete(format!("{}/v1/tasks", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

on_both_backends!(
    health_and_readiness,
    request_ids_are_returned,
    limits_answer_in_problem_json,
);

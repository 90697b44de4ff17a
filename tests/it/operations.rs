//! Issue 5: running it like production — health and readiness, request ids, and the problem+json
//! answers for bodies too large, requests too slow and methods not allowed.

use crate::common::*;
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
    let text = problem(r, 503).await.to_string();
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
    // The submit's request id travels upstream with the create call.
    let r = app
        .http
        .post(format!("{}/v1/tasks", app.base))
        .header("x-request-id", "submit-77")
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-request-id"], "submit-77");
    assert_eq!(
        app.sim.stats().last_create_request_id.as_deref(),
        Some("submit-77")
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
    let v = problem(r, 413).await;
    assert_eq!(v["status"], 413);

    let id = app.submit_ok(&valid_body()).await;
    let r = app
        .http
        .get(format!("{}/v1/tasks/{id}?wait=5", app.base))
        .send()
        .await
        .unwrap();
    problem(r, 408).await;

    let r = app
        .http
        .delete(format!("{}/v1/tasks", app.base))
        .send()
        .await
        .unwrap();
    problem(r, 405).await;
}

async fn metrics_cover_the_service_with_low_cardinality_labels(b: Backend) {
    let app = TestApp::spawn(b).await;
    let rx = crate::common::receiver::Receiver::start().await;
    app.sim.set_faults(kling_relay::simulator::Faults {
        drop_callbacks: 0.5,
        ..Default::default()
    });
    let mut body = valid_body();
    body["notify_url"] = Value::String(rx.url("/hook"));
    let id = app.submit_ok(&body).await;
    app.wait_for_status(&id, "succeeded", Duration::from_secs(15))
        .await;
    // A rejected callback, for the intake counters.
    let (status, _) = app
        .post_callback(
            &format!("{}/webhooks/cometapi/{id}?token=bad", app.base),
            &callback("1", "succeed", 1),
        )
        .await;
    assert_eq!(status, 401);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let r = app
        .anonymous
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "no key needed");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for series in [
        r#"klr_http_requests_total{method="POST",route="/v1/tasks",status="202"}"#,
        r#"klr_http_request_duration_seconds_bucket{method="POST",route="/v1/tasks""#,
        r#"klr_tasks{status="pending"}"#,
        r#"klr_task_status_changes_total{status="succeeded""#,
        r#"klr_webhooks_total{outcome="rejected_token"}"#,
        r#"klr_upstream_requests_total{endpoint="create",result="accepted"}"#,
        r#"klr_upstream_request_duration_seconds_bucket{endpoint="create""#,
        "klr_dispatch_units_in_flight ",
        "klr_dispatch_working_limit ",
        "klr_dispatch_pending ",
        "klr_notification_backlog ",
        r#"klr_notification_attempts_total{result="delivered"}"#,
        "# HELP klr_webhooks_total",
        r#"klr_units_deducted_total{client="tester",model="kling-v2-1"}"#,
        r#"klr_units_reserved{client="tester"}"#,
        // Batch sizes in counts, not in the latency buckets.
        r#"klr_group_commit_batch_size_bucket{le="1"}"#,
        r#"klr_group_commit_batch_size_bucket{le="256"}"#,
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
    // Route templates, never ids.
    assert!(text.contains(r#"route="/v1/tasks/{id}""#));
    assert!(!text.contains(&id), "a task id in a label");
}

async fn metrics_can_have_their_own_listener(b: Backend) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(move |s| s.server.metrics_listen = format!("127.0.0.1:{port}")),
            ..Options::default()
        },
    )
    .await;
    let r = app
        .anonymous
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "not on the main listener");
    let r = app
        .anonymous
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("klr_dispatch_working_limit"));
}

async fn openapi_document_and_docs_describe_every_route(b: Backend) {
    let app = TestApp::spawn(b).await;
    let r = app
        .anonymous
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let expected = [
        ("post", "/v1/tasks"),
        ("get", "/v1/tasks"),
        ("get", "/v1/tasks/{id}"),
        ("get", "/v1/tasks/{id}/events"),
        ("get", "/v1/tasks/{id}/images/{index}"),
        ("post", "/v1/tasks/{id}/cancel"),
        ("get", "/v1/tasks/{id}/stream"),
        ("get", "/v1/tasks/{id}/deliveries"),
        ("post", "/v1/tasks/{id}/deliveries/{delivery_id}/retry"),
        ("get", "/v1/status"),
        ("get", "/v1/usage"),
        ("post", "/webhooks/cometapi/{id}"),
        ("post", "/webhooks/cometapi/{id}/{token}"),
        ("get", "/webhooks/doctor/{nonce}"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/docs"),
    ];
    let documented: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(documented, expected.len(), "no route more, no route less");
    for (method, path) in expected {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} undocumented");
        assert!(!op["responses"].as_object().unwrap().is_empty());
        if path.starts_with("/v1/") {
            assert_eq!(
                op["security"][0]["api_key"],
                serde_json::json!([]),
                "{path} secured"
            );
            assert!(op["responses"]["401"].is_object(), "{path} documents 401");
        }
        // The documented route exists: whatever it answers, it is not "no such route".
        let url = format!(
            "{}{}",
            app.base,
            path.replace("{id}", "01a20bc5-f578-76a2-b699-4633fad7e034")
                .replace("{delivery_id}", "msg_x")
        );
        let req = if method == "post" {
            app.http.post(&url)
        } else {
            app.http.get(&url)
        };
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = if path.ends_with("/stream") {
            String::new()
        } else {
            resp.text().await.unwrap_or_default()
        };
        assert!(
            status != 405 && !text.contains("no such route"),
            "{method} {path}: {status} {text}"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );
    for schema in [
        "TaskView",
        "TaskRequest",
        "Problem",
        "TaskPage",
        "DeliveryView",
    ] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
    let html = app
        .anonymous
        .get(format!("{}/docs", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.starts_with("<!doctype html>"));
    for path in [
        "/v1/tasks/{id}/deliveries",
        "/webhooks/cometapi/{id}",
        "schema-TaskView",
    ] {
        assert!(html.contains(path), "/docs lacks {path}");
    }
    // Interactive, and offline: its script and style come from this service, nothing else.
    assert!(html.contains("<script defer src=\"/docs/docs.js\">"));
    assert!(html.contains("<nav id=\"toc\""));
    for attr in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
        assert!(
            !html.contains(attr),
            "/docs loads something from elsewhere: {attr}"
        );
    }
    for (asset, kind, needle) in [
        ("/docs/docs.js", "text/javascript", "Try it"),
        ("/docs/docs.css", "text/css", "details.try"),
    ] {
        let r = app
            .anonymous
            .get(format!("{}{asset}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{asset}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with(kind), "{asset}: {ct}");
        let text = r.text().await.unwrap();
        assert!(text.contains(needle), "{asset}");
        assert!(
            !text.contains("https://cdn") && !text.contains("unpkg"),
            "{asset}"
        );
    }
    // A `servers` entry, and images described as bytes, not as an array of integers.
    assert_eq!(doc["servers"][0]["url"], "/");
    let image =
        &doc["paths"]["/v1/tasks/{id}/images/{index}"]["get"]["responses"]["200"]["content"];
    for media in ["image/png", "image/jpeg"] {
        assert_eq!(image[media]["schema"]["type"], "string", "{image}");
        assert_eq!(image[media]["schema"]["format"], "binary", "{image}");
    }
}

/// How the account is shared: `/v1/status`, the metrics and the dashboard's overview show, per
/// client, the units its tasks hold, the tasks it has waiting, and its share of the last hour.
async fn status_shows_how_clients_share_the_account(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.cometapi.max_concurrency = 4),
            ..Options::stalled()
        },
    )
    .await;
    // Two tasks of 2 units fill the account; the other team's task waits.
    app.submit_ok(&valid_body()).await;
    app.submit_ok(&valid_body()).await;
    let other = create_client(&app.db, "other-team").await;
    let other_http = client_with_key(&other.api_key);
    let r = other_http
        .post(format!("{}/v1/tasks", app.base))
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let (status, v) = app.get_json("/v1/status").await;
    assert_eq!(status, 200, "{v}");
    let clients = v["clients"].as_array().expect("clients");
    let row = |name: &str| {
        clients
            .iter()
            .find(|c| c["client"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {v}"))
            .clone()
    };
    let tester = row("tester");
    assert_eq!(
        (
            tester["units_in_use"].as_i64(),
            tester["tasks_waiting"].as_i64()
        ),
        (Some(4), Some(0))
    );
    let theirs = row("other-team");
    assert_eq!(
        (
            theirs["units_in_use"].as_i64(),
            theirs["tasks_waiting"].as_i64()
        ),
        (Some(0), Some(1))
    );
    assert_eq!(tester["share_last_hour"].as_f64(), Some(1.0), "{v}");
    assert_eq!(theirs["share_last_hour"].as_f64(), Some(0.0));

    // The registry is shared by this binary's tests, which set the same gauges: look until a
    // scrape of this service shows its own figures.
    wait_until(Duration::from_secs(5), || async {
        let metrics = app.get_text_anonymously("/metrics").await;
        metrics.contains("klr_client_units_in_use{client=\"tester\"} 4")
            && metrics.contains("klr_client_tasks_waiting{client=\"other-team\"} 1")
    })
    .await;
}

/// The dashboard overview's charts read the database on both backends: tasks finished per
/// minute, with their table.
async fn overview_charts_read_both_backends(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.auth.required = false),
            ..Options::default()
        },
    )
    .await;
    for _ in 0..2 {
        let id = app.submit_ok(&valid_body()).await;
        app.wait_for_status(&id, "succeeded", Duration::from_secs(20))
            .await;
    }
    let page = app.get_text_anonymously("/ui/overview").await;
    let table = page
        .split("<table id=\"finished-table\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no chart table: {page}"));
    let table = table.split("</table>").next().unwrap_or_default();
    let succeeded: i64 = table
        .split("<tr>")
        .skip(2)
        .map(|r| {
            r.split("<td>")
                .nth(2)
                .and_then(|c| c.split("</td>").next())
                .and_then(|c| c.parse::<i64>().ok())
                .unwrap_or_else(|| panic!("row {r}"))
        })
        .sum();
    assert_eq!(succeeded, 2, "{table}");
    assert!(page.contains("id=\"duration-table\""));
}

on_both_backends!(
    overview_charts_read_both_backends,
    status_shows_how_clients_share_the_account,
    openapi_document_and_docs_describe_every_route,
    metrics_cover_the_service_with_low_cardinality_labels,
    metrics_can_have_their_own_listener,
    health_and_readiness,
    request_ids_are_returned,
    limits_answer_in_problem_json,
);

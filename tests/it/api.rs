//! The REST API and the webhook receiver from the outside: validation, errors, history paging,
//! and callback authentication, on SQLite and on Postgres.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;

const PNG_B64: &str = PNG_300;

fn error_fields(v: &Value) -> Vec<String> {
    v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_owned())
        .collect()
}

async fn task_count(app: &TestApp) -> usize {
    let (_, v) = app.get_json("/v1/tasks?limit=200").await;
    v["tasks"].as_array().unwrap().len()
}

async fn every_validation_rule_is_enforced_and_nothing_is_stored(b: Backend) {
    let app = TestApp::spawn(b).await;
    let big = "A".repeat(10 * 1024 * 1024 / 3 * 4 + 400);
    let with = |patch: Value| {
        let mut v = valid_body();
        for (k, val) in patch.as_object().unwrap() {
            v[k] = val.clone();
        }
        v
    };
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({}), vec!["subject_image_list"]),
        (
            with(json!({"subject_image_list": []})),
            vec!["subject_image_list"],
        ),
        (
            with(json!({"subject_image_list": [
            {"subject_image": "https://e.x/1.png"}, {"subject_image": "https://e.x/2.png"},
            {"subject_image": "https://e.x/3.png"}, {"subject_image": "https://e.x/4.png"},
            {"subject_image": "https://e.x/5.png"}]})),
            vec!["subject_image_list"],
        ),
        (
            with(json!({"subject_image_list": "nope"})),
            vec!["subject_image_list"],
        ),
        (
            with(
                json!({"subject_image_list": [{"subject_image": "https://e.x/a.png"}, {"subject_image": 5}]}),
            ),
            vec!["subject_image_list[1].subject_image"],
        ),
        (
            with(
                json!({"subject_image_list": [{"subject_image": "https://e.x/a.png"}, {"image": "https://e.x/a.png"}]}),
            ),
            vec![
                "subject_image_list[1].image",
                "subject_image_list[1].subject_image",
            ],
        ),
        (
            with(
                json!({"subject_image_list": [{"subject_image": "https://e.x/a.png"}, {"subject_image": format!("data:image/png;base64,{PNG_B64}")}]}),
            ),
            vec!["subject_image_list[1].subject_image"],
        ),
        (
            with(
                json!({"subject_image_list": [{"subject_image": "https://e.x/a.png"}, {"subject_image": big}]}),
            ),
            vec!["subject_image_list[1].subject_image"],
        ),
        (
            with(
                json!({"subject_image_list": [{"subject_image": "https://e.x/a.png"}, {"subject_image": "!!not base64!!"}]}),
            ),
            vec!["subject_image_list[1].subject_image"],
        ),
        (with(json!({"prompt": "x".repeat(2501)})), vec!["prompt"]),
        (
            with(json!({"negative_prompt": "x".repeat(2501)})),
            vec!["negative_prompt"],
        ),
        (
            with(json!({"watermark_info": true})),
            vec!["watermark_info"],
        ),
        (with(json!({"prompt": 7})), vec!["prompt"]),
        (with(json!({"n": 0})), vec!["n"]),
        (with(json!({"n": 10})), vec!["n"]),
        (with(json!({"n": 1.5})), vec!["n"]),
        (with(json!({"aspect_ratio": "5:4"})), vec!["aspect_ratio"]),
        (with(json!({"model_name": ""})), vec!["model_name"]),
        (
            with(json!({"scene_image": "ftp://e.x/a.png"})),
            vec!["scene_image"],
        ),
        (
            with(json!({"scence_image": "data:image/png;base64,xx"})),
            vec!["scence_image"],
        ),
        (
            with(json!({"scene_image": "https://e.x/s.png", "scence_image": "https://e.x/s.png"})),
            vec!["scene_image"],
        ),
        (with(json!({"style_image": ""})), vec!["style_image"]),
        (with(json!({"metadata": "text"})), vec!["metadata"]),
        (
            with(json!({"metadata": {"k": "v".repeat(4100)}})),
            vec!["metadata"],
        ),
        (
            with(json!({"callback_url": "https://evil.example/"})),
            vec!["callback_url"],
        ),
        (
            with(json!({"colour": "red", "size": 3})),
            vec!["colour", "size"],
        ),
        (json!([1, 2]), vec![""]),
    ];
    for (body, want) in cases {
        let r = app.submit(&body).await;
        let v = problem(r, 422).await;
        let mut got = error_fields(&v);
        got.sort();
        let mut want: Vec<String> = want.into_iter().map(str::to_owned).collect();
        want.sort();
        assert_eq!(
            got,
            want,
            "body {}",
            body.to_string().chars().take(200).collect::<String>()
        );
    }

    // Every failing field in one answer.
    let r = app
        .submit(&json!({"subject_image_list": [], "n": 99, "aspect_ratio": "x", "extra": 1}))
        .await;
    let v = problem(r, 422).await;
    assert_eq!(error_fields(&v).len(), 4);

    // Not JSON, or not declared as JSON.
    let r = app
        .http
        .post(format!("{}/v1/tasks", app.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    problem(r, 400).await;
    let r = app
        .http
        .post(format!("{}/v1/tasks", app.base))
        .header("content-type", "text/plain")
        .body(valid_body().to_string())
        .send()
        .await
        .unwrap();
    problem(r, 415).await;

    assert_eq!(task_count(&app).await, 0, "nothing stored");
    assert_eq!(app.sim.stats().create_calls, 0, "nothing dispatched");
}

async fn base64_inputs_upstream_would_refuse_are_refused_before_they_cost_anything(b: Backend) {
    let app = TestApp::spawn(b).await;
    for (image, rule) in [
        (PNG_1PX, "at least 300 px"),
        (PNG_TOO_WIDE, "aspect ratio"),
        ("aGVsbG8gd29ybGQ=", "JPEG or PNG"),
    ] {
        let body = json!({"subject_image_list": [{"subject_image": PNG_300}, {"subject_image": image}],
            "style_image": image});
        let v = problem(app.submit(&body).await, 422).await;
        let errors = v["errors"].as_array().unwrap();
        let mut fields = error_fields(&v);
        fields.sort();
        assert_eq!(
            fields,
            ["style_image", "subject_image_list[1].subject_image"]
        );
        for e in errors {
            assert!(e["message"].as_str().unwrap().contains(rule), "{e}");
        }
    }
    assert_eq!(task_count(&app).await, 0, "nothing stored");
    assert_eq!(app.sim.stats().create_calls, 0, "nothing sent");
}

async fn valid_variants_are_accepted_and_forwarded(b: Backend) {
    let app = TestApp::spawn(b).await;
    let body = json!({
        "subject_image_list": [{"subject_image": PNG_B64}, {"subject_image": "https://e.x/b.png"},
                               {"subject_image": "https://e.x/c.png"}, {"subject_image": "https://e.x/d.png"}],
        "scence_image": "https://e.x/scene.png",
        "style_image": PNG_B64,
        "n": 9,
        "aspect_ratio": "21:9",
        "negative_prompt": "blurry",
        "watermark_info": {"enabled": true},
        "metadata": {"order": 42, "tags": ["a", "b"]}
    });
    let r = app.submit(&body).await;
    assert_eq!(r.status(), 202);
    // Forwarded under today's names: the scene image as `scene_image`.
    let sent = app.sim.stats().last_create_body.expect("a create was sent");
    assert_eq!(sent["scene_image"], "https://e.x/scene.png");
    assert!(sent.get("scence_image").is_none());
    assert_eq!(sent["negative_prompt"], "blurry");
    assert_eq!(sent["watermark_info"], json!({"enabled": true}));
    assert_eq!(sent["model_name"], "kling-v2-1");
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["metadata"], json!({"order": 42, "tags": ["a", "b"]}));
    assert!(t["prompt"].is_null());
    let id = t["id"].as_str().unwrap();
    let done = app
        .wait_for_status(id, "succeeded", Duration::from_secs(15))
        .await;
    assert_eq!(done["images"].as_array().unwrap().len(), 9);
    assert_eq!(done["aspect_ratio"], "21:9");
}

async fn unknown_ids_and_routes_answer_404(b: Backend) {
    let app = TestApp::spawn(b).await;
    let unknown = uuid::Uuid::now_v7();
    for path in [
        format!("/v1/tasks/{unknown}"),
        format!("/v1/tasks/{unknown}/events"),
        "/v1/tasks/not-a-uuid".to_owned(),
        "/v1/nothing".to_owned(),
    ] {
        let r = app
            .http
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        problem(r, 404).await;
    }
    // A callback with a valid token for a task we do not have.
    let (status, _) = app
        .post_callback(
            &app.callback_url(&unknown.to_string()),
            &callback("1", "succeed", 1),
        )
        .await;
    assert_eq!(status, 404);
}

async fn history_filters_and_cursor_paging_while_tasks_arrive(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(app.submit_ok(&valid_body()).await);
    }
    let cut = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(5)).await;
    for _ in 0..5 {
        ids.push(app.submit_ok(&valid_body()).await);
    }

    // Page through with limit 4 while new tasks keep arriving: every task that existed when
    // paging began is seen exactly once, newest first.
    let before: HashSet<String> = ids.iter().cloned().collect();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/tasks?limit=4&cursor={c}"),
            None => "/v1/tasks?limit=4".to_owned(),
        };
        let (status, page) = app.get_json(&path).await;
        assert_eq!(status, 200, "{page}");
        for t in page["tasks"].as_array().unwrap() {
            seen.push(t["id"].as_str().unwrap().to_owned());
        }
        app.submit_ok(&valid_body()).await; // a newer task, behind the cursor
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no task repeated");
    assert_eq!(unique, before, "no task skipped");
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    // Status filter: fail one task through its callback, then find exactly that one.
    let failed = app.submit_ok(&valid_body()).await;
    let upstream = app.task(&failed).await["upstream_task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let far_future = i64::MAX / 4;
    let (status, _) = app
        .post_callback(
            &app.callback_url(&failed),
            &callback(&upstream, "failed", far_future),
        )
        .await;
    assert_eq!(status, 200);
    let (_, v) = app.get_json("/v1/tasks?status=failed").await;
    let got: Vec<&str> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![failed.as_str()]);
    let (_, v) = app.get_json("/v1/tasks?status=succeeded,failed").await;
    assert_eq!(v["tasks"].as_array().unwrap().len(), 1);
    let (_, v) = app.get_json("/v1/tasks?status=succeeded").await;
    assert!(v["tasks"].as_array().unwrap().is_empty());
    let (_, v) = app
        .get_json("/v1/tasks?status=submitted&status=processing&limit=200")
        .await;
    assert!(v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["status"] == "submitted" || t["status"] == "processing"));
    assert!(v["tasks"].as_array().unwrap().len() >= 17);

    // Time filters.
    let cut = cut
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (_, v) = app
        .get_json(&format!("/v1/tasks?created_before={cut}&limit=200"))
        .await;
    let older: HashSet<String> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(older, ids[..12].iter().cloned().collect::<HashSet<_>>());
    let (_, v) = app
        .get_json(&format!("/v1/tasks?created_after={cut}&limit=200"))
        .await;
    assert!(v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| !older.contains(t["id"].as_str().unwrap())));

    // Bad parameters.
    for q in [
        "limit=0",
        "limit=201",
        "limit=ten",
        "status=done",
        "created_after=yesterday",
        "cursor=garbage",
        "colour=red",
    ] {
        let r = app
            .http
            .get(format!("{}/v1/tasks?{q}", app.base))
            .send()
            .await
            .unwrap();
        problem(r, 400).await;
    }
}

async fn webhook_requires_a_valid_token_and_a_matching_task(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let id = app.submit_ok(&valid_body()).await;
    let other = app.submit_ok(&valid_body()).await;
    let t = app.task(&id).await;
    assert_eq!(t["status"], "submitted");
    let upstream = t["upstream_task_id"].as_str().unwrap().to_owned();
    let good = app.callback_url(&id);
    // Upstream timestamps are milliseconds, later than the create answer's.
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 1000;
    let body = callback(&upstream, "succeed", t0 + 10);

    let bare = format!("{}/webhooks/cometapi/{id}", app.base);
    let wrong = format!("{bare}?token=AAAA");
    let foreign = app.callback_url(&other).replace(&other, &id);
    for url in [bare.clone(), wrong, format!("{bare}/AAAA"), foreign] {
        let r = app.http.post(&url).json(&body).send().await.unwrap();
        problem(r, 401).await;
    }
    // A token for another task does not open this one.
    let (status, _) = app
        .post_callback(&app.callback_url(&other).replace(&other, &id), &body)
        .await;
    assert_eq!(status, 401);

    // Right token, wrong content: refused, nothing stored.
    let r = app
        .http
        .post(&good)
        .header("content-type", "application/json")
        .body("{broken")
        .send()
        .await
        .unwrap();
    problem(r, 400).await;
    let r = app
        .http
        .post(&good)
        .header("content-type", "text/plain")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    problem(r, 415).await;
    let (status, _) = app
        .post_callback(
            &good,
            &json!({"task_id": upstream, "task_status": "exploded"}),
        )
        .await;
    assert_eq!(status, 400);
    // A payload naming another upstream task (a gateway renamed it, or it is not ours): not
    // applied, noted on the timeline, and the task is polled instead.
    let (status, v) = app
        .post_callback(&good, &callback("999999", "succeed", 10))
        .await;
    assert_eq!((status, v["outcome"].as_str()), (200, Some("polling")));
    let mut foreign_ext = callback(&upstream, "succeed", 10);
    foreign_ext["task_info"] = json!({"external_task_id": "someone-else"});
    let (status, v) = app.post_callback(&good, &foreign_ext).await;
    assert_eq!((status, v["outcome"].as_str()), (200, Some("polling")));
    assert_eq!(
        app.task(&id).await["status"],
        "submitted",
        "nothing changed"
    );
    let events = app.events(&id).await;
    assert_eq!(
        statuses(&events),
        ["pending", "submitted", "submitted", "submitted"]
    );
    assert!(
        events[2]["detail"].as_str().unwrap().contains("polling"),
        "{events:?}"
    );

    // The real thing (by the older query-string form of the URL, still accepted), then a
    // duplicate, then a stale one.
    let (status, v) = app
        .post_callback(
            &app.callback_url_query_form(&id),
            &callback(&upstream, "processing", t0 + 5),
        )
        .await;
    assert_eq!((status, v["outcome"].as_str()), (200, Some("applied")));
    let (_, v) = app
        .post_callback(&good, &callback(&upstream, "processing", t0 + 5))
        .await;
    assert_eq!(v["outcome"], "duplicate");
    let (_, v) = app
        .post_callback(&good, &callback(&upstream, "submitted", t0 + 4))
        .await;
    assert_eq!(v["outcome"], "stale");
    let enveloped =
        json!({"code": 0, "message": "SUCCEED", "data": callback(&upstream, "succeed", t0 + 10)});
    let (_, v) = app.post_callback(&good, &enveloped).await;
    assert_eq!(v["outcome"], "applied");
    let (_, v) = app
        .post_callback(&good, &callback(&upstream, "failed", t0 + 20))
        .await;
    assert_eq!(v["outcome"], "already_final");
    let t = app.task(&id).await;
    assert_eq!(t["status"], "succeeded");
    assert_eq!(t["images"][0]["url"], "https://cdn.example/0.png");
    assert_eq!(
        statuses(&app.events(&id).await),
        [
            "pending",
            "submitted",
            "submitted",
            "submitted",
            "processing",
            "succeeded"
        ]
    );
}

async fn a_database_failure_answers_5xx_and_stores_nothing(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let id = app.submit_ok(&valid_body()).await;
    let upstream = app.task(&id).await["upstream_task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Break the database under the running service: the event insert of any change now fails,
    // so its transaction must roll back.
    app.db.exec("DROP TABLE task_events").await;
    let t0 = i64::MAX / 4;
    let (status, v) = app
        .post_callback(&app.callback_url(&id), &callback(&upstream, "succeed", t0))
        .await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(
        app.task(&id).await["status"],
        "submitted",
        "nothing committed"
    );
}

async fn the_largest_valid_request_is_accepted(b: Backend) {
    let app = TestApp::spawn(b).await;
    // Six images (4 subjects, scene, style) of just under 10 MB each, as Base64.
    let png = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, PNG_B64).unwrap();
    let mut bytes = png.clone();
    bytes.resize(10 * 1024 * 1024 - 16, 0);
    let big = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes);
    let body = json!({
        "subject_image_list": [{"subject_image": big}, {"subject_image": big},
                               {"subject_image": big}, {"subject_image": big}],
        "scene_image": big,
        "style_image": big,
        "prompt": "p".repeat(2500),
    });
    let r = app.submit(&body).await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_for_status(&id, "succeeded", Duration::from_secs(30))
        .await;
}

/// `Prefer: respond-async` (RFC 7240) answers once the task is stored, before its dispatch;
/// `Prefer: wait=N` waits at most N seconds; without either, the answer waits for the dispatch.
async fn prefer_respond_async_answers_once_stored(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.dispatch.wait = Duration::from_secs(5)),
            ..Options::stalled()
        },
    )
    .await;
    // Creates take 1.5 s upstream.
    app.sim.set_faults(kling_relay::simulator::Faults {
        create_delay_ms: 1_500,
        ..Default::default()
    });
    let post = |prefer: Option<&'static str>| {
        let (http, url) = (app.http.clone(), format!("{}/v1/tasks", app.base));
        async move {
            let mut req = http.post(url).json(&valid_body());
            if let Some(p) = prefer {
                req = req.header("prefer", p);
            }
            let started = std::time::Instant::now();
            let r = req.send().await.unwrap();
            (r, started.elapsed())
        }
    };
    let (r, took) = post(Some("respond-async")).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["preference-applied"], "respond-async");
    assert!(
        took < Duration::from_millis(1_000),
        "answered before the dispatch: {took:?}"
    );
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["status"], "pending");
    // The answer is the task as stored (built without reading it back): what a read shows,
    // but for what the dispatch, under way by now, may have changed since.
    let read = app.task(t["id"].as_str().unwrap()).await;
    let (answered, stored) = (t.as_object().unwrap(), read.as_object().unwrap());
    assert_eq!(
        answered.keys().collect::<Vec<_>>(),
        stored.keys().collect::<Vec<_>>()
    );
    for (k, v) in answered {
        if !["status", "updated_at", "dispatch_attempts", "version"].contains(&k.as_str()) {
            assert_eq!(v, &stored[k], "{k}");
        }
    }
    // It is dispatched all the same.
    app.wait_for_status(
        t["id"].as_str().unwrap(),
        "submitted",
        Duration::from_secs(10),
    )
    .await;

    let (r, took) = post(Some("wait=1, foo=bar")).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["preference-applied"], "wait=1");
    assert!(took < Duration::from_millis(1_450), "{took:?}");

    let (r, took) = post(None).await;
    assert!(r.headers().get("preference-applied").is_none());
    assert!(
        took >= Duration::from_millis(1_400),
        "waited for the dispatch: {took:?}"
    );
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["status"], "submitted");
}

/// Every problem+json names its kind in a stable `type`, so clients can branch on it.
async fn problem_types_are_stable_per_kind(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let kind = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        (status, v["type"].as_str().unwrap_or_default().to_owned())
    };
    let url = format!("{}/v1/tasks", app.base);
    let cases = [
        (
            app.http.post(&url).json(&json!({"n": 99})),
            422,
            "/problems/validation",
        ),
        (
            app.http
                .post(&url)
                .header("content-type", "application/json")
                .body("{"),
            400,
            "/problems/bad-request",
        ),
        (
            app.http
                .post(&url)
                .header("content-type", "text/plain")
                .body("{}"),
            415,
            "/problems/unsupported-media-type",
        ),
        (
            app.http.get(format!("{url}/{}", uuid::Uuid::now_v7())),
            404,
            "/problems/not-found",
        ),
        (app.anonymous.get(&url), 401, "/problems/unauthorized"),
    ];
    for (req, status, want) in cases {
        assert_eq!(
            kind(req.send().await.unwrap()).await,
            (status, want.to_owned())
        );
    }
}

on_both_backends!(
    problem_types_are_stable_per_kind,
    prefer_respond_async_answers_once_stored,
    every_validation_rule_is_enforced_and_nothing_is_stored,
    base64_inputs_upstream_would_refuse_are_refused_before_they_cost_anything,
    valid_variants_are_accepted_and_forwarded,
    unknown_ids_and_routes_answer_404,
    history_filters_and_cursor_paging_while_tasks_arrive,
    webhook_requires_a_valid_token_and_a_matching_task,
    a_database_failure_answers_5xx_and_stores_nothing,
    the_largest_valid_request_is_accepted,
);

//! Hostile input (fault test 4): arbitrary bytes and JSON as webhook and submit bodies never
//! panic, never answer 5xx and never change state unless valid; arbitrary sequences of upstream
//! events never move a task backwards and never change a final task; oversized bodies, deep
//! nesting, invalid UTF-8, huge numbers and wrong content types get a clear 4xx.

use crate::common::*;
use kling_relay::domain::{
    apply_report, ResultImage, TaskState, TaskStatus, Transition, UpstreamReport, UpstreamStatus,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use std::time::Duration;

const MAX_BODY: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Strategies

/// Any JSON value, up to a few levels deep, with keys the service reads mixed in.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        any::<String>().prop_map(Value::String),
        prop_oneof![
            Just("succeed"),
            Just("failed"),
            Just("processing"),
            Just("submitted"),
            Just("https://example.com/a.png"),
            Just("data:image/png;base64,iVBORw0KGgo="),
            Just(""),
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            Just("task_id".to_owned()),
            Just("task_status".to_owned()),
            Just("updated_at".to_owned()),
            Just("data".to_owned()),
            Just("code".to_owned()),
            Just("task_result".to_owned()),
            Just("images".to_owned()),
            Just("subject_image_list".to_owned()),
            Just("subject_image".to_owned()),
            Just("prompt".to_owned()),
            Just("n".to_owned()),
            Just("metadata".to_owned()),
            Just("notify_url".to_owned()),
            any::<String>(),
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A callback that is nearly right: real field names, values from anywhere.
fn arb_callback(upstream_id: String) -> impl Strategy<Value = Value> {
    let task_id = prop_oneof![
        3 => Just(json!(upstream_id)),
        1 => Just(json!("someone-elses-task")),
        1 => arb_json(),
    ];
    let status = prop_oneof![
        4 => Just(json!("submitted")),
        4 => Just(json!("processing")),
        1 => Just(json!("succeed")),
        1 => Just(json!("failed")),
        2 => arb_json(),
    ];
    let updated_at = prop_oneof![
        any::<i64>().prop_map(|n| json!(n)),
        Just(json!("1700000000000")),
        Just(json!(1e300)),
        arb_json(),
    ];
    let images = prop::collection::vec((arb_json(), arb_json()), 0..4).prop_map(|v| {
        Value::Array(
            v.into_iter()
                .map(|(i, u)| json!({"index": i, "url": u}))
                .collect(),
        )
    });
    (task_id, status, updated_at, images, any::<bool>()).prop_map(
        |(task_id, status, updated_at, images, envelope)| {
            let data = json!({
                "task_id": task_id,
                "task_status": status,
                "updated_at": updated_at,
                "task_result": {"images": images},
            });
            if envelope {
                json!({"code": 0, "message": "SUCCEED", "data": data})
            } else {
                data
            }
        },
    )
}

/// A submit that is nearly right.
fn arb_submit() -> impl Strategy<Value = Value> {
    let image = prop_oneof![
        4 => Just(json!("https://example.com/a.png")),
        4 => Just(json!("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg==")),
        1 => arb_json(),
    ];
    (
        prop::collection::vec(image, 0..6),
        prop_oneof![3 => Just(json!("a cat")), 1 => arb_json()],
        prop_oneof![2 => Just(json!(1)), 2 => Just(json!(9)), 1 => arb_json()],
        prop_oneof![3 => Just(Value::Null), 1 => arb_json()],
    )
        .prop_map(|(images, prompt, n, extra)| {
            let list: Vec<Value> = images
                .into_iter()
                .map(|i| json!({"subject_image": i}))
                .collect();
            let mut v = json!({"subject_image_list": list, "prompt": prompt, "n": n});
            if !extra.is_null() {
                v["metadata"] = extra;
            }
            v
        })
}

/// A body as bytes: raw garbage, any JSON, or a near-valid document.
fn arb_body(near_valid: BoxedStrategy<Value>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        arb_json().prop_map(|v| v.to_string().into_bytes()),
        near_valid.prop_map(|v| v.to_string().into_bytes()),
    ]
}

fn arb_content_type() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        6 => Just(Some("application/json")),
        1 => Just(Some("application/json; charset=utf-8")),
        1 => Just(Some("text/plain")),
        1 => Just(Some("application/x-www-form-urlencoded")),
        1 => Just(None),
    ]
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Runs an async property on the test's runtime (proptest itself is synchronous).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

async fn hostile_app(b: Backend) -> TestApp {
    TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| {
                s.server.max_body_bytes = MAX_BODY;
                s.limits.client_submits_per_minute = 1_000_000;
                s.limits.client_max_pending = 1_000_000;
                s.dispatch.max_pending = 1_000_000;
                s.dispatch.wait = Duration::ZERO;
            }),
            ..Options::stalled()
        },
    )
    .await
}

/// Posts raw bytes; returns the status and the answer's content type.
async fn post(
    http: &reqwest::Client,
    url: &str,
    ctype: Option<&str>,
    body: Vec<u8>,
) -> (u16, String) {
    let mut r = http.post(url).body(body);
    if let Some(c) = ctype {
        r = r.header("content-type", c);
    }
    let r = r.send().await.expect("the service answers");
    let status = r.status().as_u16();
    (status, content_type(&r))
}

// ---------------------------------------------------------------------------------------------
// Properties over HTTP

/// A task resource without its images' archive state.
fn without_archive(mut task: Value) -> Value {
    if let Some(images) = task["images"].as_array_mut() {
        for image in images {
            if let Some(obj) = image.as_object_mut() {
                obj.remove("archive");
                obj.remove("archived_url");
            }
        }
    }
    task
}

async fn arbitrary_webhook_bodies_never_5xx_and_change_nothing_unless_valid(b: Backend) {
    let app = hostile_app(b).await;
    let id = app.submit_ok(&valid_body()).await;
    let t = app
        .wait_for_status(&id, "submitted", Duration::from_secs(10))
        .await;
    let upstream_id = t["upstream_task_id"].as_str().unwrap().to_owned();
    let url = app.callback_url(&id);
    let strategy = (
        arb_body(arb_callback(upstream_id).boxed()),
        arb_content_type(),
    );
    let (applied, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let outcome = runner(160).run(&strategy, |(body, ctype)| {
        block_on(async {
            // The archiver works on a succeeded task's images in the background; its progress
            // is not a callback's doing.
            let before = without_archive(app.task(&id).await);
            let events_before = app.events(&id).await.len();
            let (code, answer_type) = post(&app.http, &url, ctype, body).await;
            prop_assert!(
                [200, 400, 409, 413, 415].contains(&code),
                "unexpected {code}"
            );
            let after = without_archive(app.task(&id).await);
            if code == 200 {
                applied.set(applied.get() + 1);
                let (was, now) = (
                    before["status"].as_str().unwrap_or_default(),
                    after["status"].as_str().unwrap_or_default(),
                );
                prop_assert!(status_rank(now) >= status_rank(was), "{was} -> {now}");
                if status_rank(was) == 3 {
                    prop_assert_eq!(&after, &before, "a final task changed");
                }
            } else {
                refused.set(refused.get() + 1);
                prop_assert_eq!(answer_type.as_str(), "application/problem+json");
                prop_assert_eq!(&after, &before, "a refused callback changed the task");
                prop_assert_eq!(app.events(&id).await.len(), events_before);
            }
            Ok::<(), TestCaseError>(())
        })
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    record_figures(&format!(
        "hostile: {b:?} 160 webhook bodies, {} accepted, {} refused, 0 5xx",
        applied.get(),
        refused.get()
    ));
}

async fn arbitrary_submit_bodies_never_5xx_and_store_only_valid_tasks(b: Backend) {
    let app = hostile_app(b).await;
    let url = format!("{}/v1/tasks", app.base);
    let strategy = (arb_body(arb_submit().boxed()), arb_content_type());
    let (stored, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let outcome = runner(160).run(&strategy, |(body, ctype)| {
        block_on(async {
            let before = app.db.count("SELECT COUNT(*) FROM tasks").await;
            let (code, answer_type) = post(&app.http, &url, ctype, body).await;
            let after = app.db.count("SELECT COUNT(*) FROM tasks").await;
            prop_assert!(
                [202, 400, 413, 415, 422].contains(&code),
                "unexpected {code}"
            );
            if code == 202 {
                stored.set(stored.get() + 1);
                prop_assert_eq!(after, before + 1);
            } else {
                refused.set(refused.get() + 1);
                prop_assert_eq!(answer_type.as_str(), "application/problem+json");
                prop_assert_eq!(after, before, "a refused submit stored something");
            }
            Ok::<(), TestCaseError>(())
        })
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    record_figures(&format!(
        "hostile: {b:?} 160 submit bodies, {} stored (valid), {} refused, 0 5xx",
        stored.get(),
        refused.get()
    ));
}

/// (name, content type, body, acceptable answers)
type HostileCase = (&'static str, Option<&'static str>, Vec<u8>, &'static [u16]);

/// The named hostile shapes, on both endpoints: each a clear 4xx problem, nothing stored.
async fn malformed_shapes_get_a_clear_4xx(b: Backend) {
    let app = hostile_app(b).await;
    let id = app.submit_ok(&valid_body()).await;
    app.wait_for_status(&id, "submitted", Duration::from_secs(10))
        .await;
    let before = app.task(&id).await;
    let tasks_before = app.db.count("SELECT COUNT(*) FROM tasks").await;
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let huge_n = r#"{"subject_image_list":[{"subject_image":"https://example.com/a.png"},{"subject_image":"https://example.com/b.png"}],"n":1e400}"#;
    let big_int = r#"{"subject_image_list":[{"subject_image":"https://example.com/a.png"},{"subject_image":"https://example.com/b.png"}],"n":18446744073709551616}"#;
    let mut invalid_utf8 = br#"{"prompt":""#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    invalid_utf8.extend_from_slice(br#"","n":1}"#);
    let oversized = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(MAX_BODY + 1));
    let cases: Vec<HostileCase> = vec![
        (
            "deep nesting",
            Some("application/json"),
            deep.into_bytes(),
            &[400],
        ),
        (
            "number out of range",
            Some("application/json"),
            huge_n.into(),
            &[400],
        ),
        (
            "integer beyond u64",
            Some("application/json"),
            big_int.into(),
            &[400, 422],
        ),
        (
            "invalid UTF-8",
            Some("application/json"),
            invalid_utf8,
            &[400],
        ),
        (
            "oversized",
            Some("application/json"),
            oversized.into_bytes(),
            &[413],
        ),
        ("text/plain", Some("text/plain"), b"{}".to_vec(), &[415]),
        ("XML", Some("application/xml"), b"<task/>".to_vec(), &[415]),
        ("no content type", None, b"{}".to_vec(), &[415]),
        ("empty body", Some("application/json"), Vec::new(), &[400]),
        ("NUL bytes", Some("application/json"), vec![0; 64], &[400]),
    ];
    let submit = format!("{}/v1/tasks", app.base);
    let webhook = app.callback_url(&id);
    for (name, ctype, body, expected) in cases {
        for url in [&submit, &webhook] {
            let (code, answer_type) = post(&app.http, url, ctype, body.clone()).await;
            let endpoint = if url == &submit { "submit" } else { "webhook" };
            // The webhook reads JSON for any task callback shape, so "valid JSON, wrong
            // content" answers 400 there where a submit answers 422.
            let ok = expected.contains(&code) || (endpoint == "webhook" && code == 400);
            assert!(
                ok,
                "{name} to {endpoint}: {code}, wanted one of {expected:?}"
            );
            assert_eq!(
                answer_type, "application/problem+json",
                "{name} to {endpoint}"
            );
        }
    }
    assert_eq!(app.task(&id).await, before, "nothing changed the task");
    assert_eq!(
        app.db.count("SELECT COUNT(*) FROM tasks").await,
        tasks_before,
        "nothing was stored"
    );
}

/// An upload refused before it is read is answered, never reset, and the answer says the
/// connection closes, so a client does not send its next request into a closing socket (both
/// happened, about one run in six, before the server lingered and said `Connection: close`).
async fn refused_uploads_are_answered_and_close_their_connection(b: Backend) {
    let app = hostile_app(b).await;
    let id = app.submit_ok(&valid_body()).await;
    // Past both limits (submits: `MAX_BODY`; callbacks: 1 MiB), so neither body is read to its end.
    let big = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(4 << 20));
    let submit = format!("{}/v1/tasks", app.base);
    let webhook = app.callback_url(&id);
    for round in 0..10 {
        for url in [&submit, &webhook] {
            let r = app
                .http
                .post(url)
                .header("content-type", "application/json")
                .body(big.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("round {round}, {url}: no answer: {e:?}"));
            assert_eq!(r.status().as_u16(), 413, "round {round}, {url}");
            assert_eq!(
                r.headers().get("connection").map(|v| v.as_bytes()),
                Some(&b"close"[..]),
                "round {round}, {url}: the connection will close and the answer says so"
            );
            // A small request right after, on whatever connection the client pools.
            let (code, _) = post(&app.http, &webhook, Some("text/plain"), b"{}".to_vec()).await;
            assert_eq!(code, 415, "round {round}: the next request is answered");
        }
    }
}

on_both_backends!(
    arbitrary_webhook_bodies_never_5xx_and_change_nothing_unless_valid,
    arbitrary_submit_bodies_never_5xx_and_store_only_valid_tasks,
    malformed_shapes_get_a_clear_4xx,
    refused_uploads_are_answered_and_close_their_connection,
);

// ---------------------------------------------------------------------------------------------
// The status machine under arbitrary sequences of upstream events

fn arb_report() -> impl Strategy<Value = UpstreamReport> {
    let status = prop_oneof![
        Just(UpstreamStatus::Submitted),
        Just(UpstreamStatus::Processing),
        Just(UpstreamStatus::Succeed),
        Just(UpstreamStatus::Failed),
    ];
    let task_id = prop_oneof![
        4 => Just(Some("u-1".to_owned())),
        1 => Just(Some("u-2".to_owned())),
        1 => Just(None),
    ];
    let external = prop_oneof![
        4 => Just(None),
        2 => Just(Some("klr-1".to_owned())),
        1 => Just(Some("klr-other".to_owned())),
    ];
    let images = prop::collection::vec((0u32..4, "[a-z]{1,4}"), 0..4);
    (
        status,
        task_id,
        external,
        prop::option::of(0i64..1_000),
        images,
    )
        .prop_map(
            |(status, task_id, external_task_id, updated_at_ms, images)| UpstreamReport {
                task_id,
                external_task_id,
                status,
                status_msg: None,
                final_unit_deduction: None,
                updated_at_ms,
                images: images
                    .into_iter()
                    .map(|(index, u)| ResultImage {
                        index,
                        url: format!("https://img.example/{u}.png"),
                    })
                    .collect(),
                raw: None,
            },
        )
}

#[test]
fn upstream_event_sequences_never_move_a_task_backwards() {
    let strategy = (
        prop_oneof![
            Just(TaskStatus::Pending),
            Just(TaskStatus::Submitted),
            Just(TaskStatus::Processing),
        ],
        prop::option::of(Just("u-1".to_owned())),
        prop::collection::vec(arb_report(), 1..40),
    );
    let outcome = runner(2_000).run(&strategy, |(start, bound, reports)| {
        let mut state = TaskState {
            status: start,
            upstream_task_id: bound,
            external_task_id: "klr-1".into(),
            upstream_updated_at_ms: None,
            dispatch_started: start == TaskStatus::Pending,
        };
        let mut images: Option<Vec<ResultImage>> = None;
        for r in &reports {
            let was = state.clone();
            match apply_report(&state, r) {
                Ok(Transition::Apply(c)) => {
                    prop_assert!(!was.status.is_final(), "a final task changed");
                    prop_assert!(
                        c.status.rank() > was.status.rank(),
                        "{:?} -> {:?}",
                        was.status,
                        c.status
                    );
                    if let (Some(bound), Some(new)) =
                        (&was.upstream_task_id, &c.bind_upstream_task_id)
                    {
                        prop_assert!(false, "rebound {bound} to {new}");
                    }
                    state.status = c.status;
                    if state.upstream_task_id.is_none() {
                        state.upstream_task_id = c.bind_upstream_task_id.clone();
                    }
                    state.upstream_updated_at_ms = c.upstream_updated_at_ms;
                    if c.images.is_some() {
                        prop_assert!(images.is_none(), "images replaced");
                        images = c.images.clone();
                    }
                    prop_assert!(
                        state.upstream_updated_at_ms >= was.upstream_updated_at_ms,
                        "upstream time went back"
                    );
                }
                Ok(Transition::Ignore(_)) => {}
                Err(_) => {
                    // Refused: the report names another task.
                    let other_id =
                        matches!((&was.upstream_task_id, &r.task_id), (Some(a), Some(b)) if a != b);
                    let other_ext = r.external_task_id.as_deref().is_some_and(|e| e != "klr-1");
                    prop_assert!(
                        other_id || other_ext,
                        "refused a report for this task: {r:?}"
                    );
                }
            }
        }
        if let Some(i) = &images {
            let mut idx: Vec<u32> = i.iter().map(|x| x.index).collect();
            let n = idx.len();
            idx.dedup();
            prop_assert_eq!(idx.len(), n, "duplicate image indexes kept");
        }
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

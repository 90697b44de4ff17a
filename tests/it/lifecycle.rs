//! The task lifecycle end to end: dispatch, callbacks, polling, faults, timeouts and restarts,
//! each on SQLite and on Postgres.

use crate::common::*;
use kling_relay::simulator::{Failure, Faults, SimConfig};
use serde_json::json;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(15);

async fn happy_path_by_webhook(b: Backend) {
    let app = TestApp::spawn(b).await;
    let r = app.submit(&valid_body()).await;
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let t: serde_json::Value = r.json().await.unwrap();
    let id = t["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/tasks/{id}"));
    // The POST waited for the dispatch, so the usual answer is already `submitted`.
    assert_eq!(t["status"], "submitted");
    assert!(t["upstream_task_id"].is_string());
    assert!(t["external_task_id"].as_str().unwrap().contains(id));
    assert_eq!(t["n"], 2);
    assert_eq!(t["model_name"], "kling-v2-1");
    assert!(
        t.get("subject_image_list").is_none(),
        "inputs are not echoed"
    );

    let done = app.wait_for_status(id, "succeeded", WITHIN).await;
    let images = done["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0]["index"], 0);
    assert_eq!(images[1]["index"], 1);
    assert!(done["completed_at"].is_string());
    assert!(done["error"].is_null());

    // The result URL serves a real PNG.
    let png = app
        .http
        .get(images[0]["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));

    let events = app.events(id).await;
    assert_eq!(
        statuses(&events),
        ["pending", "submitted", "processing", "succeeded"]
    );
    assert_eq!(sources(&events), ["api", "dispatch", "webhook", "webhook"]);
    assert_eq!(app.sim.stats().tasks_created, 1);
}

async fn completes_by_polling_when_every_callback_is_dropped(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.sim.set_faults(Faults {
        drop_callbacks: 1.0,
        ..Faults::default()
    });
    let id = app.submit_ok(&valid_body()).await;
    let done = app.wait_for_status(&id, "succeeded", WITHIN).await;
    assert_eq!(done["images"].as_array().unwrap().len(), 2);
    let events = app.events(&id).await;
    assert!(sources(&events).contains(&"poll".to_string()));
    assert!(!sources(&events).contains(&"webhook".to_string()));
}

async fn without_public_url_polling_carries_the_task(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            callbacks: false,
            ..Options::default()
        },
    )
    .await;
    let id = app.submit_ok(&valid_body()).await;
    app.wait_for_status(&id, "succeeded", WITHIN).await;
    assert_eq!(
        app.sim.stats().callbacks_sent,
        0,
        "no callback_url was sent"
    );
}

async fn duplicate_and_reordered_callbacks_change_nothing(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.sim.set_faults(Faults {
        duplicate_callbacks: true,
        reorder_callbacks: true,
        callback_envelope: true,
        ..Faults::default()
    });
    let id = app.submit_ok(&valid_body()).await;
    app.wait_for_status(&id, "succeeded", WITHIN).await;
    // Wait for the late (reordered, duplicated) `processing` callbacks to have arrived.
    wait_until(WITHIN, || async { app.sim.stats().callbacks_sent >= 4 }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = app.task(&id).await;
    assert_eq!(t["status"], "succeeded");
    let events = app.events(&id).await;
    assert_eq!(statuses(&events).last().unwrap(), "succeeded");
    assert_eq!(
        statuses(&events)
            .iter()
            .filter(|s| *s == "succeeded")
            .count(),
        1,
        "one success event: {events:#?}"
    );
}

async fn upstream_failure_is_reported_with_its_reason(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut body = valid_body();
    body["prompt"] = json!("a forbidden picture");
    let id = app.submit_ok(&body).await;
    let t = app.wait_for_status(&id, "failed", WITHIN).await;
    assert_eq!(t["error"]["code"], "upstream_failed");
    assert!(t["error"]["message"]
        .as_str()
        .unwrap()
        .contains("moderation"));
    assert!(t["images"].as_array().unwrap().is_empty());
}

async fn retryable_create_failures_are_retried(b: Backend) {
    for failure in [Failure::Http503, Failure::Http429, Failure::Code1303] {
        let app = TestApp::spawn(b).await;
        app.sim.set_faults(Faults {
            create_fail: Some(failure),
            create_fail_times: Some(2),
            ..Faults::default()
        });
        let id = app.submit_ok(&valid_body()).await;
        app.wait_for_status(&id, "succeeded", WITHIN).await;
        let events = app.events(&id).await;
        let retries = events
            .iter()
            .filter(|e| e["source"] == "dispatch" && e["status"] == "pending")
            .count();
        assert_eq!(retries, 2, "{failure:?}: {events:#?}");
        assert_eq!(app.sim.stats().tasks_created, 1);
    }
}

async fn lost_create_answer_is_recovered_without_a_second_task(b: Backend) {
    for lookup in [true, false] {
        let app = TestApp::spawn_with(
            b,
            Options {
                sim: SimConfig {
                    lookup_by_external_id: lookup,
                    ..fast_sim()
                },
                ..Options::default()
            },
        )
        .await;
        app.sim.set_faults(Faults {
            create_lose_response: true,
            ..Faults::default()
        });
        let id = app.submit_ok(&valid_body()).await;
        // Let the first (lost) answer be recorded, then let later calls through.
        wait_until(WITHIN, || async { app.sim.stats().create_calls >= 1 }).await;
        app.sim.set_faults(Faults::default());
        let t = app.wait_for_status(&id, "succeeded", WITHIN).await;
        assert!(t["upstream_task_id"].is_string(), "lookup={lookup}: {t}");
        assert_eq!(
            app.sim.stats().tasks_created,
            1,
            "lookup={lookup}: exactly one paid task upstream"
        );
    }
}

async fn non_final_tasks_time_out(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.poller.give_up_after = Duration::from_secs(1)),
            sim: stalled_sim(),
            ..Options::default()
        },
    )
    .await;
    let id = app.submit_ok(&valid_body()).await;
    let t = app.wait_for_status(&id, "timed_out", WITHIN).await;
    assert_eq!(t["error"]["code"], "timed_out");
    assert!(t["completed_at"].is_string());
    // A late success does not revive it.
    let upstream = t["upstream_task_id"].as_str().unwrap();
    let (status, v) = app
        .post_callback(
            &app.callback_url(&id),
            &callback(upstream, "succeed", i64::MAX / 2),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["outcome"], "already_final");
    assert_eq!(app.task(&id).await["status"], "timed_out");
    let events = app.events(&id).await;
    assert_eq!(events.last().unwrap()["source"], "system");
}

async fn task_not_exist_fails_a_task_past_the_grace_period(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.poller.not_found_grace = Duration::from_millis(500)),
            sim: stalled_sim(),
            ..Options::default()
        },
    )
    .await;
    let id = app.submit_ok(&valid_body()).await;
    app.sim.expire_all();
    let t = app.wait_for_status(&id, "failed", WITHIN).await;
    assert_eq!(t["error"]["code"], "task_not_exist");
}

async fn restart_mid_task_completes(b: Backend) {
    let mut app = TestApp::spawn(b).await;
    app.sim.set_faults(Faults {
        drop_callbacks: 0.5,
        ..Faults::default()
    });
    let id = app.submit_ok(&valid_body()).await;
    app.restart().await;
    app.wait_for_status(&id, "succeeded", WITHIN).await;
    assert_eq!(app.sim.stats().tasks_created, 1);
}

async fn pending_task_is_dispatched_after_a_restart(b: Backend) {
    let mut app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.dispatch.wait = Duration::from_millis(10)),
            ..Options::default()
        },
    )
    .await;
    app.sim.set_faults(Faults {
        create_fail: Some(Failure::Http500),
        ..Faults::default()
    });
    let id = app.submit_ok(&valid_body()).await;
    assert_eq!(app.task(&id).await["status"], "pending");
    app.stop().await;
    app.sim.set_faults(Faults::default());
    app.restart().await;
    app.wait_for_status(&id, "succeeded", WITHIN).await;
}

on_both_backends!(
    happy_path_by_webhook,
    completes_by_polling_when_every_callback_is_dropped,
    without_public_url_polling_carries_the_task,
    duplicate_and_reordered_callbacks_change_nothing,
    upstream_failure_is_reported_with_its_reason,
    retryable_create_failures_are_retried,
    lost_create_answer_is_recovered_without_a_second_task,
    non_final_tasks_time_out,
    task_not_exist_fails_a_task_past_the_grace_period,
    restart_mid_task_completes,
    pending_task_is_dispatched_after_a_restart,
);

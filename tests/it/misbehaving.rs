//! Upstream misbehaving (fault test 5): callbacks for tasks it never had or naming another of
//! our tasks, query answers with unknown statuses, malformed JSON or another task's data, and
//! 30-second stalls. Each has the outcome ARCHITECTURE.md names ("When upstream misbehaves"),
//! and none holds up other tasks.

use crate::common::*;
use kling_relay::simulator::{Faults, Garbage};
use std::time::{Duration, Instant};

/// Callbacks for a task we never had, and a callback naming another of our tasks.
async fn foreign_callbacks_are_refused_and_change_nothing(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let a = app.submit_ok(&valid_body()).await;
    let other = app.submit_ok(&valid_body()).await;
    let ta = app
        .wait_for_status(&a, "submitted", Duration::from_secs(10))
        .await;
    let tb = app
        .wait_for_status(&other, "submitted", Duration::from_secs(10))
        .await;
    let b_upstream = tb["upstream_task_id"].as_str().unwrap();

    // A task id we never issued, with the token upstream would hold for it: 404, nothing stored.
    let ghost = uuid::Uuid::now_v7().to_string();
    let before = app.db.count("SELECT COUNT(*) FROM tasks").await;
    let (status, problem) = app
        .post_callback(
            &app.callback_url(&ghost),
            &callback("u-ghost", "succeed", 1_700_000_000_000),
        )
        .await;
    assert_eq!(status, 404, "{problem}");
    assert_eq!(app.db.count("SELECT COUNT(*) FROM tasks").await, before);

    // Task B's upstream id delivered to task A's callback URL: not applied (task A is polled
    // instead, and upstream says it is still submitted), and neither task moves.
    let (status, answer) = app
        .post_callback(
            &app.callback_url(&a),
            &callback(b_upstream, "succeed", 4_000_000_000_000),
        )
        .await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("polling")),
        "{answer}"
    );
    assert_eq!(app.task(&a).await, ta);
    assert_eq!(app.task(&other).await, tb);
}

/// Query answers that are not answers: the poll counts as unanswered (the task stays as it was
/// and is polled again with backoff). Tasks still finish by callback meanwhile; a task that
/// never hears anything else times out with `timed_out` at `poller.give_up_after`.
async fn garbage_query_answers_never_change_a_task(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| {
                s.poller.first_poll_after = Duration::from_millis(100);
                s.poller.interval = Duration::from_millis(100);
                s.poller.max_interval = Duration::from_millis(200);
                s.poller.give_up_after = Duration::from_secs(3);
            }),
            ..Options::default()
        },
    )
    .await;
    for garbage in [
        Garbage::MalformedJson,
        Garbage::UnknownStatus,
        Garbage::OtherTask,
    ] {
        // With callbacks: finished by them, whatever the polls say.
        app.sim.set_faults(Faults {
            query_garbage: Some(garbage),
            ..Faults::default()
        });
        let fine = app.submit_ok(&valid_body()).await;
        app.wait_for_status(&fine, "succeeded", Duration::from_secs(10))
            .await;
        // Without callbacks: polls alone, all garbage.
        app.sim.set_faults(Faults {
            query_garbage: Some(garbage),
            drop_callbacks: 1.0,
            ..Faults::default()
        });
        let stuck = app.submit_ok(&valid_body()).await;
        let t = app
            .wait_for_status(&stuck, "timed_out", Duration::from_secs(10))
            .await;
        assert_eq!(t["error"]["code"], "timed_out", "{garbage:?}: {t}");
        assert!(t["images"].as_array().is_none_or(|i| i.is_empty()), "{t}");
        assert_eq!(
            statuses(&app.events(&stuck).await),
            ["pending", "submitted", "timed_out"],
            "{garbage:?}: no poll answer moved the task"
        );
        assert!(app.sim.stats().query_calls > 0);
    }
}

/// Upstream stalls for 30 seconds: every query, and half the create calls (which land upstream,
/// then answer late). Calls give up at `cometapi.timeout`; callbacks still finish every task,
/// and the API keeps answering at once.
async fn thirty_second_stalls_hold_up_nothing(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| {
                s.cometapi.timeout = Duration::from_secs(1);
                s.dispatch.wait = Duration::ZERO;
            }),
            ..Options::default()
        },
    )
    .await;
    app.sim.set_faults(Faults {
        query_delay_ms: 30_000,
        create_hang_rate: 0.5,
        create_hang_ms: 30_000,
        ..Faults::default()
    });
    let started = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        ids.push(app.submit_ok(&valid_body()).await);
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "a submit waited on upstream"
        );
    }
    for id in &ids {
        let t0 = Instant::now();
        app.task(id).await;
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "a read waited on upstream"
        );
    }
    for id in &ids {
        let t = app
            .wait_for_status(id, "succeeded", Duration::from_secs(20))
            .await;
        assert_eq!(t["images"].as_array().map(Vec::len), Some(2), "{t}");
    }
    let elapsed = started.elapsed();
    assert_eq!(app.sim.stats().tasks_created, 10, "each task created once");
    assert!(
        elapsed < Duration::from_secs(20),
        "took {elapsed:?} under 30 s stalls"
    );
    record_figures(&format!(
        "misbehaving: {b:?} 10 tasks under 30 s query stalls and 50% hanging creates finished in {:.1}s",
        elapsed.as_secs_f64()
    ));
}

on_both_backends!(
    foreign_callbacks_are_refused_and_change_nothing,
    garbage_query_answers_never_change_a_task,
    thirty_second_stalls_hold_up_nothing,
);

//! Issue 13: the real upstream as documented today. Each class of Kling's error table, the
//! tolerant reader, callbacks through proxies and gateways, and the three profiles, each against
//! the simulator playing that upstream, on SQLite and on Postgres.

use crate::common::*;
use base64::Engine;
use hmac::Mac;
use kling_relay::config::UpstreamProfile;
use kling_relay::simulator::{AnswerStyle, Faults, SimConfig};
use serde_json::{json, Value};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(20);

/// Probes come fast, so a fixed setup resumes within a test's patience.
fn quick_probes(s: &mut kling_relay::config::Settings) {
    s.dispatch.halt_probe_initial = Duration::from_millis(100);
    s.dispatch.halt_probe_max = Duration::from_millis(300);
}

async fn status(app: &TestApp) -> Value {
    let (code, v) = app.get_json("/v1/status").await;
    assert_eq!(code, 200, "{v}");
    v
}

async fn wait_halted(app: &TestApp, reason: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        last = status(app).await;
        if last["dispatch"]["halted"]["reason"] == reason {
            return last["dispatch"]["halted"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("dispatch not halted for {reason}: {last}");
}

async fn failed_count(app: &TestApp) -> usize {
    let (_, v) = app.get_json("/v1/tasks?status=failed&limit=200").await;
    v["tasks"].as_array().unwrap().len()
}

/// A setup problem (bad key, or no credit) halts all dispatch: every task waits `pending`,
/// none fails, `/v1/status` and `/readyz` say why; once upstream accepts again, probes notice
/// and everything completes.
async fn setup_refusal_halts_dispatch_then_resumes_by_itself(
    b: Backend,
    faults: Faults,
    reason: &str,
    code: &str,
) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(quick_probes),
            ..Options::default()
        },
    )
    .await;
    app.sim.set_faults(faults);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(app.submit_ok(&valid_body()).await);
    }
    let halted = wait_halted(&app, reason).await;
    assert_eq!(halted["upstream_code"], code, "{halted}");
    assert!(halted["since"].is_string() && halted["message"].is_string());
    // Probes keep failing for a while; nothing fails meanwhile.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for id in &ids {
        assert_eq!(app.task(id).await["status"], "pending");
    }
    assert_eq!(failed_count(&app).await, 0);
    assert_eq!(app.sim.stats().tasks_created, 0);
    let ready = app
        .anonymous
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains(reason));
    let metrics = app.get_text_anonymously("/metrics").await;
    // The registry is shared by the tests of this binary, so only the series is checked here.
    assert!(
        metrics.contains(&format!("klr_dispatch_halted{{reason=\"{reason}\"}}")),
        "{metrics}"
    );

    // The operator fixes it upstream: no restart, no action here.
    app.sim.set_faults(Faults::default());
    for id in &ids {
        app.wait_for_status(id, "succeeded", WITHIN).await;
    }
    assert!(status(&app).await["dispatch"]["halted"].is_null());
    let ready = app
        .anonymous
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(app.sim.stats().tasks_created, 4, "each task created once");
}

async fn a_refused_key_halts_dispatch_and_resumes_after_the_fix(b: Backend) {
    let faults = Faults {
        key_revoked: true,
        ..Faults::default()
    };
    setup_refusal_halts_dispatch_then_resumes_by_itself(b, faults, "authentication", "1002").await;
}

async fn an_account_out_of_credit_halts_dispatch_and_resumes_after_top_up(b: Backend) {
    let faults = Faults {
        out_of_credit: true,
        ..Faults::default()
    };
    setup_refusal_halts_dispatch_then_resumes_by_itself(b, faults, "account", "1102").await;
}

/// 1303 reshaped by a gateway into HTTP 400 `{"code": "task_failed"}` is still "busy": dispatch
/// pauses and every task completes; none fails for it.
async fn relay_shaped_1303_is_busy_not_a_failure(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            sim: SimConfig {
                concurrency_units: 2,
                ..fast_sim()
            },
            ..Options::default()
        },
    )
    .await;
    app.sim.set_faults(Faults {
        answer_style: AnswerStyle::Relay,
        ..Faults::default()
    });
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.submit_ok(&valid_body()).await);
    }
    for id in &ids {
        app.wait_for_status(id, "succeeded", WITHIN).await;
    }
    assert!(
        app.sim.stats().busy_answers > 0,
        "the account was full at times"
    );
    assert_eq!(failed_count(&app).await, 0);
}

/// A 12xx refusal is about one task: it fails with upstream's code and message; the others go on.
async fn a_parameter_refusal_fails_only_its_task(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| {
                // Allowed here, unknown upstream.
                s.cometapi.models = vec!["kling-v2-1".into(), "kling-v9".into()];
            }),
            ..Options::default()
        },
    )
    .await;
    let mut bad = valid_body();
    bad["model_name"] = json!("kling-v9");
    let bad = app.submit_ok(&bad).await;
    let good = app.submit_ok(&valid_body()).await;
    let t = app.wait_for_status(&bad, "failed", WITHIN).await;
    assert_eq!(t["error"]["code"], "1201");
    assert!(t["error"]["message"].as_str().unwrap().contains("kling-v9"));
    app.wait_for_status(&good, "succeeded", WITHIN).await;
    assert!(status(&app).await["dispatch"]["halted"].is_null());
    // A model outside cometapi.models never leaves the relay.
    let mut unknown = valid_body();
    unknown["model_name"] = json!("kling-v1");
    assert_eq!(app.submit(&unknown).await.status(), 422);
}

/// A code outside the table is retried a bounded number of times, then fails the task with it.
async fn an_unknown_code_fails_the_task_after_bounded_retries(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.cometapi.unknown_code_attempts = 2),
            ..Options::default()
        },
    )
    .await;
    app.sim.set_faults(Faults {
        create_unknown_code: Some(4242),
        ..Faults::default()
    });
    let id = app.submit_ok(&valid_body()).await;
    let t = app.wait_for_status(&id, "failed", WITHIN).await;
    assert_eq!(t["error"]["code"], "4242");
    assert_eq!(app.sim.stats().create_calls, 2);
    assert!(status(&app).await["dispatch"]["halted"].is_null());
}

/// CometAPI's current create answer has `data.task_id` and no `task_status`: the task is bound
/// at once, with no recovery (no lookup, no second create).
async fn a_create_answer_without_status_binds_the_task(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    app.sim.set_faults(Faults {
        create_without_status: true,
        ..Faults::default()
    });
    let id = app.submit_ok(&valid_body()).await;
    let t = app.wait_for_status(&id, "submitted", WITHIN).await;
    assert!(t["upstream_task_id"].is_string());
    let stats = app.sim.stats();
    assert_eq!((stats.create_calls, stats.external_lookups), (1, 0));
    let events = app.events(&id).await;
    assert_eq!(statuses(&events), ["pending", "submitted"], "{events:?}");
}

/// An app whose tasks no scheduled poll reaches within a test (only callbacks, or a poll they
/// trigger, can move them), its simulator with `faults` on.
async fn callbacks_only(b: Backend, faults: Faults) -> TestApp {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.poller.first_poll_after = Duration::from_secs(3600)),
            ..Options::default()
        },
    )
    .await;
    app.sim.set_faults(faults);
    app
}

/// A proxy that drops the callback URL's query string cannot drop the token: it is in the path.
async fn a_callback_through_a_query_stripping_proxy_lands(b: Backend) {
    let app = callbacks_only(
        b,
        Faults {
            strip_callback_query: true,
            ..Faults::default()
        },
    )
    .await;
    let id = app.submit_ok(&valid_body()).await;
    app.wait_for_status(&id, "succeeded", WITHIN).await;
    let events = app.events(&id).await;
    assert_eq!(events.last().unwrap()["source"], "webhook", "{events:?}");
}

/// A callback whose task_id was renamed on the way is not applied and not refused: the task is
/// polled at once, and the query settles it.
async fn a_callback_with_a_renamed_task_id_triggers_a_poll_that_settles_it(b: Backend) {
    let app = callbacks_only(
        b,
        Faults {
            callback_task_id_renamed: true,
            ..Faults::default()
        },
    )
    .await;
    let id = app.submit_ok(&valid_body()).await;
    let t = app.wait_for_status(&id, "succeeded", WITHIN).await;
    assert_eq!(t["images"].as_array().unwrap().len(), 2);
    let events = app.events(&id).await;
    assert_eq!(events.last().unwrap()["source"], "poll", "{events:?}");
    assert!(
        events.iter().any(|e| e["source"] == "webhook"
            && e["detail"].as_str().is_some_and(|d| d.contains("renamed-"))),
        "the mismatch is on the timeline: {events:?}"
    );
}

/// Decodes an HS256 JWT by hand (not with the relay's code) and checks its signature.
fn decode_jwt(token: &str, secret: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header, json!({"alg": "HS256", "typ": "JWT"}));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
    assert_eq!(
        mac.finalize().into_bytes().to_vec(),
        b64.decode(parts[2]).unwrap(),
        "signed with the secret key"
    );
    serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap()
}

/// The `kling` profile: Kling's paths, every request signed with a fresh HS256 JWT.
async fn the_kling_profile_signs_every_request_with_a_valid_jwt(b: Backend) {
    let app = TestApp::playing(b, UpstreamProfile::Kling).await;
    let id = app.submit_ok(&valid_body()).await;
    app.wait_for_status(&id, "succeeded", WITHIN).await;
    let stats = app.sim.stats();
    assert_eq!(stats.auth_failures, 0);
    let auth = stats.last_authorization.expect("authorized");
    let claims = decode_jwt(auth.strip_prefix("Bearer ").unwrap(), "sk-simulator-secret");
    assert_eq!(claims["iss"], "ak-simulator");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (exp, nbf) = (
        claims["exp"].as_i64().unwrap(),
        claims["nbf"].as_i64().unwrap(),
    );
    assert!(
        exp > now + 20 * 60 && exp <= now + 31 * 60,
        "about 30 minutes ahead"
    );
    assert!(nbf <= now && nbf >= now - 60, "valid now");
}

/// The `cometapi-generations` profile reproduces the older page exactly: `/images/generations`,
/// `scence_image`, 2 to 4 subjects, `kling-v2`.
async fn the_generations_profile_keeps_the_older_page(b: Backend) {
    let app = TestApp::playing(b, UpstreamProfile::CometapiGenerations).await;
    let mut body = valid_body();
    body["scene_image"] = json!("https://e.x/scene.png");
    let id = app.submit_ok(&body).await;
    let t = app.wait_for_status(&id, "succeeded", WITHIN).await;
    assert_eq!(t["model_name"], "kling-v2");
    let sent = app.sim.stats().last_create_body.unwrap();
    assert_eq!(sent["scence_image"], "https://e.x/scene.png");
    assert!(sent.get("scene_image").is_none());
    let one = json!({"subject_image_list": [{"subject_image": "https://e.x/a.png"}]});
    assert_eq!(
        app.submit(&one).await.status(),
        422,
        "2 to 4 subjects there"
    );
}

/// The default profile sends multi-image jobs to `multi-image2image`, never to the
/// text-to-image route, and reads `final_unit_deduction` onto the task.
async fn the_default_profile_uses_the_multi_image_route(b: Backend) {
    let app = TestApp::spawn(b).await;
    let one = json!({"subject_image_list": [{"subject_image": PNG_300}], "n": 3});
    let id = app.submit_ok(&one).await;
    let t = app.wait_for_status(&id, "succeeded", WITHIN).await;
    assert_eq!(t["final_unit_deduction"], "3");
    let stats = app.sim.stats();
    assert_eq!((stats.tasks_created, stats.text_to_image_tasks), (1, 0));
}

on_both_backends!(
    a_refused_key_halts_dispatch_and_resumes_after_the_fix,
    an_account_out_of_credit_halts_dispatch_and_resumes_after_top_up,
    relay_shaped_1303_is_busy_not_a_failure,
    a_parameter_refusal_fails_only_its_task,
    an_unknown_code_fails_the_task_after_bounded_retries,
    a_create_answer_without_status_binds_the_task,
    a_callback_through_a_query_stripping_proxy_lands,
    a_callback_with_a_renamed_task_id_triggers_a_poll_that_settles_it,
    the_kling_profile_signs_every_request_with_a_valid_jwt,
    the_generations_profile_keeps_the_older_page,
    the_default_profile_uses_the_multi_image_route,
);

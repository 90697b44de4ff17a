//! Issue 4: signed notifications from the outbox — Standard Webhooks signatures (checked by an
//! independent verifier and, when available, the reference library), retries, 410, hanging
//! receivers, crashes with deliveries pending, replay, default URLs, secret rotation, and
//! refused destinations.

use crate::common::receiver::{verify_standard_webhook, verify_with_reference_library, Receiver};
use crate::common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(15);

async fn submit_notified(app: &TestApp, url: &str) -> String {
    let mut body = valid_body();
    body["notify_url"] = json!(url);
    app.submit_ok(&body).await
}

async fn deliveries(app: &TestApp, id: &str) -> Vec<Value> {
    let (status, v) = app.get_json(&format!("/v1/tasks/{id}/deliveries")).await;
    assert_eq!(status, 200, "{v}");
    v["deliveries"].as_array().cloned().unwrap_or_default()
}

async fn wait_deliveries<F: Fn(&[Value]) -> bool>(app: &TestApp, id: &str, done: F) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let d = deliveries(app, id).await;
        if done(&d) {
            return d;
        }
        assert!(start.elapsed() < WITHIN, "deliveries not settled: {d:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn all_in(state: &'static str, n: usize) -> impl Fn(&[Value]) -> bool {
    move |d: &[Value]| d.len() == n && d.iter().all(|x| x["state"] == state)
}

async fn every_status_change_is_notified_signed_and_after_commit(b: Backend) {
    let app = TestApp::spawn(b).await;
    let rx = Receiver::start().await;
    rx.check_against(&app.base, app.http.clone());
    let id = submit_notified(&app, &rx.url("/ok")).await;
    app.wait_for_status(&id, "succeeded", WITHIN).await;
    wait_deliveries(&app, &id, all_in("delivered", 3)).await;

    let got = rx.received("/ok");
    assert_eq!(got.len(), 3, "one per status change");
    let statuses: Vec<String> = got
        .iter()
        .map(|r| r.json()["status"].as_str().unwrap().to_owned())
        .collect();
    let mut sorted = statuses.clone();
    sorted.sort_by_key(|s| status_rank(s));
    assert_eq!(sorted, ["submitted", "processing", "succeeded"]);
    let ids: HashSet<&str> = got.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), 3, "one webhook-id per event");
    for r in &got {
        assert_eq!(r.header("content-type"), "application/json");
        verify_standard_webhook(&app.client.signing_secret, r).expect("signature");
        verify_with_reference_library(&app.client.signing_secret, r).expect("reference library");
        assert!(verify_standard_webhook("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", r).is_err());
        // Never ahead of the database: the task was at least this far when it arrived.
        let notified = r.json()["status"].as_str().unwrap().to_owned();
        let committed = r.committed_status.clone().expect("status looked up");
        assert!(
            status_rank(&committed) >= status_rank(&notified),
            "{notified} arrived while {committed}"
        );
        assert_eq!(r.json()["id"], id.as_str());
        assert_eq!(r.json()["client"], "tester");
    }
    let last = got
        .iter()
        .find(|r| r.json()["status"] == "succeeded")
        .unwrap();
    assert_eq!(last.json()["images"].as_array().unwrap().len(), 2);
}

async fn failing_receiver_is_retried_with_the_same_webhook_id(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let rx = Receiver::start().await;
    rx.script("/flaky", &[500, 302, 503]);
    let id = submit_notified(&app, &rx.url("/flaky")).await;
    let d = wait_deliveries(&app, &id, all_in("delivered", 1)).await;
    let got = rx.received("/flaky");
    assert_eq!(got.len(), 4);
    let ids: HashSet<&str> = got.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), 1, "the same id on every attempt");
    assert_eq!(d[0]["attempts"], 4);
    let codes: Vec<i64> = d[0]["attempt_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(
        codes,
        vec![500, 302, 503, 200],
        "3xx is a failure, not followed"
    );
    for r in &got {
        verify_standard_webhook(&app.client.signing_secret, r).expect("signature");
    }
}

async fn exhausted_deliveries_are_dead_not_deleted(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let rx = Receiver::start().await;
    rx.script("/down", &[500; 10]);
    let id = submit_notified(&app, &rx.url("/down")).await;
    let d = wait_deliveries(&app, &id, all_in("dead", 1)).await;
    assert_eq!(d[0]["attempts"], 4, "the schedule has four entries");
    assert!(d[0]["next_attempt_at"].is_null());
    assert_eq!(rx.received("/down").len(), 4);
}

async fn gone_disables_the_url_for_the_client(b: Backend) {
    let app = TestApp::spawn(b).await;
    let rx = Receiver::start().await;
    rx.script("/gone", &[410]);
    let id = submit_notified(&app, &rx.url("/gone")).await;
    app.wait_for_status(&id, "succeeded", WITHIN).await;
    let d = wait_deliveries(&app, &id, |d| {
        !d.is_empty() && d.iter().all(|x| x["state"] == "disabled")
    })
    .await;
    assert_eq!(rx.received("/gone").len(), 1, "nothing after the 410");
    // Later tasks to that URL produce no deliveries at all.
    let again = submit_notified(&app, &rx.url("/gone")).await;
    app.wait_for_status(&again, "succeeded", WITHIN).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(deliveries(&app, &again).await.is_empty());
    assert_eq!(rx.received("/gone").len(), 1);
    assert!(d[0]["last_error"].as_str().unwrap().contains("410"));
}

async fn a_hanging_receiver_slows_nobody_else(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| {
                s.notifications.timeout = Duration::from_millis(500);
                s.notifications.per_url_concurrency = 1;
            }),
            ..Options::default()
        },
    )
    .await;
    let rx = Receiver::start().await;
    rx.hang("/hang", Duration::from_secs(3));
    let slow: Vec<String> = vec![
        submit_notified(&app, &rx.url("/hang")).await,
        submit_notified(&app, &rx.url("/hang")).await,
    ];
    let started = Instant::now();
    let fast = submit_notified(&app, &rx.url("/ok")).await;
    // The task itself and its other notifications are unaffected.
    app.wait_for_status(&fast, "succeeded", WITHIN).await;
    wait_deliveries(&app, &fast, all_in("delivered", 3)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "blocked behind the hanging receiver: {:?}",
        started.elapsed()
    );
    for id in &slow {
        app.wait_for_status(id, "succeeded", WITHIN).await;
    }
    assert!(
        rx.max_in_flight("/hang") <= 1,
        "per-URL concurrency bounded"
    );
    let d = wait_deliveries(&app, &slow[0], |d| {
        d.iter().any(|x| {
            x["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("timed out"))
        })
    })
    .await;
    assert!(!d.is_empty());
}

async fn a_crash_with_deliveries_pending_loses_none(b: Backend) {
    let mut app = TestApp::spawn(b).await;
    let rx = Receiver::start().await;
    rx.script("/later", &[503; 3]);
    let ids = vec![
        submit_notified(&app, &rx.url("/later")).await,
        submit_notified(&app, &rx.url("/later")).await,
    ];
    for id in &ids {
        app.wait_for_status(id, "succeeded", WITHIN).await;
    }
    app.crash_and_restart().await;
    for id in &ids {
        wait_deliveries(&app, id, all_in("delivered", 3)).await;
    }
    // Every event arrived at least once.
    let got = rx.received("/later");
    for id in &ids {
        let seen: HashSet<String> = got
            .iter()
            .filter(|r| r.json()["id"] == id.as_str() && r.json().is_object())
            .map(|r| r.json()["status"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(seen.len(), 3, "{id}: {seen:?}");
    }
}

async fn a_delivery_can_be_replayed(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let rx = Receiver::start().await;
    let id = submit_notified(&app, &rx.url("/ok")).await;
    let d = wait_deliveries(&app, &id, all_in("delivered", 1)).await;
    let delivery = d[0]["id"].as_str().unwrap().to_owned();
    let r = app
        .http
        .post(format!(
            "{}/v1/tasks/{id}/deliveries/{delivery}/retry",
            app.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_until(WITHIN, || async { rx.received("/ok").len() == 2 }).await;
    let got = rx.received("/ok");
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    assert_eq!(got[0].header("webhook-id"), delivery);
    let r = app
        .http
        .post(format!(
            "{}/v1/tasks/{id}/deliveries/msg_nope/retry",
            app.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(
        problem["detail"], "this task has no notification with this id",
        "a 404 names what is missing"
    );
}

async fn client_default_url_and_secret_rotation(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let rx = Receiver::start().await;
    let store = kling_relay::storage::Store::connect(&app.db.url, 1)
        .await
        .unwrap();
    kling_relay::service::clients::set_notify_url(&store, "tester", Some(&rx.url("/default")))
        .await
        .unwrap();
    let id = app.submit_ok(&valid_body()).await;
    wait_deliveries(&app, &id, all_in("delivered", 1)).await;
    let first = rx.received("/default");
    assert_eq!(first.len(), 1);
    verify_standard_webhook(&app.client.signing_secret, &first[0]).unwrap();

    let new_secret =
        kling_relay::service::clients::rotate_secret(&store, "tester", Duration::from_secs(3600))
            .await
            .unwrap();
    let id2 = app.submit_ok(&valid_body()).await;
    wait_deliveries(&app, &id2, all_in("delivered", 1)).await;
    let r = rx.received("/default").pop().unwrap();
    assert_eq!(
        r.header("webhook-signature").split(' ').count(),
        2,
        "both during the grace"
    );
    verify_standard_webhook(&new_secret, &r).expect("new secret");
    verify_standard_webhook(&app.client.signing_secret, &r).expect("old secret, in grace");
    verify_with_reference_library(&new_secret, &r).expect("reference library");

    // Grace over: only the new secret signs.
    kling_relay::service::clients::rotate_secret(&store, "tester", Duration::ZERO)
        .await
        .unwrap();
    store.close().await;
}

async fn refused_destinations(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| {
                s.notifications.deny_networks = vec!["127.0.0.0/8".into()];
            }),
            ..Options::stalled()
        },
    )
    .await;
    // Refused at the door: only loopback spellings here (a test never aims the service at
    // another address, even one it should refuse); link-local and metadata addresses are
    // covered by domain::notify's unit tests.
    for url in [
        "http://127.0.0.1/latest",
        "http://[::ffff:127.0.0.1]/x",
        "ftp://localhost/x",
    ] {
        let mut body = valid_body();
        body["notify_url"] = json!(url);
        let r = app.submit(&body).await;
        assert_eq!(r.status(), 422, "{url}");
    }
    // A name resolving to a denied network: the delivery is dead, with the reason.
    let rx = Receiver::start().await;
    let url = rx.url("/ok").replace("127.0.0.1", "localhost");
    let id = submit_notified(&app, &url).await;
    let d = wait_deliveries(&app, &id, all_in("dead", 1)).await;
    assert!(
        d[0]["last_error"].as_str().unwrap().contains("denied"),
        "{d:#?}"
    );
    assert!(rx.received("/ok").is_empty());
}

/// Without `notifications.allow_networks` naming it, this host is no destination, in any spelling:
/// a client could otherwise read the relay's own ports off its delivery log.
async fn loopback_destinations_are_opt_in(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.notifications.allow_networks.clear()),
            ..Options::stalled()
        },
    )
    .await;
    for host in [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f000001",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
    ] {
        let mut body = valid_body();
        body["notify_url"] = json!(format!("http://{host}:5432/x"));
        let r = app.submit(&body).await;
        assert_eq!(r.status(), 422, "{host}");
    }
    // A name is judged by what it resolves to, when the notification is sent.
    let rx = Receiver::start().await;
    let url = rx.url("/ok").replace("127.0.0.1", "localhost");
    let id = submit_notified(&app, &url).await;
    let d = wait_deliveries(&app, &id, all_in("dead", 1)).await;
    assert!(
        d[0]["last_error"].as_str().unwrap().contains("loopback"),
        "{d:#?}"
    );
    assert!(rx.received("/ok").is_empty());
}

/// Issue 18: the dashboard's notifications view lists the signed-in client's notifications in
/// trouble across tasks (not the delivered ones), and "Replay all dead" sends them again.
async fn the_dashboard_lists_dead_notifications_and_replays_them(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let rx = Receiver::start().await;
    rx.script("/down", &[500; 4]);
    let dead_task = submit_notified(&app, &rx.url("/down")).await;
    let dead = wait_deliveries(&app, &dead_task, all_in("dead", 1)).await;
    let dead_id = dead[0]["id"].as_str().unwrap().to_owned();
    let fine_task = submit_notified(&app, &rx.url("/ok")).await;
    let fine = wait_deliveries(&app, &fine_task, all_in("delivered", 1)).await;
    let fine_id = fine[0]["id"].as_str().unwrap().to_owned();

    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = plain
        .post(format!("{}/ui/login", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("api_key={}", app.client.api_key))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = |path: &'static str| {
        let (plain, cookie, base) = (plain.clone(), cookie.clone(), app.base.clone());
        async move {
            let r = plain
                .get(format!("{base}{path}"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    let html = page("/ui/notifications").await;
    assert!(
        html.contains(&format!("data-delivery=\"{dead_id}\" data-state=\"dead\"")),
        "{html}"
    );
    assert!(
        !html.contains(&fine_id),
        "a delivered notification is not in trouble"
    );
    assert!(html.contains("Replay all dead (1)"), "{html}");
    assert!(html.contains(&format!(
        "/ui/tasks/{dead_task}/deliveries/{dead_id}/replay?from=notifications"
    )));

    let r = plain
        .post(format!("{}/ui/notifications/replay-dead", app.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/notifications?replayed=1");
    let again = wait_deliveries(&app, &dead_task, all_in("delivered", 1)).await;
    assert_eq!(again[0]["id"], dead_id.as_str(), "the same webhook-id");
    assert_eq!(rx.received("/down").len(), 5);
    let html = page("/ui/notifications?replayed=1").await;
    assert!(html.contains("Every notification was delivered."), "{html}");
    assert!(html.contains("1 notification queued"), "{html}");
}

on_both_backends!(
    the_dashboard_lists_dead_notifications_and_replays_them,
    loopback_destinations_are_opt_in,
    every_status_change_is_notified_signed_and_after_commit,
    failing_receiver_is_retried_with_the_same_webhook_id,
    exhausted_deliveries_are_dead_not_deleted,
    gone_disables_the_url_for_the_client,
    a_hanging_receiver_slows_nobody_else,
    a_crash_with_deliveries_pending_loses_none,
    a_delivery_can_be_replayed,
    client_default_url_and_secret_rotation,
    refused_destinations,
);

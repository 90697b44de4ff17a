//! Several replicas on one database: claims never hand the same work to two of them, the
//! upstream budget is shared, a dead replica's leases lapse and its work is taken over, and
//! waiters hear of changes made elsewhere. Each "replica" here is its own connection pool (a
//! `Store`) or its own in-process service on the same database.

use crate::common::*;
use kling_relay::domain::{Change, EventSource, TaskStatus};
use kling_relay::storage::{Commit, FeedEvent, OutboxEntry, PendingCaps, Store};
use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const CAPS: PendingCaps = PendingCaps {
    total: 100_000,
    per_client: 100_000,
};

/// A task of `n` units, owned by nobody.
fn record(n: i64) -> kling_relay::storage::NewTaskRecord {
    let mut r = task_record(0);
    r.n = n;
    r.client = None;
    r
}

fn submitted(upstream_id: &str) -> Change {
    Change {
        status: TaskStatus::Submitted,
        upstream_status: None,
        bind_upstream_task_id: Some(upstream_id.into()),
        upstream_updated_at_ms: None,
        images: None,
        error: None,
        detail: None,
        final_unit_deduction: None,
    }
}

/// Stores a task (owned by `client`) and commits it as `submitted` to upstream task `upstream`,
/// with a poll due at `poll_due_at_ms` and, when `notify` names a URL, a notification to it.
async fn submitted_task(
    s: &Store,
    client: Option<&str>,
    upstream: &str,
    poll_due_at_ms: Option<i64>,
    notify: Option<(&str, &str)>,
) -> String {
    let mut r = record(1);
    r.client = client.map(str::to_owned);
    s.insert_task(r.clone(), None, CAPS).await.unwrap();
    let outbox = notify.map(|(id, url)| OutboxEntry {
        id: id.into(),
        client: client.unwrap_or_default().into(),
        url: url.into(),
        payload: "{}".into(),
    });
    assert!(s
        .commit_change(&Commit {
            poll_due_at_ms,
            outbox: outbox.as_ref(),
            ..commit(&r.id, 0, &submitted(upstream), EventSource::Dispatch, 10)
        })
        .await
        .unwrap());
    r.id
}

/// Many replicas claiming at once: no task is claimed twice, and the units claimed never
/// exceed the shared budget, although each replica decides on its own.
async fn concurrent_claims_share_the_budget_and_never_overlap(b: Backend) {
    const BUDGET: i64 = 10;
    let db = TestDb::new(b).await;
    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(open_store(&db).await);
    }
    for i in 0..60 {
        replicas[0]
            .insert_task(record(1 + i % 3), None, CAPS)
            .await
            .unwrap();
    }
    let mut rounds = tokio::task::JoinSet::new();
    for i in 0..12 {
        let s = replicas[i % replicas.len()].clone();
        rounds.spawn(async move {
            s.claim_dispatches(i64::MAX / 2, 3, i64::MAX / 2 + 1, false, |_, held, due| {
                // What any replica's admission does: fill the free units, oldest first.
                let in_flight = held.in_flight();
                let mut free = BUDGET - in_flight;
                let mut take = Vec::new();
                for c in due {
                    if c.n <= free {
                        free -= c.n;
                        take.push(c.id);
                    }
                }
                take
            })
            .await
            .unwrap()
        });
    }
    let mut seen = HashSet::new();
    let mut units = 0;
    while let Some(claimed) = rounds.join_next().await {
        for t in claimed.unwrap() {
            assert!(seen.insert(t.id.clone()), "task {} claimed twice", t.id);
            units += t.n;
        }
    }
    assert!(units > 0, "something was claimed");
    assert!(
        units <= BUDGET,
        "replicas claimed {units} units against a budget of {BUDGET}"
    );
    record_figures(&format!(
        "claims: 12 concurrent rounds on 4 replicas claimed {units} of {BUDGET} units, 0 twice"
    ));
}

/// A replica that dies holding a claim: the task is not due for anyone while the lease runs, then
/// another replica takes it over, in doubt (its create may have landed).
async fn a_lapsed_dispatch_lease_is_taken_over(b: Backend) {
    let db = TestDb::new(b).await;
    let (dead, alive) = (open_store(&db).await, open_store(&db).await);
    let r = record(1);
    dead.insert_task(r.clone(), None, CAPS).await.unwrap();
    let take_all = |_: Option<kling_relay::domain::admission::AdmissionState>,
                    _: kling_relay::domain::fair_share::Held,
                    due: Vec<kling_relay::storage::DispatchCandidate>| {
        due.into_iter().map(|c| c.id).collect::<Vec<_>>()
    };
    const T: i64 = 1_800_000_000_000;
    let first = dead
        .claim_dispatches(T, 10, T + 1_000, false, take_all)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    // `dead` never reports back.
    let early = alive
        .claim_dispatches(T + 999, 10, T + 5_000, false, take_all)
        .await
        .unwrap();
    assert!(early.is_empty(), "taken while the lease ran");
    let late = alive
        .claim_dispatches(T + 1_000, 10, T + 5_000, false, take_all)
        .await
        .unwrap();
    assert_eq!(late.len(), 1, "taken over once the lease lapsed");
    assert_eq!(late[0].id, r.id);
    assert_eq!(
        late[0].dispatch_started_at_ms,
        Some(T),
        "the takeover knows the first create may have landed"
    );
    assert_eq!(late[0].dispatch_attempts, 2);
}

/// Polls: disjoint claims across replicas, due again once a dead replica's lease lapses.
async fn poll_claims_are_disjoint_and_lapse(b: Backend) {
    let db = TestDb::new(b).await;
    let (a, bb) = (open_store(&db).await, open_store(&db).await);
    for i in 0..20 {
        submitted_task(&a, None, &format!("u-{i}"), Some(100), None).await;
    }
    let (x, y) = tokio::join!(
        a.claim_due_polls(100, 15, 5_000),
        bb.claim_due_polls(100, 15, 5_000)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    let mut seen = HashSet::new();
    for c in x.iter().chain(&y) {
        assert!(seen.insert(c.id.clone()), "poll of {} claimed twice", c.id);
    }
    assert_eq!(seen.len(), 20, "all due polls claimed between the two");
    assert!(a
        .claim_due_polls(4_999, 50, 9_000)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        bb.claim_due_polls(5_000, 50, 9_000).await.unwrap().len(),
        20,
        "due again once the lease lapsed"
    );
}

/// Notifications: disjoint claims across replicas; `take` declining leaves a delivery due.
async fn delivery_claims_are_disjoint(b: Backend) {
    let db = TestDb::new(b).await;
    let (a, bb) = (open_store(&db).await, open_store(&db).await);
    let client = create_client(&db, "c1").await;
    for i in 0..12 {
        let (id, url) = (format!("msg_{i}"), format!("https://receiver.test/{i}"));
        submitted_task(
            &a,
            Some(&client.name),
            &format!("u-{i}"),
            None,
            Some((&id, &url)),
        )
        .await;
    }
    let (x, y) = tokio::join!(
        a.claim_deliveries(i64::MAX / 2, 100, i64::MAX / 2 + 1, |_| Some(())),
        bb.claim_deliveries(i64::MAX / 2, 100, i64::MAX / 2 + 1, |_| Some(()))
    );
    let mut seen = HashSet::new();
    for (d, ()) in x.unwrap().iter().chain(&y.unwrap()) {
        assert!(seen.insert(d.id.clone()), "delivery {} claimed twice", d.id);
    }
    assert_eq!(seen.len(), 12);

    // A replica with no free slot claims nothing and leaves the delivery due.
    let c = create_client(&db, "c2").await;
    let notify = Some(("msg_x", "https://receiver.test/x"));
    submitted_task(&a, Some(&c.name), "u-x", None, notify).await;
    let none = a
        .claim_deliveries(i64::MAX / 2, 100, i64::MAX / 2 + 1, |_| None::<()>)
        .await
        .unwrap();
    assert!(none.is_empty());
    let later = bb
        .claim_deliveries(i64::MAX / 2, 100, i64::MAX / 2 + 1, |_| Some(()))
        .await
        .unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].0.id, "msg_x");
}

/// What admission learns is one row every replica changes: changes made at once through two
/// stores all land (none overwrites another), and a dispatch claim hands the stored state to its
/// decision.
async fn admission_changes_from_two_replicas_all_land(b: Backend) {
    use kling_relay::domain::admission::AdmissionState;
    let db = TestDb::new(b).await;
    let (one, two) = (open_store(&db).await, open_store(&db).await);
    assert_eq!(
        one.admission_state().await.unwrap(),
        None,
        "nothing learnt yet"
    );
    let fresh = AdmissionState::fresh(12);
    let bump = |store: Store| async move {
        for _ in 0..20 {
            store
                .update_admission(1, fresh, |mut s| {
                    s.finished_units += 1;
                    s.working = 7;
                    (s, ())
                })
                .await
                .unwrap();
        }
    };
    tokio::join!(
        bump(one.clone()),
        bump(two.clone()),
        bump(one.clone()),
        bump(two.clone())
    );
    let stored = two.admission_state().await.unwrap().expect("stored");
    assert_eq!(stored.finished_units, 80, "no change lost: {stored:?}");
    assert_eq!(stored.working, 7);
    // The claim reads it too, in its own transaction.
    one.insert_task(record(1), None, CAPS).await.unwrap();
    let seen = std::sync::Mutex::new(None);
    one.claim_dispatches(i64::MAX / 2, 3, i64::MAX / 2 + 1, false, |learnt, _, _| {
        *seen.lock().unwrap() = learnt;
        Vec::new()
    })
    .await
    .unwrap();
    assert_eq!(*seen.lock().unwrap(), Some(stored));
}

/// A `1303` learnt by one replica holds on another: a replica started later adopts the shrunken
/// working limit instead of spending refused creates to learn it again (Postgres; SQLite has one
/// instance, where the same row makes a restart keep what was learnt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_learnt_on_one_replica_holds_on_another() {
    if postgres_or_skip().is_none() {
        return;
    }
    let app = TestApp::spawn_with(
        Backend::Postgres,
        Options {
            settings: Box::new(|s| {
                s.cometapi.max_concurrency = 8;
                // One create per pass, so the refusal is learnt exactly: two tasks of 2 units
                // ran, a third was refused.
                s.dispatch.concurrency = 1;
                s.dispatch.wait = Duration::from_millis(10);
            }),
            sim: kling_relay::simulator::SimConfig {
                concurrency_units: 4,
                ..stalled_sim()
            },
            ..Options::default()
        },
    )
    .await;
    for _ in 0..6 {
        assert_eq!(app.submit(&valid_body()).await.status(), 202);
    }
    wait_until(Duration::from_secs(20), || async {
        let s = app.sim.stats();
        s.tasks_created == 2 && s.busy_answers == 1
    })
    .await;
    let working = |base: String| {
        let http = app.http.clone();
        async move {
            let status = fetch_json(&http, &format!("{base}/v1/status")).await;
            status["dispatch"]["working_limit"]
                .as_i64()
                .expect("working_limit")
        }
    };
    assert_eq!(working(app.base.clone()).await, 4);
    let other = app.replica().await;
    // The new replica has work waiting and room by its own configuration (8 units), and its
    // dispatcher runs a pass at least every 500 ms: it must not spend a create to relearn.
    let r = app
        .http
        .post(format!("{}/v1/tasks", other.base))
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let s = app.sim.stats();
    assert_eq!(
        (s.tasks_created, s.busy_answers),
        (2, 1),
        "no replica sent past the learnt limit: {s:?}"
    );
    assert_eq!(
        working(other.base.clone()).await,
        4,
        "the new replica reports it"
    );
}

// SQLite serves one instance, so only the takeover (by the same instance after a restart) and
// single-claimer behaviour apply there.
on_both_backends!(
    a_lapsed_dispatch_lease_is_taken_over,
    admission_changes_from_two_replicas_all_land
);

on_postgres!(
    postgres_replicas;
    concurrent_claims_share_the_budget_and_never_overlap,
    poll_claims_are_disjoint_and_lapse,
    delivery_claims_are_disjoint,
);

/// Postgres: a change committed through one store is heard by every other store's feed, not by
/// its own, and only once committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_replicas_hear_committed_changes() {
    if postgres_or_skip().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let (a, bb) = (open_store(&db).await, open_store(&db).await);
    let mut feed_a = a.change_feed().await.unwrap().expect("Postgres has a feed");
    let mut feed_b = bb
        .change_feed()
        .await
        .unwrap()
        .expect("Postgres has a feed");
    let r = record(1);
    a.insert_task(r.clone(), None, CAPS).await.unwrap();
    assert!(a
        .commit_change(&commit(
            &r.id,
            0,
            &submitted("u-1"),
            EventSource::Dispatch,
            10
        ))
        .await
        .unwrap());
    let heard = tokio::time::timeout(Duration::from_secs(5), feed_b.next())
        .await
        .expect("heard within 5 s")
        .unwrap();
    assert_eq!(heard, FeedEvent::Changed(r.id.clone()));
    // A stale compare-and-set commits nothing and says nothing.
    assert!(!bb
        .commit_change(&commit(
            &r.id,
            0,
            &submitted("u-1"),
            EventSource::Dispatch,
            11
        ))
        .await
        .unwrap());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), feed_a.next())
            .await
            .is_err(),
        "a store does not hear its own changes, nor rolled-back ones"
    );
    // A group commit of 150 changes is heard as 150 tasks (in notifications of up to 100 ids).
    let mut batch_ids = Vec::new();
    for i in 0..150 {
        let r = record(i);
        a.insert_task(r.clone(), None, CAPS).await.unwrap();
        batch_ids.push(r.id);
    }
    let changes: Vec<Change> = (0..batch_ids.len())
        .map(|i| submitted(&format!("u-many-{i}")))
        .collect();
    let commits: Vec<Commit> = batch_ids
        .iter()
        .zip(&changes)
        .map(|(id, change)| Commit {
            leaves_pending: true,
            ..commit(id, 0, change, EventSource::Webhook, 20)
        })
        .collect();
    assert!(a.commit_changes(&commits).await.unwrap().iter().all(|w| *w));
    let heard = hear(&mut feed_b, batch_ids.len()).await;
    assert_eq!(heard, batch_ids.into_iter().collect::<HashSet<_>>());

    // The same as one statement (every change carries the row it was decided on): the 150 won
    // changes are heard, the one that lost its compare-and-set is not.
    let mut whole_ids = Vec::new();
    for i in 150..301 {
        let r = record(i);
        a.insert_task(r.clone(), None, CAPS).await.unwrap();
        whole_ids.push(r.id);
    }
    let mut read = Vec::new();
    for id in &whole_ids {
        read.push(kling_relay::storage::DecidedOn::of(
            &a.get_task(id).await.unwrap().unwrap(),
        ));
    }
    let more: Vec<Change> = (0..whole_ids.len())
        .map(|i| submitted(&format!("u-whole-{i}")))
        .collect();
    let commits: Vec<Commit> = whole_ids
        .iter()
        .zip(&more)
        .zip(&read)
        .enumerate()
        .map(|(k, ((id, change), d))| Commit {
            leaves_pending: true,
            decided_on: Some(d),
            // The last is decided on a version the task never had.
            ..commit(
                id,
                if k == 150 { 9 } else { 0 },
                change,
                EventSource::Webhook,
                30,
            )
        })
        .collect();
    let won = a.commit_changes(&commits).await.unwrap();
    assert_eq!(won.iter().filter(|w| **w).count(), 150);
    assert!(!won[150], "the stale change lost");
    let lost = whole_ids.pop().expect("151 ids");
    let heard = hear(&mut feed_b, whole_ids.len()).await;
    assert!(!heard.contains(&lost), "a lost change is not announced");
    assert_eq!(heard, whole_ids.into_iter().collect::<HashSet<_>>());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), feed_b.next())
            .await
            .is_err(),
        "nothing more is heard"
    );
}

/// The first `n` distinct tasks `feed` hears of, each within 5 s.
async fn hear(feed: &mut kling_relay::storage::ChangeFeed, n: usize) -> HashSet<String> {
    let mut heard = HashSet::new();
    while heard.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), feed.next())
            .await
            .expect("heard within 5 s")
            .unwrap()
        {
            FeedEvent::Changed(id) => {
                heard.insert(id);
            }
            FeedEvent::Gap => {}
        }
    }
    heard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_has_no_change_feed() {
    let db = TestDb::new(Backend::Sqlite).await;
    assert!(open_store(&db).await.change_feed().await.unwrap().is_none());
}

/// Long-polls `id` on `other` while a callback moving it to `status` lands on `app`; returns
/// how long the waiter waited.
async fn wake_across(
    app: &TestApp,
    other: &Replica,
    id: &str,
    from: &str,
    to: &str,
    at: i64,
) -> Duration {
    let waiter = {
        let http = app.http.clone();
        let url = format!("{}/v1/tasks/{id}?wait=20&status_not={from}", other.base);
        tokio::spawn(async move {
            let started = Instant::now();
            let v: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
            (v, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let upstream_id = app.task(id).await["upstream_task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let upstream_status = if to == "succeeded" { "succeed" } else { to };
    let (code, _) = app
        .post_callback(
            &app.callback_url(id),
            &callback(&upstream_id, upstream_status, at),
        )
        .await;
    assert_eq!(code, 200);
    let (task, waited) = waiter.await.unwrap();
    assert_eq!(task["status"], json!(to), "{task}");
    waited
}

/// Long-poll on one replica, webhook on another: the waiter answers as soon as the change
/// commits, not at the end of its wait. Also after the database dropped every connection,
/// the listener's included: the feed reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_hears_a_webhook_that_landed_on_another_replica() {
    if postgres_or_skip().is_none() {
        return;
    }
    let app = TestApp::spawn_with(Backend::Postgres, Options::stalled()).await;
    let other = app.replica().await;
    let id = app.submit_ok(&valid_body()).await;
    app.wait_for_status(&id, "submitted", Duration::from_secs(10))
        .await;
    let waited = wake_across(
        &app,
        &other,
        &id,
        "submitted",
        "processing",
        1_700_000_000_500,
    )
    .await;
    assert!(waited < Duration::from_secs(5), "woke after {waited:?}");

    // Every connection to the database dropped, the listening ones too.
    let name = url::Url::parse(&app.db.url).unwrap().path()[1..].to_owned();
    let mut admin = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&postgres_admin_url())
            .await
            .unwrap()
    };
    let dropped: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ))
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        dropped >= 2,
        "the service's connections, listeners included: {dropped}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waited = wake_across(
        &app,
        &other,
        &id,
        "processing",
        "succeeded",
        1_700_000_000_900,
    )
    .await;
    assert!(
        waited < Duration::from_secs(5),
        "after the connections dropped, the waiter woke after {waited:?}"
    );
}

/// A client's submit rate holds across replicas: four a minute, spent on two replicas, leave no
/// fifth on either (Postgres; SQLite has one instance by its lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_submit_rate_holds_across_replicas() {
    if postgres_or_skip().is_none() {
        return;
    }
    let app = TestApp::spawn_with(
        Backend::Postgres,
        Options {
            settings: Box::new(|s| s.limits.client_submits_per_minute = 4),
            ..Options::stalled()
        },
    )
    .await;
    let other = app.replica().await;
    let submit_on = |base: &str| {
        let (http, url) = (app.http.clone(), format!("{base}/v1/tasks"));
        async move { http.post(url).json(&valid_body()).send().await.unwrap() }
    };
    for base in [&app.base, &other.base, &app.base, &other.base] {
        assert_eq!(submit_on(base).await.status(), 202, "{base}");
    }
    for base in [&app.base, &other.base] {
        let r = submit_on(base).await;
        assert_eq!(r.status(), 429, "{base}");
        let secs: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=15).contains(&secs), "one more in 15 s at most: {secs}");
    }
}

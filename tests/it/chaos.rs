//! Faults: a replica killed mid-run among three, Postgres refusing and dropping connections under
//! load, SQLite under `kill -9` at random moments. Each test prints its figures (tasks, kills,
//! lost, duplicated) as one `chaos:` line; the README's Reliability section quotes them.

use crate::common::process::*;
use crate::common::receiver::Receiver;
use crate::common::*;
use kling_relay::simulator::{SimConfig, Simulator};
use rand::Rng;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn sim_with_units(units: i64) -> Simulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(
        SimConfig {
            processing_after: Duration::from_millis(150),
            finish_after: Duration::from_millis(300),
            concurrency_units: units,
            ..SimConfig::default()
        },
        listener,
    )
    .await
    .unwrap()
}

/// Posts valid tasks to the given services until `stop` says so or `total` are acknowledged;
/// returns the acknowledged ids. A service that does not answer is skipped for that task.
async fn submit_across(
    http: reqwest::Client,
    bases: Arc<Mutex<Vec<String>>>,
    total: usize,
    workers: usize,
    acked: Arc<Mutex<Vec<String>>>,
) {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (http, bases, acked) = (http.clone(), bases.clone(), acked.clone());
        set.spawn(async move {
            let mut turn = w;
            loop {
                if acked.lock().unwrap().len() >= total {
                    return;
                }
                let targets = bases.lock().unwrap().clone();
                if targets.is_empty() {
                    return;
                }
                turn += 1;
                let base = &targets[turn % targets.len()];
                let Ok(r) = http
                    .post(format!("{base}/v1/tasks"))
                    .json(&valid_body())
                    .send()
                    .await
                else {
                    continue;
                };
                if r.status() == 202 {
                    if let Ok(v) = r.json::<Value>().await {
                        if let Some(id) = v["id"].as_str() {
                            acked.lock().unwrap().push(id.to_owned());
                        }
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// Fault test 1: three replicas, one Postgres, 1,000 tasks submitted through all three, one
/// replica killed with `kill -9` mid-run. Every task ends final, each is created upstream exactly
/// once, the shared budget is never exceeded, and every final notification is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_killed_mid_run_lose_nothing_and_pay_once() {
    const TASKS: usize = 1000;
    const UNITS: i64 = 60;
    if postgres_or_skip().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let sim = sim_with_units(UNITS).await;
    let rx = Receiver::start().await;
    let http = client_from_cli(&db);
    cli_ok(
        &db,
        &["clients", "set-notify-url", "tester", &rx.url("/hook")],
    );
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut env = service_env(&listen, &db.url, &sim);
        for (k, v) in [
            ("KLING_RELAY_COMETAPI__MAX_CONCURRENCY", UNITS.to_string()),
            (
                "KLING_RELAY_LIMITS__CLIENT_SUBMITS_PER_MINUTE",
                "100000".into(),
            ),
            ("KLING_RELAY_LIMITS__CLIENT_MAX_PENDING", "100000".into()),
            ("KLING_RELAY_NOTIFICATIONS__TIMEOUT", "2s".into()),
        ] {
            env.retain(|(key, _)| key != k);
            env.push((k.into(), v));
        }
        replicas.push(Service::spawn(&["serve"], &env, dir.path()));
    }
    for r in &mut replicas {
        r.wait_ready().await;
    }
    let started = Instant::now();
    let bases = Arc::new(Mutex::new(
        replicas.iter().map(|r| r.base.clone()).collect::<Vec<_>>(),
    ));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let load = tokio::spawn(submit_across(
        http.clone(),
        bases.clone(),
        TASKS,
        12,
        acked.clone(),
    ));
    // Mid-run: a third of the tasks in, many of them in flight upstream on every replica.
    wait_until(Duration::from_secs(60), || async {
        acked.lock().unwrap().len() >= TASKS / 3
    })
    .await;
    let victim = replicas[1].base.clone();
    replicas[1].kill9();
    bases.lock().unwrap().retain(|b| b != &victim);
    load.await.unwrap();
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(acked.len() >= TASKS);

    let open = "SELECT COUNT(*) FROM tasks WHERE status IN ('pending', 'submitted', 'processing')";
    let undelivered = "SELECT COUNT(*) FROM tasks t WHERE NOT EXISTS (SELECT 1 FROM deliveries d \
        WHERE d.task_id = t.id AND d.event_status = t.status AND d.state = 'delivered')";
    let outstanding = "SELECT COUNT(*) FROM deliveries WHERE state <> 'delivered'";
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let (o, u) = (db.count(open).await, db.count(undelivered).await);
        let d = db.count(outstanding).await;
        if o == 0 && u == 0 && d == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{o} tasks still open, {u} final notifications undelivered, {d} deliveries outstanding"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed();

    let stored = db.count("SELECT COUNT(*) FROM tasks").await;
    let ids: HashSet<String> = {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query_scalar("SELECT id FROM tasks")
            .fetch_all(&mut c)
            .await
            .unwrap()
            .into_iter()
            .collect()
    };
    let lost = acked.iter().filter(|id| !ids.contains(*id)).count();
    let stats = sim.stats();
    let duplicated = stats.tasks_created as i64 - stored;
    let unbound = db
        .count("SELECT COUNT(*) FROM tasks WHERE upstream_task_id IS NULL OR status <> 'succeeded'")
        .await;
    record_figures(&format!(
        "chaos: replicas=3 killed=1 tasks={stored} acknowledged={} lost={lost} \
         duplicated={duplicated} created_upstream={} busy_answers={} peak_units={}/{UNITS} \
         notifications_received={} elapsed={:.1}s",
        acked.len(),
        stats.tasks_created,
        stats.busy_answers,
        stats.peak_units_in_use,
        rx.received("/hook").len(),
        elapsed.as_secs_f64()
    ));
    assert_eq!(lost, 0, "acknowledged tasks missing");
    assert_eq!(
        duplicated, 0,
        "each stored task is created upstream exactly once"
    );
    assert_eq!(unbound, 0, "every task succeeded with its upstream task");
    assert_eq!(
        stats.busy_answers, 0,
        "the replicas shared one budget: upstream never had to refuse"
    );
    assert!(stats.peak_units_in_use <= UNITS);
    sim.stop();
}

/// Fault test 2: Postgres drops every connection of the service several times under load, and
/// for a while refuses new ones. While it cannot commit the service answers 503 and stores
/// nothing; it recovers without a restart, and nothing acknowledged is lost or paid twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outages_answer_503_and_recover_without_a_restart() {
    if postgres_or_skip().is_none() {
        return;
    }
    let app = TestApp::spawn(Backend::Postgres).await;
    let name = url::Url::parse(&app.db.url).unwrap().path()[1..].to_owned();
    let admin = || async {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&postgres_admin_url())
            .await
            .unwrap()
    };
    let terminate = format!(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    );

    let answers = Arc::new(Mutex::new(Vec::<(u16, Option<String>)>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (http, base, answers, stop) = (
            app.http.clone(),
            app.base.clone(),
            answers.clone(),
            stop.clone(),
        );
        load.spawn(async move {
            while !stop.is_cancelled() {
                let Ok(r) = http
                    .post(format!("{base}/v1/tasks"))
                    .json(&valid_body())
                    .send()
                    .await
                else {
                    continue;
                };
                let status = r.status().as_u16();
                let ctype = content_type(&r);
                let v: Value = r.json().await.unwrap_or(Value::Null);
                if status == 503 {
                    assert_eq!(ctype, "application/problem+json", "{v}");
                }
                let id = v["id"].as_str().map(str::to_owned);
                answers.lock().unwrap().push((status, id));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    // Dropped connections, five times.
    let mut terminated = 0i64;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut c = admin().await;
        terminated += sqlx::query_scalar::<_, i64>(&terminate)
            .fetch_one(&mut c)
            .await
            .unwrap();
    }
    // An outage: no connection at all for a second and a half.
    {
        let mut c = admin().await;
        sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            .execute(&mut c)
            .await
            .unwrap();
        terminated += sqlx::query_scalar::<_, i64>(&terminate)
            .fetch_one(&mut c)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = app.submit(&valid_body()).await;
    let during_status = during.status().as_u16();
    let id = "0190f6a2-0000-7000-8000-000000000000";
    let (webhook_status, _) = app
        .post_callback(
            &app.callback_url(id),
            &callback("u-x", "succeed", 1_700_000_000_000),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    {
        let mut c = admin().await;
        sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
            .execute(&mut c)
            .await
            .unwrap();
    }
    assert_eq!(during_status, 503, "a submit during the outage");
    assert_eq!(
        webhook_status, 503,
        "a callback during the outage: the sender may retry"
    );

    // Recovered without a restart.
    let recovered = Instant::now();
    wait_until(Duration::from_secs(15), || async {
        app.submit(&valid_body()).await.status() == 202
    })
    .await;
    let recovery = recovered.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    while let Some(r) = load.join_next().await {
        r.unwrap();
    }

    let answers = answers.lock().unwrap().clone();
    let unexpected: Vec<u16> = answers
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| *s != 202 && *s != 503)
        .collect();
    assert!(
        unexpected.is_empty(),
        "answers other than 202/503: {unexpected:?}"
    );
    let acked: Vec<String> = answers.iter().filter_map(|(_, id)| id.clone()).collect();
    let refused = answers.iter().filter(|(s, _)| *s == 503).count();

    let open = "SELECT COUNT(*) FROM tasks WHERE status IN ('pending', 'submitted', 'processing')";
    wait_until(Duration::from_secs(60), || async {
        app.db.count(open).await == 0
    })
    .await;
    let stored = app.db.count("SELECT COUNT(*) FROM tasks").await;
    let mut lost = 0;
    for id in &acked {
        let (status, t) = app.get_json(&format!("/v1/tasks/{id}")).await;
        if status != 200 || t["status"] != "succeeded" {
            lost += 1;
        }
    }
    let duplicated = app.sim.stats().tasks_created as i64 - stored;
    record_figures(&format!(
        "chaos: postgres connections_terminated={terminated} outage=1.5s submits={} \
         acknowledged={} answered_503={refused} lost={lost} duplicated={duplicated} \
         recovered_in={:.1}s",
        answers.len(),
        acked.len(),
        recovery.as_secs_f64()
    ));
    assert!(acked.len() > 10, "the load ran");
    assert_eq!(lost, 0);
    assert_eq!(duplicated, 0);
    assert!(
        stored >= acked.len() as i64,
        "nothing acknowledged is missing"
    );
}

/// Fault test 3: SQLite under `kill -9` at random moments of a busy workload (submits, dispatch,
/// callbacks, notifications), 20 times. After every kill the file passes `PRAGMA integrity_check`,
/// every acknowledged task is stored, and every callback the service acknowledged has its effect
/// stored. A final run completes everything, each task created upstream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_kill_dash_nine_at_random_moments() {
    const RUNS: usize = 20;
    let db = TestDb::new(Backend::Sqlite).await;
    let sim = start_sim().await;
    let rx = Receiver::start().await;
    let http = client_from_cli(&db);
    cli_ok(
        &db,
        &["clients", "set-notify-url", "tester", &rx.url("/hook")],
    );
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let env = service_env(&listen, &db.url, &sim);
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut rng = rand::thread_rng();
    let mut kill_points = Vec::new();

    for _ in 0..RUNS {
        let mut svc = Service::spawn(&["serve"], &env, dir.path());
        svc.wait_ready().await;
        let bases = Arc::new(Mutex::new(vec![svc.base.clone()]));
        let load = tokio::spawn(submit_across(
            http.clone(),
            bases.clone(),
            usize::MAX,
            4,
            acked.clone(),
        ));
        let kill_after = rng.gen_range(20..900);
        kill_points.push(kill_after);
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        svc.kill9();
        bases.lock().unwrap().clear();
        load.await.unwrap();

        let (integrity, ids, bound) = inspect_sqlite(&db.url).await;
        assert_eq!(
            integrity, "ok",
            "integrity_check after a kill at {kill_after} ms"
        );
        for id in acked.lock().unwrap().iter() {
            assert!(
                ids.contains(id),
                "acknowledged task {id} lost (kill at {kill_after} ms)"
            );
        }
        for (upstream_id, status) in sim.acknowledged_callbacks() {
            let stored = bound.iter().find(|(u, _)| u == &upstream_id);
            let Some((_, ours)) = stored else {
                panic!("acknowledged callback for {upstream_id} left no trace");
            };
            let theirs = match status.as_str() {
                "succeed" | "failed" => "final",
                s => s,
            };
            assert!(
                status_rank(ours) >= status_rank(theirs),
                "acknowledged {status} for {upstream_id}, stored {ours}"
            );
        }
    }

    // Everything finishes after a last restart, each task created upstream once.
    let mut svc = Service::spawn(&["serve"], &env, dir.path());
    svc.wait_ready().await;
    let open = "SELECT COUNT(*) FROM tasks WHERE status IN ('pending', 'submitted', 'processing')";
    wait_until(Duration::from_secs(60), || async {
        db.count(open).await == 0
    })
    .await;
    svc.kill9();
    let stored = db.count("SELECT COUNT(*) FROM tasks").await;
    let duplicated = sim.stats().tasks_created as i64 - stored;
    let acked = acked.lock().unwrap().len();
    record_figures(&format!(
        "chaos: sqlite kills={RUNS} kill_points_ms={kill_points:?} acknowledged={acked} \
         stored={stored} callbacks_acknowledged={} integrity=ok lost=0 duplicated={duplicated}",
        sim.acknowledged_callbacks().len()
    ));
    assert!(acked > 0);
    assert_eq!(duplicated, 0, "each task created upstream exactly once");
    sim.stop();
}

/// The file's integrity check, its task ids, and (upstream id, status) of bound tasks.
async fn inspect_sqlite(url: &str) -> (String, HashSet<String>, Vec<(String, String)>) {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let ids = sqlx::query_scalar("SELECT id FROM tasks")
        .fetch_all(&mut c)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let bound = sqlx::query_as(
        "SELECT upstream_task_id, status FROM tasks WHERE upstream_task_id IS NOT NULL",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    c.close().await.unwrap();
    (integrity, ids, bound)
}

/// Fault test 4 (group commit): 64 senders post final callbacks for 300 running tasks at once,
/// so the writer commits them in batches, and the process is killed with `kill -9` a random
/// moment into it, three times. Every callback the service acknowledged has its task final in
/// the database afterwards; the others may or may not, never half of one.
async fn a_kill_mid_batch_loses_no_acknowledged_callback(b: Backend) {
    use kling_relay::domain::{Change, EventSource, TaskStatus};
    use kling_relay::storage::{Commit, PendingCaps};
    const TASKS: usize = 300;
    let db = TestDb::new(b).await;
    let sim = start_sim().await;
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut env = service_env(&listen, &db.url, &sim);
    env.push((
        "KLING_RELAY_SERVER__WEBHOOK_SECRET".into(),
        WEBHOOK_SECRET.into(),
    ));
    let plain = reqwest::Client::new();
    let mut rng = rand::thread_rng();
    let mut acked_total = 0;
    for round in 0..3 {
        // Tasks upstream has (`submitted` as u-<round>-<i>), not due for a poll for an hour.
        let store = open_store(&db).await;
        let mut ids = Vec::new();
        for i in 0..TASKS {
            let mut r = task_record(i as i64);
            r.client = None;
            // Created now: an old task would be timed out by the poller first.
            r.created_at_ms = kling_relay::service::now_ms();
            let upstream = format!("u-{round}-{i}");
            store
                .insert_task(
                    r.clone(),
                    None,
                    PendingCaps {
                        total: i64::MAX,
                        per_client: i64::MAX,
                    },
                )
                .await
                .unwrap();
            let submitted = Change {
                status: TaskStatus::Submitted,
                upstream_status: None,
                bind_upstream_task_id: Some(upstream.clone()),
                upstream_updated_at_ms: None,
                images: None,
                error: None,
                detail: None,
                final_unit_deduction: None,
            };
            assert!(store
                .commit_change(&Commit {
                    poll_due_at_ms: Some(kling_relay::service::now_ms() + 3_600_000),
                    leaves_pending: true,
                    ..commit(
                        &r.id,
                        0,
                        &submitted,
                        EventSource::Dispatch,
                        kling_relay::service::now_ms()
                    )
                })
                .await
                .unwrap());
            ids.push((r.id, upstream));
        }
        store.close().await;

        let mut svc = Service::spawn(&["serve"], &env, dir.path());
        svc.wait_ready().await;
        let acked = Arc::new(Mutex::new(Vec::<String>::new()));
        let queue = Arc::new(Mutex::new(ids.clone()));
        let mut senders = Vec::new();
        for _ in 0..64 {
            let (queue, acked, plain, base) = (
                queue.clone(),
                acked.clone(),
                plain.clone(),
                svc.base.clone(),
            );
            senders.push(tokio::spawn(async move {
                loop {
                    let Some((id, upstream)) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    let token = kling_relay::service::webhook_token(WEBHOOK_SECRET.as_bytes(), &id);
                    let body = callback(&upstream, "succeed", 1_900_000_000_000);
                    let r = plain
                        .post(format!("{base}/webhooks/cometapi/{id}/{token}"))
                        .json(&body)
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => acked.lock().unwrap().push(id),
                        Ok(_) => {}
                        // The process is gone: the rest will not be answered.
                        Err(_) => return,
                    }
                }
            }));
        }
        let kill_after = rng.gen_range(30..250);
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        svc.kill9();
        for s in senders {
            s.await.unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        acked_total += acked.len();
        let store = open_store(&db).await;
        for id in &acked {
            let t = store.get_task(id).await.unwrap().unwrap();
            assert_eq!(
                t.status,
                TaskStatus::Succeeded,
                "acknowledged callback for {id} lost (kill at {kill_after} ms)"
            );
        }
        // Nothing half-stored: a final task has its event too.
        let finals = db
            .count("SELECT COUNT(*) FROM tasks WHERE status = 'succeeded'")
            .await;
        let events = db
            .count("SELECT COUNT(*) FROM task_events WHERE status = 'succeeded'")
            .await;
        assert_eq!(finals, events, "every final task has its final event");
        store.close().await;
    }
    record_figures(&format!(
        "chaos: group commit kills=3 backend={b:?} acknowledged={acked_total} lost=0"
    ));
    assert!(
        acked_total > 0,
        "some callbacks were answered before the kills"
    );
    sim.stop();
}

on_both_backends!(a_kill_mid_batch_loses_no_acknowledged_callback);

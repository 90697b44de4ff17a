//! The `kling-relay` binary as users run it: configuration errors, `migrate`, the `--simulate`
//! quickstart, the simulator CLI, and `kill -9` at any moment without losing or double-paying a task.

use crate::common::process::*;
use crate::common::*;
use kling_relay::simulator::Faults;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn run_failing(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut c = command(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run binary");
    assert!(!out.status.success(), "{args:?} {env:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_configuration_stops_start_up_naming_the_key() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "cometapi.api_key"),
        (&[("KLING_RELAY_SERVER__LISTEN", "nope")], "server.listen"),
        (&[("KLING_RELAY_SERVER__COLOUR", "red")], "server.colour"),
        (
            &[("KLING_RELAY_POLLER__INTERVAL", "fast")],
            "poller.interval",
        ),
        (
            &[("KLING_RELAY_POLLER__GIVE_UP_AFTER", "0s")],
            "poller.give_up_after",
        ),
        (
            &[("KLING_RELAY_DATABASE__URL", "mysql://x")],
            "database.url",
        ),
        (
            &[("KLING_RELAY_COMETAPI__BASE_URL", "ftp://x")],
            "cometapi.base_url",
        ),
        (
            &[("KLING_RELAY_COMETAPI__SCENE_IMAGE_FIELD", "scene")],
            "cometapi.scene_image_field",
        ),
        (
            &[("KLING_RELAY_COMETAPI__PROFILE", "openai")],
            "cometapi.profile",
        ),
        (
            &[("KLING_RELAY_COMETAPI__QUERY_PATH", "/v1/tasks")],
            "cometapi.query_path",
        ),
        (
            &[("KLING_RELAY_SERVER__WEBHOOK_SECRET", "short")],
            "server.webhook_secret",
        ),
        (
            &[("KLING_RELAY_SERVER__REQUEST_TIMEOUT", "30s")],
            "server.request_timeout",
        ),
        (
            &[("KLING_RELAY_SERVER__MAX_CONCURRENT_BODY_BYTES", "1000")],
            "server.max_concurrent_body_bytes",
        ),
        (
            &[("KLING_RELAY_SERVER__MAX_CONNECTIONS", "0")],
            "server.max_connections",
        ),
        (
            &[("KLING_RELAY_SERVER__HEADER_READ_TIMEOUT", "0s")],
            "server.header_read_timeout",
        ),
        (
            &[("KLING_RELAY_AUTH__SESSION_LIFETIME", "0s")],
            "auth.session_lifetime",
        ),
        (
            &[
                ("KLING_RELAY_AUTH__REQUIRED", "false"),
                ("KLING_RELAY_SERVER__LISTEN", "0.0.0.0:0"),
            ],
            "auth.required",
        ),
    ];
    for (env, key) in cases {
        let mut env = env.to_vec();
        if *key != "cometapi.api_key" {
            env.push(("COMETAPI_KEY", "k"));
        }
        let err = run_failing(&["serve"], &env);
        assert!(err.contains(key), "{env:?}: expected `{key}` in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one clear message: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[server]\nlisten = 5\n").unwrap();
    let err = run_failing(&["migrate", "--config", file.to_str().unwrap()], &[]);
    assert!(err.contains("server.listen"), "{err}");
    let err = run_failing(&["migrate", "--config", "/no/such/file.toml"], &[]);
    assert!(err.contains("--config"), "{err}");
}

#[test]
fn environment_overrides_the_config_file() {
    // The file points at an unwritable place; the environment wins and migrate succeeds.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        "[database]\nurl = \"sqlite:///proc/forbidden/x.db\"\n",
    )
    .unwrap();
    let db = dir.path().join("env.db");
    let out = command(&["migrate", "--config", file.to_str().unwrap()])
        .env(
            "KLING_RELAY_DATABASE__URL",
            format!("sqlite://{}", db.display()),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.exists());
}

async fn migrate_creates_and_upgrades_the_database(b: Backend) {
    let db = TestDb::new(b).await;
    for _ in 0..2 {
        let out = cli_ok(&db, &["migrate"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied"));
    }
    if b == Backend::Sqlite {
        let path = db.url.trim_start_matches("sqlite://");
        assert!(Path::new(path).exists(), "file and folders created");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_serve_simulate_runs_the_whole_loop() {
    // Exactly the README's commands: defaults everywhere except a free port, in a fresh folder.
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut svc = Service::spawn(
        &["serve", "--simulate"],
        &[("KLING_RELAY_SERVER__LISTEN".into(), listen.clone())],
        dir.path(),
    );
    svc.wait_ready().await;
    assert!(
        dir.path().join("data/kling-relay.db").exists(),
        "default SQLite file created"
    );
    let (key, secret) = svc.demo_credentials();
    assert!(key.starts_with("klr_"));
    assert!(
        secret.len() > "whsec_".len(),
        "the signing secret is printed beside the key"
    );
    let anonymous = reqwest::Client::new()
        .get(format!("{}/v1/tasks", svc.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401, "auth is on by default");
    let http = client_with_key(&key);
    // A local trial may notify a receiver on this machine: loopback needs no listing here.
    let rx = crate::common::receiver::Receiver::start().await;
    let mut body = valid_body();
    body["notify_url"] = serde_json::json!(rx.url("/hook"));
    let r = http
        .post(format!("{}/v1/tasks", svc.base))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let start = Instant::now();
    loop {
        let t: Value = fetch_json(&http, &format!("{}/v1/tasks/{id}", svc.base)).await;
        if t["status"] == "succeeded" {
            assert_eq!(t["images"].as_array().unwrap().len(), 2);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "not done: {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let list = fetch_json(
        &http,
        &format!("{}/v1/tasks?status=succeeded&limit=20", svc.base),
    )
    .await;
    assert_eq!(list["tasks"][0]["id"], id.as_str());
    wait_until(Duration::from_secs(10), || async {
        !rx.received("/hook").is_empty()
    })
    .await;
    svc.kill9();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        svc.stderr_text().contains("SIMULATION MODE"),
        "the log says results are simulated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_cli_serves_the_upstream_with_fault_switches() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut c = command(&[
        "simulator",
        "--listen",
        &listen,
        "--create-fail",
        "code1303",
    ]);
    c.current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://{listen}/kling/v1/images/multi-image2image");
    let body = json!({"subject_image_list": [{"subject_image": "https://e.x/a.png"}, {"subject_image": "https://e.x/b.png"}]});
    let start = Instant::now();
    let answer: Value = loop {
        match http
            .post(&url)
            .bearer_auth("sk-simulator")
            .json(&body)
            .send()
            .await
        {
            Ok(r) => break r.json().await.unwrap(),
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("simulator not reachable: {e}"),
        }
    };
    assert_eq!(answer["code"], 1303);
    // Clear the fault over HTTP and the same call is accepted.
    let r = http
        .put(format!("http://{listen}/_sim/faults"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let answer: Value = http
        .post(&url)
        .bearer_auth("sk-simulator")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["code"], 0, "{answer}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Done-when 4: a task accepted with 202 survives `kill -9` at any moment and completes after a
/// restart; every stored task runs upstream exactly once.
async fn kill_dash_nine_at_any_moment_loses_nothing(b: Backend) {
    let db = TestDb::new(b).await;
    let sim = start_sim().await;
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let env = service_env(&listen, &db.url, &sim);
    let http = client_from_cli(&db);
    let mut accepted: Vec<String> = Vec::new();

    // Kill at many moments: mid-POST, mid-dispatch (slow create answers), mid-processing.
    // In the slow-create rounds callbacks are dropped, so recovery cannot lean on them: the
    // create is re-sent, refused as a duplicate, and the task found by its external_task_id.
    let rounds: [(u64, u64); 8] = [
        (0, 0),
        (2, 0),
        (15, 0),
        (60, 0),
        (250, 0),
        (600, 0),
        (150, 400),
        (450, 400),
    ];
    for (kill_after_ms, create_delay_ms) in rounds {
        sim.set_faults(Faults {
            create_delay_ms,
            drop_callbacks: if create_delay_ms > 0 { 1.0 } else { 0.0 },
            ..Faults::default()
        });
        let mut svc = Service::spawn(&["serve"], &env, dir.path());
        svc.wait_ready().await;
        let mut posts = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let http = http.clone();
            let url = format!("{}/v1/tasks", svc.base);
            posts.spawn(async move {
                let r = http.post(url).json(&valid_body()).send().await.ok()?;
                (r.status() == 202).then_some(())?;
                let v: Value = r.json().await.ok()?;
                v["id"].as_str().map(str::to_owned)
            });
        }
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        svc.kill9();
        while let Some(r) = posts.join_next().await {
            if let Ok(Some(id)) = r {
                accepted.push(id);
            }
        }
    }
    assert!(!accepted.is_empty(), "some submits were acknowledged");

    sim.set_faults(Faults {
        drop_callbacks: 1.0,
        ..Faults::default()
    });
    let mut svc = Service::spawn(&["serve"], &env, dir.path());
    svc.wait_ready().await;
    let start = Instant::now();
    let all: Vec<Value> = loop {
        let page: Value = fetch_json(&http, &format!("{}/v1/tasks?limit=200", svc.base)).await;
        let tasks = page["tasks"].as_array().unwrap().clone();
        if tasks.iter().all(|t| t["status"] == "succeeded") {
            break tasks;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "not all tasks finished: {:#?}",
            tasks
                .iter()
                .filter(|t| t["status"] != "succeeded")
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stored: HashSet<&str> = all.iter().map(|t| t["id"].as_str().unwrap()).collect();
    for id in &accepted {
        assert!(stored.contains(id.as_str()), "accepted task {id} was lost");
    }
    assert_eq!(
        sim.stats().tasks_created as usize,
        all.len(),
        "every stored task ran upstream exactly once"
    );
    // The rounds that killed the service mid-create left tasks in doubt; after the restart they
    // were looked up by external_task_id and bound, never created again.
    let stats = sim.stats();
    assert!(
        stats.external_lookups > 0,
        "recovery path exercised: {stats:?}"
    );
    sim.stop();
}

/// SIGTERM under load: requests in flight finish, workers reach a safe point, the process
/// exits 0 within the deadline; nothing acknowledged is lost and nothing is left half-dispatched.
async fn sigterm_under_load_loses_nothing(b: Backend) {
    let db = TestDb::new(b).await;
    let sim = start_sim().await;
    sim.set_faults(Faults {
        create_delay_ms: 50,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut env = service_env(&listen, &db.url, &sim);
    env.push(("KLING_RELAY_SERVER__SHUTDOWN_TIMEOUT".into(), "10s".into()));
    env.push(("KLING_RELAY_DISPATCH__WAIT".into(), "1s".into()));
    env.push(("RUST_LOG".into(), "info".into()));
    let http = client_from_cli(&db);

    let mut svc = Service::spawn(&["serve", "--log-format", "json"], &env, dir.path());
    svc.wait_ready().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (http, stop, url) = (http.clone(), stop.clone(), format!("{}/v1/tasks", svc.base));
        load.spawn(async move {
            let mut accepted = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http.post(&url).json(&valid_body()).send().await {
                    Ok(r) if r.status() == 202 => {
                        if let Ok(v) = r.json::<Value>().await {
                            accepted.push(v["id"].as_str().unwrap_or_default().to_owned());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            accepted
        });
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let status = tokio::task::block_in_place(|| svc.terminate(Duration::from_secs(12)));
    assert!(
        status.success(),
        "exit status {status}: {}",
        svc.stderr_text()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut accepted = Vec::new();
    while let Some(r) = load.join_next().await {
        accepted.extend(r.unwrap());
    }
    assert!(accepted.len() >= 5, "load was running: {}", accepted.len());

    // Logs were JSON, line by line.
    let log = svc.stderr_text();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
    assert!(log.contains("request_id"), "request ids in the log");

    // Nothing half-dispatched, nothing acknowledged lost.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM tasks WHERE status = 'pending' AND dispatch_started_at IS NOT NULL")
            .await,
        0,
        "no create left in flight"
    );
    for id in &accepted {
        assert_eq!(
            db.count(&format!("SELECT COUNT(*) FROM tasks WHERE id = '{id}'"))
                .await,
            1,
            "accepted task {id} lost"
        );
    }
    // And after a restart everything completes.
    let mut svc = Service::spawn(&["serve"], &env, dir.path());
    svc.wait_ready().await;
    let start = Instant::now();
    loop {
        let open = db
            .count(
                "SELECT COUNT(*) FROM tasks WHERE status IN ('pending', 'submitted', 'processing')",
            )
            .await;
        if open == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{open} tasks still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = db.count("SELECT COUNT(*) FROM tasks").await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM tasks WHERE status = 'succeeded'")
            .await,
        total
    );
    assert_eq!(
        sim.stats().tasks_created as i64,
        total,
        "each exactly once upstream"
    );
    svc.kill9();
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_one_sqlite_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/one.db", dir.path().display());
    let env = |port: u16| -> Vec<(String, String)> {
        vec![
            (
                "KLING_RELAY_SERVER__LISTEN".into(),
                format!("127.0.0.1:{port}"),
            ),
            ("KLING_RELAY_DATABASE__URL".into(), db.clone()),
            ("COMETAPI_KEY".into(), "k".into()),
        ]
    };
    let mut first = Service::spawn(&["serve"], &env(free_port()), dir.path());
    first.wait_ready().await;
    let second = command(&["serve"])
        .envs(env(free_port()))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!second.status.success(), "the second instance started");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another kling-relay instance"), "{err}");
    // Under another name, a symlink or a hard link to the same file, it is refused as well.
    let links = tempfile::tempdir().unwrap();
    let soft = links.path().join("soft.db");
    let hard = links.path().join("hard.db");
    std::os::unix::fs::symlink(dir.path().join("one.db"), &soft).unwrap();
    std::fs::hard_link(dir.path().join("one.db"), &hard).unwrap();
    for alias in [&soft, &hard] {
        let mut e = env(free_port());
        e[1].1 = format!("sqlite://{}", alias.display());
        let second = command(&["serve"])
            .envs(e)
            .current_dir(links.path())
            .output()
            .unwrap();
        assert!(!second.status.success(), "started on the alias {alias:?}");
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(err.contains("another kling-relay instance"), "{err}");
    }
    // Once the first is gone, the file is free again.
    first.kill9();
    let mut again = Service::spawn(&["serve"], &env(free_port()), dir.path());
    again.wait_ready().await;
    again.kill9();
}

on_both_backends!(
    sigterm_under_load_loses_nothing,
    migrate_creates_and_upgrades_the_database,
    kill_dash_nine_at_any_moment_loses_nothing,
);

/// The access log: one line per request at `info`, with the route template, status, duration and
/// client, never a URL (callback URLs carry their token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_one_access_line_without_its_url() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut svc = Service::spawn(
        &["serve", "--simulate", "--log-format", "json"],
        &[
            ("KLING_RELAY_SERVER__LISTEN".into(), listen.clone()),
            // The harness sets RUST_LOG=warn; this test reads the info lines.
            ("RUST_LOG".into(), "info".into()),
        ],
        dir.path(),
    );
    svc.wait_ready().await;
    let (key, _) = svc.demo_credentials();
    let http = client_with_key(&key);
    let r = http
        .post(format!("{}/v1/tasks", svc.base))
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let start = Instant::now();
    loop {
        let t: Value = fetch_json(&http, &format!("{}/v1/tasks/{id}", svc.base)).await;
        if t["status"] == "succeeded" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "not done: {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    svc.kill9();
    std::thread::sleep(Duration::from_millis(100));
    let log = svc.stderr_text();
    let access: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "kling_relay::access")
        .collect();
    let line = |route: &str| {
        access
            .iter()
            .find(|v| v["fields"]["route"] == route)
            .unwrap_or_else(|| panic!("no access line for {route}:\n{log}"))
            .clone()
    };
    let submit = line("/v1/tasks");
    assert_eq!(submit["fields"]["status"], 202);
    assert_eq!(submit["fields"]["method"], "POST");
    assert_eq!(submit["fields"]["client"], "demo");
    assert!(submit["fields"]["duration_ms"].as_f64().is_some());
    assert_eq!(line("/v1/tasks/{id}")["fields"]["status"], 200);
    // Upstream's callbacks, by their template: the token stays out of the log.
    line("/webhooks/cometapi/{id}/{token}");
    assert!(
        !log.contains(&format!("/webhooks/cometapi/{id}/")),
        "a callback URL (with its token) reached the log"
    );
}

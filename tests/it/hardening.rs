//! Issue 14: nothing unauthenticated costs more than its headers, metric labels a caller controls
//! stay bounded, every answer says `nosniff`, NUL characters are refused (or, from upstream,
//! dropped) the same way on both backends, connections are bounded, large Base64 submits cost a
//! bounded memory, archive fetches stay off this host, and long-lived requests end with their key.

use crate::common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::time::Duration;

/// Sends only the headers of a POST announcing a huge body, and reads the answer: it must come
/// before any of the body is sent.
fn answer_to_headers_alone(base: &str, path: &str, extra: &str) -> String {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: 80000000\r\n{extra}\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).expect("an answer before the body is sent");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_senders_cost_no_more_than_their_headers() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let id = app.submit_ok(&valid_body()).await;
    let base = app.base.clone();
    let forged = [
        format!("/webhooks/cometapi/{id}/AAAA"),
        format!("/webhooks/cometapi/{id}?token=AAAA"),
    ];
    for path in forged {
        let b = base.clone();
        let answer = tokio::task::spawn_blocking(move || answer_to_headers_alone(&b, &path, ""))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    // The sign-in form is small: a large one is refused at once.
    let b = base.clone();
    let answer = tokio::task::spawn_blocking(move || answer_to_headers_alone(&b, "/ui/login", ""))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // With the right token, a callback is still bounded: 1 MiB by default.
    let big = json!({"task_id": "1", "task_status": "processing", "pad": "x".repeat(1_100_000)});
    let (status, v) = app.post_callback(&app.callback_url(&id), &big).await;
    assert_eq!(status, 413, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_share_one_metric_label_and_every_answer_says_nosniff() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    for i in 0..50 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let r = app
            .anonymous
            .request(method, format!("{}/healthz", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    }
    for path in [
        "/healthz",
        "/v1/tasks",
        "/ui/login",
        "/openapi.json",
        "/nope",
    ] {
        let r = app
            .anonymous
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
    }
    let metrics = app.get_text_anonymously("/metrics").await;
    assert!(
        !metrics.contains("MADEUP"),
        "a made-up method became a label"
    );
    assert!(metrics.contains("method=\"other\""), "{metrics}");
}

async fn nul_characters_are_refused_or_dropped_alike_on_both_backends(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let mut body = valid_body();
    body["prompt"] = json!("two cats\u{0}");
    let r = app.submit(&body).await;
    assert_eq!(r.status(), 422);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["field"], "prompt");

    // From upstream: a NUL in the status message is dropped, and the callback lands.
    let id = app.submit_ok(&valid_body()).await;
    let upstream = app.task(&id).await["upstream_task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut failed = callback(&upstream, "failed", i64::MAX / 4);
    failed["task_status_msg"] = json!("content\u{0} moderation");
    let (status, v) = app.post_callback(&app.callback_url(&id), &failed).await;
    assert_eq!(status, 200, "{v}");
    let t = app.task(&id).await;
    assert_eq!(t["status"], "failed");
    assert_eq!(t["error"]["message"], "content moderation");
}

/// Upstream's URLs are rendered as links and images only when they are http(s), and a huge
/// callback is not kept whole on the timeline.
async fn upstream_urls_and_payloads_are_kept_in_bounds(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.auth.required = false),
            ..Options::stalled()
        },
    )
    .await;
    let id = app.submit_ok(&valid_body()).await;
    let upstream = app.task(&id).await["upstream_task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut done = callback(&upstream, "succeed", i64::MAX / 4);
    done["task_result"] = json!({"images": [
        {"index": 0, "url": "javascript:alert(document.cookie)"},
        {"index": 1, "url": "file:///etc/passwd"},
        {"index": 2, "url": "https://cdn.example/2.png"}]});
    done["padding"] = json!("x".repeat(200_000));
    let (status, v) = app.post_callback(&app.callback_url(&id), &done).await;
    assert_eq!(status, 200, "{v}");
    let page = app.get_text_anonymously(&format!("/ui/tasks/{id}")).await;
    assert!(
        page.contains("href=\"https://cdn.example/2.png\""),
        "{page}"
    );
    for bad in ["javascript:", "file:"] {
        assert!(!page.contains(&format!("href=\"{bad}")), "a {bad} link");
        assert!(!page.contains(&format!("src=\"{bad}")), "a {bad} image");
    }
    let whole = format!(
        "SELECT COUNT(*) FROM task_events WHERE task_id = '{id}' AND length(upstream_payload) > 70000"
    );
    assert_eq!(
        app.db.count(&whole).await,
        0,
        "the 200 KB payload was kept whole"
    );
    let noted = format!(
        "SELECT COUNT(*) FROM task_events WHERE task_id = '{id}' AND upstream_payload LIKE '%truncated%'"
    );
    assert_eq!(app.db.count(&noted).await, 1);
}

/// A service (SQLite) archiving into `folder`.
async fn local_archive_app(folder: &std::path::Path) -> TestApp {
    let path = folder.to_str().unwrap().to_owned();
    TestApp::spawn_with(
        Backend::Sqlite,
        Options {
            settings: Box::new(move |s| {
                s.archive.backend = kling_relay::config::ArchiveBackend::Local;
                s.archive.path = path;
            }),
            ..Options::default()
        },
    )
    .await
}

/// `/readyz` says when the archive folder cannot be written, naming the setting, not the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_an_archive_folder_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("archive");
    let app = local_archive_app(&folder).await;
    let ready = || async {
        let r = app
            .anonymous
            .get(format!("{}/readyz", app.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);
    std::fs::remove_dir_all(&folder).unwrap();
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("archive.path"), "{body}");
    assert!(
        !body.contains(folder.to_str().unwrap()),
        "no absolute path: {body}"
    );
}

/// A result URL on this host (or a private network) is not fetched into the archive unless
/// `archive.allowed_hosts` names its host; the task still succeeds.
async fn archive_fetches_refuse_this_host_unless_listed(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.archive.allowed_hosts = Vec::new()),
            ..Options::default()
        },
    )
    .await;
    let id = app.submit_ok(&valid_body()).await;
    app.wait_for_status(&id, "succeeded", Duration::from_secs(15))
        .await;
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        last = app.task(&id).await;
        if last["images"][0]["archive"]["state"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["images"][0]["archive"]["state"], "failed", "{last}");
    let error = last["images"][0]["archive"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("loopback or private"), "{error}");
    assert_eq!(app.sim.stats().image_requests, 0, "nothing was fetched");
}

/// A corrupt row is a 500 (the same answer every time), not a 503 inviting retries; task ids
/// spelled another way (upper case, in braces) are another task: 404 on every route, alike.
async fn deterministic_failures_are_not_503_and_id_spellings_are_404(b: Backend) {
    let app = TestApp::spawn_with(b, Options::stalled()).await;
    let id = app.submit_ok(&valid_body()).await;
    for spelled in [id.to_uppercase(), format!("{{{id}}}")] {
        for path in [
            format!("/v1/tasks/{spelled}"),
            format!("/v1/tasks/{spelled}/events"),
            format!("/v1/tasks/{spelled}/deliveries"),
        ] {
            let (status, v) = app.get_json(&path).await;
            assert_eq!(status, 404, "{path}: {v}");
        }
        let r = app
            .http
            .post(format!("{}/v1/tasks/{spelled}/cancel", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    app.db
        .exec(&format!(
            "UPDATE tasks SET metadata = '{{not json' WHERE id = '{id}'"
        ))
        .await;
    let r = app
        .http
        .get(format!("{}/v1/tasks/{id}", app.base))
        .send()
        .await
        .unwrap();
    problem(r, 500).await;
}

on_both_backends!(
    nul_characters_are_refused_or_dropped_alike_on_both_backends,
    upstream_urls_and_payloads_are_kept_in_bounds,
    archive_fetches_refuse_this_host_unless_listed,
    deterministic_failures_are_not_503_and_id_spellings_are_404,
    large_base64_submits_cost_bounded_memory_and_leave_nothing_behind,
);

/// An archive write that fails says so without the storage's own details (absolute paths).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_write_errors_show_no_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("archive");
    let app = local_archive_app(&folder).await;
    // A file where the folder was: every write fails.
    std::fs::remove_dir_all(&folder).unwrap();
    std::fs::write(&folder, b"not a folder").unwrap();
    let id = app.submit_ok(&valid_body()).await;
    app.wait_for_status(&id, "succeeded", Duration::from_secs(15))
        .await;
    let mut error = String::new();
    for _ in 0..100 {
        let t = app.task(&id).await;
        error = t["images"][0]["archive"]["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if !error.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(error.contains("see the service log"), "{error}");
    assert!(!error.contains(dir.path().to_str().unwrap()), "{error}");
}

/// Reads until the server closes the connection; returns what it sent and when it closed.
fn read_until_closed(s: &mut std::net::TcpStream, within: Duration) -> (String, Duration) {
    let start = std::time::Instant::now();
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "still open after {within:?} ({e}): {}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

/// The service process closes a connection that sends nothing, one that sends its headers too
/// slowly, and a kept-alive one left idle; answers a long-poll that outlasts both timeouts; and
/// turns away connections over its cap at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_surplus_connections_are_closed() {
    // The binary as it runs, against a simulator that never finishes (so the long-poll waits).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = kling_relay::simulator::Simulator::start(stalled_sim(), listener)
        .await
        .unwrap();
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", process::free_port());
    let mut env = process::service_env(&addr, &db.url, &sim);
    for (k, v) in [
        ("KLING_RELAY_SERVER__HEADER_READ_TIMEOUT", "1500ms"),
        ("KLING_RELAY_SERVER__IDLE_TIMEOUT", "4s"),
        ("KLING_RELAY_SERVER__MAX_CONNECTIONS", "6"),
    ] {
        env.push((k.to_owned(), v.to_owned()));
    }
    let mut svc = process::Service::spawn(&["serve"], &env, dir.path());
    svc.wait_ready().await;
    let created = process::cli_ok(&db, &["clients", "create", "tester", "--json"]);
    let created: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let key = created["api_key"].as_str().unwrap().to_owned();
    let submitted: serde_json::Value = client_with_key(&key)
        .post(format!("{}/v1/tasks", svc.base))
        .json(&valid_body())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["id"].as_str().unwrap().to_owned();
    let base = svc.base.clone();

    let checks = tokio::task::spawn_blocking(move || {
        use std::net::TcpStream;
        // A client that connects and sends nothing, and one that sends its headers a byte at a
        // time: each is closed at the header-read timeout, unanswered.
        let mut silent = TcpStream::connect(&addr).unwrap();
        let mut slow = TcpStream::connect(&addr).unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(250));
            slow.write_all(b"x").unwrap();
        }
        let (said, after) = read_until_closed(&mut silent, Duration::from_secs(5));
        assert!(said.is_empty(), "{said}");
        assert!(after < Duration::from_secs(3), "{after:?}");
        let (said, _) = read_until_closed(&mut slow, Duration::from_secs(5));
        assert!(said.is_empty(), "{said}");

        // A kept-alive connection outlives the header-read timeout between requests, and is
        // closed at the idle timeout.
        let mut kept = TcpStream::connect(&addr).unwrap();
        write!(kept, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = kept.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        kept.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let still_open = kept.read(&mut buf).unwrap_err();
        assert!(
            matches!(
                still_open.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{still_open}"
        );
        let (_, after) = read_until_closed(&mut kept, Duration::from_secs(5));
        assert!(after < Duration::from_secs(3), "{after:?}");

        // A long-poll in flight is not idle: it is answered after its wait, longer than both
        // timeouts.
        let mut poll = TcpStream::connect(&addr).unwrap();
        let poll_sent = std::time::Instant::now();
        write!(
            poll,
            "GET /v1/tasks/{id}?wait=4 HTTP/1.1\r\nHost: {addr}\r\nauthorization: Bearer {key}\r\n\
             connection: close\r\n\r\n"
        )
        .unwrap();

        // Over the cap, a new connection is told so at once.
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..8 {
            let mut c = TcpStream::connect(&addr).unwrap();
            c.set_read_timeout(Some(Duration::from_millis(150)))
                .unwrap();
            match c.read(&mut buf) {
                Ok(n) if n > 0 => {
                    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
                    assert!(said.starts_with("HTTP/1.1 503"), "{said}");
                    assert!(said.contains("retry-after: 1"), "{said}");
                    refused += 1;
                }
                _ => held.push(c),
            }
        }
        assert!(refused >= 2, "{refused} refused, {} held", held.len());
        assert!(held.len() <= 5, "{} held", held.len());

        let (answer, _) = read_until_closed(&mut poll, Duration::from_secs(10));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            poll_sent.elapsed() > Duration::from_millis(3900),
            "{:?}",
            poll_sent.elapsed()
        );
        drop(held);
    });
    checks.await.unwrap();

    // Once the surplus is gone, the service answers as usual.
    std::thread::sleep(Duration::from_millis(200));
    let r = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
    svc.terminate(Duration::from_secs(10));
}

/// A key revoked while its long-poll waits or its live stream runs gets no more answers: the
/// long-poll ends with a 401, the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_requests_end_when_their_key_is_revoked() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Options {
            settings: Box::new(|s| s.auth.recheck_interval = Duration::from_millis(300)),
            ..Options::stalled()
        },
    )
    .await;
    let id = app.submit_ok(&valid_body()).await;
    let poll = {
        let (http, url) = (
            app.http.clone(),
            format!("{}/v1/tasks/{id}?wait=30", app.base),
        );
        tokio::spawn(async move { http.get(url).send().await.unwrap().status().as_u16() })
    };
    let mut stream = app
        .http
        .get(format!("{}/v1/tasks/{id}/stream", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let first = stream.chunk().await.unwrap().expect("the first event");
    assert!(String::from_utf8_lossy(&first).contains("event: status"));
    // Both are past authentication and waiting before the key goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!poll.is_finished());

    let store = open_store(&app.db).await;
    store.revoke_client("tester", 1).await.unwrap();
    store.close().await;
    let revoked_at = std::time::Instant::now();

    let status = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long-poll ends")
        .unwrap();
    assert_eq!(status, 401);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream still runs");
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
}

/// A kB figure from `/proc/PID/status` (`VmRSS`, `VmHWM`: the peak).
fn proc_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Six images of nearly 10 MB each, as Base64: a PNG header, then filler (only the header is
/// read), so the body is about 80 MB.
fn largest_submit_body() -> String {
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(PNG_300)
        .unwrap();
    let mut image = png.clone();
    image.resize(10 * 1024 * 1024 - 64, 0x5a);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    json!({
        "prompt": "a cat in a garden",
        "subject_image_list": (0..4).map(|_| json!({"subject_image": &b64})).collect::<Vec<_>>(),
        "scene_image": &b64,
        "style_image": &b64,
    })
    .to_string()
}

/// Four of the largest submits at once: the service's memory peaks at a bounded multiple of
/// one body (large bodies are admitted by a byte budget and copied as little as possible), it
/// returns to the system afterwards, and the Base64 leaves the database once the tasks are
/// upstream.
async fn large_base64_submits_cost_bounded_memory_and_leave_nothing_behind(b: Backend) {
    let sim = process::start_sim().await;
    let db = TestDb::new(b).await;
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", process::free_port());
    let env = process::service_env(&listen, &db.url, &sim);
    let mut svc = process::Service::spawn(&["serve"], &env, dir.path());
    svc.wait_ready().await;
    let http = process::client_from_cli(&db);
    let pid = svc.child.id();
    let body = largest_submit_body();
    let body_mb = body.len() as f64 / 1e6;
    let started_kb = proc_kb(pid, "VmRSS");

    let sends: Vec<_> = (0..4)
        .map(|_| {
            let (http, url, body) = (http.clone(), format!("{}/v1/tasks", svc.base), body.clone());
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let v: serde_json::Value = r.json().await.unwrap();
                assert_eq!(status, 202, "{v}");
                (status, v["id"].as_str().unwrap_or_default().to_owned())
            })
        })
        .collect();
    let mut ids = Vec::new();
    for s in sends {
        let (status, id) = s.await.unwrap();
        assert_eq!(status, 202);
        ids.push(id);
    }
    let peak_kb = proc_kb(pid, "VmHWM");
    // Once upstream has them, the tasks keep no Base64.
    wait_until(Duration::from_secs(30), || async {
        db.count("SELECT COUNT(*) FROM tasks WHERE status = 'pending'")
            .await
            == 0
    })
    .await;
    let kept = db
        .count(
            "SELECT COUNT(*) FROM task_inputs WHERE subject_images <> '[]' \
             OR scene_image IS NOT NULL OR style_image IS NOT NULL",
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_kb = proc_kb(pid, "VmRSS");
    svc.terminate(Duration::from_secs(10));
    let mb = |kb: u64| kb as f64 / 1024.0;
    record_figures(&format!(
        "amplification: {b:?}: 4 concurrent submits of {body_mb:.1} MB: RSS {:.0} MB at start, peak {:.0} MB ({:.2}x one body), {:.0} MB after; {kept} tasks' Base64 kept",
        mb(started_kb),
        mb(peak_kb),
        mb(peak_kb) / body_mb,
        mb(after_kb)
    ));
    assert!(mb(peak_kb) <= 4.0 * body_mb, "peak {} MB", mb(peak_kb));
    assert!(mb(after_kb) < 64.0, "after {} MB", mb(after_kb));
    assert_eq!(kept, 0, "Base64 inputs left in the database");
}

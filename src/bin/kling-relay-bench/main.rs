//! `kling-relay-bench`: load scenarios against a real `kling-relay` process on loopback, each
//! figure reported beside a limit measured in the same run. See BENCHMARKS.md.
//!
//!   cargo build --release && target/release/kling-relay-bench            # everything, both databases
//!   target/release/kling-relay-bench --scenario history --db sqlite
//!   target/release/kling-relay-bench --smoke                             # tiny sizes, seconds (CI)

mod amplification;
mod fairness;
mod usage;
mod utilization;

use axum::routing::post;
use clap::Parser;
use kling_relay::domain::{Change, EventSource, TaskInputs, TaskStatus, UpstreamStatus};
use kling_relay::simulator::{SimConfig, Simulator};
use kling_relay::storage::{Commit, NewTaskRecord, PendingCaps, Store};
use serde::Serialize;
use serde_json::{json, Value};
use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WEBHOOK_SECRET: &str = "bench-webhook-secret-of-at-least-32-bytes";

#[derive(Parser, Clone)]
#[command(about = "Benchmarks for kling-relay (loopback only)")]
struct Args {
    /// webhook-ingest, submit, history, poll-scale, end-to-end, amplification, utilization,
    /// fairness, or all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// sqlite, postgres, or both.
    #[arg(long, default_value = "both")]
    db: String,
    /// Concurrent senders.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Tiny sizes, a few seconds: proves the tool runs.
    #[arg(long)]
    smoke: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Postgres server for the postgres runs (a database is created and dropped per scenario).
    #[arg(
        long,
        env = "KLING_RELAY_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
}

#[derive(Serialize, Clone, Debug)]
struct Row {
    scenario: String,
    db: String,
    measure: String,
    ops: usize,
    seconds: f64,
    per_second: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: usize,
    /// This figure as a share of the limit measured beside it, when there is one.
    of_limit: Option<f64>,
    /// The service's peak resident memory during the scenario (MB).
    service_peak_rss_mb: Option<f64>,
    /// The service's resident memory when idle, before the load (MB).
    service_idle_rss_mb: Option<f64>,
}

struct Stats {
    latencies: Vec<Duration>,
    errors: usize,
    elapsed: Duration,
}

impl Stats {
    fn row(&self, scenario: &str, db: &str, measure: &str) -> Row {
        let mut l = self.latencies.clone();
        l.sort();
        let pct = |p: f64| -> f64 {
            if l.is_empty() {
                return 0.0;
            }
            let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
            l[i].as_secs_f64() * 1000.0
        };
        let ops = l.len() + self.errors;
        Row {
            scenario: scenario.into(),
            db: db.into(),
            measure: measure.into(),
            ops,
            seconds: self.elapsed.as_secs_f64(),
            per_second: ops as f64 / self.elapsed.as_secs_f64().max(1e-9),
            p50_ms: pct(0.50),
            p90_ms: pct(0.90),
            p99_ms: pct(0.99),
            max_ms: l.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
            errors: self.errors,
            of_limit: None,
            service_peak_rss_mb: None,
            service_idle_rss_mb: None,
        }
    }
}

/// Runs `op(i)` for i in 0..n with `concurrency` workers; each op returns Ok on success. Prints a
/// progress line to stderr while it runs.
async fn load<F, Fut>(label: &str, n: usize, concurrency: usize, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let progress = {
        let (done, label) = (done.clone(), label.to_owned());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let d = done.load(Ordering::Relaxed);
                eprint!(
                    "\r  {label}: {d}/{n} ({:.0}/s)   ",
                    d as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (op, next, done) = (op.clone(), next.clone(), done.clone());
        workers.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                match op(i).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (lat, errors)
        });
    }
    let mut stats = Stats {
        latencies: Vec::with_capacity(n),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    while let Some(r) = workers.join_next().await {
        if let Ok((lat, errors)) = r {
            stats.latencies.extend(lat);
            stats.errors += errors;
        }
    }
    stats.elapsed = started.elapsed();
    progress.abort();
    eprintln!(
        "\r  {label}: {n} done in {:.2} s            ",
        stats.elapsed.as_secs_f64()
    );
    stats
}

/// A database of the scenario's own.
struct Db {
    url: String,
    /// A SQLite run's folder, removed afterwards.
    dir: Option<std::path::PathBuf>,
    pg: Option<(String, String)>,
}

impl Db {
    async fn create(kind: &'static str, pg_admin: &str) -> anyhow::Result<Db> {
        if kind == "sqlite" {
            let dir =
                std::env::temp_dir().join(format!("klr-bench-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir)?;
            let url = format!("sqlite://{}/bench.db", dir.display());
            return Ok(Db {
                url,
                dir: Some(dir),
                pg: None,
            });
        }
        use sqlx::Connection;
        let name = format!("klr_bench_{}", uuid::Uuid::new_v4().simple());
        let mut c = sqlx::PgConnection::connect(pg_admin).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await?;
        let mut u = url::Url::parse(pg_admin)?;
        u.set_path(&format!("/{name}"));
        Ok(Db {
            url: u.to_string(),
            dir: None,
            pg: Some((pg_admin.to_owned(), name)),
        })
    }

    /// Removes the database (Postgres) or its folder (SQLite).
    async fn remove(&self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((admin, name)) = &self.pg {
            use sqlx::Connection;
            if let Ok(mut c) = sqlx::PgConnection::connect(admin).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut c)
                    .await;
            }
        }
    }
}

/// The service as its own process, so its memory is its own.
struct Service {
    child: Child,
    base: String,
}

impl Service {
    async fn start(db: &Db, sim: &Simulator, extra: &[(&str, String)]) -> anyhow::Result<Service> {
        let bin = std::env::current_exe()?
            .parent()
            .map(|d| d.join("kling-relay"))
            .ok_or_else(|| anyhow::anyhow!("no folder for the service binary"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let mut c = Command::new(bin);
        c.arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "error")
            .env("KLING_RELAY_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("KLING_RELAY_SERVER__PUBLIC_URL", &base)
            .env("KLING_RELAY_SERVER__WEBHOOK_SECRET", WEBHOOK_SECRET)
            .env("KLING_RELAY_DATABASE__URL", &db.url)
            .env("KLING_RELAY_COMETAPI__BASE_URL", sim.base_url())
            .env("COMETAPI_KEY", sim.api_key())
            .env("KLING_RELAY_COMETAPI__MAX_CONCURRENCY", "100000")
            .env("KLING_RELAY_DISPATCH__MAX_PENDING", "10000000")
            .env("KLING_RELAY_LIMITS__CLIENT_MAX_PENDING", "10000000")
            .env("KLING_RELAY_LIMITS__CLIENT_SUBMITS_PER_MINUTE", "100000000")
            .env("KLING_RELAY_POLLER__FIRST_POLL_AFTER", "1h")
            // The scenarios measure the task path; archiving is measured on its own terms.
            .env("KLING_RELAY_ARCHIVE__ENABLED", "false")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra {
            c.env(k, v);
        }
        let child = c.spawn()?;
        let http = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "service did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Service { child, base })
    }

    /// (current, peak) resident memory in MB, from /proc.
    fn rss_mb(&self) -> (Option<f64>, Option<f64>) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn simulator(
    processing_after: Duration,
    finish_after: Duration,
) -> anyhow::Result<Simulator> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(Simulator::start(
        SimConfig {
            processing_after,
            finish_after,
            concurrency_units: i64::MAX / 4,
            ..SimConfig::default()
        },
        l,
    )
    .await?)
}

async fn client_key(store: &Store) -> anyhow::Result<String> {
    Ok(
        kling_relay::service::clients::create_client(store, "bench", None)
            .await?
            .api_key,
    )
}

fn http_client(key: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(k) = key {
        if let Ok(v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {k}")) {
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(256)
        .build()
        .unwrap_or_default()
}

/// Submits one task; the task as answered with 202.
async fn post_task(h: &reqwest::Client, base: &str) -> Result<Value, String> {
    let r = h
        .post(format!("{base}/v1/tasks"))
        .json(&task_body())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 202 {
        return Err(r.status().to_string());
    }
    r.json().await.map_err(|e| e.to_string())
}

fn task_body() -> Value {
    json!({
        "subject_image_list": [{"subject_image": "https://example.com/a.png"}, {"subject_image": "https://example.com/b.png"}],
        "prompt": "two cats at a tea party", "n": 2, "aspect_ratio": "1:1"
    })
}

fn record(i: usize, status_seed: usize) -> (NewTaskRecord, TaskStatus) {
    let id = uuid::Uuid::now_v7().to_string();
    let status = match status_seed % 10 {
        0 => TaskStatus::Processing,
        1 | 2 => TaskStatus::Failed,
        _ => TaskStatus::Succeeded,
    };
    (
        NewTaskRecord {
            external_task_id: format!("klr-{id}"),
            id,
            model_name: "kling-v2".into(),
            prompt: Some(format!("bench task {i}")),
            n: 2,
            aspect_ratio: Some("1:1".into()),
            priority: Default::default(),
            metadata: None,
            inputs: TaskInputs {
                subject_images: vec![
                    "https://example.com/a.png".into(),
                    "https://example.com/b.png".into(),
                ],
                scene_image: None,
                style_image: None,
                negative_prompt: None,
                watermark_info: None,
            },
            created_at_ms: 1_700_000_000_000 + i as i64,
            client: Some("bench".into()),
            notify_url: None,
            request_id: None,
        },
        status,
    )
}

const CAPS: PendingCaps = PendingCaps {
    total: i64::MAX,
    per_client: i64::MAX,
};

/// N tasks already accepted upstream (`submitted`, upstream id `u{i}`), not due for polling.
async fn seed_submitted(store: &Store, n: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let (r, _) = record(i, 3);
        store.insert_task(r.clone(), None, CAPS).await?;
        let change = Change {
            status: TaskStatus::Submitted,
            upstream_status: Some(UpstreamStatus::Submitted),
            bind_upstream_task_id: Some(format!("u{i}")),
            upstream_updated_at_ms: Some(1),
            images: None,
            error: None,
            detail: None,
            final_unit_deduction: None,
        };
        store
            .commit_change(&Commit {
                id: &r.id,
                expected_version: 0,
                change: &change,
                source: EventSource::Dispatch,
                now_ms: kling_relay::service::now_ms(),
                poll_due_at_ms: None,
                outbox: None,
                archive: false,
                upstream_payload: None,
                leaves_pending: false,
            })
            .await?;
        ids.push(r.id);
    }
    Ok(ids)
}

fn callback_body(upstream: &str, status: &str, updated_at: i64) -> String {
    let mut v = json!({"task_id": upstream, "task_status": status, "task_status_msg": "",
        "created_at": 1, "updated_at": updated_at, "task_info": {}});
    if status == "succeed" {
        v["task_result"] = json!({"images": [
            {"index": 0, "url": "https://cdn.example/0.png"}, {"index": 1, "url": "https://cdn.example/1.png"}]});
    }
    v.to_string()
}

/// Scenario 1: callbacks for distinct tasks, beside a bare HTTP handler and bare storage writes.
async fn webhook_ingest(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let n = if args.smoke { 100 } else { 5000 };
    let db = Db::create(kind, &args.postgres_url).await?;
    let store = Store::connect(&db.url, 8).await?;
    store.migrate().await?;
    client_key(&store).await?;
    let ids = Arc::new(seed_submitted(&store, n).await?);
    let sim = simulator(Duration::from_secs(3600), Duration::from_secs(3600)).await?;
    let svc = Service::start(&db, &sim, &[]).await?;
    let (idle, _) = svc.rss_mb();
    let http = http_client(None);
    let c = args.concurrency;

    // The service: processing then succeed for each task, as CometAPI would.
    let (base, h, ids2) = (svc.base.clone(), http.clone(), ids.clone());
    let service = load("webhook-ingest service", 2 * n, c, move |i| {
        let (base, h, ids) = (base.clone(), h.clone(), ids2.clone());
        async move {
            let t = i / 2;
            let id = &ids[t];
            let status = if i % 2 == 0 { "processing" } else { "succeed" };
            let token = kling_relay::service::webhook_token(WEBHOOK_SECRET.as_bytes(), id);
            let r = h
                .post(format!("{base}/webhooks/cometapi/{id}?token={token}"))
                .header("content-type", "application/json")
                .body(callback_body(&format!("u{t}"), status, 10 + i as i64))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(r.status().to_string())
            }
        }
    })
    .await;
    let (_, peak) = svc.rss_mb();

    // HTTP limit: a bare axum handler that reads the body and answers 200.
    let bare = axum::Router::new().route(
        "/webhooks/cometapi/{id}",
        post(|body: axum::body::Bytes| async move {
            if body.is_empty() {
                ""
            } else {
                "ok"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bare_base = format!("http://{}", l.local_addr()?);
    let bare_server = tokio::spawn(async move { axum::serve(l, bare).await });
    let (h, ids2) = (http.clone(), ids.clone());
    let http_limit = load("webhook-ingest http limit", 2 * n, c, move |i| {
        let (b, h, ids) = (bare_base.clone(), h.clone(), ids2.clone());
        async move {
            let r = h
                .post(format!("{b}/webhooks/cometapi/{}?token=x", ids[i / 2]))
                .header("content-type", "application/json")
                .body(callback_body(&format!("u{}", i / 2), "processing", 1))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            r.status()
                .is_success()
                .then_some(())
                .ok_or_else(|| "status".into())
        }
    })
    .await;
    bare_server.abort();

    // Storage limit: the same number of single-row update transactions, straight through sqlx,
    // on the same database, with the same concurrency.
    let raw = Store::connect(&db.url, 8).await?;
    let (ids2, raw2) = (ids.clone(), raw.clone());
    let storage_limit = load("webhook-ingest storage limit", 2 * n, c, move |i| {
        let (ids, raw) = (ids2.clone(), raw2.clone());
        async move {
            raw.bench_update_one(&ids[i / 2], i as i64)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    // The database's own limit: SQLite, one writer looping the same single-row update (what a
    // single-writer database allows); Postgres, pgbench at the same concurrency (below).
    let (ids2, raw2) = (ids.clone(), raw.clone());
    let single_writer = load("webhook-ingest single writer", 2 * n, 1, move |i| {
        let (ids, raw) = (ids2.clone(), raw2.clone());
        async move {
            raw.bench_update_one(&ids[i / 2], i as i64)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    raw.close().await;
    store.close().await;
    drop(svc);
    let pgbench = match (kind, &db.pg) {
        ("postgres", Some((admin, name))) => pgbench_limit(admin, name, c).await,
        _ => None,
    };
    sim.stop();
    db.remove().await;

    let mut s = service.row("webhook-ingest", kind, "service");
    let hl = http_limit.row("webhook-ingest", kind, "http limit (bare axum)");
    let sl = storage_limit.row("webhook-ingest", kind, "storage limit (sqlx updates)");
    let mut sw = single_writer.row("webhook-ingest", kind, "single-row updates, one writer");
    s.of_limit = Some(s.per_second / sl.per_second);
    s.service_peak_rss_mb = peak;
    s.service_idle_rss_mb = idle;
    let mut rows = vec![s.clone(), hl, sl];
    if let Some(tps) = pgbench {
        let mut pg = sw.clone();
        pg.measure = format!("pgbench single-row updates, {c} clients (tx/s)");
        pg.ops = 0;
        pg.per_second = tps;
        pg.p50_ms = 0.0;
        pg.p90_ms = 0.0;
        pg.p99_ms = 0.0;
        pg.max_ms = 0.0;
        pg.of_limit = Some(s.per_second / tps.max(1e-9));
        rows.push(pg);
    } else {
        sw.of_limit = Some(s.per_second / sw.per_second.max(1e-9));
        rows.push(sw);
    }
    Ok(rows)
}

/// Postgres's own single-row update transactions per second (pgbench, `clients` connections,
/// 5 s) on a tasks-shaped table in the scenario's database; None when pgbench is missing.
async fn pgbench_limit(admin: &str, db_name: &str, clients: usize) -> Option<f64> {
    let mut u = url::Url::parse(admin).ok()?;
    u.set_path(&format!("/{db_name}"));
    let url = u.to_string();
    let setup = "CREATE TABLE IF NOT EXISTS pgb (id BIGINT PRIMARY KEY, status TEXT NOT NULL, \
        version BIGINT NOT NULL, updated_at BIGINT NOT NULL, payload TEXT); \
        INSERT INTO pgb SELECT i, 'processing', 0, 0, repeat('x', 200) \
        FROM generate_series(1, 20000) i ON CONFLICT DO NOTHING;";
    let ok = std::process::Command::new("psql")
        .args([url.as_str(), "-q", "-c", setup])
        .output()
        .ok()?
        .status
        .success();
    if !ok {
        return None;
    }
    let script =
        std::env::temp_dir().join(format!("klr-pgb-{}.sql", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &script,
        "\\set k random(1, 20000)\nUPDATE pgb SET status = 'succeeded', version = version + 1, \
         updated_at = updated_at + 1 WHERE id = :k;\n",
    )
    .ok()?;
    let out = std::process::Command::new("pgbench")
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            "5",
            "-f",
            &script.display().to_string(),
            url.as_str(),
        ])
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse().ok());
    if tps.is_none() {
        eprintln!(
            "  pgbench gave no figure: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tps
}

/// Scenario 2: POST /v1/tasks against the simulator with zero delays.
async fn submit(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let n = if args.smoke { 50 } else { 2000 };
    let db = Db::create(kind, &args.postgres_url).await?;
    let store = Store::connect(&db.url, 2).await?;
    store.migrate().await?;
    let key = client_key(&store).await?;
    store.close().await;
    let sim = simulator(Duration::ZERO, Duration::ZERO).await?;
    let svc = Service::start(&db, &sim, &[]).await?;
    let http = http_client(Some(&key));
    let base = svc.base.clone();
    let stats = load("submit", n, args.concurrency, move |_| {
        let (base, h) = (base.clone(), http.clone());
        async move {
            let v = post_task(&h, &base).await?;
            // Accept-to-submitted: the POST answers once the dispatch landed (dispatch.wait).
            if v["status"] == "pending" {
                return Err("answered pending".into());
            }
            Ok(())
        }
    })
    .await;
    // With `Prefer: respond-async` the POST answers once the task is stored (issue 17).
    let (base, h) = (svc.base.clone(), http_client(Some(&key)));
    let async_stats = load("submit respond-async", n, args.concurrency, move |_| {
        let (base, h) = (base.clone(), h.clone());
        async move {
            let r = h
                .post(format!("{base}/v1/tasks"))
                .header("prefer", "respond-async")
                .json(&task_body())
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status() != 202 {
                return Err(r.status().to_string());
            }
            Ok(())
        }
    })
    .await;
    let (_, peak) = svc.rss_mb();
    drop(svc);
    // The limit beside it: single-row update transactions on the same database, same concurrency.
    let raw = Store::connect(&db.url, 8).await?;
    let ids = Arc::new(raw.bench_task_ids(2 * n).await?);
    let (ids2, raw2) = (ids.clone(), raw.clone());
    let storage_limit = load("submit storage limit", 2 * n, args.concurrency, move |i| {
        let (ids, raw) = (ids2.clone(), raw2.clone());
        async move {
            raw.bench_update_one(&ids[i % ids.len().max(1)], i as i64)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    raw.close().await;
    sim.stop();
    db.remove().await;
    let mut row = stats.row("submit", kind, "POST /v1/tasks until submitted");
    row.service_peak_rss_mb = peak;
    let limit = storage_limit.row("submit", kind, "storage limit (sqlx updates)");
    let mut fast = async_stats.row("submit", kind, "POST /v1/tasks, Prefer: respond-async");
    fast.of_limit = Some(fast.per_second / limit.per_second.max(1e-9));
    Ok(vec![row, fast, limit])
}

/// Scenario 3: history over many stored tasks, first page and a page far down, with and without
/// a filter.
async fn history(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let n: usize = if args.smoke { 5_000 } else { 1_000_000 };
    let db = Db::create(kind, &args.postgres_url).await?;
    let store = Store::connect(&db.url, 4).await?;
    store.migrate().await?;
    let key = client_key(&store).await?;
    eprintln!("  history: seeding {n} tasks…");
    let seeded = Instant::now();
    store.bench_bulk_insert(n, "bench", bench_id).await?;
    eprintln!(
        "  history: seeded in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    store.close().await;
    let sim = simulator(Duration::from_secs(3600), Duration::from_secs(3600)).await?;
    let svc = Service::start(&db, &sim, &[]).await?;
    let http = http_client(Some(&key));
    // The cursor 10,000 pages of 50 down (or halfway, for small sizes): the service's opaque
    // cursor is base64url("created_at:id"); the seed's created_at is 1_700_000_000_000 + i.
    let deep_index = (n - 1).saturating_sub(500_000.min(n / 2));
    let deep_cursor = {
        use base64::Engine;
        let ms = 1_700_000_000_000i64 + deep_index as i64;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{ms}:{}", bench_id(deep_index)))
    };
    let queries = [
        ("first page", "/v1/tasks?limit=50".to_owned()),
        (
            "first page, status=failed",
            "/v1/tasks?limit=50&status=failed".to_owned(),
        ),
        (
            "deep page",
            format!("/v1/tasks?limit=50&cursor={deep_cursor}"),
        ),
        (
            "deep page, status=failed",
            format!("/v1/tasks?limit=50&status=failed&cursor={deep_cursor}"),
        ),
    ];
    let reps = if args.smoke { 50 } else { 2000 };
    let mut rows = Vec::new();
    for (what, path) in queries {
        let (base, h) = (svc.base.clone(), http.clone());
        let stats = load(&format!("history {what}"), reps, 8, move |_| {
            let (url, h) = (format!("{}{}", base, path), h.clone());
            async move {
                let r = h.get(url).send().await.map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(r.status().to_string());
                }
                let v: Value = r.json().await.map_err(|e| e.to_string())?;
                if v["tasks"].as_array().map_or(0, Vec::len) == 0 {
                    return Err("empty page".into());
                }
                Ok(())
            }
        })
        .await;
        rows.push(stats.row("history", kind, &format!("{what} ({n} tasks)")));
    }
    // The deep page as a share of the first (target: at most 1.5).
    if rows.len() == 4 {
        rows[2].of_limit = Some(rows[2].p99_ms / rows[0].p99_ms.max(1e-9));
        rows[3].of_limit = Some(rows[3].p99_ms / rows[1].p99_ms.max(1e-9));
    }
    drop(svc);
    sim.stop();
    db.remove().await;
    Ok(rows)
}

/// Scenario 4: the cost of one poller pass's "what is due" query with few and with many open
/// tasks (100,000 final tasks beside them either way), and the upstream queries per second the
/// poller sustains when all of them are due.
async fn poll_scale(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let sizes: [usize; 2] = if args.smoke {
        [100, 1_000]
    } else {
        [1_000, 100_000]
    };
    let finals = if args.smoke { 1_000 } else { 100_000 };
    let mut rows: Vec<Row> = Vec::new();
    for open in sizes {
        let db = Db::create(kind, &args.postgres_url).await?;
        let store = Store::connect(&db.url, 4).await?;
        store.migrate().await?;
        client_key(&store).await?;
        let now = kling_relay::service::now_ms();
        store.bench_bulk_insert(finals, "bench", bench_id).await?;
        store.bench_seed_open(open, "bench", now).await?;
        let reps = if args.smoke { 50 } else { 1000 };
        let s2 = store.clone();
        let due = load(
            &format!("poll-scale due query ({open} open)"),
            reps,
            1,
            move |_| {
                let s = s2.clone();
                async move {
                    let got = s
                        .due_polls(i64::MAX / 2, 64)
                        .await
                        .map_err(|e| e.to_string())?;
                    if got.is_empty() {
                        return Err("nothing due".into());
                    }
                    Ok(())
                }
            },
        )
        .await;
        let mut row = due.row(
            "poll-scale",
            kind,
            &format!("due query, {open} open + {finals} final"),
        );
        if let Some(first) = rows.iter().find(|r| r.measure.starts_with("due query")) {
            row.of_limit = Some(row.p99_ms / first.p99_ms.max(1e-9));
        }
        rows.push(row);

        // The poller itself, every task due: upstream queries per second over a window.
        let sim = simulator(Duration::from_secs(3600), Duration::from_secs(3600)).await?;
        let svc = Service::start(
            &db,
            &sim,
            &[
                ("KLING_RELAY_POLLER__TICK", "20ms".into()),
                ("KLING_RELAY_POLLER__NOT_FOUND_GRACE", "1000h".into()),
                ("KLING_RELAY_POLLER__GIVE_UP_AFTER", "1000h".into()),
            ],
        )
        .await?;
        let window = if args.smoke {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        let before = sim.stats().query_calls;
        let started = Instant::now();
        tokio::time::sleep(window).await;
        let queries = (sim.stats().query_calls - before) as usize;
        let secs = started.elapsed().as_secs_f64();
        let (_, peak) = svc.rss_mb();
        drop(svc);
        sim.stop();
        store.close().await;
        db.remove().await;
        rows.push(Row {
            scenario: "poll-scale".into(),
            db: kind.into(),
            measure: format!("poller upstream queries, {open} due"),
            ops: queries,
            seconds: secs,
            per_second: queries as f64 / secs,
            p50_ms: 0.0,
            p90_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            errors: 0,
            of_limit: None,
            service_peak_rss_mb: peak,
            service_idle_rss_mb: None,
        });
    }
    Ok(rows)
}

/// Scenario 5: tasks through the whole loop with the simulator's default delays and 10% of
/// callbacks dropped; how long after upstream finished each task is final here.
async fn end_to_end(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let n = if args.smoke { 50 } else { 10_000 };
    let db = Db::create(kind, &args.postgres_url).await?;
    let store = Store::connect(&db.url, 4).await?;
    store.migrate().await?;
    let key = client_key(&store).await?;
    let defaults = SimConfig::default();
    let sim = simulator(defaults.processing_after, defaults.finish_after).await?;
    sim.set_faults(kling_relay::simulator::Faults {
        drop_callbacks: 0.1,
        ..Default::default()
    });
    // First poll after the poller's interval: the target is "within the interval plus 5 s".
    let interval = if args.smoke { "2s" } else { "20s" };
    let svc = Service::start(
        &db,
        &sim,
        &[
            ("KLING_RELAY_POLLER__FIRST_POLL_AFTER", interval.into()),
            ("KLING_RELAY_POLLER__INTERVAL", interval.into()),
        ],
    )
    .await?;
    let http = http_client(Some(&key));
    let base = svc.base.clone();
    let submits = load("end-to-end submit", n, args.concurrency, move |_| {
        let (base, h) = (base.clone(), http.clone());
        async move { post_task(&h, &base).await.map(|_| ()) }
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(if args.smoke { 30 } else { 300 });
    let completions = loop {
        let c = store.bench_completions().await?;
        if c.len() >= n || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (_, peak) = svc.rss_mb();
    let lag: Vec<Duration> = completions
        .iter()
        .filter_map(|(upstream, completed)| {
            let finished = sim.finished_at(upstream)?;
            Some(Duration::from_millis((completed - finished).max(0) as u64))
        })
        .collect();
    let stats = Stats {
        errors: n.saturating_sub(lag.len()) + submits.errors,
        latencies: lag,
        elapsed: submits.elapsed,
    };
    drop(svc);
    sim.stop();
    store.close().await;
    db.remove().await;
    let mut row = stats.row(
        "end-to-end",
        kind,
        &format!("upstream finished -> final here (poll every {interval})"),
    );
    row.service_peak_rss_mb = peak;
    Ok(vec![row])
}

/// Seeded ids are fixed so a cursor can be built without reading the database.
fn bench_id(i: usize) -> String {
    format!("00000000-0000-7000-8000-{i:012}")
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<15} {:<9} {:<40} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>5} {:>8} {:>9}",
        "scenario",
        "db",
        "measure",
        "ops",
        "ops/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "err",
        "of limit",
        "peak RSS"
    );
    for r in rows {
        println!(
            "{:<15} {:<9} {:<40} {:>7} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>5} {:>8} {:>9}",
            r.scenario,
            r.db,
            r.measure,
            r.ops,
            r.per_second,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms,
            r.errors,
            r.of_limit.map(|x| format!("{:.2}", x)).unwrap_or_default(),
            r.service_peak_rss_mb
                .map(|x| format!("{x:.0} MB"))
                .unwrap_or_default(),
        );
    }
    for r in rows.iter().filter(|r| r.service_idle_rss_mb.is_some()) {
        println!(
            "service idle RSS ({}, {}): {:.1} MB",
            r.scenario,
            r.db,
            r.service_idle_rss_mb.unwrap_or_default()
        );
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let dbs: Vec<&'static str> = match args.db.as_str() {
        "sqlite" => vec!["sqlite"],
        "postgres" => vec!["postgres"],
        _ => vec!["sqlite", "postgres"],
    };
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "all" => vec![
            "webhook-ingest",
            "submit",
            "history",
            "poll-scale",
            "end-to-end",
            "amplification",
            "utilization",
            "fairness",
            "usage",
        ],
        s => vec![s],
    };
    let mut rows = Vec::new();
    let mut failed = false;
    for scenario in &scenarios {
        for db in &dbs {
            eprintln!("{scenario} on {db}");
            let started = Instant::now();
            let result = tokio::time::timeout(Duration::from_secs(1800), async {
                match *scenario {
                    "webhook-ingest" => webhook_ingest(&args, db).await,
                    "submit" => submit(&args, db).await,
                    "history" => history(&args, db).await,
                    "poll-scale" => poll_scale(&args, db).await,
                    "end-to-end" => end_to_end(&args, db).await,
                    "amplification" => amplification::amplification(&args, db).await,
                    "utilization" => utilization::utilization(&args, db).await,
                    "fairness" => fairness::fairness(&args, db).await,
                    "usage" => usage::usage(&args, db).await,
                    other => Err(anyhow::anyhow!("unknown scenario `{other}`")),
                }
            })
            .await;
            match result {
                Ok(Ok(r)) => rows.extend(r),
                Ok(Err(e)) => {
                    eprintln!("{scenario} on {db} failed: {e:#}");
                    failed = true;
                }
                Err(_) => {
                    eprintln!("{scenario} on {db} did not finish in time");
                    failed = true;
                }
            }
            eprintln!("  ({:.1} s)", started.elapsed().as_secs_f64());
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
    } else {
        print_table(&rows);
    }
    let errors: usize = rows.iter().map(|r| r.errors).sum();
    if failed || errors > 0 {
        eprintln!(
            "bench: {errors} request errors{}",
            if failed {
                ", and a scenario failed"
            } else {
                ""
            }
        );
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

//! `kling-relay-bench`: load scenarios against a real `kling-relay` process on loopback, each
//! figure reported beside a limit measured in the same run. See BENCHMARKS.md.
//!
//!   cargo build --release && target/release/kling-relay-bench            # everything, both databases
//!   target/release/kling-relay-bench --scenario history --db sqlite
//!   target/release/kling-relay-bench --smoke                             # tiny sizes, seconds (CI)
//!
//! Longer than 400 lines: the harness every scenario shares (arguments, the load loop, databases,
//! processes, the table); the scenarios are in files of their own.

mod amplification;
mod cpu;
mod end_to_end;
mod fairness;
mod history;
mod lean_http;
mod poll_scale;
mod submit;
mod usage;
mod utilization;
mod webhook_ingest;

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
    /// Where the CPU went during this measure, where the scenario records it.
    #[serde(flatten)]
    cpu: Option<cpu::CpuUse>,
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
            cpu: None,
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
    load_with(
        label,
        n,
        concurrency,
        || (),
        move |(), i| {
            let op = op(i);
            async move { ((), op.await) }
        },
    )
    .await
}

/// `load` with a state of each worker's own (a connection), made by `state` and handed from one
/// op to its worker's next.
async fn load_with<S, M, F, Fut>(
    label: &str,
    n: usize,
    concurrency: usize,
    state: M,
    op: F,
) -> Stats
where
    S: Send + 'static,
    M: Fn() -> S,
    F: Fn(S, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (S, Result<(), String>)> + Send,
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
        let mut own = state();
        workers.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                let (back, result) = op(own, i).await;
                own = back;
                match result {
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
    /// The address the service listens on.
    fn addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.base.trim_start_matches("http://").parse()?)
    }

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
        // For looking into a run: the service's own log filter (its log goes to stderr).
        if let Some(filter) = std::env::var_os("KLR_BENCH_SERVICE_LOG") {
            c.env("RUST_LOG", filter);
        }
        // For trying a setting on a scenario: the bench's own `KLING_RELAY_*` variables (not its
        // `KLING_RELAY_BENCH_*` ones) reach the service and win over the scenario's.
        for (k, v) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name.starts_with("KLING_RELAY_") && !name.starts_with("KLING_RELAY_BENCH_") {
                c.env(&k, v);
            }
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

    fn pid(&self) -> u32 {
        self.child.id()
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
    let with_cpu: Vec<(&Row, cpu::CpuUse)> =
        rows.iter().filter_map(|r| Some((r, r.cpu?))).collect();
    if !with_cpu.is_empty() {
        println!(
            "\nCPU per op (µs) and the machine's idle share, by measure:\n{:<15} {:<9} {:<40} {:>8} {:>8} {:>9} {:>9}",
            "scenario", "db", "measure", "db", "service", "generator", "idle"
        );
        let us = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        for (r, c) in with_cpu {
            println!(
                "{:<15} {:<9} {:<40} {:>8} {:>8} {:>9.0} {:>8.0}%",
                r.scenario,
                r.db,
                r.measure,
                us(c.db_cpu_us_per_op),
                us(c.service_cpu_us_per_op),
                c.generator_cpu_us_per_op,
                c.machine_idle_share * 100.0
            );
        }
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
                    "webhook-ingest" => webhook_ingest::webhook_ingest(&args, db).await,
                    "submit" => submit::submit(&args, db).await,
                    "history" => history::history(&args, db).await,
                    "poll-scale" => poll_scale::poll_scale(&args, db).await,
                    "end-to-end" => end_to_end::end_to_end(&args, db).await,
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

/// The CPU spent since `before`, over `ops` operations; None where `/proc` is not there.
fn spent(
    before: Option<cpu::CpuMark>,
    service: Option<u32>,
    postgres: bool,
    ops: usize,
) -> Option<cpu::CpuUse> {
    Some(before?.until(&cpu::mark(service, postgres)?, ops))
}

/// How many tasks a scenario runs: `smoke` with `--smoke`, else `KLR_BENCH_TASKS` when set (a
/// longer measured phase, to profile it), else `full`.
fn tasks(args: &Args, smoke: usize, full: usize) -> usize {
    if args.smoke {
        return smoke;
    }
    std::env::var("KLR_BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(full)
}

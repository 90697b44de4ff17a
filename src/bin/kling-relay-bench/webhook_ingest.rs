//! Scenario `webhook-ingest`: callbacks for distinct tasks (a `processing`, then a `succeed`),
//! beside a bare HTTP handler, bare storage writes, and the database's own limit (`pgbench` on
//! Postgres, one writer looping the statement on SQLite).

use super::*;

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
                decided_on: None,
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
pub(super) async fn webhook_ingest(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let n = tasks(args, 100, 5000);
    let db = Db::create(kind, &args.postgres_url).await?;
    let store = Store::connect(&db.url, 8).await?;
    store.migrate().await?;
    client_key(&store).await?;
    let ids = Arc::new(seed_submitted(&store, 2 * n).await?);
    store.bench_analyze().await?;
    let sim = simulator(Duration::from_secs(3600), Duration::from_secs(3600)).await?;
    let svc = Service::start(&db, &sim, &[]).await?;
    let (idle, _) = svc.rss_mb();
    let c = args.concurrency;

    // The service: a `processing` for each task, then a `succeed` for each, as CometAPI sends
    // them (a generation apart). Then the stress case on tasks of their own: each task's two
    // callbacks sent together, so about a third lose their compare-and-set to the other and are
    // decided again on the fresh row.
    let addr = svc.addr()?;
    let pg = kind == "postgres";
    let before = cpu::mark(Some(svc.pid()), pg);
    let service = callbacks("webhook-ingest service", &ids, 0, n, c, addr, move |i| {
        (i % n, if i < n { "processing" } else { "succeed" })
    })
    .await;
    let service_cpu = spent(before, Some(svc.pid()), pg, 2 * n);
    let racing = callbacks("webhook-ingest racing pairs", &ids, n, n, c, addr, |i| {
        (i / 2, if i % 2 == 0 { "processing" } else { "succeed" })
    })
    .await;
    let (_, peak) = svc.rss_mb();
    // Every acknowledged callback is in the database: each task got its `succeed` acknowledged
    // unless a send failed, so more unfinished tasks than failed sends means a lost change.
    let unfinished = usize::try_from(store.bench_count_open().await?).unwrap_or(usize::MAX);
    let lost = unfinished.saturating_sub(service.errors + racing.errors);
    if lost > 0 {
        eprintln!("  webhook-ingest: {lost} acknowledged callbacks not in the database");
    }

    // HTTP limit: a bare axum handler that reads the body and answers 200, driven by the same
    // generator.
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
    let bare_addr = l.local_addr()?;
    let bare_server = tokio::spawn(async move { axum::serve(l, bare).await });
    let ids2 = ids.clone();
    let http_limit =
        lean_http::load_raw("webhook-ingest http limit", 2 * n, c, bare_addr, move |i| {
            lean_http::request(
                "POST",
                &format!("/webhooks/cometapi/{}?token=x", ids2[i / 2]),
                bare_addr,
                "",
                &callback_body(&format!("u{}", i / 2), "processing", 1),
            )
        })
        .await;
    bare_server.abort();

    // Storage limit: the same number of single-row update transactions, straight through sqlx,
    // on the same database, with the same concurrency.
    let raw = Store::connect(&db.url, 8).await?;
    let (ids2, raw2) = (ids.clone(), raw.clone());
    let before = cpu::mark(None, pg);
    let storage_limit = load("webhook-ingest storage limit", 2 * n, c, move |i| {
        let (ids, raw) = (ids2.clone(), raw2.clone());
        async move {
            raw.bench_update_one(&ids[i / 2], i as i64)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    let storage_cpu = spent(before, None, pg, 2 * n);
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
    let before = cpu::mark(None, pg);
    let pgbench = match (kind, &db.pg) {
        ("postgres", Some((admin, name))) => pgbench_limit(admin, name, c).await,
        _ => None,
    };
    // Per transaction only when pgbench said how many it ran.
    let pgbench_cpu = pgbench.and_then(|(_, txs)| spent(before, None, pg, txs?));
    sim.stop();
    db.remove().await;

    let mut s = service.row("webhook-ingest", kind, "service");
    s.errors += lost;
    s.cpu = service_cpu;
    let mut race = racing.row(
        "webhook-ingest",
        kind,
        "service, each task's callbacks racing",
    );
    let hl = http_limit.row("webhook-ingest", kind, "http limit (bare axum)");
    let mut sl = storage_limit.row("webhook-ingest", kind, "storage limit (sqlx updates)");
    sl.cpu = storage_cpu;
    let mut sw = single_writer.row("webhook-ingest", kind, "single-row updates, one writer");
    s.of_limit = Some(s.per_second / sl.per_second);
    race.of_limit = Some(race.per_second / sl.per_second);
    s.service_peak_rss_mb = peak;
    s.service_idle_rss_mb = idle;
    let mut rows = vec![s.clone(), race, hl, sl];
    if let Some((tps, _)) = pgbench {
        let mut pg = sw.clone();
        pg.measure = format!("pgbench single-row updates, {c} clients (tx/s)");
        pg.ops = 0;
        pg.per_second = tps;
        pg.p50_ms = 0.0;
        pg.p90_ms = 0.0;
        pg.p99_ms = 0.0;
        pg.max_ms = 0.0;
        pg.of_limit = Some(s.per_second / tps.max(1e-9));
        pg.cpu = pgbench_cpu;
        rows.push(pg);
    } else {
        sw.of_limit = Some(s.per_second / sw.per_second.max(1e-9));
        rows.push(sw);
    }
    Ok(rows)
}

/// `2 * n` callbacks for the `n` tasks from `ids[first]`: callback `i` is `pick(i)`, a task's
/// index among them and the status reported.
async fn callbacks(
    label: &str,
    ids: &Arc<Vec<String>>,
    first: usize,
    n: usize,
    concurrency: usize,
    addr: std::net::SocketAddr,
    pick: impl Fn(usize) -> (usize, &'static str) + Send + Sync + 'static,
) -> Stats {
    let ids = ids.clone();
    lean_http::load_raw(label, 2 * n, concurrency, addr, move |i| {
        let (t, status) = pick(i);
        let t = first + t;
        let id = &ids[t];
        let token = kling_relay::service::webhook_token(WEBHOOK_SECRET.as_bytes(), id);
        lean_http::request(
            "POST",
            &format!("/webhooks/cometapi/{id}?token={token}"),
            addr,
            "",
            &callback_body(&format!("u{t}"), status, 10 + i as i64),
        )
    })
    .await
}

/// Postgres's own single-row update transactions per second (pgbench, `clients` connections,
/// 5 s) on a tasks-shaped table in the scenario's database, and how many it ran (when its
/// output says); None when pgbench is missing.
async fn pgbench_limit(admin: &str, db_name: &str, clients: usize) -> Option<(f64, Option<usize>)> {
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
    let txs = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("number of transactions actually processed: ")
        })
        .and_then(|v| v.split(['/', ' ']).next())
        .and_then(|v| v.parse().ok());
    if tps.is_none() {
        eprintln!(
            "  pgbench gave no figure: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some((tps?, txs))
}

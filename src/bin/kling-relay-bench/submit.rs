//! Scenario `submit`: `POST /v1/tasks` against the simulator, waiting for dispatch and with
//! `Prefer: respond-async`, beside the storage limit of the insert.

use super::*;

/// Scenario 2: POST /v1/tasks against the simulator with zero delays.
pub(super) async fn submit(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let n = tasks(args, 50, 2000);
    let db = Db::create(kind, &args.postgres_url).await?;
    let store = Store::connect(&db.url, 2).await?;
    store.migrate().await?;
    let key = client_key(&store).await?;
    store.close().await;
    let sim = simulator(Duration::ZERO, Duration::ZERO).await?;
    let pg = kind == "postgres";
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
    // With `Prefer: respond-async` the POST answers once the task is stored (issue 17); a
    // throughput figure, so sent by the lean generator (the wait above reads each answer's body).
    let fast = respond_async(
        "submit respond-async",
        &svc,
        &key,
        n,
        args.concurrency,
        pg,
        None,
    )
    .await?;
    let (_, peak) = svc.rss_mb();
    drop(svc);
    // The same with upstream as a real account is during a burst: generations take their time
    // and the account's concurrency (the default 10 units) is soon full, so most tasks wait
    // `pending` and intake is the POST's own work, not the lifecycles it sets off.
    let slow = simulator(Duration::from_secs(3600), Duration::from_secs(3600)).await?;
    let svc = Service::start(
        &db,
        &slow,
        &[("KLING_RELAY_COMETAPI__MAX_CONCURRENCY", "10".into())],
    )
    .await?;
    let busy = respond_async(
        "submit respond-async, upstream busy",
        &svc,
        &key,
        n,
        args.concurrency,
        pg,
        None,
    )
    .await?;
    // The same again, each POST with an `Idempotency-Key` of its own, as careful clients send.
    let keyed = respond_async(
        "submit respond-async, upstream busy, keyed",
        &svc,
        &key,
        n,
        args.concurrency,
        pg,
        Some("bench"),
    )
    .await?;
    drop(svc);
    slow.stop();
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
    // A `respond-async` row, as a share of the limit, with the CPU it cost.
    let against_limit = |(stats, cpu): (Stats, Option<cpu::CpuUse>), measure: &str| {
        let mut r = stats.row("submit", kind, measure);
        r.of_limit = Some(r.per_second / limit.per_second.max(1e-9));
        r.cpu = cpu;
        r
    };
    let fast = against_limit(fast, "POST /v1/tasks, Prefer: respond-async");
    let busy = against_limit(busy, "POST /v1/tasks, respond-async, upstream busy");
    let keyed = against_limit(
        keyed,
        "POST /v1/tasks, respond-async, upstream busy, Idempotency-Key",
    );
    Ok(vec![row, fast, busy, keyed, limit])
}

/// `n` POSTs with `Prefer: respond-async` to `svc`, `concurrency` at a time, and the CPU they
/// cost; with `idempotency_keys`, each carries the key `<it>-<i>`.
async fn respond_async(
    label: &str,
    svc: &Service,
    key: &str,
    n: usize,
    concurrency: usize,
    postgres: bool,
    idempotency_keys: Option<&'static str>,
) -> anyhow::Result<(Stats, Option<cpu::CpuUse>)> {
    let addr = svc.addr()?;
    let headers = format!("authorization: Bearer {key}\r\nprefer: respond-async\r\n");
    let body = task_body().to_string();
    let before = cpu::mark(Some(svc.pid()), postgres);
    let stats = lean_http::load_raw(
        label,
        n,
        concurrency,
        addr,
        move |i| match idempotency_keys {
            Some(prefix) => {
                let keyed = format!("{headers}idempotency-key: {prefix}-{i}\r\n");
                lean_http::request("POST", "/v1/tasks", addr, &keyed, &body)
            }
            None => lean_http::request("POST", "/v1/tasks", addr, &headers, &body),
        },
    )
    .await;
    Ok((stats, spent(before, Some(svc.pid()), postgres, n)))
}

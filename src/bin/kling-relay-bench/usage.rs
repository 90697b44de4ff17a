//! Scenario `usage`: `GET /v1/usage` for a 30-day range over 1,000,000 ended tasks (90 % succeeded
//! at 2 units, 10 % failed at 0), by day and by hour. The seeded aggregates are as the service keeps them: one row per hour, model and status once the
//! hour is past (its shards folded), shards in the current hour. Beside it, in the same run: the
//! same aggregate reads straight through the store (the storage floor under the HTTP answer), and
//! the question asked of the tasks table without aggregates (what the aggregates save).

use super::{bench_id, client_key, http_client, load, simulator, Args, Db, Row, Service};
use kling_relay::domain::usage::DAY_MS;
use kling_relay::storage::Store;
use serde_json::Value;
use std::time::{Duration, Instant};

pub async fn usage(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let n: usize = if args.smoke { 5_000 } else { 1_000_000 };
    let reps = if args.smoke { 50 } else { 2_000 };
    let db = Db::create(kind, &args.postgres_url).await?;
    let store = Store::connect(&db.url, 4).await?;
    store.migrate().await?;
    let key = client_key(&store).await?;
    let now = kling_relay::service::now_ms();
    let (from, to) = (now - 30 * DAY_MS, now);
    eprintln!("  usage: seeding {n} ended tasks and their aggregates…");
    let seeded = Instant::now();
    store
        .bench_seed_usage(n, "bench", from, to - from, bench_id)
        .await?;
    // Past hours folded, as the running service's poller keeps them (the current hour is not).
    let hour = 3_600_000;
    store
        .fold_usage_shards(from - hour, now - now % hour)
        .await?;
    eprintln!("  usage: seeded in {:.1} s", seeded.elapsed().as_secs_f64());

    let mut rows = Vec::new();
    // The floor: the two aggregate reads a usage answer makes, through the store.
    let floor = {
        let s = store.clone();
        load("usage floor (store)", reps, 1, move |_| {
            let s = s.clone();
            async move {
                s.usage_rows(Some("bench"), from, to)
                    .await
                    .map_err(|e| e.to_string())?;
                s.usage_durations(Some("bench"), from, to)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        })
        .await
    };
    let floor_row = floor.row(
        "usage",
        kind,
        "aggregate reads through the store, 1 caller (floor)",
    );
    // Without aggregates: a few runs are enough to show the order of magnitude.
    let scan = {
        let s = store.clone();
        load("usage from tasks (no aggregates)", 5, 1, move |_| {
            let s = s.clone();
            async move {
                s.bench_usage_from_tasks("bench", from, to)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await
    };
    store.close().await;

    let sim = simulator(Duration::from_secs(3600), Duration::from_secs(3600)).await?;
    let svc = Service::start(&db, &sim, &[]).await?;
    let http = http_client(Some(&key));
    let rfc = |ms: i64| kling_relay::resource::rfc3339(ms);
    for (granularity, buckets, callers) in [
        ("day", 30..=31, 1),
        ("hour", 720..=721, 1),
        ("day", 30..=31, 8),
    ] {
        let url = format!(
            "{}/v1/usage?from={}&to={}&granularity={granularity}",
            svc.base,
            rfc(from),
            rfc(to)
        );
        let h = http.clone();
        let label = format!("usage by {granularity}, {callers} callers");
        let stats = load(&label, reps, callers, move |_| {
            let (url, h, buckets) = (url.clone(), h.clone(), buckets.clone());
            async move {
                let r = h.get(url).send().await.map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(r.status().to_string());
                }
                let v: Value = r.json().await.map_err(|e| e.to_string())?;
                let got = v["buckets"].as_array().map_or(0, Vec::len);
                if !buckets.contains(&got) {
                    return Err(format!("{got} buckets"));
                }
                Ok(())
            }
        })
        .await;
        let mut row = stats.row(
            "usage",
            kind,
            &format!("GET /v1/usage, 30 days by {granularity}, {callers} caller(s) ({n} tasks)"),
        );
        // The answer as a share of the floor under it (1.0: HTTP and JSON cost nothing).
        if callers == 1 {
            row.of_limit = Some(row.p99_ms / floor_row.p99_ms.max(1e-9));
        }
        rows.push(row);
    }
    rows.push(floor_row);
    rows.push(scan.row(
        "usage",
        kind,
        "same question from the tasks table (no aggregates)",
    ));
    drop(svc);
    sim.stop();
    db.remove().await;
    Ok(rows)
}

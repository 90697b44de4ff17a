//! Scenario `poll-scale`: the poller with many quiet tasks in flight: what it reads and how
//! often it queries upstream.

use super::*;

/// Scenario 4: the cost of one poller pass's "what is due" query with few and with many open
/// tasks (100,000 final tasks beside them either way), and the upstream queries per second the
/// poller sustains when all of them are due.
pub(super) async fn poll_scale(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
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
            cpu: None,
        });
    }
    Ok(rows)
}

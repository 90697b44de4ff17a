//! Scenario `end-to-end`: submit to `succeeded` through the simulator, with callbacks.

use super::*;

/// Scenario 5: tasks through the whole loop with the simulator's default delays and 10% of
/// callbacks dropped; how long after upstream finished each task is final here.
pub(super) async fn end_to_end(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
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

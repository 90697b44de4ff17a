//! Scenario `history`: list queries over a large history (filters, deep cursors), beside the
//! same queries run on the store directly.

use super::*;

/// Scenario 3: history over many stored tasks, first page and a page far down, with and without
/// a filter.
pub(super) async fn history(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
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

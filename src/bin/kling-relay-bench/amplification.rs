//! Scenario `amplification`: four of the largest submits at once (six images of nearly 10 MB
//! each, as Base64: about 84 MB per body), measuring the service's peak resident memory against
//! the bodies, what it keeps once they are done, and the Base64 left in the database. The limit
//! beside the peak is the body itself: a service that only ever held one body would be at 1.0.

use super::{client_key, http_client, simulator, Args, Db, Row, Service, Stats};
use kling_relay::storage::Store;
use serde_json::json;
use std::time::{Duration, Instant};

/// A PNG header (300×300), then filler: only the header is read by the service.
fn largest_image_base64() -> String {
    use base64::Engine;
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&300u32.to_be_bytes());
    png.extend_from_slice(&300u32.to_be_bytes());
    png.extend_from_slice(&[8, 0, 0, 0, 0]);
    png.resize(10 * 1024 * 1024 - 64, 0x5a);
    base64::engine::general_purpose::STANDARD.encode(&png)
}

pub async fn amplification(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let concurrent = if args.smoke { 2 } else { 4 };
    let db = Db::create(kind, &args.postgres_url).await?;
    let store = Store::connect(&db.url, 2).await?;
    store.migrate().await?;
    let key = client_key(&store).await?;
    let sim = simulator(Duration::ZERO, Duration::ZERO).await?;
    let svc = Service::start(&db, &sim, &[]).await?;
    let (idle, _) = svc.rss_mb();
    let b64 = largest_image_base64();
    let body = json!({
        "prompt": "a cat in a garden",
        "subject_image_list": (0..4).map(|_| json!({"subject_image": &b64})).collect::<Vec<_>>(),
        "scene_image": &b64,
        "style_image": &b64,
    })
    .to_string();
    drop(b64);
    let body_mb = body.len() as f64 / 1e6;
    let http = http_client(Some(&key));
    let started = Instant::now();
    let sends: Vec<_> = (0..concurrent)
        .map(|_| {
            let (h, url, body) = (http.clone(), format!("{}/v1/tasks", svc.base), body.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let ok = h
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 202);
                (ok, t.elapsed())
            })
        })
        .collect();
    let mut stats = Stats {
        latencies: Vec::new(),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for s in sends {
        match s.await {
            Ok((true, d)) => stats.latencies.push(d),
            _ => stats.errors += 1,
        }
    }
    stats.elapsed = started.elapsed();
    let (_, peak) = svc.rss_mb();
    // Upstream has them all, and the memory has had a moment to go back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.bench_count_pending().await? > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = svc.rss_mb();
    let kept = store.bench_tasks_keeping_input_images().await?;
    store.close().await;
    drop(svc);
    sim.stop();
    db.remove().await;
    let mut row = stats.row(
        "amplification",
        kind,
        &format!(
            "{concurrent} submits of {body_mb:.0} MB at once; RSS after: {:.0} MB; tasks keeping Base64: {kept}",
            after.unwrap_or(0.0)
        ),
    );
    row.service_idle_rss_mb = idle;
    row.service_peak_rss_mb = peak;
    // The peak as a multiple of one body: the figure the byte budget bounds.
    row.of_limit = peak.map(|p| p / body_mb);
    Ok(vec![row])
}

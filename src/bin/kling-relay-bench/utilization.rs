//! Scenario `utilization`: how busy the paid upstream units are kept. An account of 12 units,
//! 80 tasks with `n` from {1, 1, 2, 3, 4, 9}, each taking 1 s upstream, all submitted at once;
//! the poller at its fastest settings (`first_poll_after` and `interval` 1 s). Three cases:
//! callbacks arrive; every callback is dropped (polling carries everything); another tenant holds
//! 3 of the 12 units (creates meet `1303`).
//!
//! The limit beside each figure is physical: Σ(n × duration) / units (the units the relay can
//! have: 9 when another tenant holds 3), the shortest makespan any scheduler could reach. Utilization is that bound over the measured makespan (first submit to
//! the last unit freed upstream). The slot reuse gap is the time from units freeing upstream to
//! the next create, for every freeing while work still waited.

use super::{client_key, http_client, Args, Db, Row, Service};
use kling_relay::simulator::{Faults, SimConfig, Simulator};
use kling_relay::storage::Store;
use serde_json::json;
use std::time::{Duration, Instant};

/// The workload both this and `fairness` use: task sizes, cycled, and the account's units.
pub const SIZES: [i64; 6] = [1, 1, 2, 3, 4, 9];
pub const UNITS: i64 = 12;

/// A simulator of an account of [`UNITS`] whose tasks take `duration` (a fifth of it to
/// `processing`).
pub async fn start_account(duration: Duration) -> anyhow::Result<Simulator> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(Simulator::start(
        SimConfig {
            processing_after: duration / 5,
            finish_after: duration - duration / 5,
            concurrency_units: UNITS,
            ..SimConfig::default()
        },
        listener,
    )
    .await?)
}

/// The `p` quantile of sorted figures (nearest rank), 0 when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn utilization(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let (tasks, duration) = if args.smoke {
        (12, Duration::from_millis(300))
    } else {
        (80, Duration::from_secs(1))
    };
    let mut rows = Vec::new();
    for case in ["callbacks", "polling only", "shared account"] {
        let db = Db::create(kind, &args.postgres_url).await?;
        let store = Store::connect(&db.url, 2).await?;
        store.migrate().await?;
        let key = client_key(&store).await?;
        let sim = start_account(duration).await?;
        sim.set_faults(Faults {
            drop_callbacks: if case == "polling only" { 1.0 } else { 0.0 },
            units_held_elsewhere: if case == "shared account" { 3 } else { 0 },
            ..Faults::default()
        });
        let svc = Service::start(
            &db,
            &sim,
            &[
                ("KLING_RELAY_COMETAPI__MAX_CONCURRENCY", UNITS.to_string()),
                ("KLING_RELAY_POLLER__FIRST_POLL_AFTER", "1s".into()),
                ("KLING_RELAY_POLLER__INTERVAL", "1s".into()),
            ],
        )
        .await?;
        let http = http_client(Some(&key));
        let sizes: Vec<i64> = (0..tasks).map(|i| SIZES[i % SIZES.len()]).collect();
        let started_ms = kling_relay::service::now_ms();
        let started = Instant::now();
        let sends: Vec<_> = sizes
            .iter()
            .map(|&n| {
                let (h, url) = (http.clone(), format!("{}/v1/tasks", svc.base));
                tokio::spawn(async move {
                    let body = json!({
                        "subject_image_list": [{"subject_image": "https://example.com/a.png"}],
                        "prompt": "a lighthouse at dusk", "n": n,
                    });
                    h.post(url)
                        .json(&body)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().as_u16() == 202)
                })
            })
            .collect();
        let mut errors = 0;
        for s in sends {
            if !matches!(s.await, Ok(true)) {
                errors += 1;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(if args.smoke { 60 } else { 600 });
        while store.bench_count_open().await? > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let open = store.bench_count_open().await?;
        let relay_done = started.elapsed();
        let log = sim.unit_log();
        let busy = sim.stats().busy_answers;
        store.close().await;
        drop(svc);
        sim.stop();
        db.remove().await;

        if std::env::var_os("KLR_BENCH_UNIT_LOG").is_some() {
            let mut level = 0;
            for (t, u) in &log {
                level += u;
                eprintln!("{case} {:>6} {u:>3} {level:>3}", t - started_ms);
            }
        }
        let last_free = log.iter().filter(|(_, u)| *u < 0).map(|(t, _)| *t).max();
        // Units busy over units paid for, from the simulator's own log: unlike the bound, this
        // counts each task at the time it really held its units (timers make it a little over
        // the nominal duration), so it says how much of the shortfall is the relay's.
        let busy_unit_ms: i64 = {
            let (mut level, mut at, mut sum) = (0i64, started_ms, 0i64);
            for (t, u) in &log {
                sum += level * (t - at);
                level += u;
                at = *t;
            }
            sum
        };
        let makespan_s = last_free.map_or(0.0, |t| (t - started_ms) as f64 / 1000.0);
        // The units the relay can have: the account's, less what the other tenant holds.
        let ours = UNITS - if case == "shared account" { 3 } else { 0 };
        let bound_s = sizes.iter().sum::<i64>() as f64 * duration.as_secs_f64() / ours as f64;
        let creates: Vec<i64> = log
            .iter()
            .filter(|(_, u)| *u > 0)
            .map(|(t, _)| *t)
            .collect();
        let last_create = creates.last().copied().unwrap_or(0);
        let mut gaps: Vec<f64> = log
            .iter()
            .filter(|(t, u)| *u < 0 && *t <= last_create)
            .filter_map(|(t, _)| {
                let next = creates.iter().find(|c| **c >= *t)?;
                Some((next - t) as f64)
            })
            .collect();
        gaps.sort_by(f64::total_cmp);
        rows.push(Row {
            scenario: "utilization".into(),
            db: kind.into(),
            measure: format!(
                "{case}: bound {bound_s:.1} s, makespan {makespan_s:.1} s, units busy {:.3}, \
                 {busy} × 1303, relay saw all final after {:.1} s{}",
                if makespan_s > 0.0 {
                    busy_unit_ms as f64 / 1000.0 / (ours as f64 * makespan_s)
                } else {
                    0.0
                },
                relay_done.as_secs_f64(),
                if open > 0 {
                    format!(", {open} NOT FINAL")
                } else {
                    String::new()
                }
            ),
            ops: tasks,
            seconds: makespan_s,
            per_second: if makespan_s > 0.0 {
                tasks as f64 / makespan_s
            } else {
                0.0
            },
            p50_ms: percentile(&gaps, 0.5),
            p90_ms: percentile(&gaps, 0.9),
            p99_ms: percentile(&gaps, 0.99),
            max_ms: gaps.last().copied().unwrap_or(0.0),
            errors: errors + open as usize,
            of_limit: (makespan_s > 0.0).then(|| bound_s / makespan_s),
            service_peak_rss_mb: None,
            service_idle_rss_mb: None,
            cpu: None,
        });
    }
    Ok(rows)
}

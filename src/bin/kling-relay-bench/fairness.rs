//! Scenario `fairness`: two clients on one busy account of 12 units, tasks of 1 s upstream with `n`
//! from {1, 1, 2, 3, 4, 9}, callbacks on. Two cases:
//!
//! - **newcomer**: client A queues 2,000 tasks, then client B submits one task a second for a
//!   minute. Reported: B's wait from submit to dispatch (`submitted_at − created_at`, the
//!   service's clock). The limit beside it is the time for `max(n)` = 9 units to free: every
//!   running task ends within one task duration, so the account is entirely free within 1 s of
//!   any moment; B, holding nothing, has the first claim on that room.
//! - **equal weights**: A and B each queue 150 tasks at once. Reported: each one's share of the
//!   unit-seconds its tasks held (dispatch to final, the service's view of what it gave out) while
//!   both still had tasks waiting; the target is 50 % ± 5 %.

use super::utilization::{percentile, start_account, SIZES, UNITS};
use super::{http_client, Args, Db, Row, Service};
use kling_relay::simulator::Simulator;
use kling_relay::storage::{BenchSpan, Store};
use serde_json::json;
use std::time::{Duration, Instant};

struct Setup {
    db: Db,
    store: Store,
    sim: Simulator,
    svc: Service,
    a: reqwest::Client,
    b: reqwest::Client,
}

impl Setup {
    async fn start(kind: &'static str, args: &Args, duration: Duration) -> anyhow::Result<Setup> {
        let db = Db::create(kind, &args.postgres_url).await?;
        let store = Store::connect(&db.url, 2).await?;
        store.migrate().await?;
        let mut keys = Vec::new();
        for name in ["client-a", "client-b"] {
            keys.push(
                kling_relay::service::clients::create_client(&store, name, None)
                    .await?
                    .api_key,
            );
        }
        let sim = start_account(duration).await?;
        let svc = Service::start(
            &db,
            &sim,
            &[
                ("KLING_RELAY_COMETAPI__MAX_CONCURRENCY", UNITS.to_string()),
                // The POST answers at once: thousands wait for dispatch here by design.
                ("KLING_RELAY_DISPATCH__WAIT", "0s".into()),
                ("KLING_RELAY_DISPATCH__MAX_PENDING", "50000".into()),
                ("KLING_RELAY_LIMITS__CLIENT_MAX_PENDING", "50000".into()),
                (
                    "KLING_RELAY_LIMITS__CLIENT_SUBMITS_PER_MINUTE",
                    "1000000".into(),
                ),
            ],
        )
        .await?;
        Ok(Setup {
            db,
            store,
            sim,
            svc,
            a: http_client(keys.first().map(String::as_str)),
            b: http_client(keys.get(1).map(String::as_str)),
        })
    }

    /// Submits one task of `n` units; true when accepted.
    async fn submit(&self, http: &reqwest::Client, n: i64) -> bool {
        let body = json!({
            "subject_image_list": [{"subject_image": "https://example.com/a.png"}],
            "prompt": "a lighthouse at dusk", "n": n,
        });
        http.post(format!("{}/v1/tasks", self.svc.base))
            .json(&body)
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 202)
    }

    /// Submits `count` tasks of sizes cycling through SIZES, 32 at a time; returns the refusals.
    async fn queue(&self, http: &reqwest::Client, count: usize, offset: usize) -> usize {
        let mut errors = 0;
        let sizes: Vec<i64> = (0..count)
            .map(|i| SIZES[(i + offset) % SIZES.len()])
            .collect();
        for chunk in sizes.chunks(32) {
            let sends = chunk.iter().map(|&n| self.submit(http, n));
            errors += futures_util::future::join_all(sends)
                .await
                .into_iter()
                .filter(|ok| !ok)
                .count();
        }
        errors
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.store.close().await;
        drop(self.svc);
        self.sim.stop();
        self.db.remove().await;
        Ok(())
    }
}

pub async fn fairness(args: &Args, kind: &'static str) -> anyhow::Result<Vec<Row>> {
    let duration = if args.smoke {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(1)
    };
    let mut rows = newcomer(args, kind, duration).await?;
    rows.push(equal_weights(args, kind, duration).await?);
    Ok(rows)
}

async fn newcomer(args: &Args, kind: &'static str, duration: Duration) -> anyhow::Result<Vec<Row>> {
    let (backlog, arrivals, every) = if args.smoke {
        (60, 5, Duration::from_millis(300))
    } else {
        (2_000, 60, Duration::from_secs(1))
    };
    let s = Setup::start(kind, args, duration).await?;
    let mut errors = s.queue(&s.a, backlog, 0).await;
    let started = Instant::now();
    let mut tick = tokio::time::interval(every);
    for i in 0..arrivals {
        tick.tick().await;
        if !s.submit(&s.b, SIZES[i % SIZES.len()]).await {
            errors += 1;
        }
    }
    // B's last task: dispatched within seconds, or it counts as an error below.
    let deadline = Instant::now() + Duration::from_secs(30);
    let b_waits = loop {
        let spans = s.store.bench_task_spans().await?;
        let b: Vec<&BenchSpan> = spans.iter().filter(|t| t.client == "client-b").collect();
        let dispatched: Vec<f64> = b
            .iter()
            .filter_map(|t| t.submitted_at.map(|d| (d - t.created_at) as f64))
            .collect();
        if dispatched.len() == b.len() || Instant::now() > deadline {
            errors += b.len() - dispatched.len();
            break dispatched;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elapsed = started.elapsed();
    if std::env::var_os("KLR_BENCH_UNIT_LOG").is_some() {
        for t in s.store.bench_task_spans().await? {
            if t.client == "client-b" {
                eprintln!(
                    "B n={} created {} waited {:?}",
                    t.n,
                    t.created_at,
                    t.submitted_at.map(|d| d - t.created_at)
                );
            }
        }
    }
    let busy = s.sim.stats().busy_answers;
    let spans = s.store.bench_task_spans().await?;
    let a_dispatched = spans
        .iter()
        .filter(|t| t.client == "client-a" && t.submitted_at.is_some())
        .count();
    let b_spans: Vec<BenchSpan> = spans
        .into_iter()
        .filter(|t| t.client == "client-b")
        .collect();
    s.stop().await?;
    let mut waits = b_waits;
    waits.sort_by(f64::total_cmp);
    let mut behind_others: Vec<f64> = b_spans
        .iter()
        .filter_map(|t| wait_behind_others(&b_spans, t))
        .collect();
    behind_others.sort_by(f64::total_cmp);
    let bound_ms = duration.as_secs_f64() * 1000.0;
    let others = Row {
        scenario: "fairness".into(),
        db: kind.into(),
        measure: format!(
            "newcomer: B's wait once its own running tasks left room for it (the part A's \
             backlog can cause); bound: {bound_ms:.0} ms"
        ),
        ops: behind_others.len(),
        seconds: elapsed.as_secs_f64(),
        per_second: behind_others.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: percentile(&behind_others, 0.5),
        p90_ms: percentile(&behind_others, 0.9),
        p99_ms: percentile(&behind_others, 0.99),
        max_ms: behind_others.last().copied().unwrap_or(0.0),
        errors: 0,
        of_limit: None,
        service_peak_rss_mb: None,
        service_idle_rss_mb: None,
        cpu: None,
    };
    let raw = Row {
        scenario: "fairness".into(),
        db: kind.into(),
        measure: format!(
            "newcomer: B's wait to dispatch behind A's {backlog} (A had {a_dispatched} sent, \
             {busy} × 1303); bound, 9 units free: {bound_ms:.0} ms"
        ),
        ops: waits.len(),
        seconds: elapsed.as_secs_f64(),
        per_second: waits.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: percentile(&waits, 0.5),
        p90_ms: percentile(&waits, 0.9),
        p99_ms: percentile(&waits, 0.99),
        max_ms: waits.last().copied().unwrap_or(0.0),
        errors,
        of_limit: None,
        service_peak_rss_mb: None,
        service_idle_rss_mb: None,
        cpu: None,
    };
    Ok(vec![raw, others])
}

/// How long `t` waited after the moment B's other tasks, those running then, left room for its
/// `n` on the account: what remains of its wait is what others' tasks (A's) cost it. None for a
/// task not dispatched.
fn wait_behind_others(b: &[BenchSpan], t: &BenchSpan) -> Option<f64> {
    let dispatched = t.submitted_at?;
    let others = || b.iter().filter(|o| !std::ptr::eq(*o, t));
    let own_units_at = |x: i64| -> i64 {
        others()
            .filter(|o| {
                o.submitted_at.is_some_and(|s| s <= x) && o.completed_at.is_none_or(|c| c > x)
            })
            .map(|o| o.n)
            .sum()
    };
    // Room can only appear when one of B's own tasks ends.
    let mut moments: Vec<i64> = std::iter::once(t.created_at)
        .chain(
            others()
                .filter_map(|o| o.completed_at)
                .filter(|c| *c > t.created_at),
        )
        .collect();
    moments.sort_unstable();
    let room_at = moments
        .into_iter()
        .find(|x| own_units_at(*x) + t.n <= UNITS)
        .unwrap_or(dispatched);
    Some((dispatched - room_at.min(dispatched)) as f64)
}

async fn equal_weights(args: &Args, kind: &'static str, duration: Duration) -> anyhow::Result<Row> {
    let each = if args.smoke { 24 } else { 150 };
    let s = Setup::start(kind, args, duration).await?;
    let started = Instant::now();
    let (ea, eb) = tokio::join!(s.queue(&s.a, each, 0), s.queue(&s.b, each, 3));
    let mut errors = ea + eb;
    let deadline = Instant::now() + Duration::from_secs(if args.smoke { 60 } else { 600 });
    while s.store.bench_count_open().await? > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    errors += s.store.bench_count_open().await? as usize;
    let elapsed = started.elapsed();
    let spans = s.store.bench_task_spans().await?;
    s.stop().await?;
    // Both have tasks waiting from the later first submit to the earlier last dispatch.
    fn of<'a>(spans: &'a [BenchSpan], client: &'a str) -> impl Iterator<Item = &'a BenchSpan> {
        spans.iter().filter(move |t| t.client == client)
    }
    let first = |c: &str| of(&spans, c).map(|t| t.created_at).min().unwrap_or(0);
    let last_dispatch = |c: &str| {
        of(&spans, c)
            .filter_map(|t| t.submitted_at)
            .max()
            .unwrap_or(0)
    };
    let from = first("client-a").max(first("client-b"));
    let to = last_dispatch("client-a").min(last_dispatch("client-b"));
    let unit_ms = |c: &str| -> f64 {
        of(&spans, c)
            .filter_map(|t| {
                let start = t.submitted_at?.max(from);
                let end = t.completed_at.unwrap_or(to).min(to);
                (end > start).then(|| (t.n * (end - start)) as f64)
            })
            .sum()
    };
    let (a, b) = (unit_ms("client-a"), unit_ms("client-b"));
    let share_a = if a + b > 0.0 { a / (a + b) } else { 0.0 };
    let window_s = (to - from) as f64 / 1000.0;
    Ok(Row {
        scenario: "fairness".into(),
        db: kind.into(),
        measure: format!(
            "equal weights: A {:.1} %, B {:.1} % of unit-seconds over {window_s:.1} s \
             with both waiting ({:.2} of {UNITS} units busy)",
            share_a * 100.0,
            (1.0 - share_a) * 100.0,
            if window_s > 0.0 {
                (a + b) / 1000.0 / window_s
            } else {
                0.0
            }
        ),
        ops: 2 * each,
        seconds: elapsed.as_secs_f64(),
        per_second: (2 * each) as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: 0.0,
        p90_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        errors,
        of_limit: Some(share_a),
        service_peak_rss_mb: None,
        service_idle_rss_mb: None,
        cpu: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(n: i64, created: i64, sent: Option<i64>, done: Option<i64>) -> BenchSpan {
        BenchSpan {
            client: "client-b".into(),
            n,
            created_at: created,
            submitted_at: sent,
            completed_at: done,
        }
    }

    #[test]
    fn the_wait_behind_others_starts_when_b_has_room() {
        // B's 4 runs from 100 to 1,100; B's 9 arrives at 500 and goes at 1,400: 9 + 4 > 12, so
        // the wait others caused starts at 1,100.
        let b = vec![
            span(4, 0, Some(100), Some(1_100)),
            span(9, 500, Some(1_400), Some(2_400)),
            span(1, 600, Some(650), Some(1_650)),
        ];
        assert_eq!(wait_behind_others(&b, &b[1]), Some(300.0));
        // The 1 fits beside B's own 4 and 9: all of its wait is others'.
        assert_eq!(wait_behind_others(&b, &b[2]), Some(50.0));
        assert_eq!(wait_behind_others(&b, &span(2, 0, None, None)), None);
    }
}

//! The overview's charts over time, drawn on the server as SVG (no script, no inline style: the
//! Content Security Policy allows neither), each with its figures as a table for screen readers
//! and for reading exact values.

use crate::resource::rfc3339;
use crate::service::dashboard::UnitsSample;
use maud::{html, Markup};

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 120.0;

/// `HH:MM` of a UTC time.
fn clock(ms: i64) -> String {
    rfc3339(ms).get(11..16).unwrap_or_default().to_owned()
}

/// Status groups the bars are stacked in, bottom first.
const GROUPS: [(&str, &[&str]); 3] = [
    ("succeeded", &["succeeded"]),
    ("failed", &["failed", "timed_out"]),
    ("canceled", &["canceled"]),
];

/// Tasks finished per minute over the last hour, stacked by outcome.
pub fn finished_per_minute(rows: &[(i64, String, i64)], now_ms: i64) -> Markup {
    let first = (now_ms / 60_000 - 59) * 60_000;
    let minutes: Vec<(i64, [i64; 3])> = (0..60)
        .map(|i| {
            let start = first + i * 60_000;
            let mut counts = [0; 3];
            for (_, status, n) in rows.iter().filter(|(m, _, _)| *m == start) {
                if let Some(g) = GROUPS
                    .iter()
                    .position(|(_, ss)| ss.contains(&status.as_str()))
                {
                    counts[g] += n;
                }
            }
            (start, counts)
        })
        .collect();
    let peak = minutes
        .iter()
        .map(|(_, c)| c.iter().sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let total: i64 = minutes.iter().map(|(_, c)| c.iter().sum::<i64>()).sum();
    let bar = WIDTH / 60.0;
    html! {
        figure.chart {
            svg #finished-chart role="img" viewBox={ "0 0 " (WIDTH) " " (HEIGHT + 14.0) }
                aria-label={ (total) " tasks finished in the last hour; at most " (peak) " in one minute" } {
                @for (i, (_, counts)) in minutes.iter().enumerate() {
                    @let mut y = HEIGHT;
                    @for (g, n) in counts.iter().enumerate() {
                        @if *n > 0 {
                            @let h = *n as f64 / peak as f64 * HEIGHT;
                            @let top = { y -= h; y };
                            rect class={ "bar " (GROUPS[g].0) } x=(format!("{:.1}", i as f64 * bar + 1.0)) y=(format!("{top:.1}"))
                                width=(format!("{:.1}", bar - 2.0)) height=(format!("{h:.1}")) {}
                        }
                    }
                }
                line.axis x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) {}
                text.tick x="0" y=(HEIGHT + 12.0) { (clock(first)) " UTC" }
                text.tick x=(WIDTH) y=(HEIGHT + 12.0) text-anchor="end" { "now" }
            }
            figcaption {
                "Tasks finished per minute, last hour (peak " (peak) "). "
                span.key.succeeded { "succeeded" } " " span.key.failed { "failed or timed out" } " " span.key.canceled { "canceled" }
            }
            details {
                summary { "As a table" }
                table #finished-table {
                    thead { tr { th scope="col" { "Minute (UTC)" } th scope="col" { "Succeeded" } th scope="col" { "Failed or timed out" } th scope="col" { "Canceled" } } }
                    tbody {
                        @for (start, c) in minutes.iter().filter(|(_, c)| c.iter().sum::<i64>() > 0) {
                            tr { td { (clock(*start)) } td { (c[0]) } td { (c[1]) } td { (c[2]) } }
                        }
                    }
                }
            }
        }
    }
}

fn points(values: &[(usize, f64)], slots: usize, peak: f64) -> String {
    let step = WIDTH / slots.max(1) as f64;
    values
        .iter()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                *i as f64 * step + step / 2.0,
                HEIGHT - v / peak * HEIGHT
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Upstream duration per hour over the last day: the median and the 95th percentile.
pub fn durations(rows: &[(i64, Option<f64>, Option<f64>)]) -> Markup {
    let p50: Vec<(usize, f64)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.1.map(|v| (i, v)))
        .collect();
    let p95: Vec<(usize, f64)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.2.map(|v| (i, v)))
        .collect();
    let peak = p95
        .iter()
        .chain(&p50)
        .map(|(_, v)| *v)
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let first = rows.first().map(|r| r.0).unwrap_or_default();
    html! {
        figure.chart {
            svg #duration-chart role="img" viewBox={ "0 0 " (WIDTH) " " (HEIGHT + 14.0) }
                aria-label={ "Upstream duration per hour, last day; highest p95 " (format!("{peak:.1}")) " s" } {
                @if !p95.is_empty() { polyline.p95 points=(points(&p95, rows.len(), peak)) {} }
                @if !p50.is_empty() { polyline.p50 points=(points(&p50, rows.len(), peak)) {} }
                line.axis x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) {}
                text.tick x="0" y="10" { (format!("{peak:.0} s")) }
                text.tick x="0" y=(HEIGHT + 12.0) { (clock(first)) " UTC" }
                text.tick x=(WIDTH) y=(HEIGHT + 12.0) text-anchor="end" { "now" }
            }
            figcaption {
                "Upstream duration per hour, last day: " span.key.p50 { "median" } " and " span.key.p95 { "95th percentile" } "."
            }
            details {
                summary { "As a table" }
                table #duration-table {
                    thead { tr { th scope="col" { "Hour (UTC)" } th scope="col" { "p50 (s)" } th scope="col" { "p95 (s)" } } }
                    tbody {
                        @for (start, a, b) in rows.iter().filter(|r| r.1.is_some()) {
                            tr {
                                td { (clock(*start)) }
                                td { (a.map(|v| format!("{v:.1}")).unwrap_or_default()) }
                                td { (b.map(|v| format!("{v:.1}")).unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Units in flight against the working limit over the last hour.
pub fn units(samples: &[UnitsSample], now_ms: i64) -> Markup {
    let from = now_ms - crate::service::dashboard::UNITS_HISTORY_MS;
    let peak = samples
        .iter()
        .map(|s| s.units.max(s.limit))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |at: i64| ((at - from).max(0) as f64 / (now_ms - from).max(1) as f64) * WIDTH;
    let y = |v: i64| HEIGHT - v as f64 / peak * HEIGHT;
    // Steps: a value holds until the next sample, and the last one until now.
    let line = |value: fn(&UnitsSample) -> i64| {
        let mut pts: Vec<String> = Vec::new();
        let mut prev: Option<i64> = None;
        for s in samples {
            if let Some(p) = prev {
                pts.push(format!("{:.1},{:.1}", x(s.at_ms), y(p)));
            }
            pts.push(format!("{:.1},{:.1}", x(s.at_ms), y(value(s))));
            prev = Some(value(s));
        }
        if let Some(p) = prev {
            pts.push(format!("{WIDTH:.1},{:.1}", y(p)));
        }
        pts.join(" ")
    };
    html! {
        figure.chart {
            svg #units-chart role="img" viewBox={ "0 0 " (WIDTH) " " (HEIGHT + 14.0) }
                aria-label={ "Units in flight against the limit, last hour; " (samples.len()) " samples" } {
                @if !samples.is_empty() {
                    polyline.limit points=(line(|s| s.limit)) {}
                    polyline.units points=(line(|s| s.units)) {}
                }
                line.axis x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) {}
                text.tick x="0" y="10" { (peak) " units" }
                text.tick x="0" y=(HEIGHT + 12.0) { (clock(from)) " UTC" }
                text.tick x=(WIDTH) y=(HEIGHT + 12.0) text-anchor="end" { "now" }
            }
            figcaption {
                span.key.units { "Units in flight" } " against " span.key.limit { "the working limit" }
                ", last hour (sampled every 15 s by this instance since it started)."
            }
            details {
                summary { "As a table" }
                table #units-table {
                    thead { tr { th scope="col" { "Time (UTC)" } th scope="col" { "Units in flight" } th scope="col" { "Limit" } } }
                    tbody {
                        @for s in samples.iter().rev().take(20) {
                            tr { td { (rfc3339(s.at_ms).get(11..19).unwrap_or_default()) } td { (s.units) } td { (s.limit) } }
                        }
                    }
                }
            }
        }
    }
}

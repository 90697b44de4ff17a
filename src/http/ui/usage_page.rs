//! The dashboard's usage page: units per UTC day for the last 30 days as a bar chart (SVG drawn
//! here, no script, no library), the daily budget as a line across it, tasks by status, and the
//! same numbers as a table, which is what screen readers read.

use super::pages::{layout, Nav};
use crate::domain::usage::{milli_to_units, BudgetStanding, Period};
use crate::resource::rfc3339;
use crate::service::usage::UsageReport;
use maud::{html, Markup};

const CHART_W: f64 = 720.0;
const CHART_H: f64 = 200.0;
/// Room at the bottom of the chart for the axis line.
const BASELINE: f64 = 190.0;

fn day(ms: i64) -> String {
    rfc3339(ms).get(..10).unwrap_or_default().to_owned()
}

fn units(milli: i64) -> String {
    let u = milli_to_units(milli);
    if u.fract() == 0.0 {
        format!("{u:.0}")
    } else {
        format!("{u}")
    }
}

pub fn usage(who: &str, report: &UsageReport, budgets: &[BudgetStanding]) -> Markup {
    let daily = budgets.iter().find(|b| b.period == Period::Day);
    let most = report
        .buckets
        .iter()
        .map(|b| b.units_deducted_milli)
        .max()
        .unwrap_or(0)
        .max(daily.map_or(0, |b| b.limit_units * 1000))
        .max(1000);
    let scale = |milli: i64| (milli as f64 / most as f64) * (BASELINE - 10.0);
    let slot = CHART_W / report.buckets.len().max(1) as f64;
    let total_milli: i64 = report.buckets.iter().map(|b| b.units_deducted_milli).sum();
    let mut by_status: Vec<(&str, i64)> = Vec::new();
    for b in &report.buckets {
        for (s, n) in &b.tasks {
            match by_status.iter_mut().find(|(k, _)| k == s) {
                Some((_, total)) => *total += n,
                None => by_status.push((s, *n)),
            }
        }
    }
    layout(
        "Usage",
        Some(who),
        Nav::Usage,
        html! {
            h1 { "Usage" }
            p { "Units upstream deducted per UTC day, last 30 days: " strong #units-total { (units(total_milli)) } " in all. "
                (report.units_reserved) " units are reserved by tasks waiting or running now." }
            @for b in budgets {
                p.budget {
                    "Budget per " (b.period.as_str()) ": " strong { (b.limit_units) " units" } "; "
                    (units(b.spent_milli)) " spent and " (b.reserved_units) " reserved; resets "
                    (rfc3339(b.resets_at_ms).replace('T', " ").trim_end_matches('Z').trim_end_matches(":00")) " UTC."
                }
            }
            figure {
                svg #usage-chart role="img" aria-labelledby="usage-chart-title"
                    viewBox={ "0 0 " (CHART_W) " " (CHART_H) } width="100%" preserveAspectRatio="none" {
                    title #usage-chart-title { "Units deducted per day, last 30 days; the table below has the same numbers" }
                    line x1="0" y1=(BASELINE) x2=(CHART_W) y2=(BASELINE) class="axis" {}
                    @for (i, b) in report.buckets.iter().enumerate() {
                        @let h = scale(b.units_deducted_milli);
                        rect.bar x=(format!("{:.1}", i as f64 * slot + slot * 0.15)) y=(format!("{:.1}", BASELINE - h))
                            width=(format!("{:.1}", slot * 0.7)) height=(format!("{:.1}", h)) {
                            title { (day(b.start_ms)) ": " (units(b.units_deducted_milli)) " units" }
                        }
                    }
                    @if let Some(d) = daily {
                        @let y = BASELINE - scale(d.limit_units * 1000);
                        line #budget-line x1="0" y1=(format!("{y:.1}")) x2=(CHART_W) y2=(format!("{y:.1}")) class="budget" {
                            title { "Daily budget: " (d.limit_units) " units" }
                        }
                    }
                }
                figcaption.muted {
                    "Bars: units per day. "
                    @if let Some(d) = daily { "Line: the daily budget of " (d.limit_units) " units." }
                }
            }
            h2 { "Tasks by status, last 30 days" }
            table #usage-statuses {
                thead { tr { th scope="col" { "Status" } th scope="col" { "Tasks" } } }
                tbody {
                    @for (s, n) in &by_status {
                        tr { td { (s.replace('_', " ")) } td { (n) } }
                    }
                }
            }
            h2 { "Per day" }
            table #usage-days {
                caption.muted { "The chart's numbers" }
                thead { tr {
                    th scope="col" { "Day (UTC)" }
                    th scope="col" { "Units deducted" }
                    th scope="col" { "Succeeded" }
                    th scope="col" { "Failed" }
                    th scope="col" { "Median duration" }
                } }
                tbody {
                    @for b in report.buckets.iter().rev() {
                        tr {
                            th scope="row" { (day(b.start_ms)) }
                            td { (units(b.units_deducted_milli)) }
                            td { (b.tasks.get("succeeded").copied().unwrap_or(0)) }
                            td { (b.tasks.get("failed").copied().unwrap_or(0)) }
                            td { @if let Some(s) = b.duration_p50_s { (format!("{s:.1} s")) } @else { "–" } }
                        }
                    }
                }
            }
        },
    )
}

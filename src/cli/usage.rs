//! `kling-relay usage`: the operator's view of what every client spent, from the database.

use crate::domain::usage::{Granularity, DAY_MS};
use crate::service::usage::{usage_table, UsageGrouping, UsageLine};
use crate::storage::Store;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(clap::Args)]
pub struct UsageArgs {
    /// Start, RFC 3339 or a date (2026-11-01); default: the start of the current UTC month.
    #[arg(long)]
    pub from: Option<String>,
    /// End, exclusive, RFC 3339 or a date; default: now.
    #[arg(long)]
    pub to: Option<String>,
    /// Group rows by client, day (UTC) or model.
    #[arg(long, default_value = "client", value_parser = ["client", "day", "model"])]
    pub by: String,
    /// Print JSON (one array of rows).
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV with a header row.
    #[arg(long)]
    pub csv: bool,
}

/// A time as given on the command line: RFC 3339, or a date meaning its UTC midnight.
pub fn parse_when(s: &str) -> anyhow::Result<i64> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let with_midnight = format!("{s}T00:00:00Z");
    OffsetDateTime::parse(&with_midnight, &Rfc3339)
        .map(|t| t.unix_timestamp() * 1000)
        .map_err(|_| anyhow::anyhow!("`{s}` is not a date (2026-11-01) or an RFC 3339 time"))
}

pub async fn run(store: &Store, a: UsageArgs) -> anyhow::Result<()> {
    let now = crate::service::now_ms();
    let from = match &a.from {
        Some(s) => parse_when(s)?,
        None => Granularity::Month.floor(now),
    };
    let to = match &a.to {
        Some(s) => parse_when(s)?,
        None => now,
    };
    anyhow::ensure!(to > from, "--to must be after --from");
    anyhow::ensure!(
        to - from <= 3_660 * DAY_MS,
        "a range of at most ten years, please"
    );
    let by = match a.by.as_str() {
        "day" => UsageGrouping::Day,
        "model" => UsageGrouping::Model,
        _ => UsageGrouping::Client,
    };
    let lines = usage_table(store, from, to, by).await?;
    print!("{}", render(&lines, &a.by, a.json, a.csv)?);
    Ok(())
}

/// The rows as a table (default), JSON or CSV.
pub fn render(lines: &[UsageLine], by: &str, json: bool, csv: bool) -> anyhow::Result<String> {
    let statuses: Vec<&str> = lines
        .first()
        .map(|l| l.tasks.keys().copied().collect())
        .unwrap_or_else(|| vec!["canceled", "failed", "succeeded", "timed_out"]);
    let mut out = String::new();
    if json {
        let rows: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| {
                serde_json::json!({
                    by: l.key,
                    "tasks": l.tasks,
                    "units_deducted": l.units_deducted,
                })
            })
            .collect();
        out.push_str(&serde_json::to_string(&rows)?);
        out.push('\n');
    } else if csv {
        out.push_str(&format!("{by},{},units_deducted\n", statuses.join(",")));
        for l in lines {
            let counts: Vec<String> = statuses
                .iter()
                .map(|s| l.tasks.get(s).copied().unwrap_or(0).to_string())
                .collect();
            out.push_str(&format!(
                "{},{},{}\n",
                csv_field(&l.key),
                counts.join(","),
                l.units_deducted
            ));
        }
    } else {
        out.push_str(&format!("{by:<24}"));
        for s in &statuses {
            out.push_str(&format!(" {s:>10}"));
        }
        out.push_str(&format!(" {:>14}\n", "units deducted"));
        for l in lines {
            let key = if l.key.is_empty() { "(none)" } else { &l.key };
            out.push_str(&format!("{key:<24}"));
            for s in &statuses {
                out.push_str(&format!(" {:>10}", l.tasks.get(s).copied().unwrap_or(0)));
            }
            out.push_str(&format!(" {:>14}\n", l.units_deducted));
        }
        if lines.is_empty() {
            out.push_str("(no task ended in this range)\n");
        }
    }
    Ok(out)
}

/// A CSV field, quoted when it holds a comma, quote or line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn line(key: &str, ok: i64, units: f64) -> UsageLine {
        let mut tasks = BTreeMap::new();
        for s in ["canceled", "failed", "succeeded", "timed_out"] {
            tasks.insert(s, 0);
        }
        tasks.insert("succeeded", ok);
        UsageLine {
            key: key.into(),
            tasks,
            units_deducted: units,
        }
    }

    #[test]
    fn renders_table_json_and_csv() {
        let lines = [line("team-a", 9, 18.0), line("b,\"c\"", 1, 0.25)];
        let table = render(&lines, "client", false, false).unwrap();
        assert!(table.starts_with("client "), "{table}");
        assert!(table.contains("team-a"), "{table}");
        let csv = render(&lines, "client", false, true).unwrap();
        assert_eq!(
            csv,
            "client,canceled,failed,succeeded,timed_out,units_deducted\n\
             team-a,0,0,9,0,18\n\"b,\"\"c\"\"\",0,0,1,0,0.25\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&lines, "client", true, false).unwrap()).unwrap();
        assert_eq!(json[0]["client"], "team-a");
        assert_eq!(json[0]["tasks"]["succeeded"], 9);
        assert_eq!(json[1]["units_deducted"], 0.25);
    }

    #[test]
    fn dates_and_times_are_read() {
        assert_eq!(parse_when("2026-11-01").unwrap(), 1_793_491_200_000);
        assert_eq!(
            parse_when("2026-11-01T01:00:00Z").unwrap(),
            1_793_491_200_000 + 3_600_000
        );
        assert!(parse_when("yesterday").is_err());
    }
}

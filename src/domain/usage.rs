//! Usage and budgets: what upstream charged, bucketed in UTC, and whether a submit fits a budget.
//!
//! Units are kept as integer thousandths (`milli`), so sums are exact whatever upstream writes
//! (`"1"`, `2`, `"0.25"`). A task is counted once, in the hour it ended; its duration (upstream
//! time, `submitted` to its end) goes into a histogram of ~5 % wide bins, from which a bucket's
//! percentiles are read (within 5 % of the true value).

use time::{Date, Month, OffsetDateTime, Time};

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// `final_unit_deduction` as upstream wrote it, in thousandths of a unit. None for anything that
/// is not a plain non-negative decimal: a cost is recorded as reported or not at all.
pub fn parse_units_milli(text: &str) -> Option<i64> {
    let t = text.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut milli = 0i64;
    for (i, d) in frac.bytes().take(3).enumerate() {
        milli += i64::from(d - b'0') * 10i64.pow(2 - i as u32);
    }
    whole.checked_mul(1000)?.checked_add(milli)
}

/// Thousandths of a unit as a JSON number (exact to three places).
pub fn milli_to_units(milli: i64) -> f64 {
    milli as f64 / 1000.0
}

/// The width of a bucket in a usage answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Hour,
    Day,
    Month,
}

impl Granularity {
    pub fn parse(s: &str) -> Option<Granularity> {
        match s {
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            "month" => Some(Granularity::Month),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }

    /// The start of the bucket holding `ms` (UTC).
    pub fn floor(self, ms: i64) -> i64 {
        match self {
            Granularity::Hour => ms.div_euclid(HOUR_MS) * HOUR_MS,
            Granularity::Day => ms.div_euclid(DAY_MS) * DAY_MS,
            Granularity::Month => month_start(ms),
        }
    }

    /// The start of the bucket after the one starting at `start`.
    pub fn next(self, start: i64) -> i64 {
        match self {
            Granularity::Hour => start + HOUR_MS,
            Granularity::Day => start + DAY_MS,
            Granularity::Month => next_month_start(start),
        }
    }
}

fn utc(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn ms_of(date: Date) -> i64 {
    date.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp() * 1000
}

/// The first instant of the UTC month holding `ms`.
pub fn month_start(ms: i64) -> i64 {
    let d = utc(ms).date();
    Date::from_calendar_date(d.year(), d.month(), 1).map_or(0, ms_of)
}

/// The first instant of the UTC month after the one starting at (or holding) `ms`.
pub fn next_month_start(ms: i64) -> i64 {
    let d = utc(ms).date();
    let (y, m) = match d.month() {
        Month::December => (d.year() + 1, Month::January),
        m => (d.year(), m.next()),
    };
    Date::from_calendar_date(y, m, 1).map_or(i64::MAX, ms_of)
}

/// A budget's period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The period holding `now`: its start and its end (when the budget resets).
    pub fn bounds(self, now_ms: i64) -> (i64, i64) {
        let g = match self {
            Period::Day => Granularity::Day,
            Period::Month => Granularity::Month,
        };
        let start = g.floor(now_ms);
        (start, g.next(start))
    }
}

/// A client's budget for one period, and what it stands at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetStanding {
    pub period: Period,
    pub limit_units: i64,
    /// Deducted by tasks that ended in the period.
    pub spent_milli: i64,
    /// `n` of the client's tasks not ended yet (pending or in flight).
    pub reserved_units: i64,
    pub resets_at_ms: i64,
}

impl BudgetStanding {
    /// Whether a task of `n` more units fits: spent + reserved + n may reach the budget, never
    /// pass it.
    pub fn admits(&self, n: i64) -> bool {
        let used = self.spent_milli + (self.reserved_units + n) * 1000;
        used <= self.limit_units.saturating_mul(1000)
    }

    pub fn remaining_milli(&self) -> i64 {
        self.limit_units.saturating_mul(1000) - self.spent_milli - self.reserved_units * 1000
    }
}

/// Thresholds of a budget a client is told about, in percent of spent units.
pub const BUDGET_THRESHOLDS: [i64; 2] = [80, 100];

/// The thresholds `spent_milli` has reached for a budget of `limit_units`.
pub fn thresholds_reached(spent_milli: i64, limit_units: i64) -> Vec<i64> {
    BUDGET_THRESHOLDS
        .into_iter()
        .filter(|pct| spent_milli.saturating_mul(100) >= limit_units.saturating_mul(1000) * pct)
        .collect()
}

/// Width of a duration bin: each bin is ~5 % wider than the last.
const BIN_GROWTH: f64 = 1.05;

/// The histogram bin of a duration (milliseconds; under 1 ms counts as 1 ms).
pub fn duration_bin(ms: i64) -> i64 {
    let ms = ms.max(1) as f64;
    (ms.ln() / BIN_GROWTH.ln()).floor() as i64
}

/// A representative duration of a bin (its geometric middle), in seconds.
fn bin_seconds(bin: i64) -> f64 {
    BIN_GROWTH.powf(bin as f64 + 0.5) / 1000.0
}

/// The `q` quantile (0..=1) of a histogram of `(bin, count)` pairs, in seconds.
pub fn quantile_seconds(bins: &[(i64, i64)], q: f64) -> Option<f64> {
    let total: i64 = bins.iter().map(|(_, c)| *c).sum();
    if total <= 0 {
        return None;
    }
    let mut sorted = bins.to_vec();
    sorted.sort_unstable();
    // The smallest duration with at least q of the tasks at or below it.
    let rank = ((q * total as f64).ceil() as i64).clamp(1, total);
    let mut seen = 0;
    for (bin, count) in sorted {
        seen += count;
        if seen >= rank {
            return Some((bin_seconds(bin) * 1000.0).round() / 1000.0);
        }
    }
    None
}

/// One client's share of upstream now and over the last hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientUsage {
    /// None for tasks submitted without a client (authentication off).
    pub client: Option<String>,
    /// Units its tasks hold upstream (those whose create may have landed included).
    pub units_in_use: i64,
    /// Its tasks waiting for dispatch.
    pub waiting: i64,
    /// Unit-milliseconds its tasks held upstream within the window.
    pub unit_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_parsed_as_written_or_not_at_all() {
        assert_eq!(parse_units_milli("1"), Some(1000));
        assert_eq!(parse_units_milli(" 2 "), Some(2000));
        assert_eq!(parse_units_milli("0.25"), Some(250));
        assert_eq!(parse_units_milli(".5"), Some(500));
        assert_eq!(parse_units_milli("3."), Some(3000));
        assert_eq!(parse_units_milli("1.23456"), Some(1234));
        for bad in ["", ".", "-1", "1e3", "abc", "1,5", "99999999999999999999"] {
            assert_eq!(parse_units_milli(bad), None, "{bad}");
        }
    }

    #[test]
    fn buckets_follow_utc_calendar_boundaries() {
        // 2026-01-31T23:30:00Z
        let t = 1_769_902_200_000;
        assert_eq!(Granularity::Hour.floor(t), 1_769_900_400_000);
        let day = Granularity::Day.floor(t);
        assert_eq!(day, 1_769_817_600_000, "2026-01-31T00:00Z");
        assert_eq!(Granularity::Day.next(day), 1_769_904_000_000, "2026-02-01");
        assert_eq!(Granularity::Month.floor(t), 1_767_225_600_000, "2026-01-01");
        assert_eq!(
            Granularity::Month.next(1_767_225_600_000),
            1_769_904_000_000,
            "2026-02-01"
        );
        // December rolls into the next year; February of a leap year has 29 days.
        assert_eq!(next_month_start(1_796_083_200_000), 1_798_761_600_000);
        assert_eq!(
            next_month_start(1_825_113_600_000) - 1_825_113_600_000,
            29 * DAY_MS,
            "2028-02"
        );
        assert_eq!(
            Period::Month.bounds(t),
            (1_767_225_600_000, 1_769_904_000_000)
        );
    }

    #[test]
    fn a_budget_admits_up_to_its_limit_exactly() {
        let b = BudgetStanding {
            period: Period::Day,
            limit_units: 10,
            spent_milli: 4_500,
            reserved_units: 3,
            resets_at_ms: 0,
        };
        assert!(b.admits(2), "4.5 + 3 + 2 = 9.5");
        assert!(!b.admits(3), "10.5 > 10");
        let exact = BudgetStanding {
            spent_milli: 5_000,
            ..b
        };
        assert!(exact.admits(2), "exactly 10");
        assert_eq!(exact.remaining_milli(), 2_000);
    }

    #[test]
    fn thresholds_are_reached_at_80_and_100_percent() {
        assert!(thresholds_reached(7_999, 10).is_empty());
        assert_eq!(thresholds_reached(8_000, 10), vec![80]);
        assert_eq!(thresholds_reached(12_000, 10), vec![80, 100]);
    }

    #[test]
    fn quantiles_of_the_histogram_are_within_five_percent() {
        let durations: Vec<i64> = (1..=100).map(|i| i * 100).collect();
        let mut bins = std::collections::BTreeMap::new();
        for d in &durations {
            *bins.entry(duration_bin(*d)).or_insert(0) += 1;
        }
        let bins: Vec<(i64, i64)> = bins.into_iter().collect();
        let p50 = quantile_seconds(&bins, 0.5).unwrap();
        let p95 = quantile_seconds(&bins, 0.95).unwrap();
        assert!((p50 - 5.0).abs() / 5.0 < 0.05, "{p50}");
        assert!((p95 - 9.5).abs() / 9.5 < 0.05, "{p95}");
        assert_eq!(quantile_seconds(&[], 0.5), None);
    }
}

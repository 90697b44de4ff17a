//! How long upstream takes, learned from the relay's own history, and which running tasks are
//! therefore worth polling early.
//!
//! Queries cost nothing upstream, but a finished task's units stay idle for us until we notice it
//! finished. While work waits for units, a running task past its expected finish is polled every
//! `poller.eager_interval`; while nothing waits, the lazy schedule stands (no extra polls).

use std::collections::HashMap;

/// One finished task's duration.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationSample {
    pub model: String,
    pub n: i64,
    pub ms: i64,
}

/// A task upstream is running.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningTask {
    pub id: String,
    pub model: String,
    pub n: i64,
    pub submitted_at_ms: i64,
    pub poll_due_at_ms: i64,
}

/// The median duration per model and `n`, and per model over every `n` as the fallback.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DurationEstimates {
    by_model_n: HashMap<(String, i64), i64>,
    by_model: HashMap<String, i64>,
}

fn median(mut v: Vec<i64>) -> Option<i64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2])
}

impl DurationEstimates {
    pub fn from_samples(samples: &[DurationSample]) -> Self {
        let mut by_model_n: HashMap<(String, i64), Vec<i64>> = HashMap::new();
        let mut by_model: HashMap<String, Vec<i64>> = HashMap::new();
        for s in samples {
            by_model_n
                .entry((s.model.clone(), s.n))
                .or_default()
                .push(s.ms);
            by_model.entry(s.model.clone()).or_default().push(s.ms);
        }
        DurationEstimates {
            by_model_n: by_model_n
                .into_iter()
                .filter_map(|(k, v)| Some((k, median(v)?)))
                .collect(),
            by_model: by_model
                .into_iter()
                .filter_map(|(k, v)| Some((k, median(v)?)))
                .collect(),
        }
    }

    /// Expected duration of a task of `model` with `n` images, if anything like it finished.
    pub fn expected_ms(&self, model: &str, n: i64) -> Option<i64> {
        self.by_model_n
            .get(&(model.to_owned(), n))
            .or_else(|| self.by_model.get(model))
            .copied()
    }

    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }
}

/// The running tasks to poll by `now`: only while work waits for units (`backlog`), only those
/// `eager_ms` past their expected finish (a callback that works has landed by then, so a
/// service that gets its callbacks makes no extra query), and not those whose poll is already
/// due within `eager_ms`.
pub fn eager_polls(
    now_ms: i64,
    backlog: bool,
    running: &[RunningTask],
    estimates: &DurationEstimates,
    eager_ms: i64,
) -> Vec<String> {
    if !backlog {
        return Vec::new();
    }
    running
        .iter()
        .filter(|t| {
            estimates
                .expected_ms(&t.model, t.n)
                .is_some_and(|d| t.submitted_at_ms + d + eager_ms <= now_ms)
                && t.poll_due_at_ms > now_ms + eager_ms
        })
        .map(|t| t.id.clone())
        .collect()
}

/// A rate shared by every replica, decided by the generic cell rate algorithm on a stored
/// "theoretical arrival time" (`tat`, microseconds): one call per `interval_us`, and up to
/// `want` may start at `now_us` while the schedule stays within `burst_us` of now.
/// Returns (granted, the new `tat`, microseconds until one more call may start).
pub fn gcra_take(
    tat_us: i64,
    now_us: i64,
    want: i64,
    interval_us: i64,
    burst_us: i64,
) -> (i64, i64, i64) {
    let interval_us = interval_us.max(1);
    let start = tat_us.max(now_us);
    let horizon = now_us + burst_us.max(interval_us);
    let granted = ((horizon - start) / interval_us).clamp(0, want.max(0));
    let tat = start + granted * interval_us;
    (granted, tat, (tat + interval_us - horizon).max(0))
}

/// The GCRA interval that keeps `per_second` a ceiling over every one-second window although
/// `gcra_take` hands out up to `burst_us` of calls early: a call granted at `t` holds a slot
/// between `t` and `t + burst_us`, so the calls granted within any second hold slots within a
/// second plus the burst, and those slots are spaced to fit `per_second` of them in that span.
/// The long-run rate is `per_second` × 1 s / (1 s + burst).
pub fn interval_within_per_second(per_second: u32, burst_us: i64) -> i64 {
    let span = 1_000_000 + burst_us.max(0);
    let per_second = i64::from(per_second.max(1));
    ((span + per_second - 1) / per_second).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(model: &str, n: i64, ms: i64) -> DurationSample {
        DurationSample {
            model: model.into(),
            n,
            ms,
        }
    }

    fn running(id: &str, n: i64, submitted: i64, due: i64) -> RunningTask {
        RunningTask {
            id: id.into(),
            model: "kling-v2".into(),
            n,
            submitted_at_ms: submitted,
            poll_due_at_ms: due,
        }
    }

    #[test]
    fn estimates_are_medians_per_model_and_n_with_the_model_as_fallback() {
        let e = DurationEstimates::from_samples(&[
            sample("kling-v2", 1, 900),
            sample("kling-v2", 1, 1_000),
            sample("kling-v2", 1, 50_000),
            sample("kling-v2", 4, 4_000),
        ]);
        assert_eq!(e.expected_ms("kling-v2", 1), Some(1_000));
        assert_eq!(e.expected_ms("kling-v2", 4), Some(4_000));
        // No task of 9 yet: the model's median over every n (900, 1,000, 4,000, 50,000).
        assert_eq!(e.expected_ms("kling-v2", 9), Some(4_000));
        assert_eq!(e.expected_ms("kling-v2-1", 1), None);
        assert!(DurationEstimates::from_samples(&[]).is_empty());
    }

    #[test]
    fn eager_polls_only_while_work_waits_and_only_past_the_expected_finish() {
        let e = DurationEstimates::from_samples(&[sample("kling-v2", 1, 1_000)]);
        let tasks = [
            running("due-soon-anyway", 1, 0, 10_100),
            running("overdue", 1, 8_000, 30_000),
            // Due at 9,000 + 1,000: within the grace a working callback needs.
            running("just-due", 1, 9_000, 30_000),
            running("young", 1, 9_500, 30_000),
        ];
        assert!(eager_polls(10_000, false, &tasks, &e, 250).is_empty());
        assert_eq!(eager_polls(10_000, true, &tasks, &e, 250), vec!["overdue"]);
        // Nothing learned yet: the lazy schedule stands.
        let none = DurationEstimates::default();
        assert!(eager_polls(10_000, true, &tasks, &none, 250).is_empty());
    }

    #[test]
    fn no_second_holds_more_calls_than_the_rate_whatever_the_takers_ask() {
        for (per_second, burst) in [(20, 250_000), (500, 250_000), (7, 0), (1000, 50_000)] {
            let every = interval_within_per_second(per_second, burst);
            // Takers at pseudo-random moments (a few ms apart) asking for 1 to 40 calls, some
            // giving part back: every grant's time is kept.
            let (mut tat, mut now, mut seed) = (0i64, 5_000_000i64, 7u64);
            let mut granted_at = Vec::new();
            for _ in 0..20_000 {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                now += ((seed >> 33) % 8_000) as i64;
                let want = 1 + ((seed >> 20) % 40) as i64;
                let (g, t, _) = gcra_take(tat, now, want, every, burst);
                tat = t;
                let unused = if (seed >> 12) % 5 == 0 { g / 2 } else { 0 };
                tat -= unused * every;
                granted_at.extend(std::iter::repeat_n(now, (g - unused) as usize));
            }
            let mut worst = 0;
            let mut from = 0;
            for (i, t) in granted_at.iter().enumerate() {
                while granted_at[from] <= t - 1_000_000 {
                    from += 1;
                }
                worst = worst.max(i + 1 - from);
            }
            assert!(
                worst <= per_second as usize,
                "{per_second}/s, burst {burst} µs: {worst} calls in one second"
            );
            assert!(
                worst * 10 >= per_second as usize * 7,
                "{per_second}/s: only {worst}"
            );
        }
    }

    #[test]
    fn the_shared_rate_grants_a_quarter_second_at_once_then_keeps_pace() {
        // 50 ms apart, a burst of 250 ms' worth.
        let every = 50_000;
        let (g, tat, _) = gcra_take(0, 1_000_000, 100, every, 250_000);
        assert_eq!(g, 5);
        let (g, tat, wait) = gcra_take(tat, 1_000_000, 100, every, 250_000);
        assert_eq!(
            (g, wait),
            (0, 50_000),
            "nothing left this instant; one more in 50 ms"
        );
        let (g, _, _) = gcra_take(tat, 1_100_000, 100, every, 250_000);
        assert_eq!(g, 2, "100 ms later: two more");
        // Over 10 s, two takers sharing the cell never exceed the rate plus the burst.
        let mut tat = 0;
        let mut total = 0;
        for step in 0..=200 {
            let now = 2_000_000 + step * 50_000;
            for _ in 0..2 {
                let (g, t, _) = gcra_take(tat, now, 3, every, 250_000);
                tat = t;
                total += g;
            }
        }
        assert!((200..=206).contains(&total), "{total}");
    }
}

//! Retry and polling delays. Jitter is passed in (a number in `[0, 1)`) so the arithmetic stays pure.

use std::time::Duration;

/// A `Retry-After` header's value given in seconds (the HTTP-date form is not used by the peers
/// this service talks to: upstream and notification receivers).
pub fn retry_after_seconds(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Exponential backoff: `initial * 2^attempt`, capped at `max`, then spread by up to ±25% jitter so
/// many tasks that failed together do not retry together.
pub fn backoff(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(30));
    let base = initial.saturating_mul(factor).min(max);
    let spread = 0.75 + 0.5 * jitter.clamp(0.0, 1.0);
    base.mul_f64(spread).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let i = Duration::from_secs(1);
        let m = Duration::from_secs(60);
        assert_eq!(backoff(0, i, m, 0.5), Duration::from_secs(1));
        assert_eq!(backoff(3, i, m, 0.5), Duration::from_secs(8));
        assert_eq!(backoff(40, i, m, 0.5), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let i = Duration::from_secs(4);
        let m = Duration::from_secs(60);
        assert_eq!(backoff(0, i, m, 0.0), Duration::from_secs(3));
        assert!(backoff(0, i, m, 0.999) < Duration::from_secs(5));
    }
}

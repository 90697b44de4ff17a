//! The budget of a reservation (EASY backfilling): how many units may start now beside a task
//! that waits for its room, without delaying it.

use super::Running;

/// Tasks dispatched less than this long apart count as started together (one wave): on an
/// account whose tasks take about as long, they end together too. Wider than the spread of one
/// pass's creates and of the passes that follow finishes seen together (10-25 ms on loopback),
/// and it bounds how long a backfill may delay a reserved task (see [`backfill_budget`]).
pub const WAVE_MS: i64 = 50;

/// Units that may start now without delaying a reserved task of `need` units: what stays spare
/// when it can start, that is once the oldest running tasks have ended and the rest (the youngest
/// run, as long as they leave `need` free) still hold theirs. EASY backfilling also lets through
/// a task that ends before the reserved one can start; with tasks that take about as long, that
/// is one that ends with the tasks the reserved one waits for: when those include tasks that
/// started in this wave (within [`WAVE_MS`] of `now_ms`), a task started now ends at most that
/// much after them, so every free unit may be used (left idle instead, a 2-unit gap in each
/// wave cost a whole extra wave in the `utilization` benchmark).
pub(super) fn backfill_budget(running: &[Running], working: i64, need: i64, now_ms: i64) -> i64 {
    let held: i64 = running.iter().map(|r| r.n).sum();
    let this_wave: i64 = running
        .iter()
        .filter(|r| now_ms - r.since_ms < WAVE_MS)
        .map(|r| r.n)
        .sum();
    let room_beside = working - need;
    if this_wave > 0 && (0..this_wave).contains(&room_beside) {
        return (working - held).max(0);
    }
    if room_beside <= 0 {
        return 0;
    }
    let mut still_running = 0;
    for r in running.iter().rev() {
        if still_running + r.n > room_beside {
            break;
        }
        still_running += r.n;
    }
    room_beside - still_running
}

//! Admission by concurrency units: which pending tasks may be sent upstream now.
//!
//! Upstream counts `n` units per task from `submitted` until it ends; over the account's limit a
//! create answers `1303`. The controller keeps a *working limit* at or below the configured
//! maximum. A `1303`/429 while `in_flight` of ours ran and `attempted` more were asked for says
//! the room for us lies between the two: the limit resumes at `in_flight`, what upstream took
//! (or at the refused task's size if larger and below the refused level: it may fit alone), and
//! regrowth searches upwards from there (so a refusal in a row, which pauses everything, needs the
//! room to shrink under us, not a guess of ours to miss). The refused task backs off
//! exponentially (at least 1 s, as Kling advises); the rest of dispatch goes on within the new
//! limit, unless the refusal is one in a row (no create accepted since the last), when all of it
//! pauses with that backoff (refusals of creates sent together count once). It
//! grows back each time a full working limit's worth of units has finished cleanly: half-way to
//! the level that was refused, or by one unit when none is known.
//! The level that was refused is remembered as a ceiling: reaching it again takes
//! `PROBE_WINDOWS` full windows, so a limit held down by another tenant is probed rarely, yet
//! regained once that tenant leaves.
//!
//! What the controller has learnt ([`AdmissionState`]) is the account's, not a process's: the
//! service keeps it in the database, every replica adopts it on each dispatch claim, and every
//! change to it is a read-modify-write of that row, so one replica's refusal pauses and shrinks
//! all of them.

use super::fair_share::{self, Held, Room};
use super::schedule::backoff;
use super::Priority;
use std::time::Duration;

/// A pending task waiting for room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// Its client (`""` for tasks submitted without one).
    pub client: String,
    pub priority: Priority,
    pub n: i64,
    /// When it started waiting (its creation).
    pub waiting_since_ms: i64,
}

#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub max_units: i64,
    /// First pause after a `1303`/429, doubled per consecutive refusal up to `busy_max`.
    pub busy_initial: Duration,
    pub busy_max: Duration,
    /// After waiting this long, a task that does not fit stops smaller ones from overtaking it.
    pub starvation_after: Duration,
}

/// Windows of clean finishes needed before the working limit may grow to a level upstream refused.
const PROBE_WINDOWS: i64 = 8;

#[derive(Debug, Clone)]
pub struct Admission {
    cfg: AdmissionConfig,
    state: AdmissionState,
}

/// What admission has learnt about the account: the part shared by every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionState {
    /// The working limit in units, at most the configured maximum.
    pub working: i64,
    pub paused_until_ms: i64,
    /// Consecutive refusals (each doubles the pause).
    pub busy_streak: i64,
    /// Units finished cleanly since the working limit last grew.
    pub finished_units: i64,
    /// Units held (ours) when upstream last refused; growing to it is done cautiously.
    pub refused_at: Option<i64>,
    /// When the last refusal was learnt.
    pub last_refused_ms: i64,
}

impl AdmissionState {
    /// Nothing learnt yet: the whole configured maximum.
    pub fn fresh(max_units: i64) -> Self {
        AdmissionState {
            working: max_units.max(1),
            paused_until_ms: 0,
            busy_streak: 0,
            finished_units: 0,
            refused_at: None,
            last_refused_ms: i64::MIN,
        }
    }
}

/// What a refusal for concurrency costs: the refused task's wait, and a pause of all dispatch
/// (zero unless the refusal is one in a row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyPause {
    pub task: Duration,
    pub all: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AdmissionSnapshot {
    pub max_units: i64,
    pub working_limit: i64,
    pub paused_until_ms: i64,
}

impl Admission {
    pub fn new(cfg: AdmissionConfig) -> Self {
        Admission {
            state: AdmissionState::fresh(cfg.max_units),
            cfg,
        }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    pub fn state(&self) -> AdmissionState {
        self.state
    }

    /// Takes over what was learnt elsewhere (another replica, an earlier run). A limit learnt
    /// under a larger configured maximum is held to this one's.
    pub fn adopt(&mut self, state: AdmissionState) {
        self.state = AdmissionState {
            working: state.working.clamp(1, self.cfg.max_units.max(1)),
            busy_streak: state.busy_streak.max(0),
            finished_units: state.finished_units.max(0),
            ..state
        };
    }

    /// Whether finishing tasks can still change anything (the limit is below its maximum).
    pub fn is_regrowing(&self) -> bool {
        self.state.working < self.cfg.max_units.max(1)
    }

    pub fn snapshot(&self) -> AdmissionSnapshot {
        AdmissionSnapshot {
            max_units: self.cfg.max_units,
            working_limit: self.state.working,
            paused_until_ms: self.state.paused_until_ms,
        }
    }

    /// Chooses the candidates that take the free units now, in the order to send them: see
    /// [`fair_share`] (shares between clients; within one, priority then age, small tasks
    /// backfilling until a large one has waited `starvation_after`).
    pub fn select(&self, now_ms: i64, held: &Held, candidates: &[Candidate]) -> Vec<String> {
        if now_ms < self.state.paused_until_ms {
            return Vec::new();
        }
        let room = Room {
            now_ms,
            working: self.state.working,
            starving_ms: i64::try_from(self.cfg.starvation_after.as_millis()).unwrap_or(i64::MAX),
        };
        fair_share::select(room, held, candidates)
    }

    /// Upstream said its concurrency is full when we asked for `attempted` units while `in_flight`
    /// of ours were running, for a task claimed at `claimed_at_ms`. Returns how long the refused
    /// task waits and how long all dispatch pauses.
    pub fn on_busy(
        &mut self,
        now_ms: i64,
        claimed_at_ms: i64,
        in_flight: i64,
        attempted: i64,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> BusyPause {
        // Upstream took `in_flight` and refused `in_flight + attempted`: its room for us is in
        // between. Resume at what it took, or at the refused task's own size if that is more
        // (it may fit alone, and below its size it could only go on an idle account while
        // everything else is held to less), never at the refused level nor above the previous
        // working limit; regrowth searches upwards from there. Resuming higher (the middle of
        // the range) had the next create refused at once, a refusal in a row, which idles every
        // unit for a second; a probe after a window of clean finishes is a first refusal and
        // costs only its own task a wait.
        let refused = (in_flight + attempted).max(1);
        self.state.working = in_flight
            .max(attempted)
            .min(refused - 1)
            .clamp(1, self.state.working);
        self.state.finished_units = 0;
        self.state.refused_at = Some(self.state.refused_at.map_or(refused, |r| r.min(refused)));
        // A task claimed before the last refusal was decided without knowing of it (several
        // creates of one pass): its refusal is the same event, and neither extends a pause nor
        // counts in the streak.
        let stale = claimed_at_ms < self.state.last_refused_ms;
        self.state.last_refused_ms = self.state.last_refused_ms.max(now_ms);
        let streak_before = if stale {
            (self.state.busy_streak - 1).max(0)
        } else {
            self.state.busy_streak
        };
        // The refused task backs off as Kling advises for `1303`: exponentially, from at least
        // `busy_initial` (>= 1 s).
        let mut wait = backoff(
            u32::try_from(streak_before).unwrap_or(u32::MAX),
            self.cfg.busy_initial,
            self.cfg.busy_max,
            jitter,
        )
        .max(self.cfg.busy_initial);
        if let Some(ra) = retry_after {
            wait = wait.max(ra);
        }
        if !stale {
            self.state.busy_streak = self.state.busy_streak.saturating_add(1);
        }
        // The first refusal since an accepted create only says the working limit was above the
        // room: the limit now adapts, and what runs within it goes on (units left idle for a
        // second cost a quarter of a shared account). A refusal in a row says the room shrank
        // under us, or our guess of it failed: then everything waits.
        let all = if stale || streak_before == 0 {
            Duration::ZERO
        } else {
            wait
        };
        if !all.is_zero() {
            let until = now_ms.saturating_add(i64::try_from(all.as_millis()).unwrap_or(i64::MAX));
            self.state.paused_until_ms = self.state.paused_until_ms.max(until);
        }
        BusyPause { task: wait, all }
    }

    /// A create was accepted: the refusals streak is over.
    pub fn on_accepted(&mut self) {
        self.state.busy_streak = 0;
    }

    /// A task that held `units` ended cleanly.
    pub fn on_finished(&mut self, units: i64) {
        let max = self.cfg.max_units.max(1);
        if self.state.working >= max {
            return;
        }
        self.state.finished_units += units.max(1);
        // Below a refused level, the room lies between the two: close half the gap per window
        // (a binary search, as on_busy does downwards). The refused level itself is probed
        // rarely; with no refused level known, one unit at a time.
        let next = match self.state.refused_at {
            Some(refused) if self.state.working + 1 < refused => {
                (self.state.working + ((refused - self.state.working) / 2).max(1)).min(refused - 1)
            }
            _ => self.state.working + 1,
        }
        .min(max);
        let window = match self.state.refused_at {
            Some(refused) if next >= refused => self.state.working * PROBE_WINDOWS,
            _ => self.state.working,
        };
        if self.state.finished_units >= window {
            self.state.finished_units = 0;
            self.state.working = next;
            if self.state.refused_at.is_some_and(|r| next >= r) {
                // The probe is under way: if it is refused again, on_busy sets a new ceiling.
                self.state.refused_at = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adm(max: i64) -> Admission {
        Admission::new(AdmissionConfig {
            max_units: max,
            busy_initial: Duration::from_secs(1),
            busy_max: Duration::from_secs(60),
            starvation_after: Duration::from_secs(30),
        })
    }

    fn c(id: &str, n: i64, since: i64) -> Candidate {
        Candidate {
            id: id.into(),
            client: "A".into(),
            priority: Priority::Normal,
            n,
            waiting_since_ms: since,
        }
    }

    /// One client's units in flight, as one task.
    fn held(in_flight: i64) -> Held {
        Held {
            shares: crate::domain::fair_share::Shares::from([(
                "A".to_string(),
                crate::domain::fair_share::ClientShare {
                    in_flight,
                    ..Default::default()
                },
            )]),
            running: if in_flight > 0 {
                vec![crate::domain::fair_share::Running {
                    n: in_flight,
                    since_ms: 0,
                }]
            } else {
                vec![]
            },
            virtual_time: 0,
        }
    }

    #[test]
    fn fills_the_free_units_in_order_and_backfills_small_tasks() {
        let a = adm(12);
        let cs = [c("a", 4, 0), c("b", 9, 0), c("c", 3, 0), c("d", 5, 0)];
        // Largest first: b; d is reserved the room b leaves, and c fits beside it meanwhile.
        assert_eq!(a.select(1000, &held(0), &cs), vec!["b", "c"]);
        assert_eq!(a.select(1000, &held(10), &cs), Vec::<String>::new());
        let a = adm(10);
        assert_eq!(a.select(1000, &held(0), &cs), vec!["b"]);
    }

    #[test]
    fn a_starving_large_task_reserves_the_room() {
        let a = adm(10);
        let cs = [c("big", 9, 0), c("small", 1, 0)];
        // Fresh: the small one may overtake.
        assert_eq!(a.select(1_000, &held(5), &cs), vec!["small"]);
        // After 30 s of waiting: nothing overtakes it any more.
        assert!(a.select(31_000, &held(5), &cs).is_empty());
        assert_eq!(a.select(31_000, &held(0), &cs), vec!["big", "small"]);
    }

    #[test]
    fn a_task_larger_than_the_limit_goes_alone() {
        let mut a = adm(10);
        a.on_busy(0, 0, 3, 1, None, 0.5);
        let cs = [c("big", 9, 0), c("small", 1, 0)];
        assert_eq!(a.select(10_000, &held(0), &cs), vec!["big"]);
        assert!(a.select(10_000, &held(1), &cs).len() <= 1);
    }

    #[test]
    fn busy_shrinks_pauses_with_backoff_and_finishing_grows_back() {
        let mut a = adm(10);
        let p1 = a.on_busy(0, 0, 6, 2, None, 0.0);
        assert!(
            p1.task >= Duration::from_secs(1),
            "the task waits at least 1 s"
        );
        assert_eq!(
            p1.all,
            Duration::ZERO,
            "a first refusal pauses nothing else"
        );
        assert_eq!(a.snapshot().working_limit, 6);
        assert_eq!(
            a.select(500, &held(5), &[c("x", 1, 0)]),
            vec!["x"],
            "what fits the smaller limit goes on"
        );
        assert!(a.select(500, &held(6), &[c("x", 1, 0)]).is_empty());
        let p2 = a.on_busy(0, 0, 6, 2, None, 0.0);
        assert!(p2.task > p1.task, "exponential");
        assert_eq!(p2.all, p2.task, "a refusal in a row pauses everything");
        assert!(
            a.select(500, &held(0), &[c("x", 1, 0)]).is_empty(),
            "paused"
        );
        let p3 = a.on_busy(0, 0, 6, 2, Some(Duration::from_secs(120)), 0.0);
        assert!(p3.all >= Duration::from_secs(120), "Retry-After honoured");
        a.on_accepted();
        // Below the refused level (6 + 2 = 8): a unit back per window (the limit's worth).
        a.on_finished(5);
        assert_eq!(
            a.snapshot().working_limit,
            6,
            "a full window not finished yet"
        );
        a.on_finished(1);
        assert_eq!(a.snapshot().working_limit, 7, "one unit per window");
        // The refused level itself: only after PROBE_WINDOWS full windows.
        a.on_finished(7 * PROBE_WINDOWS - 1);
        assert_eq!(a.snapshot().working_limit, 7, "probed rarely");
        a.on_finished(1);
        assert_eq!(a.snapshot().working_limit, 8);
        for _ in 0..100 {
            a.on_finished(9);
        }
        assert_eq!(a.snapshot().working_limit, 10, "capped at the maximum");
        a.on_busy(0, 0, 0, 1, None, 0.0);
        assert_eq!(a.snapshot().working_limit, 1, "never below one unit");
    }

    #[test]
    fn refusals_of_one_pass_count_once() {
        let mut a = adm(12);
        // Claimed together at 100; the refusals arrive at 150 and 160.
        let first = a.on_busy(150, 100, 3, 9, None, 0.0);
        assert!(first.task >= Duration::from_secs(1));
        let second = a.on_busy(160, 100, 2, 4, None, 0.0);
        assert_eq!(second.all, Duration::ZERO, "the same event");
        assert_eq!(second.task, first.task, "its task waits as the first's");
        assert_eq!(a.snapshot().working_limit, 4, "the limit still takes both");
        assert_eq!(a.state().busy_streak, 1);
        assert_eq!(a.snapshot().paused_until_ms, 0, "nothing else paused");
        // Claimed after them, refused again: that is a streak, and all of dispatch pauses, for
        // twice as long.
        let third = a.on_busy(3000, 2500, 3, 1, None, 0.0);
        assert!(third.all > first.task, "{third:?}");
        assert_eq!(
            a.snapshot().paused_until_ms,
            3000 + third.all.as_millis() as i64
        );
        a.on_accepted();
        let after = a.on_busy(9000, 8000, 3, 1, None, 0.0);
        assert_eq!(
            after.all,
            Duration::ZERO,
            "an accepted create ends the streak"
        );
    }

    #[test]
    fn regrowth_closes_half_the_gap_to_the_refused_level_per_window() {
        // 8 of ours ran and another 8 was refused: the room is 8 to 15.
        let mut a = adm(16);
        a.on_busy(0, 0, 8, 8, None, 0.0);
        assert_eq!(
            a.snapshot().working_limit,
            8,
            "resumes at what upstream took"
        );
        a.on_finished(7);
        assert_eq!(a.snapshot().working_limit, 8, "a window not finished yet");
        a.on_finished(1);
        assert_eq!(
            a.snapshot().working_limit,
            12,
            "half-way to 16, in one window"
        );
        a.on_finished(12);
        assert_eq!(a.snapshot().working_limit, 14);
        a.on_finished(14);
        assert_eq!(a.snapshot().working_limit, 15);
        // 15 is refused with 14 running: the room is 14.
        a.on_accepted();
        let probe = a.on_busy(0, 0, 14, 1, None, 0.0);
        assert_eq!(
            probe.all,
            Duration::ZERO,
            "a probe after accepted creates pauses nothing else"
        );
        assert_eq!(a.snapshot().working_limit, 14);
        a.on_finished(14 * (PROBE_WINDOWS - 1));
        assert_eq!(
            a.snapshot().working_limit,
            14,
            "the refused level is probed rarely"
        );
        a.on_finished(14);
        assert_eq!(a.snapshot().working_limit, 15);
    }

    #[test]
    fn a_refusal_resumes_at_what_upstream_took_or_the_refused_task() {
        // 9 of ours ran and a task of 3 was refused (another tenant holds 3 of 12): resuming at
        // 9 lets the next pass's single unit wait for our own units instead of being refused in
        // a row, which would pause everything.
        let mut a = adm(12);
        a.on_busy(0, 0, 9, 3, None, 0.0);
        assert_eq!(a.snapshot().working_limit, 9);
        assert!(a.select(500, &held(9), &[c("x", 1, 0)]).is_empty());
        // 1 ran and a 9 was refused: the 9 may fit alone, so the limit stays at 9 (below it,
        // the 9 could only go on an idle account, and everything else would be held to less).
        let mut a = adm(12);
        a.on_busy(0, 0, 1, 9, None, 0.0);
        assert_eq!(a.snapshot().working_limit, 9);
        // Nothing ran and a 9 was refused: the room is less than 9.
        let mut a = adm(12);
        a.on_busy(0, 0, 0, 9, None, 0.0);
        assert_eq!(a.snapshot().working_limit, 8);
        // Never above the limit it had.
        a.on_busy(0, 0, 10, 1, None, 0.0);
        assert_eq!(a.snapshot().working_limit, 8);
        a.on_busy(0, 0, 5, 1, None, 0.0);
        assert_eq!(a.snapshot().working_limit, 5);
    }

    #[test]
    fn adopting_a_state_holds_it_to_this_configuration() {
        let mut learnt = adm(12);
        learnt.on_busy(0, 0, 10, 2, None, 0.0);
        let mut other = adm(8);
        other.adopt(learnt.state());
        assert_eq!(other.snapshot().working_limit, 8, "held to this maximum");
        assert_eq!(
            other.snapshot().paused_until_ms,
            learnt.state().paused_until_ms
        );
        assert!(!other.is_regrowing());
        let mut other = adm(16);
        other.adopt(learnt.state());
        assert_eq!(other.snapshot().working_limit, 10);
        assert!(other.is_regrowing());
        // What a row could hold after a bad edit never breaks the arithmetic.
        other.adopt(AdmissionState {
            working: -5,
            busy_streak: -1,
            finished_units: -3,
            ..AdmissionState::fresh(16)
        });
        assert_eq!(other.snapshot().working_limit, 1);
        assert_eq!(other.state().busy_streak, 0);
    }
}

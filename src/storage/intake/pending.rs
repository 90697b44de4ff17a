//! The pending caps without counting the waiting tasks on every batch.
//!
//! A count reads every waiting task (1.7 ms of a Postgres insert batch at 2,000 waiting, on the
//! one writer's path; BENCHMARKS §15). But only intake makes tasks wait: every other change
//! takes them away, and intake is serialised (the submit lock; SQLite's one writer). So each
//! batch adds what it admitted to `intake_counts` (all clients under `*`, each client under its
//! name), and a count once taken stays an upper bound: the count plus what intake admitted since,
//! on any replica, as that table says. While the bound leaves room for the whole batch under
//! both caps, it stands in for the count: nothing is refused for a full queue, exactly as a
//! count would decide, since the true number is at most the bound. Closer to a cap, the batch
//! counts, and the count is the new baseline.

use super::NewTask;
use crate::storage::Store;
use std::collections::HashMap;

/// Scope of the all-clients row of `intake_counts` (client names start with a letter or digit).
pub(super) const ALL: &str = "*";

/// What this process knows of the waiting tasks since its last counts.
#[derive(Debug, Default)]
pub(crate) struct PendingBound {
    total: Option<Baseline>,
    clients: HashMap<String, Baseline>,
    /// Counts taken (tests read it).
    counts: u64,
}

/// A count, and what intake had admitted in the same scope when it was taken.
#[derive(Debug, Clone, Copy)]
struct Baseline {
    counted: i64,
    admitted: i64,
}

impl Baseline {
    /// The most tasks that can be waiting now, with `admitted` admitted in all.
    fn bound(self, admitted: i64) -> Option<i64> {
        // A total below the one counted against (a database restored from an older copy)
        // bounds nothing.
        (admitted >= self.admitted).then(|| self.counted + (admitted - self.admitted))
    }
}

/// `intake_counts` as a batch reads it, before it admits anything.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Admitted {
    pub total: i64,
    /// The batch's first client's (0 without a client or a row).
    pub client: i64,
}

/// A batch as the caps see it: its first client's name, its size, and the lowest caps among
/// its tasks (all clients' and the first client's).
pub(super) struct BatchCaps<'a> {
    pub client: Option<&'a str>,
    pub tasks: i64,
    pub total_cap: i64,
    pub client_cap: i64,
}

impl PendingBound {
    /// Upper bounds for the waiting tasks, in all and of the batch's first client, when the
    /// whole batch fits under both caps with them; None when the batch must count.
    pub(super) fn room(&self, batch: &BatchCaps<'_>, now: Admitted) -> Option<(i64, i64)> {
        // Task k of the batch (from 0) is refused when the bound plus k reaches the cap.
        let fits = |bound: i64, cap: i64| bound.saturating_add(batch.tasks) <= cap;
        let total = self.total?.bound(now.total)?;
        if !fits(total, batch.total_cap) {
            return None;
        }
        let client = match batch.client {
            None => 0,
            Some(name) => self.clients.get(name)?.bound(now.client)?,
        };
        if batch.client.is_some() && !fits(client, batch.client_cap) {
            return None;
        }
        Some((total, client))
    }

    /// Takes counts `(total, client)` made when `now` was admitted as the new baselines (after
    /// the batch's transaction ended: one that failed may have read anything).
    pub(super) fn counted(&mut self, client: Option<&str>, counts: (i64, i64), now: Admitted) {
        self.counts += 1;
        self.total = Some(Baseline {
            counted: counts.0,
            admitted: now.total,
        });
        if let Some(name) = client {
            self.clients.insert(
                name.to_owned(),
                Baseline {
                    counted: counts.1,
                    admitted: now.client,
                },
            );
        }
    }

    pub(super) fn counts_taken(&self) -> u64 {
        self.counts
    }
}

/// The batch as the pending caps see it: the lowest caps among its tasks.
pub(super) fn batch_caps<'a>(tasks: &[NewTask], client: Option<&'a str>) -> BatchCaps<'a> {
    let of_client = |t: &&NewTask| t.record.client.as_deref() == client;
    BatchCaps {
        client,
        tasks: i64::try_from(tasks.len()).unwrap_or(i64::MAX),
        total_cap: tasks.iter().map(|t| t.caps.total).min().unwrap_or(0),
        client_cap: tasks
            .iter()
            .filter(of_client)
            .map(|t| t.caps.per_client)
            .min()
            .unwrap_or(0),
    }
}

impl Store {
    pub(super) fn pending_bound(&self) -> std::sync::MutexGuard<'_, PendingBound> {
        // Baselines stay consistent even if a holder panicked: each is replaced whole.
        self.pending_bound.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times this store counted the waiting tasks for the pending caps.
    #[doc(hidden)]
    pub fn pending_counts_taken(&self) -> u64 {
        self.pending_bound().counts_taken()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(client: Option<&str>, tasks: i64) -> BatchCaps<'_> {
        BatchCaps {
            client,
            tasks,
            total_cap: 100,
            client_cap: 10,
        }
    }

    #[test]
    fn without_a_count_there_is_no_bound() {
        let b = PendingBound::default();
        assert_eq!(b.room(&batch(None, 1), Admitted::default()), None);
        let mut b = PendingBound::default();
        b.counted(None, (5, 0), Admitted::default());
        assert_eq!(
            b.room(&batch(Some("a"), 1), Admitted::default()),
            None,
            "client a was never counted"
        );
    }

    #[test]
    fn the_bound_is_the_count_plus_what_was_admitted_since() {
        let mut b = PendingBound::default();
        b.counted(
            Some("a"),
            (40, 3),
            Admitted {
                total: 1_000,
                client: 200,
            },
        );
        // Other replicas admitted 50, 4 of them a's.
        let now = Admitted {
            total: 1_050,
            client: 204,
        };
        assert_eq!(b.room(&batch(Some("a"), 3), now), Some((90, 7)));
        // 7 + 3 fills a's cap of 10 exactly: the third task is the tenth, still admitted.
        assert_eq!(
            b.room(&batch(Some("a"), 4), now),
            None,
            "the eleventh must count"
        );
        let near_total = Admitted {
            total: 1_058,
            client: 204,
        };
        assert_eq!(b.room(&batch(None, 2), near_total), Some((98, 0)));
        assert_eq!(b.room(&batch(None, 3), near_total), None);
    }

    #[test]
    fn a_counter_that_went_back_bounds_nothing() {
        let mut b = PendingBound::default();
        b.counted(
            None,
            (1, 0),
            Admitted {
                total: 500,
                client: 0,
            },
        );
        let restored = Admitted {
            total: 400,
            client: 0,
        };
        assert_eq!(b.room(&batch(None, 1), restored), None);
    }
}

//! Where the two backends differ at run time, the migrations aside: every switch on `Pool` that
//! changes what a statement says lives here, so the whole dialect reads on one page. Statements
//! elsewhere take these fragments and stay one text for both.

use super::{Pool, Store};
use std::sync::LazyLock;

/// Advisory-lock key (Postgres) that serialises dispatch admission across replicas ("klr\x01"):
/// summing the units in flight and claiming what fits is one step for the whole account.
pub(super) const ADMISSION_LOCK_KEY: i64 = 0x6b6c_7201;

/// Advisory-lock key (Postgres) that serialises submits across replicas, so a budget's check and
/// the insert it allows are one step (SQLite's single writer already is). The number is the one
/// every release has used: a replica of an older build must take the same lock.
pub(super) const SUBMIT_LOCK_KEY: i64 = 72_430_001;

/// A serialised step's transaction on Postgres: `BEGIN` and the advisory lock (held until the
/// transaction ends) sent as one simple query, one round trip instead of two.
static BEGIN_ADMISSION: LazyLock<String> = LazyLock::new(|| begin_locked(ADMISSION_LOCK_KEY));
static BEGIN_SUBMITS: LazyLock<String> = LazyLock::new(|| begin_locked(SUBMIT_LOCK_KEY));

fn begin_locked(key: i64) -> String {
    format!("BEGIN; SELECT pg_advisory_xact_lock({key})")
}

/// Which step a serialised transaction is (see [`Store::begin_serialised`]).
pub(super) enum Serialised {
    /// Dispatch admission: [`ADMISSION_LOCK_KEY`].
    Admission,
    /// Submits: [`SUBMIT_LOCK_KEY`].
    Submits,
}

impl Store {
    /// How a read-then-write transaction begins. SQLite: take the write lock up front, so a
    /// transaction that reads before it writes waits for another process's writer (the CLI's, say)
    /// in the busy handler instead of failing on the lock upgrade with a stale snapshot.
    pub(super) fn begin_claim(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "BEGIN IMMEDIATE",
            Pool::Postgres(_) => "BEGIN",
        }
    }

    /// How a step that must be one at a time across replicas begins: as `begin_claim`, and on
    /// Postgres with the step's advisory lock taken in the same round trip. SQLite's write lock,
    /// taken up front, already is that lock.
    pub(super) fn begin_serialised(&self, step: Serialised) -> &'static str {
        match (&self.pool, step) {
            (Pool::Sqlite(_), _) => self.begin_claim(),
            (Pool::Postgres(_), Serialised::Admission) => BEGIN_ADMISSION.as_str(),
            (Pool::Postgres(_), Serialised::Submits) => BEGIN_SUBMITS.as_str(),
        }
    }

    /// Row locks of a claim's select: other replicas skip rows a claim is working on instead of
    /// waiting for it. SQLite's `BEGIN IMMEDIATE` already excludes every other writer.
    pub(super) fn skip_locked(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "",
            Pool::Postgres(_) => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// The dispatch claim's read of each client's next due tasks (`sql::DUE_DISPATCHES`, and on
    /// Postgres `sql::DUE_DISPATCHES_PG`, which does not read the whole backlog).
    pub(super) fn due_dispatches(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => super::sql::DUE_DISPATCHES,
            Pool::Postgres(_) => super::sql::DUE_DISPATCHES_PG,
        }
    }

    /// Row lock of a read-modify-write's read (a shared counter row): other writers wait for it.
    pub(super) fn for_update(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "",
            Pool::Postgres(_) => " FOR UPDATE",
        }
    }
}

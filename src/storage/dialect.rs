//! Where the two backends differ at run time, the migrations aside: every switch on `Pool` that
//! changes what a statement says lives here, so the whole dialect reads on one page. Statements
//! elsewhere take these fragments and stay one text for both.

use super::{Pool, Store};

/// Advisory-lock key (Postgres) that serialises dispatch admission across replicas ("klr\x01"):
/// summing the units in flight and claiming what fits is one step for the whole account.
pub(super) const ADMISSION_LOCK_KEY: i64 = 0x6b6c_7201;

/// Advisory-lock key (Postgres) that serialises submits across replicas, so a budget's check and
/// the insert it allows are one step (SQLite's single writer already is). The number is the one
/// every release has used: a replica of an older build must take the same lock.
pub(super) const SUBMIT_LOCK_KEY: i64 = 72_430_001;

/// Takes an advisory lock until the transaction ends (Postgres only; see `serialises_writers`).
pub(super) const ADVISORY_XACT_LOCK: &str = "SELECT pg_advisory_xact_lock($1)";

impl Store {
    /// True where writers of several sessions run at once (Postgres): steps that must be atomic
    /// across replicas take an advisory lock, and commits tell other replicas through `NOTIFY`.
    /// SQLite has one writer at a time, which is that lock already, and no other replica.
    pub(super) fn is_postgres(&self) -> bool {
        matches!(self.pool, Pool::Postgres(_))
    }

    /// How a read-then-write transaction begins. SQLite: take the write lock up front, so a
    /// transaction that reads before it writes waits for another process's writer (the CLI's, say)
    /// in the busy handler instead of failing on the lock upgrade with a stale snapshot.
    pub(super) fn begin_claim(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "BEGIN IMMEDIATE",
            Pool::Postgres(_) => "BEGIN",
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

    /// Row lock of a read-modify-write's read (a shared counter row): other writers wait for it.
    pub(super) fn for_update(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "",
            Pool::Postgres(_) => " FOR UPDATE",
        }
    }
}

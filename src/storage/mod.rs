//! Storage: every SQL statement the service runs, for SQLite and Postgres.
//!
//! Both dialects take `$N` placeholders and share the statements; the migrations differ
//! (`migrations/sqlite`, `migrations/postgres`), and the runtime switches (how a transaction
//! begins, row locks, advisory locks and their keys, `pg_notify`) are all in `dialect`.
//! `on_pool!` expands a body once per backend, so each statement is type-checked against both
//! drivers without a runtime `Any` layer.
//!
//! Status changes are compare-and-set on `version`: a change is decided on a snapshot and commits
//! only if nobody changed the task since, together with its timeline event, in one transaction.
//!
//! Files: `pool` (connecting, the writer queue, migrations), `dialect` (where the backends'
//! statements differ at run time), `records` (row and record types),
//! `tasks` (one new task, reading tasks), `intake` (new tasks in batches), `commits` (status
//! changes in batches: one statement per round of rows, written per backend in `commits/rows`
//! for SQLite's `json_each` and `commits/set` for Postgres's `UNNEST`: with `Store::get_tasks`,
//! the places where a statement is not shared), `changes` (dispatch retries, polls, plans), `queries` (the read
//! queries tests check the plans of), then one file per table group.

use crate::domain::{
    Change, EventSource, InputImage, Priority, ResultImage, Task, TaskError, TaskEvent, TaskInputs,
    TaskStatus,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, PgPool, SqlitePool};
use std::str::FromStr;
use std::time::Duration;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A group commit failed (or its writer stopped): nothing of the batch was stored.
    #[error("the batch holding this change was not stored: {0}")]
    Batch(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// What a storage failure means to whoever asked: only `Unavailable` may go away on a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFailure {
    /// A stored row cannot be read back as what it should be.
    Corrupt,
    /// The change breaks a constraint: a unique key, a reference, a check.
    Conflict,
    /// The database cannot store the data as given (Postgres SQLSTATE class 22, data exception).
    Unstorable,
    /// Anything else: the database is down, busy or unreachable, or a batch was lost.
    Unavailable,
}

impl StorageError {
    pub fn failure(&self) -> StorageFailure {
        let db = match self {
            StorageError::Corrupt(_) => return StorageFailure::Corrupt,
            StorageError::Database(e) => e.as_database_error(),
            _ => None,
        };
        match db {
            Some(db)
                if db.is_unique_violation()
                    || db.is_foreign_key_violation()
                    || db.is_check_violation() =>
            {
                StorageFailure::Conflict
            }
            Some(db) if db.code().is_some_and(|c| c.starts_with("22")) => {
                StorageFailure::Unstorable
            }
            _ => StorageFailure::Unavailable,
        }
    }
}

#[derive(Clone, Debug)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPools),
}

/// Postgres has two pools on the same database: `main` for everything but the grouped task
/// reads and status-change commits, which use `keyed`, whose sessions plan differently
/// (`pool::KEYED_SESSION` says how and why).
#[derive(Clone, Debug)]
struct PgPools {
    main: PgPool,
    keyed: PgPool,
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    /// SQLite has one writer at a time. Writers of this process queue here, on an async lock,
    /// instead of in SQLite's busy handler, whose sleeps (up to 100 ms each) make latency spiky.
    write_lock: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
    /// Tags this process's change notifications, so its own feed skips them.
    instance: std::sync::Arc<str>,
    /// The waiting tasks' counts between batches (`intake::pending`).
    pending_bound: std::sync::Arc<std::sync::Mutex<intake::PendingBound>>,
}

/// Runs `$body` with `$p` bound to whichever pool this store has.
macro_rules! on_pool {
    ($store:expr, $p:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($crate::storage::PgPools { main: $p, .. }) => $body,
        }
    };
}

mod admission;
mod archive;
#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "bench")]
#[doc(hidden)]
pub use bench::BenchSpan;
mod claims;
mod clients;
mod deliveries;
mod dialect;
mod doctor;
mod feed;
mod overview;
mod polling;
mod sessions;
mod usage;

pub use archive::{ArchiveSetback, StoredImage};
pub use clients::ClientError;
pub use deliveries::{
    AttemptRecord, Delivery, DeliveryAttempt, DueDelivery, NextStep, OutboxEntry,
};
pub use feed::{ChangeFeed, FeedEvent};
pub use overview::ClientUsage;
mod changes;
mod commits;
mod intake;
pub use intake::NewTask;
mod pool;
pub mod queries;
mod records;
mod tasks;
pub use pool::InstanceLock;
pub use queries as sql;
pub use records::*;
pub use usage::{usage_shard, BudgetAlert, ClientBudgets, DurationRow, UsageRow};

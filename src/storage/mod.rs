//! Storage: every SQL statement the service runs, for SQLite and Postgres.
//!
//! Both dialects take `$N` placeholders and share the statements below; only the migrations differ
//! (`migrations/sqlite`, `migrations/postgres`). `on_pool!` expands a body once per backend, so each
//! statement is type-checked against both drivers without a runtime `Any` layer.
//!
//! Status changes are compare-and-set on `version`: a change is decided on a snapshot and commits
//! only if nobody changed the task since, together with its timeline event, in one transaction.

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

#[derive(Clone, Debug)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
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
}

/// Runs `$body` with `$p` bound to whichever pool this store has.
macro_rules! on_pool {
    ($store:expr, $p:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

mod admission;
mod archive;
mod bench;
#[doc(hidden)]
pub use bench::BenchSpan;
mod claims;
mod clients;
mod deliveries;
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
pub use usage::{BudgetAlert, ClientBudgets, DurationRow, UsageRow};

/// The locks that keep a SQLite database to one serving instance; released when dropped.
pub struct InstanceLock {
    _files: [std::fs::File; 2],
}

fn take_lock(
    path: &std::path::Path,
    db: &std::path::Path,
) -> std::result::Result<std::fs::File, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another kling-relay instance is serving this SQLite database ({}, held by {}), \
             perhaps under another name (a link); SQLite supports one instance: stop the other \
             one, or use Postgres for several",
            db.display(),
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

const TASK_COLUMNS: &str = "id, external_task_id, upstream_task_id, status, upstream_status, \
    model_name, prompt, n, aspect_ratio, metadata, images, error_code, error_message, created_at, \
    updated_at, completed_at, upstream_updated_at, version, dispatch_attempts, dispatch_started_at, \
    poll_count, client, notify_url, request_id, final_unit_deduction, priority, cost_source";

#[derive(sqlx::FromRow)]
struct TaskRow {
    id: String,
    external_task_id: String,
    upstream_task_id: Option<String>,
    status: String,
    upstream_status: Option<String>,
    model_name: String,
    prompt: Option<String>,
    n: i64,
    aspect_ratio: Option<String>,
    metadata: Option<String>,
    images: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    created_at: i64,
    updated_at: i64,
    completed_at: Option<i64>,
    upstream_updated_at: Option<i64>,
    version: i64,
    dispatch_attempts: i64,
    dispatch_started_at: Option<i64>,
    poll_count: i64,
    client: Option<String>,
    notify_url: Option<String>,
    request_id: Option<String>,
    final_unit_deduction: Option<String>,
    priority: String,
    cost_source: Option<String>,
}

impl TryFrom<TaskRow> for Task {
    type Error = StorageError;
    fn try_from(r: TaskRow) -> Result<Task> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StorageError::Corrupt(format!("task {}: {what}: {e}", r.id))
        };
        let status = TaskStatus::from_str(&r.status).map_err(|e| corrupt("status", &e))?;
        let priority = Priority::parse(&r.priority)
            .ok_or_else(|| corrupt("priority", &format!("unknown priority `{}`", r.priority)))?;
        let metadata = match &r.metadata {
            Some(m) => Some(serde_json::from_str(m).map_err(|e| corrupt("metadata", &e))?),
            None => None,
        };
        let images: Vec<ResultImage> = match &r.images {
            Some(i) => serde_json::from_str(i).map_err(|e| corrupt("images", &e))?,
            None => Vec::new(),
        };
        let error = match (r.error_code, r.error_message) {
            (Some(code), message) => Some(TaskError {
                code,
                message: message.unwrap_or_default(),
            }),
            _ => None,
        };
        Ok(Task {
            id: r.id,
            external_task_id: r.external_task_id,
            upstream_task_id: r.upstream_task_id,
            status,
            upstream_status: r.upstream_status,
            model_name: r.model_name,
            prompt: r.prompt,
            n: r.n,
            aspect_ratio: r.aspect_ratio,
            priority,
            metadata,
            images,
            error,
            created_at_ms: r.created_at,
            updated_at_ms: r.updated_at,
            completed_at_ms: r.completed_at,
            upstream_updated_at_ms: r.upstream_updated_at,
            version: r.version,
            dispatch_attempts: r.dispatch_attempts,
            dispatch_started_at_ms: r.dispatch_started_at,
            poll_count: r.poll_count,
            client: r.client,
            notify_url: r.notify_url,
            request_id: r.request_id,
            final_unit_deduction: r.final_unit_deduction,
            cost_source: r.cost_source,
        })
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    at: i64,
    source: String,
    status: String,
    upstream_status: Option<String>,
    detail: Option<String>,
    upstream_payload: Option<String>,
}

#[derive(sqlx::FromRow)]
struct InputsRow {
    subject_images: String,
    scene_image: Option<String>,
    style_image: Option<String>,
    negative_prompt: Option<String>,
    watermark_info: Option<String>,
}

/// A new task to store, already validated.
#[derive(Debug, Clone)]
pub struct NewTaskRecord {
    pub id: String,
    pub external_task_id: String,
    pub model_name: String,
    pub prompt: Option<String>,
    pub n: i64,
    pub aspect_ratio: Option<String>,
    pub priority: Priority,
    pub metadata: Option<serde_json::Value>,
    pub inputs: TaskInputs,
    pub created_at_ms: i64,
    pub client: Option<String>,
    pub notify_url: Option<String>,
    pub request_id: Option<String>,
}

/// Limits checked atomically with the insert.
#[derive(Debug, Clone, Copy)]
pub struct PendingCaps {
    /// Tasks waiting for dispatch, all clients together.
    pub total: i64,
    /// Tasks waiting for dispatch for this task's client.
    pub per_client: i64,
}

/// History filter; `before` is the keyset cursor `(created_at, id)` of the last task already seen.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this client's tasks; None: everyone's.
    pub client: Option<String>,
    pub statuses: Vec<TaskStatus>,
    pub created_after_ms: Option<i64>,
    pub created_before_ms: Option<i64>,
    /// Case-insensitive substring of the prompt or the metadata's JSON text (the dashboard's
    /// search); a filter, not an index-served query.
    pub text: Option<String>,
    pub before: Option<(i64, String)>,
    pub limit: i64,
}

/// A task the poller should ask upstream about.
#[derive(Debug, Clone)]
pub struct PollCandidate {
    pub id: String,
    pub upstream_task_id: Option<String>,
    pub external_task_id: String,
    pub created_at_ms: i64,
    pub poll_count: i64,
}

#[derive(sqlx::FromRow)]
struct PollRow {
    id: String,
    upstream_task_id: Option<String>,
    external_task_id: String,
    created_at: i64,
    poll_count: i64,
}

impl From<PollRow> for PollCandidate {
    fn from(r: PollRow) -> PollCandidate {
        PollCandidate {
            id: r.id,
            upstream_task_id: r.upstream_task_id,
            external_task_id: r.external_task_id,
            created_at_ms: r.created_at,
            poll_count: r.poll_count,
        }
    }
}

/// A pending task the dispatcher may send.
#[derive(Debug, Clone)]
pub struct DispatchCandidate {
    pub id: String,
    /// `""` for a task without a client.
    pub client: String,
    pub priority: Priority,
    pub n: i64,
    pub created_at_ms: i64,
    /// An earlier create may have landed: recover before sending again.
    pub in_doubt: bool,
}

impl From<DispatchCandidate> for crate::domain::admission::Candidate {
    /// A task waiting for room, as admission sees it (it waits from its creation).
    fn from(c: DispatchCandidate) -> Self {
        crate::domain::admission::Candidate {
            id: c.id,
            client: c.client,
            priority: c.priority,
            n: c.n,
            waiting_since_ms: c.created_at_ms,
        }
    }
}

/// An `Idempotency-Key` to take for a new task.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    /// Whose key it is (the caller); empty while callers are not authenticated.
    pub scope: String,
    pub key: String,
    pub request_hash: String,
    /// A key taken before this time has expired and may be taken again.
    pub expired_before_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// The key was taken by `task_id`, with the same request or another.
    Existing {
        task_id: String,
        same_request: bool,
    },
    /// `max_pending` tasks already wait for dispatch.
    QueueFull,
    /// The task's `n` would take its client over this budget (spent + reserved + n).
    OverBudget(crate::domain::usage::BudgetStanding),
}

/// A status change to commit.
#[derive(Debug, Clone, Copy)]
pub struct Commit<'a> {
    pub id: &'a str,
    /// The version the change was decided on.
    pub expected_version: i64,
    pub change: &'a Change,
    pub source: EventSource,
    pub now_ms: i64,
    /// When to poll next (set while submitted/processing).
    pub poll_due_at_ms: Option<i64>,
    /// The notification written with the change.
    pub outbox: Option<&'a OutboxEntry>,
    /// Queue the images of a success for the archive, in the same transaction.
    pub archive: bool,
    /// What upstream sent, kept with the event (JSON text).
    pub upstream_payload: Option<&'a str>,
    /// The change takes the task out of `pending` (decided on `expected_version`): its input
    /// images go in the same transaction.
    pub leaves_pending: bool,
}

/// A parameter for [`Store::explain`].
#[derive(Debug, Clone)]
pub enum ExplainArg {
    Int(i64),
    Text(String),
}

/// A dispatch attempt that did not land, to record against a still-pending task.
#[derive(Debug, Clone)]
pub struct DispatchRetry {
    pub next_attempt_at_ms: i64,
    /// Keep the in-flight mark: the failed call may have reached upstream.
    pub maybe_sent: bool,
    pub detail: String,
}

fn json_text<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StorageError::Corrupt(e.to_string()))
}

impl Store {
    /// Opens (and for SQLite creates) the database named by `url`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        let pool = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?;
            if let Some(dir) = opts.get_filename().parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        StorageError::Corrupt(format!(
                            "cannot create database folder {}: {e}",
                            dir.display()
                        ))
                    })?;
                }
            }
            let opts = opts
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: a commit is on disk before we acknowledge it, even across power loss.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(max_connections)
                    .connect_with(opts)
                    .await?,
            )
        } else {
            let opts = PgConnectOptions::from_str(url)?;
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(opts)
                    .await?,
            )
        };
        let write_lock = matches!(pool, Pool::Sqlite(_))
            .then(|| std::sync::Arc::new(tokio::sync::Mutex::new(())));
        Ok(Store {
            pool,
            write_lock,
            instance: uuid::Uuid::now_v7().simple().to_string().into(),
        })
    }

    /// Held for the length of a write transaction (SQLite only; Postgres writers run in parallel).
    async fn writer(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_lock {
            Some(l) => Some(l.lock().await),
            None => None,
        }
    }

    /// One serving instance per SQLite database. Two locks: `<path>.lock` beside the file (so
    /// two containers sharing the volume see each other), and one named after the file's identity
    /// (device and inode) in the temporary folder, so a symlink or a hard link to the same
    /// database, under another name, is refused too: with a hard link, two instances would keep
    /// separate WAL files and lose acknowledged tasks. An existing database file is never opened
    /// here (closing a second descriptor on it would release SQLite's own POSIX locks). Held
    /// until the returned value is dropped; None for Postgres.
    pub fn lock_single_instance(url: &str) -> std::result::Result<Option<InstanceLock>, String> {
        if !url.starts_with("sqlite:") {
            return Ok(None);
        }
        let opts = SqliteConnectOptions::from_str(url).map_err(|e| e.to_string())?;
        let db = opts.get_filename().to_path_buf();
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let mut beside = db.as_os_str().to_owned();
        beside.push(".lock");
        let beside = take_lock(std::path::Path::new(&beside), &db)?;
        // The database's identity needs the file: an empty one is a new SQLite database. Only a
        // missing file is created (and closed at once); an existing one is never opened here.
        if !db.exists() {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .append(true)
                .open(&db)
                .map_err(|e| format!("cannot create {}: {e}", db.display()))?;
        }
        let meta =
            std::fs::metadata(&db).map_err(|e| format!("cannot read {}: {e}", db.display()))?;
        let identity = {
            use std::os::unix::fs::MetadataExt;
            std::env::temp_dir().join(format!(
                "kling-relay-sqlite-{}-{}.lock",
                meta.dev(),
                meta.ino()
            ))
        };
        let identity = take_lock(&identity, &db)?;
        Ok(Some(InstanceLock {
            _files: [beside, identity],
        }))
    }

    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    pub async fn migrate(&self) -> Result<()> {
        match &self.pool {
            Pool::Sqlite(p) => SQLITE_MIGRATIONS.run(p).await?,
            Pool::Postgres(p) => POSTGRES_MIGRATIONS.run(p).await?,
        }
        Ok(())
    }

    /// Ready to serve: the database answers and every migration this binary knows is applied.
    pub async fn readiness(&self) -> std::result::Result<(), String> {
        let (migrator, applied): (&sqlx::migrate::Migrator, Result<Vec<i64>>) = match &self.pool {
            Pool::Sqlite(p) => (
                &SQLITE_MIGRATIONS,
                sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(p)
                    .await
                    .map_err(Into::into),
            ),
            Pool::Postgres(p) => (
                &POSTGRES_MIGRATIONS,
                sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(p)
                    .await
                    .map_err(Into::into),
            ),
        };
        let applied = applied.map_err(|_| "database unreachable".to_owned())?;
        let missing = migrator
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .count();
        if missing > 0 {
            return Err(format!("{missing} migration(s) not applied"));
        }
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }

    /// Returns the stored secret `name`, storing `generated` first if there is none. Concurrent
    /// first starts agree on one value.
    pub async fn ensure_secret(&self, name: &str, generated: &str) -> Result<String> {
        const INSERT: &str =
            "INSERT INTO service_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";
        const SELECT: &str = "SELECT value FROM service_secrets WHERE name = $1";
        on_pool!(self, p => {
            sqlx::query(INSERT).bind(name).bind(generated).execute(p).await?;
            let v: String = sqlx::query_scalar(SELECT).bind(name).fetch_one(p).await?;
            Ok(v)
        })
    }

    /// Stores a new `pending` task, its inputs and its first event in one transaction — unless
    /// its idempotency key is already taken (the task that took it is returned instead) or
    /// `max_pending` tasks already wait for dispatch.
    pub async fn insert_task(
        &self,
        t: NewTaskRecord,
        idempotency: Option<&IdempotencyClaim>,
        caps: PendingCaps,
    ) -> Result<InsertOutcome> {
        let _writer = self.writer().await;
        const TASK: &str =
            "INSERT INTO tasks (id, external_task_id, status, model_name, prompt, n, \
            aspect_ratio, metadata, created_at, updated_at, next_dispatch_at, client, notify_url, \
            request_id, priority) \
            SELECT $1, $2, 'pending', $3, $4, $5, $6, $7, $8, $8, $8, $10, $11, $13, $14 \
            WHERE (SELECT COUNT(*) FROM tasks WHERE status = 'pending') < $9 \
            AND (SELECT COUNT(*) FROM tasks WHERE client = $10 AND status = 'pending') < $12";
        const INPUTS: &str =
            "INSERT INTO task_inputs (task_id, subject_images, scene_image, style_image, \
            negative_prompt, watermark_info, summary) VALUES ($1, $2, $3, $4, $5, $6, $7)";
        const EXPIRE_KEY: &str =
            "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND created_at < $3";
        const CLAIM_KEY: &str =
            "INSERT INTO idempotency_keys (scope, key, request_hash, task_id, created_at) \
            VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scope, key) DO NOTHING";
        const READ_KEY: &str =
            "SELECT request_hash, task_id FROM idempotency_keys WHERE scope = $1 AND key = $2";
        let metadata = t.metadata.as_ref().map(json_text).transpose()?;
        let summary = json_text(&t.inputs.summary())?;
        // The images move into the statement rather than being copied: a Base64 submit is
        // tens of MB, and SQLite copies each bound value and builds the row once more.
        let mut t = t;
        let subjects = json_text(&std::mem::take(&mut t.inputs.subject_images))?;
        let scene_image = t.inputs.scene_image.take();
        let style_image = t.inputs.style_image.take();
        let watermark = t
            .inputs
            .watermark_info
            .as_ref()
            .map(json_text)
            .transpose()?;
        let serialize_submits = matches!(self.pool, Pool::Postgres(_));
        let begin = self.begin_claim();
        on_pool!(self, p => {
            let mut conn = p.acquire().await?;
            let outcome = async {
            // SQLite: the write lock up front, since the budget check reads before the insert
            // writes, and a deferred transaction whose snapshot went stale cannot upgrade.
            let mut tx = conn.begin_with(begin).await?;
            if serialize_submits {
                // Postgres: make the pending count and the insert one atomic step across
                // sessions (SQLite's single writer already does).
                sqlx::query("SELECT pg_advisory_xact_lock(72430001)")
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(k) = idempotency {
                sqlx::query(EXPIRE_KEY)
                    .bind(&k.scope)
                    .bind(&k.key)
                    .bind(k.expired_before_ms)
                    .execute(&mut *tx)
                    .await?;
                let taken: Option<(String, String)> = sqlx::query_as(READ_KEY)
                    .bind(&k.scope)
                    .bind(&k.key)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some((hash, task_id)) = taken {
                    tx.rollback().await?;
                    return Ok(InsertOutcome::Existing {
                        task_id,
                        same_request: hash == k.request_hash,
                    });
                }
            }
            if let Some(client) = &t.client {
                // Under the same lock as the insert (Postgres) or the single writer (SQLite):
                // two submits never both spend the last of a budget.
                let budgets: Option<usage::ClientBudgets> =
                    sqlx::query_as(usage::CLIENT_BUDGETS).bind(client).fetch_optional(&mut *tx).await?;
                let limits = budgets.map(|b| b.limits()).unwrap_or_default();
                if !limits.is_empty() {
                    let reserved: i64 =
                        sqlx::query_scalar(usage::UNITS_RESERVED).bind(client).fetch_one(&mut *tx).await?;
                    for (period, limit_units) in limits {
                        let (start, resets_at_ms) = period.bounds(t.created_at_ms);
                        let spent_milli: i64 = sqlx::query_scalar(usage::UNITS_SPENT)
                            .bind(client)
                            .bind(start)
                            .fetch_one(&mut *tx)
                            .await?;
                        let standing = crate::domain::usage::BudgetStanding {
                            period,
                            limit_units,
                            spent_milli,
                            reserved_units: reserved,
                            resets_at_ms,
                        };
                        if !standing.admits(t.n) {
                            tx.rollback().await?;
                            return Ok(InsertOutcome::OverBudget(standing));
                        }
                    }
                }
            }
            let inserted = sqlx::query(TASK)
                .bind(&t.id)
                .bind(&t.external_task_id)
                .bind(&t.model_name)
                .bind(&t.prompt)
                .bind(t.n)
                .bind(&t.aspect_ratio)
                .bind(&metadata)
                .bind(t.created_at_ms)
                .bind(caps.total)
                .bind(&t.client)
                .bind(&t.notify_url)
                .bind(caps.per_client)
                .bind(&t.request_id)
                .bind(t.priority.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if inserted == 0 {
                tx.rollback().await?;
                return Ok(InsertOutcome::QueueFull);
            }
            if let Some(k) = idempotency {
                // A concurrent request may have taken the key since the read above; the primary
                // key decides, and the loser returns the winner's task.
                let claimed = sqlx::query(CLAIM_KEY)
                    .bind(&k.scope)
                    .bind(&k.key)
                    .bind(&k.request_hash)
                    .bind(&t.id)
                    .bind(t.created_at_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if claimed == 0 {
                    tx.rollback().await?;
                    let (hash, task_id): (String, String) = sqlx::query_as(READ_KEY)
                        .bind(&k.scope)
                        .bind(&k.key)
                        .fetch_one(p)
                        .await?;
                    return Ok(InsertOutcome::Existing {
                        task_id,
                        same_request: hash == k.request_hash,
                    });
                }
            }
            // Not cached: a cached SQLite statement keeps its last bound values (here, megabytes
            // of Base64) until its next use.
            sqlx::query(INPUTS)
                .persistent(false)
                .bind(&t.id)
                .bind(subjects)
                .bind(scene_image)
                .bind(style_image)
                .bind(&t.inputs.negative_prompt)
                .bind(&watermark)
                .bind(summary)
                .execute(&mut *tx)
                .await?;
            sqlx::query(INSERT_EVENT)
                .bind(&t.id)
                .bind(t.created_at_ms)
                .bind(EventSource::Api.as_str())
                .bind(TaskStatus::Pending.as_str())
                .bind(None::<String>)
                .bind(Some("accepted"))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, StorageError>(InsertOutcome::Inserted)
            }
            .await;
            // A Base64 submit grows the connection's buffers to its size; the pool would keep
            // them for as long as the connection lives.
            conn.shrink_buffers();
            outcome
        })
    }

    /// Forgets idempotency keys older than `cutoff_ms`. Returns how many.
    pub async fn delete_expired_idempotency_keys(&self, cutoff_ms: i64, limit: i64) -> Result<u64> {
        let _writer = self.writer().await;
        const SQL: &str = "DELETE FROM idempotency_keys WHERE (scope, key) IN \
            (SELECT scope, key FROM idempotency_keys WHERE created_at < $1 LIMIT $2)";
        on_pool!(self, p => {
            Ok(sqlx::query(SQL).bind(cutoff_ms).bind(limit).execute(p).await?.rows_affected())
        })
    }

    /// Units of upstream concurrency our tasks may hold: tasks upstream has (`submitted`,
    /// `processing`) plus pending tasks whose create may have landed.
    pub async fn units_in_flight(&self) -> Result<i64> {
        on_pool!(self, p => {
            Ok(sqlx::query_scalar(sql::UNITS_IN_FLIGHT).fetch_one(p).await?)
        })
    }

    /// How many tasks are in each open status.
    pub async fn open_tasks_by_status(&self) -> Result<Vec<(String, i64)>> {
        on_pool!(self, p => {
            Ok(sqlx::query_as(sql::OPEN_BY_STATUS).fetch_all(p).await?)
        })
    }

    /// Tasks waiting for dispatch.
    pub async fn pending_count(&self) -> Result<i64> {
        on_pool!(self, p => {
            Ok(sqlx::query_scalar(sql::PENDING_COUNT).fetch_one(p).await?)
        })
    }

    pub async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
        let row: Option<TaskRow> = on_pool!(self, p => {
            sqlx::query_as(&sql).bind(id).fetch_optional(p).await?
        });
        row.map(Task::try_from).transpose()
    }

    /// What the task's input images were: the summary written at submit (None for a task
    /// stored before summaries were kept, or with no inputs row).
    pub async fn input_summary(&self, id: &str) -> Result<Option<Vec<InputImage>>> {
        const SQL: &str = "SELECT summary FROM task_inputs WHERE task_id = $1";
        let row: Option<(Option<String>,)> = on_pool!(self, p => {
            sqlx::query_as(SQL).bind(id).fetch_optional(p).await?
        });
        row.and_then(|(s,)| s)
            .map(|s| {
                serde_json::from_str(&s)
                    .map_err(|e| StorageError::Corrupt(format!("task {id}: input summary: {e}")))
            })
            .transpose()
    }

    pub async fn get_inputs(&self, id: &str) -> Result<Option<TaskInputs>> {
        const SQL: &str =
            "SELECT subject_images, scene_image, style_image, negative_prompt, watermark_info \
            FROM task_inputs WHERE task_id = $1";
        let row: Option<InputsRow> = on_pool!(self, p => {
            let mut conn = p.acquire().await?;
            // Not cached, so the statement does not hold the last row's Base64 (see insert_task).
            let row = sqlx::query_as(SQL).persistent(false).bind(id).fetch_optional(&mut *conn).await;
            conn.shrink_buffers();
            row?
        });
        row.map(|r| {
            Ok(TaskInputs {
                subject_images: serde_json::from_str(&r.subject_images)
                    .map_err(|e| StorageError::Corrupt(format!("task {id}: inputs: {e}")))?,
                scene_image: r.scene_image,
                style_image: r.style_image,
                negative_prompt: r.negative_prompt,
                watermark_info: r
                    .watermark_info
                    .as_deref()
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(|e| {
                        StorageError::Corrupt(format!("task {id}: watermark_info: {e}"))
                    })?,
            })
        })
        .transpose()
    }

    /// Newest first, keyset-paged on `(created_at, id)`.
    pub async fn list_tasks(&self, f: &ListFilter) -> Result<Vec<Task>> {
        let sql = sql::list(f);
        let rows: Vec<TaskRow> = on_pool!(self, p => {
            let mut q = sqlx::query_as(&sql);
            if let Some(c) = &f.client {
                q = q.bind(c.clone());
            }
            for s in &f.statuses {
                q = q.bind(s.as_str());
            }
            if let Some(v) = f.created_after_ms {
                q = q.bind(v);
            }
            if let Some(v) = f.created_before_ms {
                q = q.bind(v);
            }
            if let Some(t) = &f.text {
                q = q.bind(like_pattern(t));
            }
            if let Some((at, id)) = &f.before {
                q = q.bind(*at).bind(id.clone());
            }
            q.bind(f.limit).fetch_all(p).await?
        });
        rows.into_iter().map(Task::try_from).collect()
    }

    pub async fn events(&self, id: &str) -> Result<Vec<TaskEvent>> {
        let rows: Vec<EventRow> = on_pool!(self, p => {
            sqlx::query_as(sql::EVENTS).bind(id).fetch_all(p).await?
        });
        Ok(rows
            .into_iter()
            .map(|r| TaskEvent {
                at_ms: r.at,
                source: r.source,
                status: r.status,
                upstream_status: r.upstream_status,
                detail: r.detail,
                upstream_payload: r.upstream_payload,
            })
            .collect())
    }

    /// Commits a status change decided on `expected_version`, with its event and its
    /// notification. Returns false when the task changed in between (the caller re-reads and
    /// decides again).
    pub async fn commit_change(&self, c: &Commit<'_>) -> Result<bool> {
        let done = self.commit_changes(std::slice::from_ref(c)).await?;
        Ok(done.first().copied().unwrap_or(false))
    }

    /// Commits several status changes in one transaction (group commit): each is still its own
    /// compare-and-set with its event, notification, archive rows and usage; the result says,
    /// per change, whether it won. Any database error fails them all: none is stored.
    pub async fn commit_changes(&self, batch: &[Commit<'_>]) -> Result<Vec<bool>> {
        let _writer = self.writer().await;
        let is_postgres = matches!(self.pool, Pool::Postgres(_));
        // Rows are changed in one order (tasks by id, then the usage aggregates by key), so two
        // batches committing at once (Postgres) wait for each other instead of deadlocking.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by(|a, b| batch[*a].id.cmp(batch[*b].id));
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let mut won = vec![false; batch.len()];
            let mut ended = usage::Ended::default();
            let mut changed: Vec<&str> = Vec::with_capacity(batch.len());
            for &slot in &order {
                let c = &batch[slot];
                let Commit {
                    id,
                    expected_version,
                    change,
                    source,
                    now_ms,
                    poll_due_at_ms,
                    outbox,
                    archive,
                    upstream_payload,
                    leaves_pending,
                } = *c;
                const SQL: &str = "UPDATE tasks SET status = $2, \
                    upstream_status = COALESCE($3, upstream_status), \
                    upstream_task_id = COALESCE(upstream_task_id, $4), \
                    upstream_updated_at = $5, \
                    images = COALESCE($6, images), \
                    error_code = COALESCE($7, error_code), \
                    error_message = COALESCE($8, error_message), \
                    updated_at = $9, completed_at = $10, \
                    next_dispatch_at = NULL, dispatch_started_at = NULL, \
                    poll_due_at = $11, poll_count = 0, version = version + 1, \
                    final_unit_deduction = COALESCE($13, final_unit_deduction), \
                    submitted_at = COALESCE(submitted_at, $14), \
                    upstream_started_at = COALESCE(upstream_started_at, $15), \
                    cost_source = CASE WHEN $13 IS NULL THEN cost_source ELSE $16 END \
                    WHERE id = $1 AND version = $12 \
                    RETURNING COALESCE(client, ''), model_name, \
                    CASE WHEN upstream_task_id IS NULL THEN NULL ELSE submitted_at END, \
                    final_unit_deduction";
                let images = change.images.as_ref().map(json_text).transpose()?;
                let upstream_status = change.upstream_status.map(|s| s.as_str());
                let completed_at = change.status.is_final().then_some(now_ms);
                let (code, message) = match &change.error {
                    Some(e) => (Some(e.code.as_str()), Some(e.message.as_str())),
                    None => (None, None),
                };
                let done: Option<(String, String, Option<i64>, Option<String>)> = sqlx::query_as(SQL)
                    .bind(id)
                    .bind(change.status.as_str())
                    .bind(upstream_status)
                    .bind(&change.bind_upstream_task_id)
                    .bind(change.upstream_updated_at_ms)
                    .bind(&images)
                    .bind(code)
                    .bind(message)
                    .bind(now_ms)
                    .bind(completed_at)
                    .bind(poll_due_at_ms)
                    .bind(expected_version)
                    .bind(&change.final_unit_deduction)
                    .bind(leaves_pending.then_some(now_ms))
                    .bind(if leaves_pending { change.upstream_updated_at_ms } else { None })
                    .bind(source.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some((client, model, submitted_at, deduction)) = done else {
                    continue;
                };
                if change.status.is_final() {
                    // A task is counted once: the status machine never moves a final task, and this
                    // commit won the compare-and-set on a version that was not final.
                    ended.add(usage::Finished::new(
                        id,
                        client,
                        model,
                        change.status,
                        now_ms,
                        submitted_at,
                        deduction.as_deref(),
                    ));
                }
                sqlx::query(INSERT_EVENT_WITH_PAYLOAD)
                    .bind(id)
                    .bind(now_ms)
                    .bind(source.as_str())
                    .bind(change.status.as_str())
                    .bind(upstream_status)
                    .bind(&change.detail)
                    .bind(upstream_payload)
                    .execute(&mut *tx)
                    .await?;
                if leaves_pending {
                    // Out of pending means upstream has the task or it is over: no dispatch can need
                    // its images again, so they go with the same commit (their summary stays).
                    sqlx::query(DROP_INPUT_IMAGES).bind(id).execute(&mut *tx).await?;
                }
                if let Some(o) = outbox {
                    // The notification is part of the change: both commit, or neither.
                    sqlx::query(deliveries::INSERT_OUTBOX)
                        .bind(&o.id)
                        .bind(id)
                        .bind(&o.client)
                        .bind(&o.url)
                        .bind(change.status.as_str())
                        .bind(&o.payload)
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await?;
                }
                if let (true, TaskStatus::Succeeded, Some(images)) =
                    (archive, change.status, &change.images)
                {
                    for img in images {
                        sqlx::query(archive::ENQUEUE)
                            .bind(id)
                            .bind(i64::from(img.index))
                            .bind(&img.url)
                            .bind(now_ms)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                won[slot] = true;
                changed.push(id);
            }
            if is_postgres {
                // Delivered at commit: other replicas' waiters hear of the changes
                // (storage::feed), a notification per hundred tasks.
                for ids in changed.chunks(feed::IDS_PER_NOTIFICATION) {
                    sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(feed::CHANNEL)
                        .bind(self.change_payload(ids))
                        .execute(&mut *tx)
                        .await?;
                }
            }
            for (key, (tasks, units_milli)) in &ended.hourly {
                sqlx::query(usage::ADD_HOURLY)
                    .bind(&key.0)
                    .bind(key.1)
                    .bind(&key.2)
                    .bind(key.3)
                    .bind(key.4)
                    .bind(*tasks)
                    .bind(*units_milli)
                    .execute(&mut *tx)
                    .await?;
            }
            for (key, tasks) in &ended.durations {
                sqlx::query(usage::ADD_DURATION)
                    .bind(&key.0)
                    .bind(key.1)
                    .bind(key.2)
                    .bind(key.3)
                    .bind(*tasks)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(won)
        })
    }

    /// Records a dispatch attempt that did not land; the task stays pending.
    pub async fn retry_dispatch(&self, id: &str, now_ms: i64, r: &DispatchRetry) -> Result<()> {
        let _writer = self.writer().await;
        const SQL: &str = "UPDATE tasks SET next_dispatch_at = $2, \
            dispatch_started_at = CASE WHEN $3 = 1 THEN dispatch_started_at ELSE NULL END \
            WHERE id = $1 AND status = 'pending'";
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let done = sqlx::query(SQL)
                .bind(id)
                .bind(r.next_attempt_at_ms)
                .bind(i64::from(r.maybe_sent))
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() > 0 {
                sqlx::query(INSERT_EVENT)
                    .bind(id)
                    .bind(now_ms)
                    .bind(EventSource::Dispatch.as_str())
                    .bind(TaskStatus::Pending.as_str())
                    .bind(None::<String>)
                    .bind(&r.detail)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Tasks upstream holds whose next poll is due, most overdue first.
    pub async fn due_polls(&self, now_ms: i64, limit: i64) -> Result<Vec<PollCandidate>> {
        let rows: Vec<PollRow> = on_pool!(self, p => {
            sqlx::query_as(sql::DUE_POLLS).bind(now_ms).bind(limit).fetch_all(p).await?
        });
        Ok(rows.into_iter().map(PollCandidate::from).collect())
    }

    /// Sets the next poll of a still-open task after a poll that brought no change.
    pub async fn reschedule_poll(&self, id: &str, due_at_ms: i64, poll_count: i64) -> Result<()> {
        let _writer = self.writer().await;
        const SQL: &str = "UPDATE tasks SET poll_due_at = $2, poll_count = $3 \
            WHERE id = $1 AND poll_due_at IS NOT NULL";
        on_pool!(self, p => {
            sqlx::query(SQL).bind(id).bind(due_at_ms).bind(poll_count).execute(p).await?;
            Ok(())
        })
    }

    /// Records a note on the task's timeline (its status unchanged) and, if the task is being
    /// polled, makes its next poll due at `now_ms`. Returns whether a poll was brought forward.
    pub async fn note_and_poll_now(
        &self,
        id: &str,
        now_ms: i64,
        source: EventSource,
        detail: &str,
        upstream_payload: Option<&str>,
    ) -> Result<bool> {
        let _writer = self.writer().await;
        const NOTE: &str = "INSERT INTO task_events \
            (task_id, at, source, status, upstream_status, detail, upstream_payload) \
            SELECT id, $2, $3, status, upstream_status, $4, $5 FROM tasks WHERE id = $1";
        const POLL: &str = "UPDATE tasks SET poll_due_at = $2 \
            WHERE id = $1 AND poll_due_at IS NOT NULL";
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query(NOTE)
                .bind(id)
                .bind(now_ms)
                .bind(source.as_str())
                .bind(detail)
                .bind(upstream_payload)
                .execute(&mut *tx)
                .await?;
            let moved = sqlx::query(POLL).bind(id).bind(now_ms).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(moved.rows_affected() > 0)
        })
    }

    /// The query plan of `sql` with the given parameters, one line per plan step (SQLite's
    /// `EXPLAIN QUERY PLAN`, Postgres's `EXPLAIN` with sequential scans priced out, so a plan
    /// without an index means no index can serve the query).
    pub async fn explain(&self, sql: &str, args: &[ExplainArg]) -> Result<Vec<String>> {
        match &self.pool {
            Pool::Sqlite(p) => {
                let text = format!("EXPLAIN QUERY PLAN {sql}");
                let mut q = sqlx::query_as::<_, (i64, i64, i64, String)>(&text);
                for a in args {
                    q = match a {
                        ExplainArg::Int(v) => q.bind(*v),
                        ExplainArg::Text(v) => q.bind(v.clone()),
                    };
                }
                Ok(q.fetch_all(p).await?.into_iter().map(|r| r.3).collect())
            }
            Pool::Postgres(p) => {
                let mut conn = p.acquire().await?;
                sqlx::query("SET enable_seqscan = off")
                    .execute(&mut *conn)
                    .await?;
                let text = format!("EXPLAIN {sql}");
                let mut q = sqlx::query_scalar::<_, String>(&text);
                for a in args {
                    q = match a {
                        ExplainArg::Int(v) => q.bind(*v),
                        ExplainArg::Text(v) => q.bind(v.clone()),
                    };
                }
                let plan = q.fetch_all(&mut *conn).await;
                sqlx::query("RESET enable_seqscan")
                    .execute(&mut *conn)
                    .await?;
                Ok(plan?)
            }
        }
    }

    /// Open tasks created before `cutoff_ms` (candidates for `timed_out`).
    pub async fn expired_open_tasks(&self, cutoff_ms: i64, limit: i64) -> Result<Vec<String>> {
        on_pool!(self, p => {
            Ok(sqlx::query_scalar(sql::EXPIRED_OPEN).bind(cutoff_ms).bind(limit).fetch_all(p).await?)
        })
    }
}

/// `%text%` in lower case, with LIKE's own wildcards escaped.
fn like_pattern(text: &str) -> String {
    let mut p = String::from("%");
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

const INSERT_EVENT: &str =
    "INSERT INTO task_events (task_id, at, source, status, upstream_status, detail) \
    VALUES ($1, $2, $3, $4, $5, $6)";
/// A task's images once it has left pending; its summary, prompt text and watermark stay.
const DROP_INPUT_IMAGES: &str = "UPDATE task_inputs SET subject_images = '[]', \
    scene_image = NULL, style_image = NULL WHERE task_id = $1 AND subject_images <> '[]'";
const INSERT_EVENT_WITH_PAYLOAD: &str = "INSERT INTO task_events \
    (task_id, at, source, status, upstream_status, detail, upstream_payload) \
    VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// The read queries behind history and background work, public so tests can check their plans.
pub mod sql {
    /// Recent succeeded tasks' durations (upstream's clock when known), newest first.
    pub const RECENT_DURATIONS: &str = "SELECT model_name, n, \
                CASE WHEN upstream_started_at IS NOT NULL AND upstream_updated_at IS NOT NULL \
                     THEN upstream_updated_at - upstream_started_at \
                     ELSE completed_at - submitted_at END \
                FROM tasks WHERE status = 'succeeded' AND submitted_at IS NOT NULL \
                ORDER BY created_at DESC LIMIT $1";
    /// Running tasks: their polls are scheduled.
    pub const RUNNING_TASKS: &str =
        "SELECT id, model_name, n, submitted_at, poll_due_at FROM tasks \
            WHERE poll_due_at IS NOT NULL AND submitted_at IS NOT NULL";
    /// Whether a pending task is due for dispatch.
    pub const DISPATCH_BACKLOG: &str = "SELECT EXISTS (SELECT 1 FROM tasks \
        WHERE next_dispatch_at IS NOT NULL AND next_dispatch_at <= $1 AND status = 'pending')";
    /// The earliest scheduled poll.
    pub const NEXT_POLL_DUE: &str =
        "SELECT MIN(poll_due_at) FROM tasks WHERE poll_due_at IS NOT NULL";
    /// A task's timeline, oldest first.
    pub const EVENTS: &str =
        "SELECT at, source, status, upstream_status, detail, upstream_payload \
            FROM task_events \
            WHERE task_id = $1 ORDER BY id";
    /// Pending tasks whose dispatch is due, most overdue first.
    pub const DUE_DISPATCHES: &str = "SELECT id, n, created_at, dispatch_started_at, client, \
            priority FROM (SELECT id, n, created_at, dispatch_started_at, \
            COALESCE(client, '') AS client, priority, ROW_NUMBER() OVER (PARTITION BY client \
            ORDER BY CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END, \
            next_dispatch_at, id) AS place FROM tasks WHERE next_dispatch_at IS NOT NULL \
            AND next_dispatch_at <= $1) AS due WHERE place <= $2";
    /// Tasks holding units upstream (in flight, or possibly in flight): client, `n`, and when
    /// the dispatch began (oldest first). One statement, so no task is missed or counted twice
    /// when another replica's commit moves it between the two kinds.
    pub const HOLDING_UNITS: &str = "SELECT client, n FROM (\
            SELECT COALESCE(client, '') AS client, n, COALESCE(submitted_at, created_at) AS since \
            FROM tasks WHERE status IN ('submitted', 'processing') \
            UNION ALL SELECT COALESCE(client, '') AS client, n, dispatch_started_at AS since \
            FROM tasks WHERE dispatch_started_at IS NOT NULL AND status = 'pending') AS held \
            ORDER BY since";
    pub const CLIENT_SHARES: &str = "SELECT name, weight, max_units FROM clients";
    /// Tasks upstream holds whose next poll is due. Only rows with `poll_due_at` set (submitted or
    /// processing) are in `tasks_poll_due`, so final tasks are never read.
    pub const DUE_POLLS: &str =
        "SELECT id, upstream_task_id, external_task_id, created_at, poll_count \
            FROM tasks WHERE poll_due_at IS NOT NULL AND poll_due_at <= $1 \
            ORDER BY poll_due_at LIMIT $2";
    /// Units our tasks may hold upstream: those upstream has (`submitted`, `processing`) plus
    /// pending tasks whose create may have landed. One statement, so both sums come from one
    /// snapshot: read apart, a task moving from in doubt to submitted between them (another
    /// replica's commit) would be counted in neither, and the budget overspent.
    pub const UNITS_IN_FLIGHT: &str = "SELECT \
        (SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM tasks \
            WHERE status IN ('submitted', 'processing')) + \
        (SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM tasks \
            WHERE dispatch_started_at IS NOT NULL AND status = 'pending')";
    /// Notifications whose next attempt is due, oldest first.
    pub const DUE_DELIVERIES: &str = "SELECT id, task_id, client, url, payload, attempts \
        FROM deliveries WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= $1 \
        ORDER BY next_attempt_at LIMIT $2";
    /// Open tasks per status (for metrics); final tasks are not read.
    pub const OPEN_BY_STATUS: &str = "SELECT status, COUNT(*) FROM tasks \
        WHERE status IN ('pending', 'submitted', 'processing') GROUP BY status";
    /// Tasks waiting for dispatch (the backpressure cap).
    pub const PENDING_COUNT: &str = "SELECT COUNT(*) FROM tasks WHERE status = 'pending'";
    /// Open tasks older than a cutoff. The predicate repeats the partial index's so both
    /// planners use `tasks_open_by_age`.
    pub const EXPIRED_OPEN: &str = "SELECT id FROM tasks \
            WHERE status IN ('pending', 'submitted', 'processing') AND created_at < $1 \
            ORDER BY created_at LIMIT $2";

    /// The history query for a filter; parameters are bound in the order client, statuses, created_after,
    /// created_before, cursor (created_at, id), limit.
    pub fn list(f: &super::ListFilter) -> String {
        let mut sql = format!("SELECT {} FROM tasks WHERE 1 = 1", super::TASK_COLUMNS);
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if f.client.is_some() {
            sql.push_str(&format!(" AND client = {}", next()));
        }
        if !f.statuses.is_empty() {
            let marks: Vec<String> = f.statuses.iter().map(|_| next()).collect();
            sql.push_str(&format!(" AND status IN ({})", marks.join(", ")));
        }
        if f.created_after_ms.is_some() {
            sql.push_str(&format!(" AND created_at >= {}", next()));
        }
        if f.created_before_ms.is_some() {
            sql.push_str(&format!(" AND created_at < {}", next()));
        }
        if f.text.is_some() {
            let p = next();
            sql.push_str(&format!(
                " AND (LOWER(COALESCE(prompt, '')) LIKE {p} ESCAPE '\\' \
                 OR LOWER(COALESCE(metadata, '')) LIKE {p} ESCAPE '\\')"
            ));
        }
        if f.before.is_some() {
            // A row-value comparison, not `a < x OR (a = x AND b < y)`: both planners turn it
            // into a range on the (…, created_at, id) index, so a deep page costs what the
            // first page costs instead of walking every newer row.
            let (a, b) = (next(), next());
            sql.push_str(&format!(" AND (created_at, id) < ({a}, {b})"));
        }
        sql.push_str(&format!(
            " ORDER BY created_at DESC, id DESC LIMIT {}",
            next()
        ));
        sql
    }
}

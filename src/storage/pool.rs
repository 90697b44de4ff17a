//! The connection pool: opening (and for SQLite creating) the database, the single-instance lock
//! of SQLite, the one-writer queue, migrations, readiness and the generated-secret store.

use super::*;

/// The locks that keep a SQLite database to one serving instance; released when dropped.
pub struct InstanceLock {
    _files: [std::fs::File; 2],
}

pub(super) fn take_lock(
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

/// A pooled Postgres connection idle this long is checked before use (see `pg_pool`).
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(1);

/// The session settings of the keyed pool (`PgPools::keyed`). Its statements (the grouped task
/// reads and status-change commits of the intake path) reach rows by key only, and run thousands of
/// times a second with arrays of a handful of rows: Postgres planned each afresh, because a plan
/// made for the array at hand looks cheaper than one made for any array, and planning was a quarter
/// of the database's CPU under callbacks. A generic plan is made once per connection; with
/// sequential scans priced out, a plan made while `tasks` was still small (its statistics stale
/// until autovacuum analyzes) cannot scan the whole table once it has grown. Other statements keep
/// the default: several filter on optional parameters (`$1 IS NULL OR …`), which only a plan made
/// for the values at hand can use an index for.
const KEYED_SESSION: [(&str, &str); 2] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
];

/// Connections of the keyed pool: the commit writers and the two task readers
/// (`service::Relay::start`).
fn keyed_connections(commit_writers: u32) -> u32 {
    commit_writers.max(1) + 2
}

/// A Postgres pool of up to `max` connections, opened as work needs them.
fn pg_pool(max: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        // sqlx checks a connection when it comes back to the pool; checking it again when it is
        // taken costs a round trip on every query, in the path from a finished task to the next
        // create. Only a connection idle a while (the server may have dropped it meanwhile) is
        // checked before use.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_CHECK_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

impl Store {
    /// Opens (and for SQLite creates) the database named by `url`, with room in the keyed pool
    /// for one commit writer.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        Self::connect_with_writers(url, max_connections, 1).await
    }

    /// `connect`, with room in Postgres's keyed pool for `commit_writers` status-change
    /// batches committing at once (`database.commit_writers`).
    pub async fn connect_with_writers(
        url: &str,
        max_connections: u32,
        commit_writers: u32,
    ) -> Result<Store> {
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
                    // A file cannot hang up: the check would only cost a trip to its thread.
                    .test_before_acquire(false)
                    .connect_with(opts)
                    .await?,
            )
        } else {
            let opts = PgConnectOptions::from_str(url)?;
            // Lazy: a CLI command that never reads a task through it opens none (`serve` fills
            // it before it listens, `warm_up`).
            let keyed = pg_pool(keyed_connections(commit_writers))
                .connect_lazy_with(opts.clone().options(KEYED_SESSION));
            Pool::Postgres(PgPools {
                main: pg_pool(max_connections).connect_with(opts).await?,
                keyed,
            })
        };
        let write_lock = matches!(pool, Pool::Sqlite(_))
            .then(|| std::sync::Arc::new(tokio::sync::Mutex::new(())));
        Ok(Store {
            pool,
            write_lock,
            instance: uuid::Uuid::now_v7().simple().to_string().into(),
            pending_bound: Default::default(),
        })
    }

    /// Held for the length of a write transaction (SQLite only; Postgres writers run in parallel).
    pub(super) async fn writer(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
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
            Pool::Postgres(PgPools { main: p, .. }) => POSTGRES_MIGRATIONS.run(p).await?,
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
            Pool::Postgres(PgPools { main: p, .. }) => (
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
        match &self.pool {
            Pool::Sqlite(p) => p.close().await,
            Pool::Postgres(PgPools { main, keyed }) => {
                tokio::join!(main.close(), keyed.close());
            }
        }
    }

    /// Connections the pools hold now, in use or idle.
    pub fn connections(&self) -> u32 {
        match &self.pool {
            Pool::Sqlite(p) => p.size(),
            Pool::Postgres(PgPools { main, keyed }) => main.size() + keyed.size(),
        }
    }

    /// Opens every connection the pools may hold, so the first burst of work after a start does
    /// not wait for connections to be set up one by one (a few milliseconds each on Postgres,
    /// paid in the path of the first tasks' dispatch). They stay open while in use, as always.
    pub async fn warm_up(&self) -> Result<()> {
        match &self.pool {
            Pool::Sqlite(p) => fill(p).await,
            Pool::Postgres(PgPools { main, keyed }) => {
                fill(main).await?;
                fill(keyed).await
            }
        }
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
}

/// Opens every connection `p` may hold.
async fn fill<DB: sqlx::Database>(p: &sqlx::Pool<DB>) -> Result<()> {
    let size = p.options().get_max_connections() as usize;
    let held = futures_util::future::try_join_all((0..size).map(|_| p.acquire())).await?;
    drop(held);
    Ok(())
}

impl Store {
    /// Postgres: the plan a keyed session (`KEYED_SESSION`) makes once for each statement the
    /// keyed pool runs, as (statement, plan lines); empty on SQLite. Made now, on the database
    /// as it is, as the service's sessions make theirs on their first use of each statement.
    pub async fn keyed_plans(&self) -> Result<Vec<(String, Vec<String>)>> {
        let Pool::Postgres(PgPools { keyed, .. }) = &self.pool else {
            return Ok(Vec::new());
        };
        // (name, parameter types where the text does not say them all, statement)
        let mut statements = vec![(
            "read tasks".to_owned(),
            String::new(),
            super::tasks::READ_TASKS_PG.clone(),
        )];
        for (i, sql) in super::commits::COMMIT_SET.iter().enumerate() {
            statements.push((
                format!("commit round {i}"),
                String::new(),
                (*sql).to_owned(),
            ));
        }
        for (i, sql) in super::commits::AFTER_CHANGES.iter().enumerate() {
            let types = format!("({})", super::commits::AFTER_PARAM_TYPES);
            statements.push((format!("after changes {i}"), types, (*sql).to_owned()));
        }
        for (i, sql) in super::commits::COMMIT_WHOLE.iter().enumerate() {
            let types = format!("({})", super::commits::WHOLE_PARAM_TYPES);
            statements.push((format!("whole batch {i}"), types, sql.clone()));
        }
        let mut conn = keyed.acquire().await?;
        let mut plans = Vec::with_capacity(statements.len());
        for (name, types, sql) in statements {
            sqlx::raw_sql(&format!("PREPARE klr_keyed_plan {types} AS {sql}"))
                .execute(&mut *conn)
                .await?;
            // Deallocated whatever the explain gives, so the pooled session is left as it was.
            let plan = explain_prepared(&mut conn, "klr_keyed_plan").await;
            sqlx::raw_sql("DEALLOCATE klr_keyed_plan")
                .execute(&mut *conn)
                .await?;
            plans.push((name, plan?));
        }
        Ok(plans)
    }
}

/// The plan of prepared statement `name` (every parameter NULL: a generic plan does not look at
/// them), one line per step.
async fn explain_prepared(conn: &mut sqlx::PgConnection, name: &str) -> Result<Vec<String>> {
    let params: i32 = sqlx::query_scalar(
        "SELECT cardinality(parameter_types) FROM pg_prepared_statements WHERE name = $1",
    )
    .bind(name)
    .fetch_one(&mut *conn)
    .await?;
    let nulls = vec!["NULL"; usize::try_from(params).unwrap_or(0)].join(", ");
    Ok(
        sqlx::query_scalar(&format!("EXPLAIN EXECUTE {name}({nulls})"))
            .fetch_all(&mut *conn)
            .await?,
    )
}

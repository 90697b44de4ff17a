//! The relay's use cases: submit, read history, and apply news about a task. HTTP handlers and
//! background workers both call in here, so every path goes through the same status machine and
//! the same storage rules.
//!
//! `mod.rs` holds `Relay` and its construction; the use cases are one file each: `submit`,
//! `reads`, `changes` (status changes and cancel), `callback` (callback URLs and tokens), `halt`,
//! `deliveries`, `admission`, `usage`, `dashboard`, `clients` (authentication and client
//! administration), `live` (long-poll and SSE), `group_commit`; `error` is `ServiceError`.

mod admission;
mod archive;
mod callback;
mod changes;
pub mod clients;
pub mod dashboard;
mod deliveries;
mod dispatch;
mod error;
pub mod group_commit;
mod halt;
mod key_reads;
pub mod live;
pub mod poll;
mod reads;
mod submit;
pub mod usage;

pub use error::ServiceError;
pub use reads::Gauges;

use crate::config::Settings;
use crate::domain::admission::{Admission, AdmissionConfig, AdmissionSnapshot};
use crate::domain::client::{Caller, SubmitBudget};
use crate::domain::halt::{DispatchHalt, Halt, HaltConfig, HaltReason};
use crate::domain::notify::NetworkPolicy;
use crate::domain::{
    apply_report, cancel, finish_with_error, validate_new_task, CancelRefused, EventSource,
    FieldError, IgnoreReason, ReportMismatch, Rules, Task, TaskError, TaskEvent, TaskInputs,
    TaskStatus, Transition, UpstreamReport,
};
use crate::storage::{
    DecidedOn, IdempotencyClaim, InsertOutcome, NewTaskRecord, OutboxEntry, PendingCaps,
    StorageError, Store,
};
use crate::upstream::{CometClient, Wire};
use base64::Engine;
use group_commit::OwnedCommit;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, Notify};

/// Name of the stored secret behind callback URL tokens.
const WEBHOOK_SECRET_NAME: &str = "webhook_token_key";
/// How often a status change is re-decided when another writer got in first.
const MAX_CHANGE_ATTEMPTS: usize = 8;
/// Published instead of a task id when any task may have changed (never a task id: those are UUIDs).
pub(crate) const EVERY_TASK: &str = "*";
/// How long an `Idempotency-Key` keeps returning its task.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// What applying a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied(TaskStatus),
    Ignored(IgnoreReason),
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn token_mac(key: &[u8], task_id: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(b"cometapi-callback:");
    mac.update(task_id.as_bytes());
    mac
}

/// The callback token of `task_id` under `key`: base64url(HMAC-SHA256(key, "cometapi-callback:" + id)).
pub fn webhook_token(key: &[u8], task_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(token_mac(key, task_id).finalize().into_bytes())
}

/// The result of a submit.
#[derive(Debug)]
pub struct Submitted {
    pub task: Task,
    /// False when an `Idempotency-Key` returned an earlier task.
    pub created: bool,
}

/// What the dispatcher is doing, for the status endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DispatchStatus {
    #[serde(flatten)]
    pub admission: AdmissionSnapshot,
    pub units_in_flight: i64,
    pub pending: i64,
    #[serde(skip)]
    pub halted: Option<Halt>,
}

pub struct Relay {
    store: Store,
    /// Upstream concurrency budget; see `domain::admission`.
    admission: Mutex<Admission>,
    /// The writer that commits status changes in groups (`group_commit`).
    group_commit: group_commit::GroupCommit,
    /// The reads status changes are decided on, grouped (`group_commit::GroupRead`).
    group_read: group_commit::GroupRead<crate::domain::Task>,
    /// API key lookups, grouped (`key_reads`).
    key_reads: key_reads::KeyReads,
    /// New tasks, stored in groups (`group_commit::GroupInsert`).
    group_insert: group_commit::GroupInsert,
    /// When this replica last folded the usage aggregates' shards (`service::usage`).
    usage_folded_at: std::sync::atomic::AtomicI64,
    /// The overview's units-in-flight chart (`dashboard.rs`), kept for an hour in this process.
    units_history: Mutex<std::collections::VecDeque<dashboard::UnitsSample>>,
    upstream: CometClient,
    /// Set while upstream refuses the setup (key, IP, account, route); see `domain::halt`.
    halt: Mutex<DispatchHalt>,
    pub settings: Arc<Settings>,
    token_key: Vec<u8>,
    /// Wakes the dispatcher when a task is accepted.
    pub dispatch_wake: Notify,
    /// The last dispatch pass left due work waiting for units (`claim_for_dispatch`).
    work_waiting: std::sync::atomic::AtomicBool,
    /// The last dispatch pass left no unit free (`Relay::units_full`).
    units_full: std::sync::atomic::AtomicBool,
    /// Tasks whose final report this replica is committing: their units are free upstream, and
    /// the dispatch claim counts them so before the commit lands (`dispatch::Finishing`).
    finishing: Mutex<std::collections::HashSet<String>>,
    /// Wakes the poller when a task should be polled at once.
    pub poll_wake: Notify,
    /// Ids of tasks that changed or had a dispatch attempt; waiters filter by id.
    changes: broadcast::Sender<String>,
    /// Wakes the notifier when a delivery is written.
    pub notify_wake: Notify,
    /// Wakes the archiver when a task's images are queued.
    pub archive_wake: Notify,
    /// Where archived images are kept.
    pub archive: crate::archive::Archive,
    /// Where notifications may go.
    pub network_policy: NetworkPolicy,
    /// Per-client submit rate.
    submit_budgets: Mutex<HashMap<String, SubmitBudget>>,
    /// Postgres: submits taken from a client's shared rate and not spent yet (left, taken at).
    submit_stash: tokio::sync::Mutex<HashMap<String, (i64, i64)>>,
    /// Fires when the service stops: long-lived answers (long-poll, SSE) end early.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Clients' default notify URLs, read at most every CLIENT_URL_TTL: every status change needs
    /// one, and a database read per change was the largest cost of webhook intake after the write.
    client_urls: Mutex<HashMap<String, (Option<String>, i64)>>,
    /// Bytes of large request bodies being read and processed at once (`server.max_concurrent_body_bytes`).
    body_budget: Arc<tokio::sync::Semaphore>,
}

/// Bodies up to this size skip the byte budget: they cost little, and must not queue behind a
/// large one.
pub const SMALL_BODY_BYTES: usize = 1024 * 1024;

/// Largest raw upstream payload kept on a timeline entry, as JSON text.
pub const MAX_STORED_PAYLOAD_BYTES: usize = 64 * 1024;

/// The payload as JSON text, or a note of its size when it is larger than anyone needs to read
/// (a 20 MB callback must not become a 20 MB timeline row).
fn capped_payload(v: &serde_json::Value) -> String {
    let text = v.to_string();
    if text.len() <= MAX_STORED_PAYLOAD_BYTES {
        return text;
    }
    serde_json::json!({
        "truncated": true,
        "bytes": text.len(),
        "note": format!("payloads over {MAX_STORED_PAYLOAD_BYTES} bytes are not kept"),
    })
    .to_string()
}

/// SHA-256 (hex) of a JSON value's text, computed while it is written out.
fn json_sha256(v: &serde_json::Value) -> String {
    use sha2::Digest;
    struct Hashing(Sha256);
    impl std::io::Write for Hashing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = Hashing(Sha256::new());
    // Writing JSON into a hasher cannot fail: the writer never errs and values always encode.
    let _ = serde_json::to_writer(&mut h, v);
    h.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// How long a client's default notify URL is cached; a change with the CLI applies within it.
const CLIENT_URL_TTL: Duration = Duration::from_secs(5);

impl Relay {
    pub async fn new(store: Store, settings: Arc<Settings>) -> anyhow::Result<Relay> {
        let configured = settings.server.webhook_secret.expose();
        let key = if configured.is_empty() {
            let generated =
                base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
            store.ensure_secret(WEBHOOK_SECRET_NAME, &generated).await?
        } else {
            configured.to_owned()
        };
        let c = &settings.cometapi;
        let wire = Wire::resolve(c);
        tracing::info!(upstream = %wire.describe(), "upstream profile");
        let upstream = CometClient::new(wire, c.timeout)?;
        let (changes, _) = broadcast::channel(1024);
        let d = &settings.dispatch;
        let admission = Mutex::new(Admission::new(AdmissionConfig {
            max_units: settings.cometapi.max_concurrency,
            busy_initial: d.busy_initial,
            busy_max: d.busy_max,
            starvation_after: d.starvation_after,
        }));
        let network_policy = settings
            .notifications
            .network_policy()
            .map_err(anyhow::Error::msg)?;
        let archive = if settings.archive.enabled {
            crate::archive::Archive::from_settings(&settings.archive)?
        } else {
            crate::archive::Archive::in_memory()
        };
        // SQLite has one writer at a time; on Postgres, `database.commit_writers` batches
        // commit at once (the keyed pool holds a connection for each, `app::open_store`).
        let writers = match store.backend() {
            "postgres" => settings.database.commit_writers.max(1) as usize,
            _ => 1,
        };
        let group_commit = group_commit::GroupCommit::start(
            store.clone(),
            writers,
            settings.database.group_commit_max_batch,
            settings.database.group_commit_max_wait,
        );
        // Reads that decide a change, grouped the same way (two readers: reads do not wait
        // for each other, but a reader's query is cheaper than a read each).
        let group_read = group_commit::GroupRead::tasks(
            store.clone(),
            2,
            settings.database.group_commit_max_batch,
        );
        let key_reads =
            key_reads::start(store.clone(), 2, settings.database.group_commit_max_batch);
        let group_insert = group_commit::GroupInsert::start(
            store.clone(),
            settings.database.group_commit_max_batch,
            settings.database.group_commit_max_wait,
        );
        Ok(Relay {
            group_read,
            key_reads,
            group_insert,
            notify_wake: Notify::new(),
            archive_wake: Notify::new(),
            archive,
            network_policy,
            submit_budgets: Mutex::new(HashMap::new()),
            submit_stash: tokio::sync::Mutex::new(HashMap::new()),
            shutdown: tokio_util::sync::CancellationToken::new(),
            client_urls: Mutex::new(HashMap::new()),
            body_budget: Arc::new(tokio::sync::Semaphore::new(
                settings.server.max_concurrent_body_bytes,
            )),
            store,
            admission,
            group_commit,
            usage_folded_at: std::sync::atomic::AtomicI64::new(0),
            units_history: Mutex::new(std::collections::VecDeque::new()),
            upstream,
            halt: Mutex::new(DispatchHalt::new(HaltConfig {
                probe_initial: d.halt_probe_initial,
                probe_max: d.halt_probe_max,
            })),
            token_key: key.into_bytes(),
            settings,
            dispatch_wake: Notify::new(),
            work_waiting: std::sync::atomic::AtomicBool::new(false),
            units_full: std::sync::atomic::AtomicBool::new(false),
            finishing: Mutex::new(std::collections::HashSet::new()),
            poll_wake: Notify::new(),
            changes,
        })
    }
}

/// Runs `work` for every item, at most `limit` at a time, and waits for all of them.
pub(crate) async fn for_each_bounded<T, F, Fut>(items: Vec<T>, limit: usize, work: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for item in items {
        if set.len() >= limit.max(1) {
            set.join_next().await;
        }
        set.spawn(work(item));
    }
    while set.join_next().await.is_some() {}
}

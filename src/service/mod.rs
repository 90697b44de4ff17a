//! The relay's use cases: submit, read history, and apply news about a task. HTTP handlers and
//! background workers both call in here, so every path goes through the same status machine and
//! the same storage rules. `clients` holds authentication and client administration, `live` the
//! waiting for changes (long-poll and SSE).

mod admission;
pub mod clients;
pub mod dashboard;
mod deliveries;
pub mod group_commit;
pub mod live;
pub mod usage;

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
    IdempotencyClaim, InsertOutcome, ListFilter, NewTaskRecord, OutboxEntry, PendingCaps,
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

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the request is invalid")]
    Invalid(Vec<FieldError>),
    #[error("task not found")]
    NotFound,
    #[error("this task has no notification with this id")]
    DeliveryNotFound,
    #[error(transparent)]
    Mismatch(#[from] ReportMismatch),
    #[error("the task kept changing while this update was applied; try again")]
    Contended,
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyConflict,
    #[error("too many tasks are waiting for dispatch; retry later")]
    QueueFull,
    #[error(
        "this task's {requested} units would take the client over its {} budget of {} units",
        standing.period.as_str(),
        standing.limit_units
    )]
    BudgetExceeded {
        standing: crate::domain::usage::BudgetStanding,
        requested: i64,
    },
    #[error("too many submits from this client; retry in {0} s")]
    RateLimited(u64),
    #[error("missing, unknown or revoked API key")]
    Unauthorized,
    #[error("the task cannot be canceled: {0}")]
    CannotCancel(CancelRefused),
    #[error("{0}")]
    ImageUnavailable(String),
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

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
    pub store: Store,
    /// Upstream concurrency budget; see `domain::admission`.
    admission: Mutex<Admission>,
    /// The writer that commits status changes in groups (`group_commit`).
    group_commit: group_commit::GroupCommit,
    /// When this replica last folded the usage aggregates' shards (`service::usage`).
    usage_folded_at: std::sync::atomic::AtomicI64,
    /// The overview's units-in-flight chart (`dashboard.rs`), kept for an hour in this process.
    units_history: Mutex<std::collections::VecDeque<dashboard::UnitsSample>>,
    pub upstream: CometClient,
    /// Set while upstream refuses the setup (key, IP, account, route); see `domain::halt`.
    halt: Mutex<DispatchHalt>,
    pub settings: Arc<Settings>,
    token_key: Vec<u8>,
    /// Wakes the dispatcher when a task is accepted.
    pub dispatch_wake: Notify,
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
        // SQLite has one writer at a time; on Postgres half the pool commits batches at once.
        let writers = match store.backend() {
            "postgres" => (settings.database.max_connections as usize / 2).max(1),
            _ => 1,
        };
        let group_commit = group_commit::GroupCommit::start(
            store.clone(),
            writers,
            settings.database.group_commit_max_batch,
            settings.database.group_commit_max_wait,
        );
        Ok(Relay {
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
            poll_wake: Notify::new(),
            changes,
        })
    }

    fn mac(&self, task_id: &str) -> Hmac<Sha256> {
        token_mac(&self.token_key, task_id)
    }

    /// The unguessable token that authorises callbacks for one task.
    pub fn webhook_token(&self, task_id: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.mac(task_id).finalize().into_bytes())
    }

    /// Constant-time check of a callback token.
    pub fn verify_webhook_token(&self, task_id: &str, token: &str) -> bool {
        match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token) {
            Ok(raw) => self.mac(task_id).verify_slice(&raw).is_ok(),
            Err(_) => false,
        }
    }

    /// Where upstream should call back for a task; None when no public URL is configured. The
    /// token is a path segment, not a query parameter: proxies and gateways drop or rewrite
    /// query strings, and a callback without its token is refused.
    pub fn callback_url(&self, task_id: &str) -> Option<String> {
        let base = self.settings.server.public_url.trim_end_matches('/');
        if base.is_empty() {
            return None;
        }
        Some(format!(
            "{base}/webhooks/cometapi/{task_id}/{}",
            self.webhook_token(task_id)
        ))
    }

    /// Whether `kling-relay doctor` left this nonce for the service to serve.
    pub async fn doctor_nonce_valid(&self, nonce: &str) -> Result<bool, ServiceError> {
        // A nonce is a UUID: anything else is not worth a database read.
        if uuid::Uuid::parse_str(nonce).is_err() {
            return Ok(false);
        }
        Ok(self.store.doctor_nonce_valid(nonce, now_ms()).await?)
    }

    /// Why the service is not ready, if it is not: the database (answering, migrations current),
    /// a halted dispatch, or an archive folder it cannot write.
    pub async fn readiness(&self) -> Result<(), String> {
        self.store.readiness().await?;
        if let Some(h) = self.halted() {
            return Err(format!(
                "dispatch halted ({}): {}",
                h.reason.as_str(),
                h.reason.advice()
            ));
        }
        let a = &self.settings.archive;
        if a.enabled && a.backend == crate::config::ArchiveBackend::Local {
            let probe = std::path::Path::new(&a.path)
                .join(format!(".readyz-{}", uuid::Uuid::new_v4().simple()));
            let written = tokio::fs::write(&probe, b"ok").await;
            let _ = tokio::fs::remove_file(&probe).await;
            // The folder is named by its setting, not its absolute path.
            written
                .map_err(|e| format!("the archive folder (archive.path) cannot be written: {e}"))?;
        }
        Ok(())
    }

    /// The halt in force, if upstream refuses the setup.
    pub fn halted(&self) -> Option<Halt> {
        self.halt_state().current().cloned()
    }

    /// Why dispatch is halted, if it is (without copying the halt's texts).
    pub fn halt_reason(&self) -> Option<HaltReason> {
        self.halt_state().current().map(|h| h.reason)
    }

    fn halt_state(&self) -> MutexGuard<'_, DispatchHalt> {
        self.halt.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Upstream refused the setup: every dispatch stops until a probe passes.
    pub fn halt_dispatch(&self, reason: HaltReason, code: &str, message: &str) {
        let first = {
            let mut state = self.halt_state();
            let first = state.current().is_none();
            state.halt(now_ms(), reason, code, message);
            first
        };
        if first {
            tracing::error!(
                reason = reason.as_str(),
                upstream_code = code,
                upstream_message = message,
                advice = reason.advice(),
                "dispatch halted: upstream refuses the setup; every task waits, none fails"
            );
        }
        for r in HaltReason::ALL {
            metrics::gauge!("klr_dispatch_halted", "reason" => r.as_str()).set(if r == reason {
                1.0
            } else {
                0.0
            });
        }
    }

    /// A probe (or any call) passed: dispatch resumes.
    pub fn resume_dispatch(&self) {
        if let Some(h) = self.halt_state().resume() {
            tracing::warn!(
                reason = h.reason.as_str(),
                halted_for_ms = now_ms() - h.since_ms,
                "dispatch resumed: upstream accepts the setup again"
            );
            self.dispatch_wake.notify_one();
        }
    }

    /// Whether a probe is due now (and if so, the next is scheduled): the reason to probe.
    pub fn take_halt_probe(&self, jitter: f64) -> Option<HaltReason> {
        self.halt_state().take_probe(now_ms(), jitter)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    pub fn publish(&self, task_id: &str) {
        // No receivers is fine: nobody is waiting.
        let _ = self.changes.send(task_id.to_owned());
    }

    /// Wakes every waiter to re-read: changes may have been missed.
    pub fn publish_all(&self) {
        self.publish(EVERY_TASK);
    }

    /// One submit from `client`'s `limits.client_submits_per_minute`. On Postgres the budget is
    /// a rate in the database, shared by every replica (a minute's worth at most at once, as
    /// here); SQLite has a single instance, whose memory is the whole truth.
    async fn take_submit_budget(&self, client: &str) -> Result<(), ServiceError> {
        let per_minute = self.settings.limits.client_submits_per_minute;
        if self.store.backend() == "postgres" {
            const MINUTE_US: i64 = 60_000_000;
            // A second's worth is taken from the shared cell at a time and spent here, so
            // a busy client costs the database one row lock per batch, not per submit; what a
            // batch leaves unspent lapses after a second.
            // Held across the refill, so concurrent submits do not each take a batch (and burn
            // the client's minute between them).
            let mut stash = self.submit_stash.lock().await;
            let now = now_ms();
            if let Some((left, taken_at)) = stash.get_mut(client) {
                if *left > 0 && now - *taken_at < 1000 {
                    *left -= 1;
                    return Ok(());
                }
            }
            let every = MINUTE_US / i64::from(per_minute.max(1));
            let batch = i64::from(per_minute / 60).clamp(1, 50);
            let (granted, wait_us) = self
                .store
                .take_from_rate(&format!("submits:{client}"), now, batch, every, MINUTE_US)
                .await?;
            if granted == 0 {
                let secs = u64::try_from((wait_us + 999_999) / 1_000_000).unwrap_or(1);
                return Err(ServiceError::RateLimited(secs.max(1)));
            }
            stash.insert(client.to_owned(), (granted - 1, now));
            return Ok(());
        }
        let mut budgets = self
            .submit_budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let budget = budgets
            .entry(client.to_owned())
            .or_insert_with(|| SubmitBudget::new(per_minute));
        budget
            .take(now_ms())
            .map_err(|wait| ServiceError::RateLimited(wait.as_secs().max(1)))
    }

    /// Refuses a notify URL whose host is an address the policy forbids (names are checked
    /// when the notification is sent, against what they resolve to).
    fn check_destination_literal(&self, url: &str) -> Result<(), String> {
        let Ok(u) = url::Url::parse(url) else {
            return Err("must be an absolute http or https URL".into());
        };
        self.network_policy.check_url_host(&u)
    }

    /// The byte-budget share of dispatching a stored task: its Base64 inputs are read back and
    /// written into the create call, which costs memory like a submit of them.
    pub async fn reserve_dispatch_bytes(
        &self,
        id: &str,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ServiceError> {
        let Some(summary) = self.store.input_summary(id).await? else {
            return Ok(None);
        };
        Ok(self
            .reserve_body_bytes(crate::domain::base64_len(&summary))
            .await)
    }

    /// Waits until a request body of `bytes` fits the budget of large bodies in memory at once;
    /// the budget is taken back when the returned permit drops. A Base64 image costs memory a
    /// few times over while it is parsed, checked and stored, so large submits take turns.
    pub async fn reserve_body_bytes(
        &self,
        bytes: usize,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if bytes <= SMALL_BODY_BYTES {
            return None;
        }
        let most = self.settings.server.max_concurrent_body_bytes;
        let n = u32::try_from(bytes.min(most)).unwrap_or(u32::MAX);
        self.body_budget.clone().acquire_many_owned(n).await.ok()
    }

    /// Validates and durably stores a task, then gives the dispatcher up to `dispatch.wait` to
    /// send it upstream, so the usual answer already says `submitted`. With an idempotency key
    /// (scoped to the caller), a repeat of the same request returns the first task instead.
    pub async fn submit(
        &self,
        caller: &Caller,
        body: serde_json::Value,
        idempotency_key: Option<&str>,
        request_id: Option<&str>,
        max_wait: Option<Duration>,
        body_budget: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Submitted, ServiceError> {
        let wire = self.upstream.wire();
        let rules = Rules::api(wire.subject_images, &wire.default_model, &wire.models);
        let req = validate_new_task(&body, rules).map_err(ServiceError::Invalid)?;
        // serde_json orders object keys, so equal JSON hashes equal; hashed as it is written out,
        // so an 80 MB body is not copied into a string for it.
        let request_hash = idempotency_key.map(|_| json_sha256(&body));
        drop(body);
        if let Some(url) = &req.notify_url {
            self.check_destination_literal(url).map_err(|m| {
                ServiceError::Invalid(vec![FieldError {
                    field: "notify_url".into(),
                    message: m,
                }])
            })?;
        }
        if let Caller::Client(name) = caller {
            self.take_submit_budget(name).await?;
        }
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let record = NewTaskRecord {
            external_task_id: format!("klr-{id}"),
            id: id.clone(),
            model_name: req.model_name,
            prompt: req.prompt,
            n: i64::from(req.n),
            aspect_ratio: req.aspect_ratio,
            priority: req.priority,
            metadata: req.metadata.map(serde_json::Value::Object),
            inputs: TaskInputs {
                subject_images: req.subject_images,
                scene_image: req.scene_image,
                style_image: req.style_image,
                negative_prompt: req.negative_prompt,
                watermark_info: req.watermark_info,
            },
            created_at_ms: now,
            client: caller.scope().map(str::to_owned),
            notify_url: req.notify_url,
            request_id: request_id.map(str::to_owned),
        };
        let claim = idempotency_key
            .zip(request_hash)
            .map(|(key, request_hash)| IdempotencyClaim {
                // Keys are the caller's own: two clients may use the same key.
                scope: caller.scope().unwrap_or("").to_owned(),
                key: key.to_owned(),
                request_hash,
                expired_before_ms: now - ms(IDEMPOTENCY_TTL),
            });
        let mut changes = self.subscribe();
        let caps = PendingCaps {
            total: self.settings.dispatch.max_pending,
            per_client: self.settings.limits.client_max_pending,
        };
        let record_n = record.n;
        let inserted = self.store.insert_task(record, claim.as_ref(), caps).await?;
        drop(body_budget);
        match inserted {
            InsertOutcome::Inserted => {}
            InsertOutcome::QueueFull => return Err(ServiceError::QueueFull),
            InsertOutcome::OverBudget(standing) => {
                return Err(ServiceError::BudgetExceeded {
                    standing,
                    requested: record_n,
                })
            }
            InsertOutcome::Existing {
                task_id,
                same_request: true,
            } => {
                return Ok(Submitted {
                    task: self.get(caller, &task_id).await?,
                    created: false,
                })
            }
            InsertOutcome::Existing { .. } => return Err(ServiceError::IdempotencyConflict),
        }
        self.dispatch_wake.notify_one();
        // The caller may ask to wait less (`Prefer: respond-async` or `wait=`): the task is
        // stored either way, and the answer then shows it as it is.
        let wait = max_wait.map_or(self.settings.dispatch.wait, |w| {
            w.min(self.settings.dispatch.wait)
        });
        let _ = tokio::time::timeout(wait, async {
            loop {
                match changes.recv().await {
                    Ok(changed) if changed == id => return,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
        .await;
        Ok(Submitted {
            task: self.get(caller, &id).await?,
            created: true,
        })
    }

    /// The archive records of these tasks' images (only succeeded tasks have any).
    pub async fn archive_records(
        &self,
        tasks: &[Task],
    ) -> Result<Vec<crate::domain::archive::ArchivedImage>, ServiceError> {
        let ids: Vec<String> = tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Succeeded && !t.images.is_empty())
            .map(|t| t.id.clone())
            .collect();
        Ok(self.store.images_of_tasks(&ids).await?)
    }

    /// Image `index` of one of the caller's tasks, from the archive: its record and its bytes.
    pub async fn archived_image(
        &self,
        caller: &Caller,
        id: &str,
        index: u32,
    ) -> Result<
        (
            crate::domain::archive::ArchivedImage,
            crate::archive::Object,
        ),
        ServiceError,
    > {
        self.get(caller, id).await?;
        let records = self.store.task_images(id).await?;
        let Some(record) = records.into_iter().find(|r| r.index == index) else {
            return Err(ServiceError::ImageUnavailable(format!(
                "task {id} has no archived image {index}"
            )));
        };
        let key = match (&record.state, &record.object_key) {
            (crate::domain::archive::ArchiveState::Stored, Some(key)) => key.clone(),
            (state, _) => {
                return Err(ServiceError::ImageUnavailable(format!(
                    "image {index} of task {id} is not in the archive (state {state})"
                )))
            }
        };
        let object = self.archive.get(&key).await.map_err(|e| match e {
            crate::archive::ArchiveError::NotFound => ServiceError::ImageUnavailable(format!(
                "image {index} of task {id} is missing from the archive"
            )),
            other => ServiceError::Archive(other),
        })?;
        Ok((record, object))
    }

    /// Cancels a task that has not been sent upstream.
    pub async fn cancel(&self, caller: &Caller, id: &str) -> Result<Task, ServiceError> {
        self.get(caller, id).await?;
        self.decide_and_commit(id, EventSource::Api, None, |task| {
            cancel(&task.state()).map_err(ServiceError::CannotCancel)
        })
        .await?;
        self.get(caller, id).await
    }

    pub async fn dispatch_status(&self) -> Result<DispatchStatus, ServiceError> {
        let admission = self.admission_snapshot().await?;
        Ok(DispatchStatus {
            admission,
            units_in_flight: self.store.units_in_flight().await?,
            pending: self.store.pending_count().await?,
            halted: self.halted(),
        })
    }

    /// How the account's units are shared: per client, units held and tasks waiting now, and
    /// unit-time over the last hour.
    pub async fn client_usage(&self) -> Result<Vec<crate::storage::ClientUsage>, ServiceError> {
        const HOUR_MS: i64 = 3600 * 1000;
        let now = now_ms();
        // Tasks that started more than an hour before the window are left out of it.
        Ok(self.store.client_usage(now, now - HOUR_MS, HOUR_MS).await?)
    }

    /// A task the caller owns. Another client's task is "not found", never "forbidden".
    pub async fn get(&self, caller: &Caller, id: &str) -> Result<Task, ServiceError> {
        match self.store.get_task(id).await? {
            Some(t) if caller.owns(t.client.as_deref()) => Ok(t),
            _ => Err(ServiceError::NotFound),
        }
    }

    /// A task whoever owns it (workers and webhooks).
    pub async fn get_any(&self, id: &str) -> Result<Task, ServiceError> {
        self.store.get_task(id).await?.ok_or(ServiceError::NotFound)
    }

    pub async fn list(
        &self,
        caller: &Caller,
        filter: &ListFilter,
    ) -> Result<Vec<Task>, ServiceError> {
        let mut filter = filter.clone();
        filter.client = caller.scope().map(str::to_owned);
        Ok(self.store.list_tasks(&filter).await?)
    }

    pub async fn events(&self, caller: &Caller, id: &str) -> Result<Vec<TaskEvent>, ServiceError> {
        self.get(caller, id).await?;
        Ok(self.store.events(id).await?)
    }

    /// The notification a change produces: the task as it will be, to the task's own
    /// `notify_url` or else its client's default.
    async fn notification_for(
        &self,
        task: &Task,
        change: &crate::domain::Change,
        source: EventSource,
        now: i64,
    ) -> Result<Option<OutboxEntry>, ServiceError> {
        let Some(client) = &task.client else {
            return Ok(None);
        };
        let url = match &task.notify_url {
            Some(u) => u.clone(),
            None => match self.client_default_url(client, now).await? {
                Some(u) => u,
                None => return Ok(None),
            },
        };
        Ok(Some(OutboxEntry {
            id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
            client: client.clone(),
            url,
            payload: crate::resource::task_json(task.after(change, source, now))
                .map_err(|e| StorageError::Corrupt(format!("task {} as JSON: {e}", task.id)))?,
        }))
    }

    pub(super) async fn client_default_url(
        &self,
        client: &str,
        now: i64,
    ) -> Result<Option<String>, ServiceError> {
        let cached = self
            .client_urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(client)
            .filter(|(_, at)| now - at < ms(CLIENT_URL_TTL))
            .map(|(url, _)| url.clone());
        if let Some(url) = cached {
            return Ok(url);
        }
        let url = self
            .store
            .get_client(client)
            .await?
            .and_then(|c| c.notify_url);
        self.client_urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client.to_owned(), (url.clone(), now));
        Ok(url)
    }

    /// When a task that just moved to `status` should first be polled.
    fn poll_due_after_change(&self, status: TaskStatus, now: i64) -> Option<i64> {
        matches!(status, TaskStatus::Submitted | TaskStatus::Processing)
            .then(|| now + ms(self.settings.poller.first_poll_after))
    }

    /// Applies what upstream says about a task, whichever way it arrived.
    pub async fn apply_report(
        &self,
        id: &str,
        source: EventSource,
        report: &UpstreamReport,
    ) -> Result<ApplyOutcome, ServiceError> {
        self.decide_and_commit(id, source, report.raw.as_ref(), |task| {
            Ok(apply_report(&task.state(), report)?)
        })
        .await
    }

    /// A callback with a valid token whose upstream ids do not match the task: someone between
    /// upstream and us renamed something. Nothing is applied from it; the task is polled at
    /// once, so the truth comes from the query, and the timeline says why.
    pub async fn poll_after_mismatch(
        &self,
        id: &str,
        source: EventSource,
        mismatch: &ReportMismatch,
        raw: Option<&serde_json::Value>,
    ) -> Result<(), ServiceError> {
        let detail = format!("{mismatch}; polling upstream to settle the task");
        let payload = raw.map(capped_payload);
        self.store
            .note_and_poll_now(id, now_ms(), source, &detail, payload.as_deref())
            .await?;
        self.poll_wake.notify_one();
        self.publish(id);
        Ok(())
    }

    /// Ends a task with an error unless it is already final.
    pub async fn finish(
        &self,
        id: &str,
        source: EventSource,
        status: TaskStatus,
        error: TaskError,
    ) -> Result<ApplyOutcome, ServiceError> {
        self.decide_and_commit(id, source, None, |task| {
            Ok(finish_with_error(&task.state(), status, error.clone()))
        })
        .await
    }

    /// Ends a task upstream never took (its create was refused, or it could not be sent):
    /// failed, and recorded as costing nothing, since no upstream task was created to charge.
    pub async fn refuse(&self, id: &str, error: TaskError) -> Result<ApplyOutcome, ServiceError> {
        self.decide_and_commit(id, EventSource::Dispatch, None, |task| {
            Ok(
                match finish_with_error(&task.state(), TaskStatus::Failed, error.clone()) {
                    Transition::Apply(mut change) => {
                        change.final_unit_deduction = Some("0".into());
                        Transition::Apply(change)
                    }
                    ignore => ignore,
                },
            )
        })
        .await
    }

    async fn decide_and_commit(
        &self,
        id: &str,
        source: EventSource,
        upstream_payload: Option<&serde_json::Value>,
        decide: impl Fn(&Task) -> Result<Transition, ServiceError>,
    ) -> Result<ApplyOutcome, ServiceError> {
        // Written only with a change: most reports (duplicates, unchanged polls) are ignored.
        let mut payload_text: Option<String> = None;
        for _ in 0..MAX_CHANGE_ATTEMPTS {
            let task = self.get_any(id).await?;
            let change = match decide(&task)? {
                Transition::Ignore(reason) => return Ok(ApplyOutcome::Ignored(reason)),
                Transition::Apply(change) => change,
            };
            if payload_text.is_none() {
                payload_text = upstream_payload.map(capped_payload);
            }
            let now = now_ms();
            let poll_due = self.poll_due_after_change(change.status, now);
            let outbox = self.notification_for(&task, &change, source, now).await?;
            let notifies = outbox.is_some();
            if self
                .group_commit
                .commit(OwnedCommit {
                    id: id.to_owned(),
                    expected_version: task.version,
                    change: change.clone(),
                    source,
                    now_ms: now,
                    poll_due_at_ms: poll_due,
                    outbox,
                    archive: self.settings.archive.enabled,
                    upstream_payload: payload_text.clone(),
                    leaves_pending: task.status == TaskStatus::Pending
                        && change.status != TaskStatus::Pending,
                })
                .await?
            {
                if self.settings.archive.enabled && change.status == TaskStatus::Succeeded {
                    self.archive_wake.notify_one();
                }
                tracing::info!(task_id = %id, source = source.as_str(), status = %change.status, "task status changed");
                metrics::counter!("klr_task_status_changes_total", "status" => change.status.as_str(), "source" => source.as_str()).increment(1);
                if change.status.is_final() {
                    self.on_task_ended(&task, &change).await;
                }
                if task.status.holds_upstream_units() && change.status.is_final() {
                    if matches!(change.status, TaskStatus::Succeeded | TaskStatus::Failed) {
                        self.admission_finished(task.n).await;
                    }
                    // Units were freed: pending work may fit now.
                    self.dispatch_wake.notify_one();
                }
                if notifies {
                    self.notify_wake.notify_one();
                }
                self.publish(id);
                return Ok(ApplyOutcome::Applied(change.status));
            }
        }
        Err(ServiceError::Contended)
    }
}

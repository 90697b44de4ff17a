//! Keeps our own copy of succeeded tasks' images before upstream's URLs expire.
//!
//! Each image of a success is queued in the success's own transaction (`task_images`). This
//! worker claims due images with a lease (see `storage::claims`), fetches each within
//! `archive.timeout` and `archive.max_image_bytes`, keeps it only if its bytes are a PNG or JPEG,
//! writes it under a key fixed per image (so a fetch repeated after a crash overwrites, never
//! duplicates), and records its SHA-256. Network failures and 5xx are retried with backoff; a
//! 4xx, a non-image, an oversized body or a forbidden source fails the image at once. A failed
//! image never fails its task. The same loop runs the retention sweep.
//!
//! Longer than 400 lines: fetching, the retention sweep and `archive backfill` share one
//! claim-and-fetch loop and its error handling.

use super::{for_each_bounded, jitter, PolicyResolver};
use crate::domain::archive::{object_key, ArchivedImage, ImageFormat, SourcePolicy};
use crate::domain::archive::{ArchiveSetback, StoredImage};
use crate::domain::notify::NetworkPolicy;
use crate::domain::schedule::backoff;
use crate::service::{ms, now_ms, Relay, ServiceError};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often due work is looked for when nothing wakes the archiver.
const TICK: Duration = Duration::from_secs(1);
/// Images removed per sweep pass.
const SWEEP_BATCH: i64 = 200;

/// Why a fetch stored nothing.
#[derive(Debug)]
struct Setback {
    /// Worth trying again later (network, timeout, 5xx, storage).
    retry: bool,
    reason: String,
}

fn give_up(reason: impl Into<String>) -> Setback {
    Setback {
        retry: false,
        reason: reason.into(),
    }
}

fn retry(reason: impl Into<String>) -> Setback {
    Setback {
        retry: true,
        reason: reason.into(),
    }
}

/// An error and its causes on one line (reqwest's own message often leaves out the cause).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Checks a URL's scheme, host and (for an address literal, which is never resolved) address.
fn check_source(
    source: &SourcePolicy,
    network: &NetworkPolicy,
    url: &url::Url,
) -> Result<(), String> {
    source.check(url)?;
    network.check_url_host(url)
}

pub struct Archiver {
    relay: Arc<Relay>,
    http: reqwest::Client,
    source: SourcePolicy,
    network: NetworkPolicy,
}

impl Archiver {
    pub fn new(relay: Arc<Relay>) -> anyhow::Result<Archiver> {
        let a = &relay.settings.archive;
        let source = SourcePolicy {
            allowed_hosts: a.allowed_hosts.clone(),
            allow_http: a.allow_http,
        };
        // Link-local and metadata addresses are refused, and (the URL coming from upstream, or
        // from anyone holding a callback token) this host and private networks unless
        // archive.allowed_hosts lists the host.
        let mut network = NetworkPolicy::parse(&[], &[]).map_err(anyhow::Error::msg)?;
        network.refuse_internal = true;
        network.exempt_hosts = a.allowed_hosts.clone();
        let max_redirects = a.max_redirects;
        let (rs, rn) = (source.clone(), network.clone());
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                let n = attempt.previous().len();
                return attempt.error(format!("more than {max_redirects} redirects ({n})"));
            }
            match check_source(&rs, &rn, attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(format!("redirect refused: {e}")),
            }
        });
        let http = reqwest::Client::builder()
            .timeout(a.timeout)
            .redirect(redirects)
            .user_agent(concat!("kling-relay/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(PolicyResolver {
                policy: network.clone(),
            }))
            .build()?;
        Ok(Archiver {
            relay,
            http,
            source,
            network,
        })
    }

    /// One pass: claims due images and archives them. Returns how many it worked on.
    pub async fn step(self: &Arc<Self>) -> Result<usize, ServiceError> {
        let a = &self.relay.settings.archive;
        let now = now_ms();
        // Outlasts one fetch and the write of its bytes; see `storage::claims` on leases.
        let lease_until = now + 2 * ms(a.timeout) + 5_000;
        let due = self
            .relay
            .claim_images_to_archive(now, a.concurrency as i64, lease_until)
            .await?;
        let n = due.len();
        let me = self.clone();
        for_each_bounded(due, a.concurrency, move |img| {
            let me = me.clone();
            async move {
                let (task, index) = (img.task_id.clone(), img.index);
                if let Err(e) = me.archive_one(img).await {
                    tracing::error!(task_id = %task, index, error = %e, "archive outcome not recorded; it will be retried");
                }
            }
        })
        .await;
        Ok(n)
    }

    async fn archive_one(&self, img: ArchivedImage) -> Result<(), ServiceError> {
        let store = &self.relay;
        let started = Instant::now();
        let result = match self.fetch(&img.url).await {
            Ok((bytes, format)) => self.keep(&img, bytes, format).await,
            Err(s) => Err(s),
        };
        let outcome = match &result {
            Ok(()) => "stored",
            Err(s) if s.retry => "retry",
            Err(_) => "failed",
        };
        metrics::counter!("klr_archive_fetches_total", "result" => outcome).increment(1);
        let Err(setback) = result else {
            tracing::info!(task_id = %img.task_id, index = img.index, elapsed = ?started.elapsed(), "image archived");
            return Ok(());
        };
        let a = &self.relay.settings.archive;
        let then = if setback.retry && img.attempts < a.max_attempts {
            let attempt = u32::try_from(img.attempts.saturating_sub(1)).unwrap_or(u32::MAX);
            let delay = backoff(attempt, a.retry_initial, a.retry_max, jitter());
            ArchiveSetback::RetryAt(now_ms() + ms(delay))
        } else {
            ArchiveSetback::GiveUp
        };
        tracing::warn!(task_id = %img.task_id, index = img.index, reason = %setback.reason, ?then, "image not archived");
        let reason = if setback.retry && matches!(then, ArchiveSetback::GiveUp) {
            format!(
                "{} (gave up after {} attempts)",
                setback.reason, img.attempts
            )
        } else {
            setback.reason
        };
        store
            .image_setback(&img.task_id, img.index, &reason, then, now_ms())
            .await?;
        Ok(())
    }

    /// Writes the bytes to the archive and records them.
    async fn keep(
        &self,
        img: &ArchivedImage,
        bytes: Bytes,
        format: ImageFormat,
    ) -> Result<(), Setback> {
        let key = object_key(&img.task_id, img.index, format);
        let sha256 = crate::domain::client::hex_sha256(&bytes);
        let size = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        self.relay.archive.put(&key, bytes).await.map_err(|e| {
            // The storage's own message can hold absolute paths or bucket details: the log
            // has it, the client-visible error does not.
            tracing::warn!(task_id = %img.task_id, index = img.index, error = %e, "archive write failed");
            retry("the archive storage refused the write (see the service log)")
        })?;
        self.relay
            .image_kept(
                &img.task_id,
                img.index,
                &StoredImage {
                    object_key: &key,
                    content_type: format.content_type(),
                    size_bytes: size,
                    sha256: &sha256,
                },
                now_ms(),
            )
            .await
            .map_err(|e| retry(e.to_string()))?;
        Ok(())
    }

    async fn fetch(&self, raw: &str) -> Result<(Bytes, ImageFormat), Setback> {
        let max = self.relay.settings.archive.max_image_bytes;
        let url = url::Url::parse(raw).map_err(|e| give_up(format!("not a URL: {e}")))?;
        check_source(&self.source, &self.network, &url)
            .map_err(|e| give_up(format!("source refused: {e}")))?;
        let mut resp = self.http.get(url).send().await.map_err(|e| {
            if e.is_redirect() {
                give_up(with_causes(&e.without_url()))
            } else {
                retry(format!("fetch failed: {}", with_causes(&e.without_url())))
            }
        })?;
        let status = resp.status();
        if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
            return Err(give_up(format!("upstream answered HTTP {status}")));
        }
        if !status.is_success() {
            return Err(retry(format!("upstream answered HTTP {status}")));
        }
        let declared = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        if let Some(len) = resp.content_length() {
            if len > max {
                return Err(give_up(format!(
                    "too large: {len} bytes (archive.max_image_bytes is {max})"
                )));
            }
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| retry(format!("reading the image failed: {}", e.without_url())))?
        {
            if (body.len() + chunk.len()) as u64 > max {
                return Err(give_up(format!(
                    "too large: over {max} bytes (archive.max_image_bytes)"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let format = ImageFormat::sniff(&body).ok_or_else(|| {
            give_up(format!(
                "not a PNG or JPEG image (content-type {declared}, {} bytes)",
                body.len()
            ))
        })?;
        Ok((body.freeze(), format))
    }

    /// Removes copies older than `archive.retention`, recording each removal.
    pub async fn sweep(&self) -> Result<usize, ServiceError> {
        let Some(keep_for) = self.relay.settings.archive.retention else {
            return Ok(0);
        };
        let store = &self.relay;
        let expired = store
            .images_past_retention(now_ms() - ms(keep_for), SWEEP_BATCH)
            .await?;
        let mut removed = 0;
        for img in expired {
            if let Some(key) = &img.object_key {
                if let Err(e) = self.relay.archive.delete(key).await {
                    tracing::warn!(task_id = %img.task_id, index = img.index, error = %e, "retention sweep could not delete an image; will retry");
                    continue;
                }
            }
            if store
                .image_removed(&img.task_id, img.index, now_ms())
                .await?
            {
                removed += 1;
            }
        }
        if removed > 0 {
            metrics::counter!("klr_archive_deleted_total").increment(removed as u64);
            tracing::info!(
                removed,
                retention = %humantime::format_duration(keep_for),
                "retention sweep removed archived images"
            );
        }
        Ok(removed)
    }
}

pub async fn run(relay: Arc<Relay>, shutdown: CancellationToken) {
    if !relay.settings.archive.enabled {
        return;
    }
    let archiver = match Archiver::new(relay.clone()) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            tracing::error!(error = %e, "archiver cannot start; images stay queued");
            return;
        }
    };
    let sweep_every = relay
        .settings
        .archive
        .retention
        .map(|r| (r / 10).clamp(Duration::from_millis(100), Duration::from_secs(60)));
    let mut last_sweep: Option<Instant> = None;
    tracing::info!("archiver started");
    while !shutdown.is_cancelled() {
        let worked = match archiver.step().await {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::error!(error = %e, "archiver pass failed");
                false
            }
        };
        if let Some(every) = sweep_every {
            if last_sweep.is_none_or(|t| t.elapsed() >= every) {
                last_sweep = Some(Instant::now());
                if let Err(e) = archiver.sweep().await {
                    tracing::error!(error = %e, "retention sweep failed");
                }
            }
        }
        if worked {
            continue;
        }
        let tick = sweep_every.map_or(TICK, |s| s.min(TICK));
        tokio::select! {
            _ = relay.archive_wake.notified() => {}
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    tracing::info!("archiver stopped");
}

/// What `archive backfill` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BackfillReport {
    /// Tasks whose images were queued by this run.
    pub tasks_queued: u64,
    /// Images this run stored, gave up on, or left pending (retrying later, by the service).
    pub stored: u64,
    pub failed: u64,
    pub pending: u64,
}

/// Queues the images of succeeded tasks that have no archive records (they succeeded before
/// archiving was on), `batch` tasks at a time, and archives each batch before the next.
/// `progress(done, total)` follows the tasks. Stopping it loses nothing: queued images stay
/// queued for the service's archiver or the next run, and queued tasks are not queued again.
pub async fn backfill(
    relay: Arc<Relay>,
    batch: i64,
    progress: impl Fn(u64, u64),
) -> anyhow::Result<BackfillReport> {
    let archiver = Arc::new(Archiver::new(relay.clone())?);
    let store = &relay;
    let total = u64::try_from(store.unarchived_count().await?).unwrap_or(0);
    let mut report = BackfillReport::default();
    let mut after = String::new();
    progress(0, total);
    loop {
        let tasks = store.unarchived_tasks(&after, batch.max(1)).await?;
        let Some((last, _)) = tasks.last() else { break };
        after = last.clone();
        let mut ids = Vec::new();
        for (id, images) in &tasks {
            store.queue_images(id, images, now_ms()).await?;
            ids.push(id.clone());
        }
        // Archive what is due now; retries due later are left to the service.
        while archiver.step().await? > 0 {}
        for img in store.images_of_tasks(&ids).await? {
            match img.state {
                crate::domain::archive::ArchiveState::Stored => report.stored += 1,
                crate::domain::archive::ArchiveState::Failed => report.failed += 1,
                _ => report.pending += 1,
            }
        }
        report.tasks_queued += tasks.len() as u64;
        progress(report.tasks_queued, total.max(report.tasks_queued));
    }
    Ok(report)
}

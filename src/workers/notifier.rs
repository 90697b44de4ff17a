//! Delivers notifications from the outbox to clients, signed per Standard Webhooks.
//!
//! Deliveries run on their own HTTP client and their own tasks: a slow or dead receiver holds
//! at most `per_url_concurrency` of the `concurrency` delivery slots and never slows webhook
//! intake, dispatch or polling. A claimed delivery's next attempt is pushed past the request's
//! time limit first, so a crash mid-attempt means another attempt, never a lost notification.

use super::{jitter, PolicyResolver};
use crate::domain::delivery::{AttemptRecord, DueDelivery, NextStep};
use crate::domain::notify::{next_delay, signature_header};
use crate::service::{ms, now_ms, Relay, ServiceError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How often the outbox is checked when nothing wakes the notifier.
const TICK: Duration = Duration::from_millis(250);

struct Notifier {
    relay: Arc<Relay>,
    http: reqwest::Client,
    slots: Arc<Semaphore>,
    per_url: Mutex<HashMap<String, Arc<Semaphore>>>,
}

pub async fn run(relay: Arc<Relay>, shutdown: CancellationToken) {
    let n = &relay.settings.notifications;
    let http = match reqwest::Client::builder()
        .timeout(n.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("kling-relay/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(PolicyResolver {
            policy: relay.network_policy.clone(),
        }))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "notifier cannot build its HTTP client; notifications stay queued");
            return;
        }
    };
    let notifier = Arc::new(Notifier {
        slots: Arc::new(Semaphore::new(n.concurrency)),
        per_url: Mutex::new(HashMap::new()),
        http,
        relay: relay.clone(),
    });
    tracing::info!("notifier started");
    let mut in_flight = tokio::task::JoinSet::new();
    while !shutdown.is_cancelled() {
        while in_flight.try_join_next().is_some() {}
        if let Err(e) = notifier.start_due(&mut in_flight).await {
            tracing::error!(error = %e, "notifier pass failed");
        }
        tokio::select! {
            _ = relay.notify_wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    // Attempts under way finish (each is bounded by the request timeout).
    while in_flight.join_next().await.is_some() {}
    tracing::info!("notifier stopped");
}

impl Notifier {
    fn url_slots(&self, url: &str) -> Arc<Semaphore> {
        let mut map = self.per_url.lock().unwrap_or_else(|p| p.into_inner());
        // Forget idle URLs so the map does not grow without bound.
        let per_url = self.relay.settings.notifications.per_url_concurrency;
        if map.len() > 10_000 {
            map.retain(|_, s| s.available_permits() < per_url);
        }
        map.entry(url.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(per_url)))
            .clone()
    }

    /// Starts an attempt for every due delivery that has a free slot, without waiting for them.
    async fn start_due(
        self: &Arc<Self>,
        in_flight: &mut tokio::task::JoinSet<()>,
    ) -> Result<(), ServiceError> {
        let now = now_ms();
        let lease = ms(self.relay.settings.notifications.timeout) + 5_000;
        let claimed = self
            .relay
            .claim_deliveries(now, 256, now + lease, |d| {
                // Only what can start now is claimed: a busy URL's deliveries stay due for a
                // later pass (or another replica) instead of sitting out a lease.
                let slot = self.slots.clone().try_acquire_owned().ok()?;
                let url_slot = self.url_slots(&d.url).try_acquire_owned().ok()?;
                Some((slot, url_slot))
            })
            .await?;
        for (d, (slot, url_slot)) in claimed {
            let me = self.clone();
            in_flight.spawn(async move {
                let id = d.id.clone();
                if let Err(e) = me.attempt(d, (slot, url_slot)).await {
                    tracing::error!(delivery_id = %id, error = %e, "delivery attempt not recorded; it will be retried");
                }
            });
        }
        Ok(())
    }

    async fn attempt(
        &self,
        d: DueDelivery,
        _slots: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) -> Result<(), ServiceError> {
        let started = Instant::now();
        let outcome = self.send(&d).await;
        let at = now_ms();
        let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let attempts_made = usize::try_from(d.attempts + 1).unwrap_or(usize::MAX);
        let schedule = self.relay.settings.notifications.schedule();
        let retry =
            |retry_after: Option<Duration>| match next_delay(&schedule, attempts_made, jitter()) {
                Some(delay) => {
                    NextStep::RetryAt(at + ms(retry_after.map_or(delay, |r| delay.max(r))))
                }
                None => NextStep::Dead,
            };
        let record = match outcome {
            Sent::Status(code, _) if (200..300).contains(&code) => AttemptRecord {
                at_ms: at,
                status_code: Some(i64::from(code)),
                error: None,
                duration_ms,
                next: NextStep::Delivered,
            },
            Sent::Status(410, _) => AttemptRecord {
                at_ms: at,
                status_code: Some(410),
                error: Some("410 Gone: this URL is disabled for the client".into()),
                duration_ms,
                next: NextStep::Disabled,
            },
            Sent::Status(code, retry_after) => AttemptRecord {
                at_ms: at,
                status_code: Some(i64::from(code)),
                error: Some(if (300..400).contains(&code) {
                    format!("HTTP {code}: redirects are not followed")
                } else {
                    format!("HTTP {code}")
                }),
                duration_ms,
                next: retry(retry_after),
            },
            Sent::Failed(error) => AttemptRecord {
                at_ms: at,
                status_code: None,
                error: Some(error),
                duration_ms,
                next: retry(None),
            },
            Sent::Refused(error) => AttemptRecord {
                at_ms: at,
                status_code: None,
                error: Some(error),
                duration_ms,
                next: NextStep::Dead,
            },
        };
        tracing::info!(delivery_id = %d.id, task_id = %d.task_id, status = ?record.status_code, next = ?record.next, "notification attempt");
        let result = match record.next {
            NextStep::Delivered => "delivered",
            NextStep::RetryAt(_) => "failed",
            NextStep::Dead => "dead",
            NextStep::Disabled => "disabled",
        };
        metrics::counter!("klr_notification_attempts_total", "result" => result).increment(1);
        self.relay.record_delivery_attempt(&d, &record).await?;
        Ok(())
    }

    async fn send(&self, d: &DueDelivery) -> Sent {
        if let Err(why) = self.check_destination(&d.url).await {
            return Sent::Refused(why);
        }
        let client = match self.relay.notified_client(&d.client).await {
            Ok(Some(c)) => c,
            Ok(None) => return Sent::Refused(format!("client `{}` no longer exists", d.client)),
            Err(e) => return Sent::Failed(format!("database: {e}")),
        };
        let ts = now_ms() / 1000;
        let signature = signature_header(
            &client.signing_secrets(now_ms()),
            &d.id,
            ts,
            d.payload.as_bytes(),
        );
        let resp = self
            .http
            .post(&d.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &d.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(d.payload.clone())
            .send()
            .await;
        match resp {
            Ok(r) => Sent::Status(
                r.status().as_u16(),
                r.headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::domain::schedule::retry_after_seconds),
            ),
            Err(e) if e.is_timeout() => Sent::Failed("timed out".into()),
            Err(e) if e.is_connect() => Sent::Failed("connection failed".into()),
            Err(_) => Sent::Failed("request failed".into()),
        }
    }

    /// http(s) only, and every address the host stands for must be allowed. A refusal here is
    /// final and says why; the resolver repeats the check at connect time, so a name that
    /// changes its answer in between still reaches no refused address.
    async fn check_destination(&self, url: &str) -> Result<(), String> {
        let u = url::Url::parse(url).map_err(|_| "not a URL".to_owned())?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err("only http and https destinations".into());
        }
        let policy = &self.relay.network_policy;
        match u.host() {
            Some(url::Host::Domain(name)) => {
                let port = u.port_or_known_default().unwrap_or(80);
                match tokio::net::lookup_host((name, port)).await {
                    Ok(addrs) => {
                        for a in addrs {
                            policy.check_host(name, a.ip())?;
                        }
                        Ok(())
                    }
                    // Resolution can fail for a while; that is worth a retry, the send will say.
                    Err(_) => Ok(()),
                }
            }
            Some(_) => policy.check_url_host(&u),
            None => Err("URL has no host".into()),
        }
    }
}

enum Sent {
    Status(u16, Option<Duration>),
    Failed(String),
    Refused(String),
}

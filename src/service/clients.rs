//! Who is calling: API-key authentication, and client administration for the CLI and
//! `serve --simulate`.

use super::{now_ms, Relay, ServiceError};
use crate::domain::client::{
    api_key_from, hash_api_key, key_prefix, signing_secret_from, validate_client_name, Caller,
    Client, MAX_WEIGHT,
};
use crate::domain::validation::check_notify_url;
use crate::storage::{ClientError, Store};
use std::time::Duration;

/// Name of the stored plaintext key of the `--simulate` demo client (a demo convenience: real
/// clients' keys are only ever stored hashed).
const DEMO_KEY_SECRET: &str = "demo_client_api_key";
pub const DEMO_CLIENT: &str = "demo";

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Relay {
    /// Resolves the `Authorization: Bearer` key. Without a key: anyone, if authentication is
    /// off. Every failure is the same 401, saying nothing about which clients exist.
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, ServiceError> {
        let Some(key) = bearer.map(str::trim).filter(|k| !k.is_empty()) else {
            return if self.settings.auth.required {
                Err(ServiceError::Unauthorized)
            } else {
                Ok(Caller::Anyone)
            };
        };
        let hash = hash_api_key(key);
        match self.key_reads.get(&hash).await? {
            Some((client, stored)) if constant_time_eq(stored.as_bytes(), hash.as_bytes()) => {
                if client.is_revoked() {
                    Err(ServiceError::Unauthorized)
                } else {
                    Ok(Caller::Client(client.name))
                }
            }
            _ => Err(ServiceError::Unauthorized),
        }
    }
}

/// Dashboard sessions. The cookie carries a random id, never the API key: a stolen cookie is not a
/// key, and signing out or revoking the client ends it on the server.
impl Relay {
    /// Checks `key` like the API does and opens a session for its client; returns the session id.
    pub async fn sign_in(&self, key: &str) -> Result<String, ServiceError> {
        let Caller::Client(name) = self.authenticate(Some(key)).await? else {
            return Err(ServiceError::Unauthorized);
        };
        let id = session_id_from(rand::random());
        let now = now_ms();
        let (idle_cutoff, created_cutoff) = self.session_cutoffs(now);
        // Housekeeping where it costs nothing noticeable: sign-ins are rare.
        self.store
            .delete_dead_sessions(idle_cutoff, created_cutoff)
            .await?;
        self.store
            .create_session(&hash_api_key(&id), &name, now)
            .await?;
        Ok(id)
    }

    /// The caller a session cookie stands for. Without one: anyone, if authentication is off.
    pub async fn session_caller(&self, session_id: Option<&str>) -> Result<Caller, ServiceError> {
        let anonymous = || {
            if self.settings.auth.required {
                Err(ServiceError::Unauthorized)
            } else {
                Ok(Caller::Anyone)
            }
        };
        let Some(id) = session_id.filter(|id| !id.is_empty()) else {
            return anonymous();
        };
        let hash = hash_api_key(id);
        let now = now_ms();
        let (idle_cutoff, created_cutoff) = self.session_cutoffs(now);
        match self
            .store
            .live_session(&hash, idle_cutoff, created_cutoff)
            .await?
        {
            Some((client, last_seen)) => {
                // Written at most a few times per idle period, not on every page.
                let granularity = (self.settings.auth.session_idle_timeout / 4)
                    .min(Duration::from_secs(60))
                    .as_millis() as i64;
                if now - last_seen >= granularity {
                    self.store.touch_session(&hash, now).await?;
                }
                Ok(Caller::Client(client))
            }
            None => anonymous(),
        }
    }

    pub async fn sign_out(&self, session_id: &str) -> Result<(), ServiceError> {
        self.store.delete_session(&hash_api_key(session_id)).await?;
        Ok(())
    }

    /// Whether a caller authenticated earlier still is (its client not revoked since).
    pub async fn still_authorized(&self, caller: &Caller) -> Result<bool, ServiceError> {
        match caller {
            Caller::Anyone => Ok(true),
            Caller::Client(name) => Ok(self
                .store
                .get_client(name)
                .await?
                .is_some_and(|c| !c.is_revoked())),
        }
    }

    fn session_cutoffs(&self, now: i64) -> (i64, i64) {
        let auth = &self.settings.auth;
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        (
            now.saturating_sub(ms(auth.session_idle_timeout)),
            now.saturating_sub(ms(auth.session_lifetime)),
        )
    }
}

/// `kls_` + base64url of 32 random bytes.
fn session_id_from(random: [u8; 32]) -> String {
    use base64::Engine;
    format!(
        "kls_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    )
}

/// A client just created: the key is shown this once.
#[derive(Clone, serde::Serialize)]
pub struct NewClient {
    pub name: String,
    pub api_key: String,
    pub signing_secret: String,
}

impl std::fmt::Debug for NewClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewClient")
            .field("name", &self.name)
            .field("api_key", &"[redacted]")
            .field("signing_secret", &"[redacted]")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

pub async fn create_client(
    store: &Store,
    name: &str,
    notify_url: Option<&str>,
) -> Result<NewClient, AdminError> {
    validate_client_name(name).map_err(AdminError::Invalid)?;
    if let Some(u) = notify_url {
        check_notify_url(u).map_err(|m| AdminError::Invalid(format!("notify URL {m}")))?;
    }
    let api_key = api_key_from(rand::random());
    let signing_secret = signing_secret_from(rand::random());
    let client = Client {
        name: name.to_owned(),
        api_key_prefix: key_prefix(&api_key),
        signing_secret: signing_secret.clone(),
        previous_signing_secret: None,
        previous_secret_expires_at_ms: None,
        notify_url: notify_url.map(str::to_owned),
        created_at_ms: now_ms(),
        revoked_at_ms: None,
        weight: 1,
        max_units: None,
        units_per_day: None,
        units_per_month: None,
    };
    store
        .create_client(&client, &hash_api_key(&api_key))
        .await?;
    Ok(NewClient {
        name: name.to_owned(),
        api_key,
        signing_secret,
    })
}

/// A new signing secret; the old one keeps signing beside it for `grace`.
pub async fn rotate_secret(
    store: &Store,
    name: &str,
    grace: Duration,
) -> Result<String, AdminError> {
    let secret = signing_secret_from(rand::random());
    let until = now_ms() + super::ms(grace);
    store.rotate_secret(name, &secret, until).await?;
    Ok(secret)
}

pub async fn set_notify_url(
    store: &Store,
    name: &str,
    url: Option<&str>,
) -> Result<(), AdminError> {
    if let Some(u) = url {
        check_notify_url(u).map_err(|m| AdminError::Invalid(format!("notify URL {m}")))?;
    }
    store.set_client_notify_url(name, url).await?;
    Ok(())
}

/// Sets a client's weight (1 to [`MAX_WEIGHT`]) and unit cap (`Some(None)` removes it); what
/// is None stays as it is. Takes effect at the next dispatch pass of every replica.
pub async fn set_share(
    store: &Store,
    name: &str,
    weight: Option<i64>,
    max_units: Option<Option<i64>>,
) -> Result<(), AdminError> {
    if weight.is_some_and(|w| !(1..=MAX_WEIGHT).contains(&w)) {
        return Err(AdminError::Invalid(format!(
            "a weight is from 1 to {MAX_WEIGHT}"
        )));
    }
    if max_units.flatten().is_some_and(|m| m < 1) {
        return Err(AdminError::Invalid(
            "max units is at least 1 (or remove the cap with --no-max-units)".into(),
        ));
    }
    store.set_client_share(name, weight, max_units).await?;
    Ok(())
}

/// Sets a client's budgets (units per UTC day and month; Some(None) removes one).
pub async fn set_budgets(
    store: &Store,
    name: &str,
    per_day: Option<Option<i64>>,
    per_month: Option<Option<i64>>,
) -> Result<(), AdminError> {
    if per_day.flatten().is_some_and(|u| u < 0) || per_month.flatten().is_some_and(|u| u < 0) {
        return Err(AdminError::Invalid(
            "a budget is 0 units or more (remove one with --no-units-per-day or --no-units-per-month)"
                .into(),
        ));
    }
    store.set_client_budgets(name, per_day, per_month).await?;
    Ok(())
}

/// The demo client of `serve --simulate`: created on first use, its key kept so every start can
/// print it. Returns (name, API key, signing secret).
pub async fn ensure_demo_client(store: &Store) -> Result<(String, String, String), AdminError> {
    let candidate = api_key_from(rand::random());
    let key = store.ensure_secret(DEMO_KEY_SECRET, &candidate).await?;
    let existing = store.get_client(DEMO_CLIENT).await?;
    match existing {
        Some(c) if !c.is_revoked() => Ok((DEMO_CLIENT.to_owned(), key, c.signing_secret)),
        Some(_) => Err(AdminError::Invalid(
            "the demo client was revoked; create a client with `kling-relay clients create`".into(),
        )),
        None => {
            let client = Client {
                name: DEMO_CLIENT.to_owned(),
                api_key_prefix: key_prefix(&key),
                signing_secret: signing_secret_from(rand::random()),
                previous_signing_secret: None,
                previous_secret_expires_at_ms: None,
                notify_url: None,
                created_at_ms: now_ms(),
                revoked_at_ms: None,
                weight: 1,
                max_units: None,
                units_per_day: None,
                units_per_month: None,
            };
            store.create_client(&client, &hash_api_key(&key)).await?;
            Ok((DEMO_CLIENT.to_owned(), key, client.signing_secret))
        }
    }
}

//! Internal clients: names, API keys and notification signing secrets.

use base64::Engine;
use sha2::{Digest, Sha256};

/// A client of the relay, as stored (its API key only as a hash).
#[derive(Clone, PartialEq)]
pub struct Client {
    pub name: String,
    pub api_key_prefix: String,
    pub signing_secret: String,
    pub previous_signing_secret: Option<String>,
    pub previous_secret_expires_at_ms: Option<i64>,
    pub notify_url: Option<String>,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    /// Relative share of the upstream units when clients compete (1 to [`MAX_WEIGHT`]).
    pub weight: i64,
    /// Most units its tasks may hold upstream at once; None: no cap beyond the account's.
    pub max_units: Option<i64>,
    /// Budgets in units per UTC day and month (None: no budget).
    pub units_per_day: Option<i64>,
    pub units_per_month: Option<i64>,
}

/// Largest client weight: a thousand to one is already "this one only".
pub const MAX_WEIGHT: i64 = 1000;

impl std::fmt::Debug for Client {
    // Signing secrets never print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("api_key_prefix", &self.api_key_prefix)
            .field("signing_secret", &"[redacted]")
            .field("notify_url", &self.notify_url)
            .field("revoked_at_ms", &self.revoked_at_ms)
            .field("weight", &self.weight)
            .field("max_units", &self.max_units)
            .finish()
    }
}

impl Client {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms.is_some()
    }

    /// The secrets notifications are signed with now: the current one, and the previous one
    /// during its grace period after a rotation.
    pub fn signing_secrets(&self, now_ms: i64) -> Vec<&str> {
        let mut s = vec![self.signing_secret.as_str()];
        if let (Some(prev), Some(until)) = (
            &self.previous_signing_secret,
            self.previous_secret_expires_at_ms,
        ) {
            if now_ms < until {
                s.push(prev);
            }
        }
        s
    }
}

/// Who is asking: an authenticated client, or anyone when authentication is switched off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Client(String),
    Anyone,
}

impl Caller {
    /// The client whose tasks this caller sees; None: all tasks.
    pub fn scope(&self) -> Option<&str> {
        match self {
            Caller::Client(name) => Some(name),
            Caller::Anyone => None,
        }
    }

    pub fn owns(&self, task_client: Option<&str>) -> bool {
        match self {
            Caller::Client(name) => task_client == Some(name.as_str()),
            Caller::Anyone => true,
        }
    }
}

/// A token bucket for one client's submits: `per_minute` tokens, refilled evenly.
#[derive(Debug, Clone)]
pub struct SubmitBudget {
    per_minute: u32,
    tokens: f64,
    updated_ms: Option<i64>,
}

impl SubmitBudget {
    pub fn new(per_minute: u32) -> Self {
        SubmitBudget {
            per_minute,
            tokens: f64::from(per_minute),
            updated_ms: None,
        }
    }

    /// Takes one submit, or says how long until one is available.
    pub fn take(&mut self, now_ms: i64) -> Result<(), std::time::Duration> {
        let cap = f64::from(self.per_minute.max(1));
        let per_ms = cap / 60_000.0;
        if let Some(t) = self.updated_ms {
            self.tokens = (self.tokens + (now_ms - t).max(0) as f64 * per_ms).min(cap);
        }
        self.updated_ms = Some(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait_ms = ((1.0 - self.tokens) / per_ms).ceil();
            Err(std::time::Duration::from_millis(wait_ms as u64))
        }
    }
}

/// Names are short, lowercase and stable: they appear in task resources and are never reused.
pub fn validate_client_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a client name: use 1 to 64 of a-z, 0-9, `-`, `_`, starting with a letter or digit"
        ))
    }
}

/// `klr_` + 43 characters of base64url: 256 random bits.
pub fn api_key_from(random: [u8; 32]) -> String {
    format!(
        "klr_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    )
}

/// `whsec_` + base64 of 32 random bytes, the Standard Webhooks secret format.
pub fn signing_secret_from(random: [u8; 32]) -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(random)
    )
}

/// How an API key is stored and looked up. Keys carry 256 random bits, so a fast hash is enough:
/// there is nothing to brute-force.
pub fn hash_api_key(key: &str) -> String {
    hex_sha256(key.as_bytes())
}

/// SHA-256 as lowercase hex.
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The part of a key shown in listings.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(10).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["billing", "svc-2", "a", "team_x"] {
            assert!(validate_client_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Billing", "-x", "a b", &"x".repeat(65), "é"] {
            assert!(validate_client_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_and_secrets_have_their_formats() {
        let k = api_key_from([7; 32]);
        assert!(k.starts_with("klr_") && k.len() == 4 + 43);
        let s = signing_secret_from([7; 32]);
        assert!(s.starts_with("whsec_"));
        assert_eq!(hash_api_key(&k).len(), 64);
        assert_ne!(hash_api_key(&k), hash_api_key(&api_key_from([8; 32])));
    }

    #[test]
    fn submit_budget_refills_evenly() {
        let mut b = SubmitBudget::new(60);
        for _ in 0..60 {
            assert!(b.take(0).is_ok());
        }
        let wait = b.take(0).unwrap_err();
        assert!(wait <= std::time::Duration::from_secs(1));
        assert!(b.take(1000).is_ok(), "one token per second");
        assert!(b.take(1000).is_err());
    }

    #[test]
    fn previous_secret_is_used_only_during_its_grace() {
        let c = Client {
            name: "a".into(),
            api_key_prefix: "klr_".into(),
            signing_secret: "new".into(),
            previous_signing_secret: Some("old".into()),
            previous_secret_expires_at_ms: Some(100),
            notify_url: None,
            created_at_ms: 0,
            revoked_at_ms: None,
            weight: 1,
            max_units: None,
            units_per_day: None,
            units_per_month: None,
        };
        assert_eq!(c.signing_secrets(99), vec!["new", "old"]);
        assert_eq!(c.signing_secrets(100), vec!["new"]);
        let shown = format!("{c:?}");
        assert!(!shown.contains("new") && !shown.contains("old"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }
}

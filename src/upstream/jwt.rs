//! Kling's request token: an HS256 JWT (`iss` = access key, `exp` 30 minutes ahead, `nbf` 5 s
//! back) signed with the secret key. Renewed well before it expires; never logged.

use crate::config::Secret;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Mutex;

/// How long a token is valid, and how long before its end a new one is made.
const LIFETIME_S: i64 = 1800;
const RENEW_BEFORE_S: i64 = 300;
/// `nbf` this far back, so a clock slightly ahead of upstream's does not make it "not yet valid".
const NOT_BEFORE_SLACK_S: i64 = 5;

pub struct KlingTokens {
    access_key: Secret,
    secret_key: Secret,
    /// (token, exp)
    current: Mutex<Option<(Secret, i64)>>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs `claims` as a compact HS256 JWT.
pub fn sign_hs256(claims: &serde_json::Value, key: &[u8]) -> String {
    let header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = b64(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{payload}");
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
}

/// Checks an HS256 token's signature and returns its claims (the simulator's side).
pub fn verify_hs256(token: &str, key: &[u8]) -> Option<serde_json::Value> {
    let (signing_input, signature) = token.rsplit_once('.')?;
    let (header, payload) = signing_input.split_once('.')?;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: serde_json::Value = serde_json::from_slice(&engine.decode(header).ok()?).ok()?;
    if header.get("alg")?.as_str()? != "HS256" {
        return None;
    }
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    mac.update(signing_input.as_bytes());
    mac.verify_slice(&engine.decode(signature).ok()?).ok()?;
    serde_json::from_slice(&engine.decode(payload).ok()?).ok()
}

impl KlingTokens {
    pub fn new(access_key: Secret, secret_key: Secret) -> Self {
        KlingTokens {
            access_key,
            secret_key,
            current: Mutex::new(None),
        }
    }

    /// A token valid for at least `RENEW_BEFORE_S` more seconds at `now_s` (Unix seconds).
    pub fn token(&self, now_s: i64) -> Secret {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, exp)) = current.as_ref() {
            if exp - now_s > RENEW_BEFORE_S {
                return token.clone();
            }
        }
        let exp = now_s + LIFETIME_S;
        let claims = serde_json::json!({
            "iss": self.access_key.expose(),
            "exp": exp,
            "nbf": now_s - NOT_BEFORE_SLACK_S,
        });
        let token = Secret::new(sign_hs256(&claims, self.secret_key.expose().as_bytes()));
        *current = Some((token.clone(), exp));
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_carry_the_claims_and_renew_before_expiry() {
        let t = KlingTokens::new(Secret::new("ak-1"), Secret::new("sk-1"));
        let first = t.token(1_000_000);
        let claims = verify_hs256(first.expose(), b"sk-1").unwrap();
        assert_eq!(claims["iss"], "ak-1");
        assert_eq!(claims["exp"], 1_000_000 + 1800);
        assert_eq!(claims["nbf"], 1_000_000 - 5);
        assert!(verify_hs256(first.expose(), b"other").is_none());
        // Reused while fresh, renewed in its last five minutes.
        assert_eq!(t.token(1_000_000 + 1000).expose(), first.expose());
        assert_ne!(t.token(1_000_000 + 1600).expose(), first.expose());
    }
}

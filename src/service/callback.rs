//! Callback URLs and their tokens: the HMAC that authorises CometAPI's callbacks for one task.

use super::*;

impl Relay {
    fn mac(&self, task_id: &str) -> Hmac<Sha256> {
        token_mac(&self.token_key, task_id)
    }

    /// The unguessable token that authorises callbacks for one task.
    pub fn webhook_token(&self, task_id: &str) -> String {
        webhook_token(&self.token_key, task_id)
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
            "{base}{}/{task_id}/{}",
            crate::domain::CALLBACK_PATH,
            self.webhook_token(task_id)
        ))
    }

    /// A callback body as upstream's report on a task, if it is one (`upstream::wire` reads
    /// every documented shape).
    pub fn read_callback(&self, body: &serde_json::Value) -> Option<crate::domain::UpstreamReport> {
        crate::upstream::parse_callback(body)
    }
}

//! One-time nonces that `kling-relay doctor` leaves for the running service to serve, so it can
//! tell whether `server.public_url` reaches *this* instance (and not some other server).
//! Kept beside the service's secrets: the database is the one thing both processes share.

use super::{Pool, Result, Store};

const PREFIX: &str = "doctor_nonce:";

impl Store {
    /// Leaves `nonce` for the service to serve until `expires_at_ms`.
    pub async fn put_doctor_nonce(&self, nonce: &str, expires_at_ms: i64) -> Result<()> {
        let _writer = self.writer().await;
        const SQL: &str = "INSERT INTO service_secrets (name, value) VALUES ($1, $2)";
        let name = format!("{PREFIX}{nonce}");
        on_pool!(self, p => {
            sqlx::query(SQL).bind(&name).bind(expires_at_ms.to_string()).execute(p).await?;
            Ok(())
        })
    }

    /// Whether `nonce` was left by doctor and has not expired.
    pub async fn doctor_nonce_valid(&self, nonce: &str, now_ms: i64) -> Result<bool> {
        const SQL: &str = "SELECT value FROM service_secrets WHERE name = $1";
        let name = format!("{PREFIX}{nonce}");
        let value: Option<String> = on_pool!(self, p => {
            sqlx::query_scalar(SQL).bind(&name).fetch_optional(p).await?
        });
        Ok(value
            .and_then(|v| v.parse::<i64>().ok())
            .is_some_and(|expires| expires > now_ms))
    }

    pub async fn delete_doctor_nonce(&self, nonce: &str) -> Result<()> {
        let _writer = self.writer().await;
        const SQL: &str = "DELETE FROM service_secrets WHERE name = $1";
        let name = format!("{PREFIX}{nonce}");
        on_pool!(self, p => {
            sqlx::query(SQL).bind(&name).execute(p).await?;
            Ok(())
        })
    }
}

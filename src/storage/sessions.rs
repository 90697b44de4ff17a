//! Dashboard sessions: stored by the hash of their id, looked up with their client's revocation.

use super::{Pool, Result, Store};

impl Store {
    pub async fn create_session(&self, id_hash: &str, client: &str, now_ms: i64) -> Result<()> {
        const SQL: &str = "INSERT INTO ui_sessions (id_hash, client, created_at, last_seen_at) \
            VALUES ($1, $2, $3, $3)";
        on_pool!(self, p => {
            sqlx::query(SQL).bind(id_hash).bind(client).bind(now_ms).execute(p).await?;
        });
        Ok(())
    }

    /// The session's client and when it was last seen, if the session has neither been idle
    /// since `idle_cutoff_ms` nor started before `created_cutoff_ms`, and its client is not
    /// revoked.
    pub async fn live_session(
        &self,
        id_hash: &str,
        idle_cutoff_ms: i64,
        created_cutoff_ms: i64,
    ) -> Result<Option<(String, i64)>> {
        const SQL: &str = "SELECT s.client, s.last_seen_at FROM ui_sessions s \
            JOIN clients c ON c.name = s.client \
            WHERE s.id_hash = $1 AND c.revoked_at IS NULL \
            AND s.last_seen_at > $2 AND s.created_at > $3";
        let found: Option<(String, i64)> = on_pool!(self, p => {
            sqlx::query_as(SQL)
                .bind(id_hash)
                .bind(idle_cutoff_ms)
                .bind(created_cutoff_ms)
                .fetch_optional(p)
                .await?
        });
        Ok(found)
    }

    pub async fn touch_session(&self, id_hash: &str, now_ms: i64) -> Result<()> {
        const SQL: &str = "UPDATE ui_sessions SET last_seen_at = $2 WHERE id_hash = $1";
        on_pool!(self, p => {
            sqlx::query(SQL).bind(id_hash).bind(now_ms).execute(p).await?;
        });
        Ok(())
    }

    pub async fn delete_session(&self, id_hash: &str) -> Result<()> {
        on_pool!(self, p => {
            sqlx::query("DELETE FROM ui_sessions WHERE id_hash = $1")
                .bind(id_hash)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Forgets sessions that can no longer be used: expired, or of a revoked client.
    pub async fn delete_dead_sessions(
        &self,
        idle_cutoff_ms: i64,
        created_cutoff_ms: i64,
    ) -> Result<u64> {
        const SQL: &str = "DELETE FROM ui_sessions WHERE last_seen_at <= $1 OR created_at <= $2 \
            OR client IN (SELECT name FROM clients WHERE revoked_at IS NOT NULL)";
        let n = on_pool!(self, p => {
            sqlx::query(SQL)
                .bind(idle_cutoff_ms)
                .bind(created_cutoff_ms)
                .execute(p)
                .await?
                .rows_affected()
        });
        Ok(n)
    }
}

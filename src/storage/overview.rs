//! Aggregates for the dashboard's overview.

use super::{Pool, Result, Store};

impl Store {
    /// Tasks created since `since_ms`, per status (one client's, or everyone's).
    pub async fn status_counts_since(
        &self,
        client: Option<&str>,
        since_ms: i64,
    ) -> Result<Vec<(String, i64)>> {
        const SQL: &str = "SELECT status, COUNT(*) FROM tasks \
            WHERE created_at >= $1 AND ($2 = '' OR client = $2) GROUP BY status";
        on_pool!(self, p => {
            Ok(sqlx::query_as(SQL)
                .bind(since_ms)
                .bind(client.unwrap_or(""))
                .fetch_all(p)
                .await?)
        })
    }

    /// Why tasks created since `since_ms` failed or timed out, most frequent first:
    /// (error code, one message of that code, how many).
    pub async fn failure_reasons_since(
        &self,
        client: Option<&str>,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<(String, String, i64)>> {
        const SQL: &str = "SELECT COALESCE(error_code, status), \
            COALESCE(MAX(error_message), ''), COUNT(*) FROM tasks \
            WHERE created_at >= $1 AND ($2 = '' OR client = $2) \
            AND status IN ('failed', 'timed_out') \
            GROUP BY COALESCE(error_code, status) ORDER BY COUNT(*) DESC LIMIT $3";
        on_pool!(self, p => {
            Ok(sqlx::query_as(SQL)
                .bind(since_ms)
                .bind(client.unwrap_or(""))
                .bind(limit)
                .fetch_all(p)
                .await?)
        })
    }
}

//! A batch's idempotency keys, a statement for all of them: expired ones deleted and the rest
//! read before the checks, the admitted tasks' claimed after the inserts. A statement a key
//! cost the one submit writer three round trips per keyed task, inside the transaction that
//! holds the submit lock: 192 round trips for a batch of 64 keyed submits.

use crate::storage::{sql, NewTask, Result, StorageError};
use serde_json::json;
use std::collections::HashMap;

/// The three statements in a backend's dialect; each takes the keys as one JSON array (`$1`).
pub(super) struct KeySql {
    expire: &'static str,
    read: &'static str,
    claim: &'static str,
}

pub(super) const POSTGRES: KeySql = KeySql {
    expire: sql::EXPIRE_KEYS_PG,
    read: sql::READ_KEYS_PG,
    claim: sql::CLAIM_KEYS_PG,
};

pub(super) const SQLITE: KeySql = KeySql {
    expire: sql::EXPIRE_KEYS,
    read: sql::READ_KEYS,
    claim: sql::CLAIM_KEYS,
};

/// A stored key: (scope, key) -> (request hash, task id).
pub(super) type StoredKeys = HashMap<(String, String), (String, String)>;

/// The stored keys the batch's tasks carry, once the expired ones are deleted. A key carried
/// twice expires as of its first task's time: the whole batch sees the keys as they stand then.
pub(super) async fn stored<'c, DB>(
    tx: &mut sqlx::Transaction<'c, DB>,
    sql: &KeySql,
    tasks: &[NewTask],
) -> Result<StoredKeys>
where
    DB: sqlx::Database,
    for<'e> &'e mut DB::Connection: sqlx::Executor<'e, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (String, String, String, String): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let mut seen = std::collections::HashSet::new();
    let wanted: Vec<serde_json::Value> = tasks
        .iter()
        .filter_map(|t| t.idempotency.as_ref())
        .filter(|k| seen.insert((k.scope.as_str(), k.key.as_str())))
        .map(|k| json!({"s": k.scope, "k": k.key, "e": k.expired_before_ms}))
        .collect();
    if wanted.is_empty() {
        return Ok(StoredKeys::new());
    }
    let list = serde_json::Value::Array(wanted).to_string();
    sqlx::query(sql.expire)
        .bind(list.clone())
        .execute(&mut **tx)
        .await?;
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(sql.read)
        .bind(list)
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(scope, key, hash, task)| ((scope, key), (hash, task)))
        .collect())
}

/// Claims the admitted tasks' keys. The submit lock (or SQLite's single writer) made the read
/// exact and the batch gave each key to one task, so every claim must take.
pub(super) async fn claim<'c, DB>(
    tx: &mut sqlx::Transaction<'c, DB>,
    sql: &KeySql,
    admitted: &[&NewTask],
) -> Result<()>
where
    DB: sqlx::Database,
    for<'e> &'e mut DB::Connection: sqlx::Executor<'e, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (String,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let claims: Vec<serde_json::Value> = admitted
        .iter()
        .filter_map(|a| {
            a.idempotency.as_ref().map(|k| {
                json!({"s": k.scope, "k": k.key, "h": k.request_hash, "t": a.record.id,
                    "c": a.record.created_at_ms})
            })
        })
        .collect();
    if claims.is_empty() {
        return Ok(());
    }
    let wanted = claims.len();
    // The keys taken (`RETURNING`): the backends share no way to count affected rows here.
    let claimed: Vec<String> = sqlx::query_scalar(sql.claim)
        .bind(serde_json::Value::Array(claims).to_string())
        .fetch_all(&mut **tx)
        .await?;
    if claimed.len() != wanted {
        return Err(StorageError::Batch(
            "an idempotency key was taken outside the submit lock".into(),
        ));
    }
    Ok(())
}

//! Clients: create, look up by key hash, list, revoke, rotate secrets, default notify URL.

use super::{json_text, PgPools, Pool, Result, StorageError, Store};
use crate::domain::client::Client;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("a client named `{0}` exists or existed; names are never reused")]
    NameTaken(String),
    #[error("no client named `{0}`")]
    Unknown(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<sqlx::Error> for ClientError {
    fn from(e: sqlx::Error) -> Self {
        ClientError::Storage(e.into())
    }
}

/// An update by client name that touched no row names an unknown client.
fn found(name: &str, rows: u64) -> std::result::Result<(), ClientError> {
    if rows == 0 {
        return Err(ClientError::Unknown(name.to_owned()));
    }
    Ok(())
}

const COLUMNS: &str = "name, api_key_prefix, signing_secret, previous_signing_secret, \
    previous_secret_expires_at, notify_url, created_at, revoked_at, weight, max_units, \
    units_per_day, units_per_month";

#[derive(sqlx::FromRow)]
struct ClientRow {
    name: String,
    api_key_prefix: String,
    signing_secret: String,
    previous_signing_secret: Option<String>,
    previous_secret_expires_at: Option<i64>,
    notify_url: Option<String>,
    created_at: i64,
    revoked_at: Option<i64>,
    weight: i64,
    max_units: Option<i64>,
    units_per_day: Option<i64>,
    units_per_month: Option<i64>,
}

impl From<ClientRow> for Client {
    fn from(r: ClientRow) -> Self {
        Client {
            name: r.name,
            api_key_prefix: r.api_key_prefix,
            signing_secret: r.signing_secret,
            previous_signing_secret: r.previous_signing_secret,
            previous_secret_expires_at_ms: r.previous_secret_expires_at,
            notify_url: r.notify_url,
            created_at_ms: r.created_at,
            revoked_at_ms: r.revoked_at,
            weight: r.weight,
            max_units: r.max_units,
            units_per_day: r.units_per_day,
            units_per_month: r.units_per_month,
        }
    }
}

impl Store {
    pub async fn create_client(
        &self,
        c: &Client,
        api_key_hash: &str,
    ) -> std::result::Result<(), ClientError> {
        const SQL: &str =
            "INSERT INTO clients (name, api_key_hash, api_key_prefix, signing_secret, \
            notify_url, created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING";
        let inserted = on_pool!(self, p => {
            sqlx::query(SQL)
                .bind(&c.name)
                .bind(api_key_hash)
                .bind(&c.api_key_prefix)
                .bind(&c.signing_secret)
                .bind(&c.notify_url)
                .bind(c.created_at_ms)
                .execute(p)
                .await?
                .rows_affected()
        });
        if inserted == 0 {
            return Err(ClientError::NameTaken(c.name.clone()));
        }
        Ok(())
    }

    pub async fn get_client(&self, name: &str) -> Result<Option<Client>> {
        let sql = format!("SELECT {COLUMNS} FROM clients WHERE name = $1");
        let row: Option<ClientRow> = on_pool!(self, p => {
            sqlx::query_as(&sql).bind(name).fetch_optional(p).await?
        });
        Ok(row.map(Client::from))
    }

    /// The clients holding keys with these hashes, revoked or not, each with its key's hash
    /// (in no order; a hash no client holds is missing).
    pub async fn clients_by_key_hashes(&self, hashes: &[&str]) -> Result<Vec<(Client, String)>> {
        let found: Vec<ClientWithHash> = match &self.pool {
            Pool::Postgres(PgPools { main: p, .. }) => {
                let sql = format!(
                    "SELECT {COLUMNS}, api_key_hash FROM clients WHERE api_key_hash = ANY($1)"
                );
                sqlx::query_as(&sql).bind(hashes).fetch_all(p).await?
            }
            Pool::Sqlite(p) => {
                let sql = format!(
                    "SELECT {COLUMNS}, api_key_hash FROM clients \
                     WHERE api_key_hash IN (SELECT value FROM json_each($1))"
                );
                sqlx::query_as(&sql)
                    .bind(json_text(&hashes)?)
                    .fetch_all(p)
                    .await?
            }
        };
        Ok(found
            .into_iter()
            .map(|r| (Client::from(r.client), r.api_key_hash))
            .collect())
    }

    pub async fn list_clients(&self) -> Result<Vec<Client>> {
        let sql = format!("SELECT {COLUMNS} FROM clients ORDER BY name");
        let rows: Vec<ClientRow> = on_pool!(self, p => {
            sqlx::query_as(&sql).fetch_all(p).await?
        });
        Ok(rows.into_iter().map(Client::from).collect())
    }

    pub async fn revoke_client(
        &self,
        name: &str,
        now_ms: i64,
    ) -> std::result::Result<(), ClientError> {
        const SQL: &str =
            "UPDATE clients SET revoked_at = COALESCE(revoked_at, $2) WHERE name = $1";
        on_pool!(self, p => {
            let done = sqlx::query(SQL).bind(name).bind(now_ms).execute(p).await?.rows_affected();
            found(name, done)
        })
    }

    /// Makes `new_secret` current; the old one stays valid until `previous_expires_at_ms`.
    pub async fn rotate_secret(
        &self,
        name: &str,
        new_secret: &str,
        previous_expires_at_ms: i64,
    ) -> std::result::Result<(), ClientError> {
        const SQL: &str = "UPDATE clients SET previous_signing_secret = signing_secret, \
            signing_secret = $2, previous_secret_expires_at = $3 WHERE name = $1";
        on_pool!(self, p => {
            let done = sqlx::query(SQL)
                .bind(name)
                .bind(new_secret)
                .bind(previous_expires_at_ms)
                .execute(p)
                .await?
                .rows_affected();
            found(name, done)
        })
    }

    /// Sets a client's weight and unit cap (each left as it is when None).
    pub async fn set_client_share(
        &self,
        name: &str,
        weight: Option<i64>,
        max_units: Option<Option<i64>>,
    ) -> std::result::Result<(), ClientError> {
        const SQL: &str = "UPDATE clients SET weight = COALESCE($2, weight), \
            max_units = CASE WHEN $3 THEN $4 ELSE max_units END WHERE name = $1";
        on_pool!(self, p => {
            let done = sqlx::query(SQL)
                .bind(name)
                .bind(weight)
                .bind(max_units.is_some())
                .bind(max_units.flatten())
                .execute(p)
                .await?
                .rows_affected();
            found(name, done)
        })
    }

    /// Sets a client's budgets in units per UTC day and month (each left as it is when None;
    /// Some(None) removes it).
    pub async fn set_client_budgets(
        &self,
        name: &str,
        per_day: Option<Option<i64>>,
        per_month: Option<Option<i64>>,
    ) -> std::result::Result<(), ClientError> {
        const SQL: &str = "UPDATE clients SET \
            units_per_day = CASE WHEN $2 THEN $3 ELSE units_per_day END, \
            units_per_month = CASE WHEN $4 THEN $5 ELSE units_per_month END WHERE name = $1";
        on_pool!(self, p => {
            let done = sqlx::query(SQL)
                .bind(name)
                .bind(per_day.is_some())
                .bind(per_day.flatten())
                .bind(per_month.is_some())
                .bind(per_month.flatten())
                .execute(p)
                .await?
                .rows_affected();
            found(name, done)
        })
    }

    pub async fn set_client_notify_url(
        &self,
        name: &str,
        url: Option<&str>,
    ) -> std::result::Result<(), ClientError> {
        const SQL: &str = "UPDATE clients SET notify_url = $2 WHERE name = $1";
        on_pool!(self, p => {
            let done = sqlx::query(SQL).bind(name).bind(url).execute(p).await?.rows_affected();
            found(name, done)
        })
    }
}

#[derive(sqlx::FromRow)]
struct ClientWithHash {
    #[sqlx(flatten)]
    client: ClientRow,
    api_key_hash: String,
}

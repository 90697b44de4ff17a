//! What an insert batch knows of each client: its waiting tasks and its budgets' standing.

use crate::domain::usage::Period;
use crate::storage::{usage, Result};

const CLIENT_PENDING: &str = "SELECT COUNT(*) FROM tasks WHERE client = $1 AND status = 'pending'";

/// What the batch knows of a client so far: its pending tasks and its budgets' standing, each
/// counting the tasks admitted before in the batch.
pub(super) struct ClientSoFar {
    pub pending: i64,
    pub limits: Vec<(Period, i64)>,
    /// Units reserved by its unfinished tasks.
    pub reserved: i64,
    /// Units spent, per budget period and period start, as read.
    pub spent: Vec<(Period, i64, i64)>,
}

/// A client's pending count (unless `pending` has it already), budgets and reserved units,
/// read in the batch's transaction.
pub(super) async fn load_client<'c, DB>(
    tx: &mut sqlx::Transaction<'c, DB>,
    client: &str,
    pending: Option<i64>,
) -> Result<ClientSoFar>
where
    DB: sqlx::Database,
    for<'e> &'e mut DB::Connection: sqlx::Executor<'e, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'r> sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    usage::ClientBudgets: for<'r> sqlx::FromRow<'r, DB::Row>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let pending: i64 = match pending {
        Some(counted) => counted,
        None => {
            sqlx::query_scalar(CLIENT_PENDING)
                .bind(client)
                .fetch_one(&mut **tx)
                .await?
        }
    };
    let budgets: Option<usage::ClientBudgets> = sqlx::query_as(usage::CLIENT_BUDGETS)
        .bind(client)
        .fetch_optional(&mut **tx)
        .await?;
    let limits = budgets.map(|b| b.limits()).unwrap_or_default();
    let reserved: i64 = if limits.is_empty() {
        0
    } else {
        sqlx::query_scalar(usage::UNITS_RESERVED)
            .bind(client)
            .fetch_one(&mut **tx)
            .await?
    };
    Ok(ClientSoFar {
        pending,
        limits,
        reserved,
        spent: Vec::new(),
    })
}

//! The account's admission state (`admission_state`): one row that every replica reads in its
//! dispatch claim and changes by read-modify-write under a row lock (Postgres) or the write lock
//! (SQLite), so no replica's change overwrites another's.

use super::{Pool, Result, Store};
use crate::domain::admission::AdmissionState;

/// The only account today; the key leaves room for several.
const ACCOUNT: &str = "default";

const READ_STATE: &str = "SELECT working_limit, paused_until, busy_streak, \
    finished_units, refused_at, last_refused_at FROM admission_state WHERE account = 'default'";

#[derive(sqlx::FromRow)]
struct StateRow {
    working_limit: i64,
    paused_until: i64,
    busy_streak: i64,
    finished_units: i64,
    refused_at: Option<i64>,
    last_refused_at: i64,
}

impl From<StateRow> for AdmissionState {
    fn from(r: StateRow) -> Self {
        AdmissionState {
            working: r.working_limit,
            paused_until_ms: r.paused_until,
            busy_streak: r.busy_streak,
            finished_units: r.finished_units,
            refused_at: r.refused_at,
            last_refused_ms: r.last_refused_at,
        }
    }
}

impl Store {
    /// What admission has learnt, if anything has been stored yet.
    pub async fn admission_state(&self) -> Result<Option<AdmissionState>> {
        let row: Option<StateRow> = on_pool!(self, p => {
            sqlx::query_as(READ_STATE).fetch_optional(p).await?
        });
        Ok(row.map(AdmissionState::from))
    }

    /// Changes the stored state with `change`, which sees the current one (`fresh` when none is
    /// stored) and returns the new one and a result. Replicas changing it at once take turns.
    pub async fn update_admission<R>(
        &self,
        now_ms: i64,
        fresh: AdmissionState,
        change: impl FnOnce(AdmissionState) -> (AdmissionState, R),
    ) -> Result<(AdmissionState, R)> {
        let _writer = self.writer().await;
        let read = format!("{READ_STATE}{}", self.for_update());
        const WRITE: &str = "INSERT INTO admission_state (account, working_limit, paused_until, \
            busy_streak, finished_units, refused_at, last_refused_at, updated_at) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (account) DO UPDATE SET \
            working_limit = excluded.working_limit, paused_until = excluded.paused_until, \
            busy_streak = excluded.busy_streak, finished_units = excluded.finished_units, \
            refused_at = excluded.refused_at, last_refused_at = excluded.last_refused_at, \
            updated_at = excluded.updated_at";
        const CREATE: &str = "INSERT INTO admission_state (account, working_limit, paused_until, \
            busy_streak, finished_units, refused_at, last_refused_at, updated_at) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (account) DO NOTHING";
        let begin = self.begin_claim();
        on_pool!(self, p => {
            let mut tx = p.begin_with(begin).await?;
            let mut stored: Option<StateRow> =
                sqlx::query_as(&read).fetch_optional(&mut *tx).await?;
            if stored.is_none() {
                // Two replicas may both find no row: one creates it, both then lock it.
                bind_state(sqlx::query(CREATE), fresh, now_ms).execute(&mut *tx).await?;
                stored = sqlx::query_as(&read).fetch_optional(&mut *tx).await?;
            }
            let current = stored.map_or(fresh, AdmissionState::from);
            let (next, result) = change(current);
            if next != current {
                bind_state(sqlx::query(WRITE), next, now_ms).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok((next, result))
        })
    }
}

fn bind_state<'q, DB: sqlx::Database>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    s: AdmissionState,
    now_ms: i64,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    q.bind(ACCOUNT)
        .bind(s.working)
        .bind(s.paused_until_ms)
        .bind(s.busy_streak)
        .bind(s.finished_units)
        .bind(s.refused_at)
        .bind(s.last_refused_ms)
        .bind(now_ms)
}

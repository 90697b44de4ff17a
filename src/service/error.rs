//! What a use case can answer besides success; `http::error` maps each to one HTTP answer.

use super::*;
use crate::storage::StorageFailure;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the request is invalid")]
    Invalid(Vec<FieldError>),
    #[error("task not found")]
    NotFound,
    #[error("this task has no notification with this id")]
    DeliveryNotFound,
    #[error(transparent)]
    Mismatch(#[from] ReportMismatch),
    #[error("the task kept changing while this update was applied; try again")]
    Contended,
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyConflict,
    #[error("too many tasks are waiting for dispatch; retry later")]
    QueueFull,
    #[error(
        "this task's {requested} units would take the client over its {} budget of {} units",
        standing.period.as_str(),
        standing.limit_units
    )]
    BudgetExceeded {
        standing: crate::domain::usage::BudgetStanding,
        requested: i64,
    },
    #[error("too many submits from this client; retry in {0} s")]
    RateLimited(u64),
    #[error("missing, unknown or revoked API key")]
    Unauthorized,
    #[error("the task cannot be canceled: {0}")]
    CannotCancel(CancelRefused),
    #[error("{0}")]
    ImageUnavailable(String),
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
    /// Stored data that cannot be read back: the same answer on every retry.
    #[error(transparent)]
    Corrupt(StorageError),
    /// The change breaks a constraint of what is stored.
    #[error(transparent)]
    StoredConflict(StorageError),
    /// The database cannot store the request's data as given.
    #[error(transparent)]
    Unstorable(StorageError),
    /// The database is unavailable; a retry may succeed.
    #[error(transparent)]
    Storage(StorageError),
}

/// Storage failures by what a retry would do, so HTTP never needs the storage types.
impl From<StorageError> for ServiceError {
    fn from(e: StorageError) -> Self {
        match e.failure() {
            StorageFailure::Corrupt => ServiceError::Corrupt(e),
            StorageFailure::Conflict => ServiceError::StoredConflict(e),
            StorageFailure::Unstorable => ServiceError::Unstorable(e),
            StorageFailure::Unavailable => ServiceError::Storage(e),
        }
    }
}

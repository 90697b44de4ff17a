//! What a caller may ask of task history. HTTP and the dashboard build it from their query
//! strings; storage runs it (`storage::ListFilter` is this type).

use super::TaskStatus;

/// A query over task history: which tasks, newest first; `before` is the keyset cursor `(created_at, id)` of the last task already seen.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    /// Only this client's tasks; None: everyone's.
    pub client: Option<String>,
    pub statuses: Vec<TaskStatus>,
    pub created_after_ms: Option<i64>,
    pub created_before_ms: Option<i64>,
    /// Case-insensitive substring of the prompt or the metadata's JSON text (the dashboard's
    /// search); a filter, not an index-served query.
    pub text: Option<String>,
    pub before: Option<(i64, String)>,
    pub limit: i64,
}

//! A notification's delivery as the outbox holds it: what is due, each attempt, and what
//! happens next. Plain values: `storage::deliveries` reads and writes them, the notifier acts on
//! them, `resource` shows them.

/// A delivery due for an attempt.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: String,
    pub task_id: String,
    pub client: String,
    pub url: String,
    pub payload: String,
    pub attempts: i64,
}

/// One attempt to deliver, as the timeline of a delivery shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryAttempt {
    pub at_ms: i64,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub duration_ms: i64,
}

/// A notification and where its delivery stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub task_id: String,
    pub url: String,
    pub event_status: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at_ms: Option<i64>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub delivered_at_ms: Option<i64>,
    pub attempt_log: Vec<DeliveryAttempt>,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    Delivered,
    RetryAt(i64),
    /// The schedule is exhausted, or the destination is refused: kept, not deleted.
    Dead,
    /// The receiver answered 410: this URL is disabled for the client.
    Disabled,
}

/// An attempt to record, with what follows it.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub at_ms: i64,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub duration_ms: i64,
    pub next: NextStep,
}

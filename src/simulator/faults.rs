//! The simulator's fault switches: what the tests (and `PUT /_sim/faults`) make upstream do
//! wrong, from lost callbacks to a revoked key.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    Http500,
    Http503,
    Http429,
    Code1303,
}

/// How error answers are shaped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerStyle {
    /// Kling's table: the documented HTTP status with the service code.
    #[default]
    Kling,
    /// A well-known gateway's: every non-zero code becomes HTTP 400
    /// `{"code": "task_failed", "message": <Kling's message>}`.
    Relay,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Probability (0 to 1) that a callback is never sent.
    pub drop_callbacks: f64,
    pub duplicate_callbacks: bool,
    /// Hold back non-final callbacks and send them after the final one.
    pub reorder_callbacks: bool,
    pub callback_delay_ms: u64,
    /// Wrap callbacks in the `{code, message, data}` envelope.
    pub callback_envelope: bool,
    /// Send callbacks to the callback URL without its query string (as some proxies do).
    pub strip_callback_query: bool,
    /// Callbacks carry a `task_id` other than the one the create answer gave.
    pub callback_task_id_renamed: bool,
    /// Create answers carry `data.task_id` but no `task_status` (CometAPI's current example).
    pub create_without_status: bool,
    /// The account's resource pack is depleted: creates answer 1102 (HTTP 429).
    pub out_of_credit: bool,
    /// The key was revoked: every call answers 1002 (HTTP 401).
    pub key_revoked: bool,
    /// The caller's IP is not on the allow-list: every call answers 1304 (HTTP 429).
    pub ip_not_allowed: bool,
    /// Creates answer this code outside the published table (HTTP 200).
    pub create_unknown_code: Option<i64>,
    pub answer_style: AnswerStyle,
    pub create_fail: Option<Failure>,
    /// How many create calls fail before the switch clears itself; None: all of them.
    pub create_fail_times: Option<u32>,
    /// Answer create calls this late (the task is created first).
    pub create_delay_ms: u64,
    /// Create the task, then answer 500 as if the answer was lost on the way.
    pub create_lose_response: bool,
    /// Probability (0 to 1) that a create answers HTTP 500 without creating anything.
    pub create_error_rate: f64,
    /// Probability (0 to 1) that a create creates the task, then answers only after
    /// `create_hang_ms` (a caller with a shorter timeout never sees the answer).
    pub create_hang_rate: f64,
    pub create_hang_ms: u64,
    pub query_fail: Option<Failure>,
    pub query_delay_ms: u64,
    /// Answer queries with something that is not a valid task answer.
    pub query_garbage: Option<Garbage>,
    /// What the result image URLs answer instead of the PNG.
    pub image_fault: Option<ImageFault>,
    /// Answer image requests this late.
    pub image_delay_ms: u64,
    /// Units of the account held by someone else (another team on the same key): they count
    /// against `concurrency_units` like ours, so creates meet `1303` sooner.
    pub units_held_elsewhere: i64,
}

/// Ways a result image URL can misbehave, for the archive tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFault {
    /// 404 Not Found (the URL expired).
    NotFound,
    /// 200 with an HTML page.
    Html,
    /// 200 with a 2 MB body that starts like a PNG.
    Huge,
    /// A redirect to the cloud metadata address.
    RedirectToMetadata,
    /// 503, as if overloaded.
    Unavailable,
}

/// Ways a query answer can be wrong, for the misbehaving-upstream tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Garbage {
    /// HTTP 200 whose body is not JSON.
    MalformedJson,
    /// A well-formed answer whose `task_status` is not one the page lists.
    UnknownStatus,
    /// A well-formed answer about another task (its `task_id` differs).
    OtherTask,
}

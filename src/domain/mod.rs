//! The domain: task types, the status machine, request validation and retry schedules.
//!
//! Pure code only: nothing here does I/O or knows about HTTP or SQL, so every rule that keeps a
//! task's history honest can be tested on its own and is shared by webhooks, polls, dispatch and
//! the simulator.

pub mod admission;
pub mod archive;
pub mod client;
pub mod delivery;
pub mod durations;
pub mod fair_share;
pub mod halt;
pub mod image_header;
pub mod notify;
pub mod query;
pub mod schedule;
pub mod task;
pub mod usage;
pub mod validation;

pub use query::TaskQuery;
pub use task::*;
pub use validation::{is_model_name, validate_new_task, FieldError, NewTask, Rules};

/// Where CometAPI's callbacks come in: `{CALLBACK_PATH}/{task id}/{token}`. HTTP serves it and
/// the relay writes it into each create's `callback_url`: one spelling for both.
pub const CALLBACK_PATH: &str = "/webhooks/cometapi";

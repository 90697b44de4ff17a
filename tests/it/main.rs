//! The integration tests, as one crate: one link of the library for the whole suite instead of
//! one per file. Each module is one concern and runs against real SQLite files, the real
//! Postgres and real `kling-relay` processes; `common` is the harness they share.
//!
//! Run one module with `cargo test --test it api::` (or `scripts/test --test it api::`).

#[macro_use]
mod common;

mod api;
mod archive;
mod chaos;
mod cli;
mod clients;
mod dashboard;
mod dispatch;
mod doctor;
mod hardening;
mod hostile;
mod layering;
mod lifecycle;
mod live;
mod misbehaving;
mod notifications;
mod operations;
mod process;
mod replicas;
mod secrets;
mod simulator;
mod storage;
mod upstream;
mod usage;
mod workers;

//! kling-relay: a durable relay in front of CometAPI's Kling multi-image-to-image generation.
//! See ARCHITECTURE.md for the map of modules.

pub mod app;
pub mod archive;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod domain;
pub mod http;
pub mod resource;
pub mod service;
pub mod simulator;
pub mod storage;
pub mod telemetry;
pub mod upstream;
pub mod workers;

//! `kling-relay simulator`: the CometAPI stand-in on its own, with its fault switches.

use super::stop_on_signal;
use crate::config::{LogFormat, UpstreamProfile};
use crate::simulator::{AnswerStyle, Failure, Faults, SimConfig, Simulator};
use crate::telemetry;
use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct SimulatorArgs {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Which upstream to behave as: cometapi, cometapi-generations or kling (routes, field
    /// names, subject bounds, authentication).
    #[arg(long, default_value = "cometapi", value_parser = parse_profile)]
    profile: UpstreamProfile,
    /// Bearer key the simulator expects (cometapi profiles).
    #[arg(long, default_value = "sk-simulator")]
    api_key: String,
    /// Access key and secret key of the kling profile (its JWT is checked against them).
    #[arg(long, default_value = "ak-simulator")]
    access_key: String,
    /// Secret key of the kling profile.
    #[arg(long, default_value = "sk-simulator-secret")]
    secret_key: String,
    /// Error answers as Kling's table has them (kling) or reshaped by a gateway into HTTP 400
    /// {"code":"task_failed"} (relay).
    #[arg(long, default_value = "kling", value_parser = parse_answer_style)]
    answer_style: AnswerStyle,
    /// Send callbacks without the callback URL's query string (as some proxies do).
    #[arg(long)]
    strip_callback_query: bool,
    /// Callbacks carry a task_id other than the create answer's.
    #[arg(long)]
    callback_task_id_renamed: bool,
    /// Create answers carry data.task_id but no task_status.
    #[arg(long)]
    create_without_status: bool,
    /// The account is out of credit: creates answer 1102.
    #[arg(long)]
    out_of_credit: bool,
    /// The key is revoked: every call answers 1002 (HTTP 401).
    #[arg(long)]
    key_revoked: bool,
    /// Time from submitted to processing.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    processing_after: Duration,
    /// Time from processing to the final status.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    finish_after: Duration,
    /// Account concurrency in units (a task holds n).
    #[arg(long, default_value_t = 20)]
    concurrency_units: i64,
    /// Do not answer queries by external_task_id.
    #[arg(long)]
    no_external_lookup: bool,
    /// Probability (0 to 1) of dropping each callback.
    #[arg(long, default_value_t = 0.0)]
    drop_callbacks: f64,
    /// Send every callback twice.
    #[arg(long)]
    duplicate_callbacks: bool,
    /// Hold each `processing` callback until after the task's next one (out of order).
    #[arg(long)]
    reorder_callbacks: bool,
    /// Delay each callback by this long (e.g. 500ms).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    callback_delay: Duration,
    /// Make every create call fail: http500, http503, http429 or code1303.
    #[arg(long, value_parser = parse_failure)]
    create_fail: Option<Failure>,
    /// Make every query fail: http500, http503, http429 or code1303.
    #[arg(long, value_parser = parse_failure)]
    query_fail: Option<Failure>,
    /// Answer each create call this much later.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    create_delay: Duration,
    /// Answer each query this much later.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    query_delay: Duration,
}

fn parse_profile(s: &str) -> Result<UpstreamProfile, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}`: expected cometapi, cometapi-generations or kling"))
}

fn parse_answer_style(s: &str) -> Result<AnswerStyle, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}`: expected kling or relay"))
}

fn parse_failure(s: &str) -> Result<Failure, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}`: expected http500, http503, http429 or code1303"))
}

pub async fn run(a: SimulatorArgs) -> anyhow::Result<()> {
    telemetry::init(LogFormat::Text, "info");
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let cfg = SimConfig {
        profile: a.profile,
        api_key: a.api_key,
        access_key: a.access_key,
        secret_key: a.secret_key,
        processing_after: a.processing_after,
        finish_after: a.finish_after,
        concurrency_units: a.concurrency_units,
        lookup_by_external_id: !a.no_external_lookup,
        ..SimConfig::default()
    };
    let faults = Faults {
        answer_style: a.answer_style,
        strip_callback_query: a.strip_callback_query,
        callback_task_id_renamed: a.callback_task_id_renamed,
        create_without_status: a.create_without_status,
        out_of_credit: a.out_of_credit,
        key_revoked: a.key_revoked,
        drop_callbacks: a.drop_callbacks,
        duplicate_callbacks: a.duplicate_callbacks,
        reorder_callbacks: a.reorder_callbacks,
        callback_delay_ms: a.callback_delay.as_millis() as u64,
        create_fail: a.create_fail,
        query_fail: a.query_fail,
        create_delay_ms: a.create_delay.as_millis() as u64,
        query_delay_ms: a.query_delay.as_millis() as u64,
        ..Faults::default()
    };
    let sim = Simulator::start_with_faults(cfg, faults, listener).await?;
    tracing::info!(url = %sim.base_url(), "CometAPI simulator listening; faults at PUT /_sim/faults");
    let shutdown = CancellationToken::new();
    stop_on_signal(shutdown.clone()).await;
    sim.stop();
    Ok(())
}

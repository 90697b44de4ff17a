//! Logging setup: readable text by default, JSON on request; `RUST_LOG` overrides the level.

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Metrics: one Prometheus recorder per process, rendered at `/metrics`. Labels are
/// low-cardinality by construction: route templates, outcomes, statuses; never ids.
pub mod metrics {
    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
    use std::sync::OnceLock;

    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

    /// The process's recorder, installed on first use.
    pub fn handle() -> &'static PrometheusHandle {
        HANDLE.get_or_init(|| {
            let latency = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            // Batch sizes are counts, not seconds.
            let sizes = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets(&latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(
                            "klr_group_commit_batch_size".into(),
                        ),
                        &sizes,
                    )
                })
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Another recorder may already be installed (tests start many services in one
            // process): the first one serves everyone.
            let _ = ::metrics::set_global_recorder(recorder);
            describe();
            handle
        })
    }

    fn describe() {
        use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        describe_counter!(
            "klr_http_requests_total",
            "HTTP requests by method, route template and status"
        );
        describe_histogram!(
            "klr_http_request_duration_seconds",
            Unit::Seconds,
            "HTTP request latency by method and route template"
        );
        describe_histogram!(
            "klr_group_commit_batch_size",
            Unit::Count,
            "Status changes committed per group-commit transaction"
        );
        describe_gauge!(
            "klr_tasks",
            "Open tasks by status (pending, submitted, processing), read at scrape time"
        );
        describe_counter!(
            "klr_task_status_changes_total",
            "Committed task status changes by new status and source"
        );
        describe_counter!(
            "klr_webhooks_total",
            "CometAPI callbacks by outcome (applied, duplicate, stale, already_final, rejected_*)"
        );
        describe_counter!("klr_polls_total", "Upstream polls by outcome");
        describe_counter!(
            "klr_upstream_requests_total",
            "Upstream calls by endpoint and result"
        );
        describe_histogram!(
            "klr_upstream_request_duration_seconds",
            Unit::Seconds,
            "Upstream call latency by endpoint"
        );
        describe_gauge!(
            "klr_dispatch_units_in_flight",
            "Upstream concurrency units our tasks may hold"
        );
        describe_gauge!(
            "klr_dispatch_working_limit",
            "Current (adapted) upstream concurrency limit in units"
        );
        describe_gauge!(
            "klr_dispatch_max_units",
            "Configured upstream concurrency in units"
        );
        describe_gauge!("klr_dispatch_pending", "Tasks waiting for dispatch");
        describe_gauge!(
            "klr_notification_backlog",
            "Notifications waiting for an attempt"
        );
        describe_counter!(
            "klr_notification_attempts_total",
            "Notification attempts by result (delivered, failed, dead, disabled)"
        );
    }
}

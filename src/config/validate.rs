//! The checks run once at load: each value against its range, and the values that must agree
//! across sections (URLs, limits against each other). Each failure names its key.

use super::*;
use std::net::SocketAddr;
use std::time::Duration;

impl Settings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.cometapi.base_url.is_empty() {
            check_http_url("cometapi.base_url", &self.cometapi.base_url)?;
        }
        if !self.server.public_url.is_empty() {
            check_http_url("server.public_url", &self.server.public_url)?;
        }
        let db = &self.database.url;
        if !(db.starts_with("sqlite:")
            || db.starts_with("postgres://")
            || db.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database.url",
                "must start with sqlite: or postgres://",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if !(1..=64).contains(&self.database.commit_writers) {
            return Err(invalid("database.commit_writers", "must be from 1 to 64"));
        }
        if !(1..=4096).contains(&self.database.group_commit_max_batch) {
            return Err(invalid(
                "database.group_commit_max_batch",
                "must be from 1 to 4096",
            ));
        }
        if self.database.group_commit_max_wait > Duration::from_millis(100) {
            return Err(invalid(
                "database.group_commit_max_wait",
                "must be at most 100ms (every caller in a batch waits for it)",
            ));
        }
        self.validate_upstream()?;
        if self.server.max_concurrent_body_bytes < self.server.max_body_bytes {
            return Err(invalid(
                "server.max_concurrent_body_bytes",
                "must be at least server.max_body_bytes (else the largest body could never be read)",
            ));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if self.poller.max_queries_per_second == 0 {
            return Err(invalid(
                "poller.max_queries_per_second",
                "must be at least 1",
            ));
        }
        let positive: [(&'static str, Duration); 19] = [
            ("poller.eager_interval", self.poller.eager_interval),
            ("auth.session_idle_timeout", self.auth.session_idle_timeout),
            ("auth.session_lifetime", self.auth.session_lifetime),
            ("auth.recheck_interval", self.auth.recheck_interval),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.idle_timeout", self.server.idle_timeout),
            (
                "dispatch.halt_probe_initial",
                self.dispatch.halt_probe_initial,
            ),
            ("dispatch.halt_probe_max", self.dispatch.halt_probe_max),
            ("server.request_timeout", self.server.request_timeout),
            ("server.shutdown_timeout", self.server.shutdown_timeout),
            ("cometapi.timeout", self.cometapi.timeout),
            ("dispatch.retry_initial", self.dispatch.retry_initial),
            ("dispatch.retry_max", self.dispatch.retry_max),
            ("poller.first_poll_after", self.poller.first_poll_after),
            ("poller.interval", self.poller.interval),
            ("poller.max_interval", self.poller.max_interval),
            ("poller.give_up_after", self.poller.give_up_after),
            ("poller.not_found_grace", self.poller.not_found_grace),
            ("poller.tick", self.poller.tick),
        ];
        for (key, d) in positive {
            if d.is_zero() {
                return Err(invalid(key, "must be longer than zero"));
            }
        }
        if self.cometapi.max_concurrency < 1 {
            return Err(invalid("cometapi.max_concurrency", "must be at least 1"));
        }
        if self.dispatch.busy_initial < Duration::from_secs(1) {
            return Err(invalid(
                "dispatch.busy_initial",
                "must be at least 1s (upstream asks for a first delay of at least a second)",
            ));
        }
        if self.dispatch.busy_max < self.dispatch.busy_initial {
            return Err(invalid(
                "dispatch.busy_max",
                "must be at least dispatch.busy_initial",
            ));
        }
        if self.dispatch.max_pending < 1 {
            return Err(invalid("dispatch.max_pending", "must be at least 1"));
        }
        if self.dispatch.concurrency == 0 {
            return Err(invalid("dispatch.concurrency", "must be at least 1"));
        }
        if self.poller.concurrency == 0 {
            return Err(invalid("poller.concurrency", "must be at least 1"));
        }
        if !self.server.metrics_listen.is_empty()
            && self.server.metrics_listen.parse::<SocketAddr>().is_err()
        {
            return Err(invalid(
                "server.metrics_listen",
                "must be empty or an address such as 127.0.0.1:9100",
            ));
        }
        if self.limits.client_max_pending < 1 {
            return Err(invalid("limits.client_max_pending", "must be at least 1"));
        }
        if self.limits.client_submits_per_minute < 1 {
            return Err(invalid(
                "limits.client_submits_per_minute",
                "must be at least 1",
            ));
        }
        let n = &self.notifications;
        if n.timeout.is_zero() {
            return Err(invalid("notifications.timeout", "must be longer than zero"));
        }
        if n.retry_schedule.is_empty() {
            return Err(invalid(
                "notifications.retry_schedule",
                "needs at least one entry (the delay before the first attempt)",
            ));
        }
        if n.concurrency == 0 || n.per_url_concurrency == 0 {
            return Err(invalid(
                "notifications.concurrency",
                "and per_url_concurrency must be at least 1",
            ));
        }
        if let Err(e) = n.network_policy() {
            return Err(invalid("notifications.allow_networks", e));
        }
        let a = &self.archive;
        if a.enabled {
            if a.backend == ArchiveBackend::S3 && a.s3_bucket.trim().is_empty() {
                return Err(invalid(
                    "archive.s3_bucket",
                    "is required with backend = \"s3\"",
                ));
            }
            if a.backend == ArchiveBackend::Local && a.path.trim().is_empty() {
                return Err(invalid(
                    "archive.path",
                    "is required with backend = \"local\"",
                ));
            }
            if a.concurrency == 0 {
                return Err(invalid("archive.concurrency", "must be at least 1"));
            }
            if a.max_attempts < 1 {
                return Err(invalid("archive.max_attempts", "must be at least 1"));
            }
            if a.max_image_bytes == 0 {
                return Err(invalid("archive.max_image_bytes", "must be at least 1"));
            }
            for (key, d) in [
                ("archive.timeout", a.timeout),
                ("archive.retry_initial", a.retry_initial),
                ("archive.retry_max", a.retry_max),
            ] {
                if d.is_zero() {
                    return Err(invalid(key, "must be longer than zero"));
                }
            }
            if a.retention.is_some_and(|r| r.is_zero()) {
                return Err(invalid(
                    "archive.retention",
                    "must be `forever` or longer than zero",
                ));
            }
        }
        let secret = self.server.webhook_secret.expose();
        if !secret.is_empty() && secret.len() < 32 {
            return Err(invalid(
                "server.webhook_secret",
                "must be at least 32 bytes (it keys every callback token), or empty to have one generated",
            ));
        }
        let longest_wait = Duration::from_secs(60).max(self.dispatch.wait);
        if self.server.request_timeout <= longest_wait {
            return Err(invalid(
                "server.request_timeout",
                format!(
                    "must be longer than the longest wait a request may hold ({}: a 60 s long-poll, or dispatch.wait)",
                    humantime::format_duration(longest_wait)
                ),
            ));
        }
        if !self.auth.required && !self.server.listen.ip().is_loopback() {
            return Err(invalid(
                "auth.required",
                format!(
                    "= false needs a loopback server.listen (not {}): anyone who reaches the service could spend the account's credits",
                    self.server.listen
                ),
            ));
        }
        if self.server.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        if self.server.max_webhook_body_bytes < 1024 {
            return Err(invalid(
                "server.max_webhook_body_bytes",
                "must be at least 1024",
            ));
        }
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            return Err(invalid("log.level", e.to_string()));
        }
        Ok(())
    }

    fn validate_upstream(&self) -> Result<(), ConfigError> {
        let c = &self.cometapi;
        match c.scene_image_field.as_str() {
            "" | "scence_image" | "scene_image" => {}
            _ => {
                return Err(invalid(
                    "cometapi.scene_image_field",
                    "must be `scence_image` or `scene_image` (or empty for the profile's)",
                ))
            }
        }
        for (key, path) in [
            ("cometapi.create_path", &c.create_path),
            ("cometapi.query_path", &c.query_path),
        ] {
            if !path.is_empty() && !path.starts_with('/') {
                return Err(invalid(
                    key,
                    "must start with `/` (or be empty for the profile's)",
                ));
            }
        }
        if !c.query_path.is_empty() && !c.query_path.contains("{task_id}") {
            return Err(invalid(
                "cometapi.query_path",
                "must contain `{task_id}` where the task id goes",
            ));
        }
        match c.external_lookup.as_str() {
            "" | "query" | "path" | "none" => {}
            _ => {
                return Err(invalid(
                    "cometapi.external_lookup",
                    "must be `query`, `path` or `none` (or empty for the profile's)",
                ))
            }
        }
        if c.max_subject_images > 4 || c.min_subject_images > 4 {
            return Err(invalid(
                "cometapi.max_subject_images",
                "upstream takes at most 4 subject images",
            ));
        }
        if c.max_subject_images > 0 && c.min_subject_images > c.max_subject_images {
            return Err(invalid(
                "cometapi.min_subject_images",
                "must not exceed cometapi.max_subject_images",
            ));
        }
        if let Some(bad) = c.models.iter().find(|m| !crate::domain::is_model_name(m)) {
            return Err(invalid(
                "cometapi.models",
                format!("`{bad}` is not a model name (letters, digits, `-`, `_`, `.`)"),
            ));
        }
        if !c.default_model.is_empty()
            && !c.models.is_empty()
            && !c.models.contains(&c.default_model)
        {
            return Err(invalid(
                "cometapi.default_model",
                format!("`{}` is not in cometapi.models", c.default_model),
            ));
        }
        if c.unknown_code_attempts < 1 {
            return Err(invalid(
                "cometapi.unknown_code_attempts",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Settings that work but are probably a mistake outside a local trial: one line each, for the
    /// start-up log.
    pub fn warnings(&self, simulate: bool) -> Vec<String> {
        let mut out = Vec::new();
        if simulate {
            return out;
        }
        let plain_http_off_host = |raw: &str| {
            url::Url::parse(raw).is_ok_and(|u| {
                u.scheme() == "http"
                    && !matches!(u.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"))
            })
        };
        if plain_http_off_host(&self.server.public_url) {
            out.push(format!(
                "server.public_url {} is plain http: callback tokens travel in clear text; use https",
                self.server.public_url
            ));
        }
        if plain_http_off_host(&self.cometapi.base_url) {
            out.push(format!(
                "cometapi.base_url {} is plain http: the upstream key travels in clear text; use https",
                self.cometapi.base_url
            ));
        }
        if let Ok(raw) = std::env::var("RUST_LOG") {
            if raw.parse::<tracing_subscriber::EnvFilter>().is_err() {
                out.push(format!(
                    "RUST_LOG `{raw}` is not a valid filter; log.level is used instead"
                ));
            }
        }
        out
    }

    /// Without `--simulate` the upstream credentials are required: the key, or for the `kling`
    /// profile the access key and secret key.
    pub fn require_api_key(&self) -> Result<(), ConfigError> {
        if self.cometapi.profile == UpstreamProfile::Kling {
            for (key, value, env) in [
                (
                    "cometapi.access_key",
                    &self.cometapi.access_key,
                    "KLING_ACCESS_KEY",
                ),
                (
                    "cometapi.secret_key",
                    &self.cometapi.secret_key,
                    "KLING_SECRET_KEY",
                ),
            ] {
                if value.is_empty() {
                    return Err(invalid(
                        key,
                        format!("is missing: the `kling` profile signs requests with it; set {env}, or run with --simulate"),
                    ));
                }
            }
            return Ok(());
        }
        if self.cometapi.api_key.is_empty() {
            return Err(invalid(
                "cometapi.api_key",
                "is missing: set COMETAPI_KEY (or KLING_RELAY_COMETAPI__API_KEY), or run with --simulate",
            ));
        }
        Ok(())
    }
}

fn check_http_url(key: &'static str, raw: &str) -> Result<(), ConfigError> {
    match url::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(()),
        _ => Err(invalid(key, format!("`{raw}` is not an http(s) URL"))),
    }
}

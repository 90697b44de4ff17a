//! Settings: `config/default.toml` (compiled in), then `--config FILE`, then `KLING_RELAY_*`
//! environment variables, then `COMETAPI_KEY`. Loaded and validated once at start; any bad value
//! stops start-up with a message naming the key.
//!
//! Longer than 400 lines: every setting with its default, documentation and validation in one
//! table; the checks that span sections (URLs, limits against each other) need them all in view.

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A string that never prints: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub cometapi: CometApiSettings,
    pub dispatch: DispatchSettings,
    pub poller: PollerSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    pub notifications: NotificationSettings,
    pub archive: ArchiveSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveBackend {
    Local,
    S3,
    Memory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSettings {
    pub enabled: bool,
    pub backend: ArchiveBackend,
    pub path: String,
    pub s3_bucket: String,
    pub s3_prefix: String,
    pub s3_endpoint: String,
    pub s3_region: String,
    pub s3_access_key_id: Secret,
    pub s3_secret_access_key: Secret,
    pub s3_allow_http: bool,
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub max_image_bytes: u64,
    pub max_attempts: i64,
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    pub allowed_hosts: Vec<String>,
    pub allow_http: bool,
    pub max_redirects: usize,
    #[serde(deserialize_with = "retention")]
    pub retention: Option<Duration>,
}

/// "forever" (None) or a duration.
fn retention<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let raw = String::deserialize(d)?;
    if raw.trim().eq_ignore_ascii_case("forever") {
        return Ok(None);
    }
    humantime::parse_duration(raw.trim())
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("`forever` or a duration: {e}")))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub required: bool,
    /// A dashboard session unused this long is over.
    #[serde(with = "humantime_serde")]
    pub session_idle_timeout: Duration,
    /// A dashboard session is over this long after sign-in, used or not.
    #[serde(with = "humantime_serde")]
    pub session_lifetime: Duration,
    /// How often a long-lived request (a live stream, a long-poll) checks that its key still holds.
    #[serde(with = "humantime_serde")]
    pub recheck_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub client_max_pending: i64,
    pub client_submits_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationSettings {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub retry_schedule: Vec<humantime_serde::Serde<Duration>>,
    pub concurrency: usize,
    pub per_url_concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub secret_rotation_grace: Duration,
    pub allow_networks: Vec<String>,
    pub deny_networks: Vec<String>,
    /// Set by `serve --simulate` alone (a local trial): loopback destinations need no listing.
    #[serde(skip)]
    pub loopback_for_simulation: bool,
}

impl NotificationSettings {
    pub fn schedule(&self) -> Vec<Duration> {
        self.retry_schedule.iter().map(|d| **d).collect()
    }

    pub fn network_policy(&self) -> Result<crate::domain::notify::NetworkPolicy, String> {
        let mut policy =
            crate::domain::notify::NetworkPolicy::parse(&self.allow_networks, &self.deny_networks)?;
        policy.refuse_loopback = !self.loopback_for_simulation;
        Ok(policy)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub public_url: String,
    pub webhook_secret: Secret,
    pub max_body_bytes: usize,
    /// Bytes of large request bodies (over 1 MiB) read and processed at once; more wait.
    pub max_concurrent_body_bytes: usize,
    /// Largest callback body read (after its token is checked): callbacks are a few KB.
    pub max_webhook_body_bytes: usize,
    pub metrics_listen: String,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Open connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, from connecting or from its first byte.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may sit with no request before it is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    /// Postgres: status-change batches committing at once (SQLite has one writer).
    pub commit_writers: u32,
    /// Most status changes committed in one transaction (1: each alone).
    pub group_commit_max_batch: usize,
    /// Once several changes are queued, how long the writer waits for more before committing.
    #[serde(with = "humantime_serde")]
    pub group_commit_max_wait: Duration,
}

impl fmt::Debug for DatabaseSettings {
    // A Postgres URL may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("commit_writers", &self.commit_writers)
            .field("group_commit_max_batch", &self.group_commit_max_batch)
            .field("group_commit_max_wait", &self.group_commit_max_wait)
            .finish()
    }
}

/// The URL with any password replaced, for logs.
/// The file a `sqlite:` URL names (`sqlite://data/x.db`, `sqlite:data/x.db`,
/// `sqlite:///abs/x.db`, with or without `?options`); None for memory databases and Postgres.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path.starts_with(":memory:") {
        return None;
    }
    Some(PathBuf::from(path))
}

pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        _ => raw.to_owned(),
    }
}

/// Which upstream wire description `cometapi.profile` selects; see `upstream::profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamProfile {
    /// Today's CometAPI multi-image page: `/kling/v1/images/multi-image2image`.
    Cometapi,
    /// The user's original CometAPI page: `/kling/v1/images/generations`, `scence_image`.
    CometapiGenerations,
    /// Kling's own API, authenticated with a JWT from an access key and a secret key.
    Kling,
}

impl UpstreamProfile {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProfile::Cometapi => "cometapi",
            UpstreamProfile::CometapiGenerations => "cometapi-generations",
            UpstreamProfile::Kling => "kling",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CometApiSettings {
    pub profile: UpstreamProfile,
    /// Empty: the profile's.
    pub base_url: String,
    pub api_key: Secret,
    /// For the `kling` profile.
    pub access_key: Secret,
    pub secret_key: Secret,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Each of these, empty (or 0), takes the profile's value.
    pub create_path: String,
    pub query_path: String,
    pub scene_image_field: String,
    pub default_model: String,
    pub models: Vec<String>,
    pub min_subject_images: usize,
    pub max_subject_images: usize,
    pub external_lookup: String,
    pub max_concurrency: i64,
    /// Attempts of a create answered with a code outside the published table before the task
    /// fails with it.
    pub unknown_code_attempts: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchSettings {
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    #[serde(with = "humantime_serde")]
    pub busy_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub busy_max: Duration,
    #[serde(with = "humantime_serde")]
    pub starvation_after: Duration,
    pub max_pending: i64,
    /// While dispatch is halted (bad key, account out of credit): first and longest delay
    /// between probes.
    #[serde(with = "humantime_serde")]
    pub halt_probe_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub halt_probe_max: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollerSettings {
    #[serde(with = "humantime_serde")]
    pub first_poll_after: Duration,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    #[serde(with = "humantime_serde")]
    pub not_found_grace: Duration,
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// While work waits for units: how often a running task past its expected finish is polled.
    #[serde(with = "humantime_serde")]
    pub eager_interval: Duration,
    /// Upstream queries per second at most, spread evenly.
    pub max_queries_per_second: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {}", describe_figment(.0))]
    Load(Box<figment::Error>),
    #[error("configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// One line per problem, each naming the key as written in the file (`section.key`) and where the
/// value came from.
fn describe_figment(err: &figment::Error) -> String {
    use figment::error::Kind;
    err.clone()
        .into_iter()
        .map(|e| {
            let mut path: Vec<String> = e.path.iter().map(|p| p.to_lowercase()).collect();
            if let Kind::UnknownField(name, _) = &e.kind {
                if path.last() != Some(name) {
                    path.push(name.clone());
                }
            }
            let key = path.join(".");
            // A file is named by its path, so a syntax error says which file to open.
            let file = e.metadata.as_ref().and_then(|m| match &m.source {
                Some(figment::Source::File(path)) => Some(path.display().to_string()),
                _ => None,
            });
            let origin = match (&file, e.metadata.as_ref()) {
                (Some(f), _) => format!(" (in {f})"),
                (None, Some(m)) => format!(" (from {})", m.name),
                (None, None) => String::new(),
            };
            let problem = match &e.kind {
                Kind::UnknownField(name, _) => format!("unknown key `{name}`"),
                other => other.to_string().trim_end().to_owned(),
            };
            if key.is_empty() {
                // Not about one key: the file itself (a TOML syntax error, say).
                match file {
                    Some(f) => format!("{f}: {problem}"),
                    None => format!("{problem}{origin}"),
                }
            } else {
                format!("`{key}`: {problem}{origin}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

impl Settings {
    /// Loads the layered settings from the process environment.
    /// Relative SQLite and archive paths come out absolute, against the working directory.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut settings = Self::load_from(file, Env::prefixed("KLING_RELAY_"), Env::raw())?;
        if let Ok(cwd) = std::env::current_dir() {
            settings.resolve_paths(&cwd);
        }
        Ok(settings)
    }

    /// The compiled-in defaults alone, ignoring files and the environment (tests start here).
    pub fn defaults() -> Result<Settings, ConfigError> {
        let none = || Env::prefixed("KLING_RELAY_DEFAULTS_ONLY_").only(&[]);
        Self::load_from(None, none(), none())
    }

    fn load_from(file: Option<&Path>, prefixed: Env, raw: Env) -> Result<Settings, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.exists() {
                return Err(invalid(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            fig = fig.merge(Toml::file(path));
        }
        // Only SECTION__KEY names are settings: other KLING_RELAY_* variables (the test suite's
        // KLING_RELAY_TEST_POSTGRES_URL, say) are not ours to refuse.
        fig = fig
            .merge(prefixed.filter(|k| k.as_str().contains("__")).split("__"))
            .merge(
                raw.clone()
                    .only(&["COMETAPI_KEY"])
                    .map(|_| "cometapi.api_key".into()),
            )
            .merge(
                raw.clone()
                    .only(&["KLING_ACCESS_KEY"])
                    .map(|_| "cometapi.access_key".into()),
            )
            .merge(
                raw.only(&["KLING_SECRET_KEY"])
                    .map(|_| "cometapi.secret_key".into()),
            );
        let settings: Settings = fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Makes the SQLite file and the archive folder absolute, once, against `base` (the working
    /// directory): every command then names the same files in its log, and a command run from
    /// another folder says where it looked instead of silently using a new database there.
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(file) = sqlite_file(&self.database.url) {
            if file.is_relative() {
                let query = self.database.url.find('?').map(|i| &self.database.url[i..]);
                self.database.url = format!(
                    "sqlite://{}{}",
                    base.join(file).display(),
                    query.unwrap_or("")
                );
            }
        }
        let archive = Path::new(&self.archive.path);
        if !self.archive.path.is_empty() && archive.is_relative() {
            self.archive.path = base.join(archive).display().to_string();
        }
    }

    /// The SQLite database's file, if the database is a SQLite file.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        sqlite_file(&self.database.url)
    }

    /// Where the data is, for logs and messages: the SQLite file, or the Postgres URL without
    /// its password.
    pub fn database_location(&self) -> String {
        match self.sqlite_file() {
            Some(f) => f.display().to_string(),
            None => redact_url(&self.database.url),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_match_the_contract() {
        let s = Settings::defaults().unwrap();
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.database.url, "sqlite://data/kling-relay.db");
        assert_eq!(s.cometapi.profile, UpstreamProfile::Cometapi);
        assert_eq!(s.cometapi.base_url, "");
        assert!(s.cometapi.api_key.is_empty());
        assert!(s.require_api_key().is_err());
        // A writer that waits for its batch to fill holds a closed loop of senders in step
        // (BENCHMARKS §14): by default it takes what is queued.
        assert_eq!(s.database.group_commit_max_wait, Duration::ZERO);
        assert_eq!(s.database.group_commit_max_batch, 256);
        // One writer gathers the largest batches: on Postgres each writer more cost CPU per
        // change (BENCHMARKS §14).
        assert_eq!(s.database.commit_writers, 1);
    }

    #[test]
    fn commit_writers_out_of_range_is_refused_by_name() {
        for bad in [0, 65] {
            let mut s = Settings::defaults().unwrap();
            s.database.commit_writers = bad;
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains("database.commit_writers"), "{bad}: {err}");
        }
        let mut s = Settings::defaults().unwrap();
        s.database.commit_writers = 64;
        assert!(s.validate().is_ok());
    }

    #[test]
    fn a_syntax_error_names_the_file_not_an_empty_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "[server]\nlisten = [\n").unwrap();
        let err = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "configuration: {}: TOML parse error",
                path.display()
            )),
            "{err}"
        );
        assert!(!err.contains("``"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_working_directory() {
        let base = Path::new("/srv/relay");
        let mut s = Settings::defaults().unwrap();
        s.resolve_paths(base);
        assert_eq!(s.database.url, "sqlite:///srv/relay/data/kling-relay.db");
        assert_eq!(s.database_location(), "/srv/relay/data/kling-relay.db");
        assert_eq!(s.archive.path, "/srv/relay/data/archive");
        for (url, want) in [
            ("sqlite:x.db?mode=rwc", "sqlite:///srv/relay/x.db?mode=rwc"),
            ("sqlite:///abs/x.db", "sqlite:///abs/x.db"),
            ("sqlite::memory:", "sqlite::memory:"),
            ("postgres://u:pw@h/db", "postgres://u:pw@h/db"),
        ] {
            s.database.url = url.into();
            s.resolve_paths(base);
            assert_eq!(s.database.url, want);
        }
        assert_eq!(s.database_location(), "postgres://u:redacted@h/db");
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("sk-123")), "[redacted]");
        assert_eq!(
            redact_url("postgres://u:pw@localhost/db"),
            "postgres://u:redacted@localhost/db"
        );
    }
}

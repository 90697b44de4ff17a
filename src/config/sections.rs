//! Each section of the settings, as `config/default.toml` lays it out, with the few helpers
//! that read one section alone.

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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

/// The file a `sqlite:` URL names (`sqlite://data/x.db`, `sqlite:data/x.db`,
/// `sqlite:///abs/x.db`, with or without `?options`); None for memory databases and Postgres.
pub(super) fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path.starts_with(":memory:") {
        return None;
    }
    Some(PathBuf::from(path))
}

/// The URL with any password replaced, for logs.
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

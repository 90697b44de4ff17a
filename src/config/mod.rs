//! Settings: `config/default.toml` (compiled in), then `--config FILE`, then `KLING_RELAY_*`
//! environment variables, then `COMETAPI_KEY`. Loaded and validated once at start; any bad value
//! stops start-up with a message naming the key.
//!
//! One file per part: `sections` (each section's keys, as the TOML has them), `validate` (the
//! checks, including those that span sections) and this file (loading, layering, errors).

mod sections;
mod validate;

pub use sections::*;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

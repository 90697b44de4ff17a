//! The image archive's rules: what an archived image's state can be, which bytes are accepted,
//! where they go, and which source URLs may be fetched. No I/O here.

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// How a fetch that did not store its image ends.
#[derive(Debug, Clone)]
pub enum ArchiveSetback {
    /// Try again at this time.
    RetryAt(i64),
    /// Give up: the image is marked failed.
    GiveUp,
}

/// What a successful fetch stored.
#[derive(Debug, Clone)]
pub struct StoredImage<'a> {
    pub object_key: &'a str,
    pub content_type: &'a str,
    pub size_bytes: i64,
    pub sha256: &'a str,
}

/// An archive state: where one result image stands in the archive.
// The OpenAPI schema derives from this type (named `ArchiveStateSchema` there, as before).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = ArchiveStateSchema)]
pub enum ArchiveState {
    /// Waiting for (another) fetch.
    Pending,
    /// Our copy is in the archive.
    Stored,
    /// Given up on; `error` says why. The task itself is unaffected.
    Failed,
    /// Removed by the retention sweep.
    Deleted,
}

impl ArchiveState {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveState::Pending => "pending",
            ArchiveState::Stored => "stored",
            ArchiveState::Failed => "failed",
            ArchiveState::Deleted => "deleted",
        }
    }
}

impl fmt::Display for ArchiveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ArchiveState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(ArchiveState::Pending),
            "stored" => Ok(ArchiveState::Stored),
            "failed" => Ok(ArchiveState::Failed),
            "deleted" => Ok(ArchiveState::Deleted),
            other => Err(format!("unknown archive state `{other}`")),
        }
    }
}

/// One result image's archive record.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedImage {
    pub task_id: String,
    pub index: u32,
    pub url: String,
    pub state: ArchiveState,
    pub attempts: i64,
    pub object_key: Option<String>,
    pub content_type: Option<String>,
    pub size_bytes: Option<i64>,
    pub sha256: Option<String>,
    pub error: Option<String>,
    pub stored_at_ms: Option<i64>,
    pub deleted_at_ms: Option<i64>,
}

/// The image formats kept, told by their first bytes (never by what the server claims).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
}

impl ImageFormat {
    pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
        const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
        const JPEG: &[u8] = b"\xff\xd8\xff";
        if bytes.starts_with(PNG) {
            Some(ImageFormat::Png)
        } else if bytes.starts_with(JPEG) {
            Some(ImageFormat::Jpeg)
        } else {
            None
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
        }
    }
}

/// Where image `index` of `task_id` is kept inside the archive. Fixed per image, so a fetch
/// repeated after a crash overwrites the same object instead of leaving a second one.
pub fn object_key(task_id: &str, index: u32, format: ImageFormat) -> String {
    format!("{task_id}/{index}.{}", format.extension())
}

/// Which source URLs may be fetched: the scheme (https, and http only when allowed) and the
/// host (any, or one of `allowed_hosts`). Addresses are checked separately, when resolved.
#[derive(Debug, Clone)]
pub struct SourcePolicy {
    pub allowed_hosts: Vec<String>,
    pub allow_http: bool,
}

impl SourcePolicy {
    pub fn check(&self, url: &url::Url) -> Result<(), String> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            other => return Err(format!("scheme `{other}` is not fetched (https only)")),
        }
        let Some(host) = url.host_str() else {
            return Err("the URL has no host".into());
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if !self.allowed_hosts.is_empty()
            && !self
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host))
        {
            return Err(format!("host `{host}` is not in archive.allowed_hosts"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_by_their_bytes() {
        assert_eq!(
            ImageFormat::sniff(b"\x89PNG\r\n\x1a\n\0\0"),
            Some(ImageFormat::Png)
        );
        assert_eq!(
            ImageFormat::sniff(b"\xff\xd8\xff\xe0JFIF"),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!(ImageFormat::sniff(b"<!doctype html>"), None);
        assert_eq!(ImageFormat::sniff(b""), None);
        assert_eq!(ImageFormat::sniff(b"GIF89a"), None);
    }

    #[test]
    fn sources_are_checked_by_scheme_and_host() {
        let any = SourcePolicy {
            allowed_hosts: vec![],
            allow_http: false,
        };
        let ok = |p: &SourcePolicy, u: &str| p.check(&url::Url::parse(u).unwrap());
        assert!(ok(&any, "https://cdn.example/a.png").is_ok());
        assert!(ok(&any, "http://cdn.example/a.png").is_err());
        assert!(ok(&any, "file:///etc/passwd").is_err());
        assert!(ok(&any, "ftp://cdn.example/a.png").is_err());
        let listed = SourcePolicy {
            allowed_hosts: vec!["cdn.klingai.com".into()],
            allow_http: true,
        };
        assert!(ok(&listed, "https://CDN.klingai.com/x.png").is_ok());
        assert!(ok(&listed, "http://cdn.klingai.com/x.png").is_ok());
        assert!(ok(&listed, "https://evil.example/x.png").is_err());
    }

    #[test]
    fn keys_are_fixed_per_image() {
        assert_eq!(object_key("t1", 2, ImageFormat::Jpeg), "t1/2.jpg");
        assert_eq!(
            object_key("t1", 2, ImageFormat::Png),
            object_key("t1", 2, ImageFormat::Png)
        );
    }

    #[test]
    fn states_round_trip() {
        for s in [
            ArchiveState::Pending,
            ArchiveState::Stored,
            ArchiveState::Failed,
            ArchiveState::Deleted,
        ] {
            assert_eq!(s.as_str().parse::<ArchiveState>(), Ok(s));
        }
        assert!("lost".parse::<ArchiveState>().is_err());
    }
}

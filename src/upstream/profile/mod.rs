//! Upstream profiles (one file each): a complete wire description (paths, field names, bounds, lookup form,
//! authentication) selected by `cometapi.profile`, each part overridable one setting at a time.
//!
//! Why three: CometAPI's current multi-image page and Kling's own API create multi-image tasks
//! at `…/images/multi-image2image`; the user's original page used `…/images/generations`, which
//! today is the text-to-image route (a multi-image job sent there is refused, or runs as a paid
//! text-to-image job). Accounts differ, so the old form stays one setting away.

use crate::config::{CometApiSettings, Secret, UpstreamProfile};

/// How a task is found by its `external_task_id` (for a create whose answer was lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalLookup {
    /// `GET <create_path>?external_task_id=…`
    Query,
    /// The external id in the `{task_id}` slot of the query path (Kling takes either id there).
    Path,
    /// No lookup: recovery relies on duplicate refusals and callbacks.
    None,
}

impl ExternalLookup {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "query" => Some(ExternalLookup::Query),
            "path" => Some(ExternalLookup::Path),
            "none" => Some(ExternalLookup::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExternalLookup::Query => "query",
            ExternalLookup::Path => "path",
            ExternalLookup::None => "none",
        }
    }
}

/// How requests are authenticated.
#[derive(Debug, Clone)]
pub enum Auth {
    /// `Authorization: Bearer <key>` (CometAPI).
    Bearer(Secret),
    /// A short-lived HS256 JWT from an access key and a secret key (Kling).
    KlingJwt {
        access_key: Secret,
        secret_key: Secret,
    },
}

/// The resolved wire description the client and the simulator follow.
#[derive(Debug, Clone)]
pub struct Wire {
    pub profile: UpstreamProfile,
    pub base_url: String,
    pub create_path: String,
    /// With `{task_id}` where the id goes.
    pub query_path: String,
    pub scene_image_field: String,
    pub default_model: String,
    pub models: Vec<String>,
    /// Subject images per task, inclusive.
    pub subject_images: (usize, usize),
    pub external_lookup: ExternalLookup,
    pub auth: Auth,
}

/// The text-to-image route of each API: a multi-image job sent there is not a multi-image job.
pub const COMETAPI_TEXT_TO_IMAGE_PATH: &str = "/kling/v1/images/generations";
pub const COMETAPI_MULTI_IMAGE_PATH: &str = "/kling/v1/images/multi-image2image";
pub const KLING_TEXT_TO_IMAGE_PATH: &str = "/v1/images/generations";
pub const KLING_MULTI_IMAGE_PATH: &str = "/v1/images/multi-image2image";
pub const COMETAPI_BASE_URL: &str = "https://api.cometapi.com";
pub const KLING_BASE_URL: &str = "https://api-singapore.klingai.com";

mod cometapi;
mod cometapi_generations;
mod kling;

/// What a profile fixes; each part can be replaced by its own setting.
struct Defaults {
    base_url: &'static str,
    create_path: &'static str,
    scene_image_field: &'static str,
    default_model: &'static str,
    subject_images: (usize, usize),
    external_lookup: ExternalLookup,
}

fn defaults(p: UpstreamProfile) -> &'static Defaults {
    match p {
        UpstreamProfile::Cometapi => &cometapi::DEFAULTS,
        UpstreamProfile::CometapiGenerations => &cometapi_generations::DEFAULTS,
        UpstreamProfile::Kling => &kling::DEFAULTS,
    }
}

fn or<'a>(set: &'a str, default: &'a str) -> &'a str {
    if set.is_empty() {
        default
    } else {
        set
    }
}

impl Wire {
    /// The profile's description with every setting that is set laid over it.
    pub fn resolve(c: &CometApiSettings) -> Wire {
        let d = defaults(c.profile);
        let create_path = or(&c.create_path, d.create_path).to_owned();
        let query_path = if c.query_path.is_empty() {
            format!("{create_path}/{{task_id}}")
        } else {
            c.query_path.clone()
        };
        let min = if c.min_subject_images == 0 {
            d.subject_images.0
        } else {
            c.min_subject_images
        };
        let max = if c.max_subject_images == 0 {
            d.subject_images.1
        } else {
            c.max_subject_images
        };
        let auth = match c.profile {
            UpstreamProfile::Kling => Auth::KlingJwt {
                access_key: c.access_key.clone(),
                secret_key: c.secret_key.clone(),
            },
            _ => Auth::Bearer(c.api_key.clone()),
        };
        Wire {
            profile: c.profile,
            base_url: or(&c.base_url, d.base_url).trim_end_matches('/').to_owned(),
            create_path,
            query_path,
            scene_image_field: or(&c.scene_image_field, d.scene_image_field).to_owned(),
            default_model: or(&c.default_model, d.default_model).to_owned(),
            models: c.models.clone(),
            subject_images: (min, max.max(min)),
            external_lookup: ExternalLookup::parse(&c.external_lookup).unwrap_or(d.external_lookup),
            auth,
        }
    }

    /// The query path for one id (the id percent-encoded as one segment).
    pub fn query_path_for(&self, id: &str) -> String {
        let segment: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
        self.query_path.replace("{task_id}", &segment)
    }

    /// The text-to-image route of this API (what `doctor` warns about).
    pub fn text_to_image_path(&self) -> &'static str {
        match self.profile {
            UpstreamProfile::Kling => KLING_TEXT_TO_IMAGE_PATH,
            _ => COMETAPI_TEXT_TO_IMAGE_PATH,
        }
    }

    /// The multi-image route of this API.
    pub fn multi_image_path(&self) -> &'static str {
        match self.profile {
            UpstreamProfile::Kling => KLING_MULTI_IMAGE_PATH,
            _ => COMETAPI_MULTI_IMAGE_PATH,
        }
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "profile {} at {}: create POST {}, query GET {}, scene image as `{}`, {}-{} subjects, default model {}, lookup by external_task_id: {}",
            self.profile.as_str(),
            self.base_url,
            self.create_path,
            self.query_path,
            self.scene_image_field,
            self.subject_images.0,
            self.subject_images.1,
            self.default_model,
            self.external_lookup.as_str()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn wire(f: impl FnOnce(&mut CometApiSettings)) -> Wire {
        let mut s = Settings::defaults().unwrap().cometapi;
        f(&mut s);
        Wire::resolve(&s)
    }

    #[test]
    fn each_profile_resolves_to_its_documented_wire() {
        let w = wire(|_| {});
        assert_eq!(w.base_url, "https://api.cometapi.com");
        assert_eq!(w.create_path, "/kling/v1/images/multi-image2image");
        assert_eq!(
            w.query_path_for("7"),
            "/kling/v1/images/multi-image2image/7"
        );
        assert_eq!(w.scene_image_field, "scene_image");
        assert_eq!(w.subject_images, (1, 4));

        let w = wire(|c| c.profile = UpstreamProfile::CometapiGenerations);
        assert_eq!(w.create_path, "/kling/v1/images/generations");
        assert_eq!(w.query_path_for("7"), "/kling/v1/images/generations/7");
        assert_eq!(w.scene_image_field, "scence_image");
        assert_eq!(w.default_model, "kling-v2");
        assert_eq!(w.subject_images, (2, 4));

        let w = wire(|c| c.profile = UpstreamProfile::Kling);
        assert_eq!(w.base_url, "https://api-singapore.klingai.com");
        assert_eq!(w.create_path, "/v1/images/multi-image2image");
        assert_eq!(w.external_lookup, ExternalLookup::Path);
        assert!(matches!(w.auth, Auth::KlingJwt { .. }));
    }

    #[test]
    fn settings_override_one_field_at_a_time() {
        let w = wire(|c| {
            c.query_path = "/v2/tasks/{task_id}/status".into();
            c.scene_image_field = "scence_image".into();
            c.max_subject_images = 3;
            c.external_lookup = "none".into();
        });
        assert_eq!(w.create_path, "/kling/v1/images/multi-image2image");
        assert_eq!(w.query_path_for("a/b"), "/v2/tasks/a%2Fb/status");
        assert_eq!(w.scene_image_field, "scence_image");
        assert_eq!(w.subject_images, (1, 3));
        assert_eq!(w.external_lookup, ExternalLookup::None);
    }
}

//! Validation of a task request, field by field, so one answer lists every problem.
//!
//! The same rules serve the REST API and the simulator (which must refuse what CometAPI refuses).

use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};

pub const MIN_SUBJECT_IMAGES: usize = 2;
pub const MAX_SUBJECT_IMAGES: usize = 4;
pub const MAX_PROMPT_CHARS: usize = 2500;
pub const MAX_IMAGES_PER_TASK: i64 = 9;
/// 10 MB, the upstream's per-image limit, counted on the decoded bytes.
pub const MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;
pub const MAX_METADATA_BYTES: usize = 4096;
pub const DEFAULT_MODEL: &str = "kling-v2";
pub const ASPECT_RATIOS: [&str; 8] = ["16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3", "21:9"];

/// One failing field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A validated task request: everything needed to create the task upstream, plus our metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub subject_images: Vec<String>,
    pub prompt: Option<String>,
    pub scene_image: Option<String>,
    pub style_image: Option<String>,
    pub n: u8,
    pub aspect_ratio: Option<String>,
    pub model_name: String,
    pub metadata: Option<Map<String, Value>>,
    /// Where to notify the client of status changes (API only).
    pub notify_url: Option<String>,
}

/// Which fields besides the upstream ones a caller may send.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// The REST API takes `metadata` and `notify_url`; the upstream does not.
    pub allow_metadata: bool,
    /// The upstream takes `callback_url` and `external_task_id`; the REST API makes its own.
    pub allow_upstream_routing: bool,
}

impl Rules {
    pub const API: Rules = Rules {
        allow_metadata: true,
        allow_upstream_routing: false,
    };
    pub const UPSTREAM: Rules = Rules {
        allow_metadata: false,
        allow_upstream_routing: true,
    };
}

/// Checks a request body against every rule and returns all failures at once.
pub fn validate_new_task(body: &Value, rules: Rules) -> Result<NewTask, Vec<FieldError>> {
    let Some(obj) = body.as_object() else {
        return Err(vec![FieldError::new("", "the body must be a JSON object")]);
    };
    let mut errors = Vec::new();

    for key in obj.keys() {
        let known = matches!(
            key.as_str(),
            "subject_image_list"
                | "prompt"
                | "scene_image"
                | "scence_image"
                | "style_image"
                | "n"
                | "aspect_ratio"
                | "model_name"
        ) || (rules.allow_metadata && (key == "metadata" || key == "notify_url"))
            || (rules.allow_upstream_routing
                && (key == "callback_url" || key == "external_task_id"));
        if !known {
            errors.push(FieldError::new(key.clone(), "unknown field"));
        }
    }

    let subject_images = subject_images(obj.get("subject_image_list"), &mut errors);
    let prompt = optional_string(obj, "prompt", &mut errors);
    if let Some(p) = &prompt {
        let chars = p.chars().count();
        if chars > MAX_PROMPT_CHARS {
            errors.push(FieldError::new(
                "prompt",
                format!("at most {MAX_PROMPT_CHARS} characters (got {chars})"),
            ));
        }
    }

    let scene_image = match (obj.get("scene_image"), obj.get("scence_image")) {
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                "scene_image",
                "give either `scene_image` or `scence_image`, not both",
            ));
            None
        }
        (Some(_), None) => optional_image(obj, "scene_image", &mut errors),
        (None, Some(_)) => optional_image(obj, "scence_image", &mut errors),
        (None, None) => None,
    };
    let style_image = optional_image(obj, "style_image", &mut errors);

    let n = match obj.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_i64() {
            Some(n) if (1..=MAX_IMAGES_PER_TASK).contains(&n) => n as u8,
            _ => {
                errors.push(FieldError::new(
                    "n",
                    format!("must be an integer from 1 to {MAX_IMAGES_PER_TASK}"),
                ));
                1
            }
        },
    };

    let aspect_ratio = optional_string(obj, "aspect_ratio", &mut errors);
    if let Some(ar) = &aspect_ratio {
        if !ASPECT_RATIOS.contains(&ar.as_str()) {
            errors.push(FieldError::new(
                "aspect_ratio",
                format!("must be one of {}", ASPECT_RATIOS.join(", ")),
            ));
        }
    }

    let model_name =
        optional_string(obj, "model_name", &mut errors).unwrap_or_else(|| DEFAULT_MODEL.to_owned());
    if model_name.is_empty()
        || model_name.len() > 64
        || !model_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        errors.push(FieldError::new(
            "model_name",
            "must be a model name such as `kling-v2` (letters, digits, `-`, `_`, `.`)",
        ));
    }

    let metadata = match obj.get("metadata") {
        Some(_) if !rules.allow_metadata => None,
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            let size = Value::Object(m.clone()).to_string().len();
            if size > MAX_METADATA_BYTES {
                errors.push(FieldError::new(
                    "metadata",
                    format!("at most {MAX_METADATA_BYTES} bytes as JSON (got {size})"),
                ));
            }
            Some(m.clone())
        }
        Some(_) => {
            errors.push(FieldError::new("metadata", "must be a JSON object"));
            None
        }
    };

    let notify_url = if rules.allow_metadata {
        let url = optional_string(obj, "notify_url", &mut errors);
        if let Some(u) = &url {
            if let Err(msg) = check_notify_url(u) {
                errors.push(FieldError::new("notify_url", msg));
            }
        }
        url
    } else {
        None
    };

    if rules.allow_upstream_routing {
        optional_string(obj, "callback_url", &mut errors);
        optional_string(obj, "external_task_id", &mut errors);
    }

    if errors.is_empty() {
        Ok(NewTask {
            subject_images,
            prompt,
            scene_image,
            style_image,
            n,
            aspect_ratio,
            model_name,
            metadata,
            notify_url,
        })
    } else {
        Err(errors)
    }
}

fn subject_images(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Vec<String> {
    const FIELD: &str = "subject_image_list";
    let Some(value) = value else {
        errors.push(FieldError::new(FIELD, "required"));
        return Vec::new();
    };
    let Some(list) = value.as_array() else {
        errors.push(FieldError::new(
            FIELD,
            "must be an array of {\"subject_image\": ...} objects",
        ));
        return Vec::new();
    };
    if !(MIN_SUBJECT_IMAGES..=MAX_SUBJECT_IMAGES).contains(&list.len()) {
        errors.push(FieldError::new(
            FIELD,
            format!(
                "must hold {MIN_SUBJECT_IMAGES} to {MAX_SUBJECT_IMAGES} images (got {})",
                list.len()
            ),
        ));
    }
    let mut images = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let field = format!("{FIELD}[{i}].subject_image");
        let Some(obj) = item.as_object() else {
            errors.push(FieldError::new(
                format!("{FIELD}[{i}]"),
                "must be an object {\"subject_image\": ...}",
            ));
            continue;
        };
        for key in obj.keys().filter(|k| *k != "subject_image") {
            errors.push(FieldError::new(
                format!("{FIELD}[{i}].{key}"),
                "unknown field",
            ));
        }
        match obj.get("subject_image") {
            Some(Value::String(s)) => match check_image(s) {
                Ok(()) => images.push(s.clone()),
                Err(msg) => errors.push(FieldError::new(field, msg)),
            },
            Some(_) => errors.push(FieldError::new(field, "must be a string")),
            None => errors.push(FieldError::new(field, "required")),
        }
    }
    images
}

fn optional_string(
    obj: &Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(field, "must be a string"));
            None
        }
    }
}

fn optional_image(
    obj: &Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    let s = optional_string(obj, field, errors)?;
    match check_image(&s) {
        Ok(()) => Some(s),
        Err(msg) => {
            errors.push(FieldError::new(field, msg));
            None
        }
    }
}

/// A notification destination: an absolute http(s) URL of at most 2048 characters.
pub fn check_notify_url(s: &str) -> Result<(), String> {
    if s.len() > 2048 {
        return Err("at most 2048 characters".into());
    }
    match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err("must be an absolute http or https URL".into()),
    }
}

/// An image is an http(s) URL or raw Base64 of a JPEG or PNG of at most 10 MB.
fn check_image(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    let lower_head: String = s.chars().take(8).collect::<String>().to_ascii_lowercase();
    if lower_head.starts_with("http://") || lower_head.starts_with("https://") {
        return match url::Url::parse(s) {
            Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
            _ => Err("is not a valid http(s) URL".into()),
        };
    }
    if lower_head.starts_with("data:") {
        return Err(
            "a `data:` URL is not accepted: strip the `data:image/...;base64,` prefix and send the raw Base64"
                .into(),
        );
    }
    if s.contains("://") {
        return Err("only http and https URLs are accepted".into());
    }
    // Reject by size before decoding, so an oversized body costs no allocation.
    let approx_decoded = s.len() / 4 * 3;
    if approx_decoded > MAX_IMAGE_BYTES + 3 {
        return Err(format!(
            "decoded image is larger than {MAX_IMAGE_BYTES} bytes (10 MB)"
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| "is neither an http(s) URL nor valid Base64".to_owned())?;
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(format!(
            "decoded image is larger than {MAX_IMAGE_BYTES} bytes (10 MB)"
        ));
    }
    let is_png = bytes.starts_with(b"\x89PNG\r\n\x1a\n");
    let is_jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
    if !is_png && !is_jpeg {
        return Err("Base64 image must be a JPEG or PNG".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

    fn valid() -> Value {
        json!({
            "subject_image_list": [{"subject_image": "https://example.com/a.png"}, {"subject_image": PNG_B64}],
            "prompt": "two cats",
            "n": 2,
            "aspect_ratio": "1:1",
        })
    }

    fn fields(v: Value) -> Vec<String> {
        validate_new_task(&v, Rules::API)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn accepts_a_valid_request_with_defaults() {
        let t = validate_new_task(&valid(), Rules::API).unwrap();
        assert_eq!(t.model_name, "kling-v2");
        assert_eq!(t.n, 2);
        assert_eq!(t.subject_images.len(), 2);
    }

    #[test]
    fn lists_every_failing_field_at_once() {
        let f = fields(json!({
            "subject_image_list": [{"subject_image": "data:image/png;base64,AAAA"}],
            "prompt": "x".repeat(2501),
            "n": 10,
            "aspect_ratio": "5:4",
            "metadata": [1],
            "colour": "red",
        }));
        for want in [
            "subject_image_list",
            "subject_image_list[0].subject_image",
            "prompt",
            "n",
            "aspect_ratio",
            "metadata",
            "colour",
        ] {
            assert!(f.contains(&want.to_string()), "{want} missing from {f:?}");
        }
    }

    #[test]
    fn scene_image_is_accepted_under_both_spellings_but_not_both() {
        let mut v = valid();
        v["scence_image"] = json!("https://example.com/s.png");
        assert!(validate_new_task(&v, Rules::API)
            .unwrap()
            .scene_image
            .is_some());
        v["scene_image"] = json!("https://example.com/s.png");
        assert_eq!(fields(v), vec!["scene_image"]);
    }

    #[test]
    fn image_rules() {
        assert!(check_image("ftp://x/y.png").is_err());
        assert!(check_image("https://").is_err());
        assert!(check_image("not base64 at all!").is_err());
        assert!(check_image("aGVsbG8=").is_err()); // valid Base64, but not an image
        assert!(check_image(PNG_B64).is_ok());
        let big = "A".repeat(MAX_IMAGE_BYTES / 3 * 4 + 8);
        assert!(check_image(&big).unwrap_err().contains("larger"));
        assert!(check_image("DATA:image/png;base64,xx")
            .unwrap_err()
            .contains("strip"));
    }

    #[test]
    fn metadata_limit_and_routing_fields() {
        let mut v = valid();
        v["metadata"] = json!({"k": "x".repeat(5000)});
        assert_eq!(fields(v), vec!["metadata"]);
        let mut v = valid();
        v["external_task_id"] = json!("mine");
        assert_eq!(fields(v.clone()), vec!["external_task_id"]);
        assert!(validate_new_task(&v, Rules::UPSTREAM).is_ok());
    }
}

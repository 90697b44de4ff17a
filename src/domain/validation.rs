//! Validation of a task request, field by field, so one answer lists every problem.
//!
//! The same rules serve the REST API and the simulator (which must refuse what CometAPI refuses).
//!
//! Longer than 400 lines: one validator, field by field, so one answer lists every problem; the
//! rules are tested below it.

use super::Priority;
use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};

pub const MAX_PROMPT_CHARS: usize = 2500;
pub const MAX_IMAGES_PER_TASK: i64 = 9;
/// 10 MB, the upstream's per-image limit, counted on the decoded bytes.
pub const MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;
pub const MAX_METADATA_BYTES: usize = 4096;
const NUL_REFUSED: &str = "must not contain NUL characters (\\u0000)";
/// Upstream's rules for every input image: each side at least this many pixels, and the longer
/// side at most `MAX_ASPECT` times the shorter.
pub const MIN_IMAGE_SIDE: u32 = 300;
pub const MAX_ASPECT: f64 = 2.5;
pub const ASPECT_RATIOS: [&str; 8] = ["16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3", "21:9"];

/// The fields of a create that both the REST API and upstream take. `scence_image` is
/// upstream's misspelt name for `scene_image`, accepted as an alias.
pub const TASK_FIELDS: [&str; 10] = [
    "subject_image_list",
    "prompt",
    "negative_prompt",
    "watermark_info",
    "scene_image",
    "scence_image",
    "style_image",
    "n",
    "aspect_ratio",
    "model_name",
];
/// Fields only the REST API takes.
pub const API_ONLY_FIELDS: [&str; 3] = ["metadata", "notify_url", "priority"];
/// Fields only upstream takes; the REST API makes its own.
pub const UPSTREAM_ONLY_FIELDS: [&str; 2] = ["callback_url", "external_task_id"];

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
    pub negative_prompt: Option<String>,
    /// Upstream's `watermark_info` object, forwarded as given.
    pub watermark_info: Option<Value>,
    pub scene_image: Option<String>,
    pub style_image: Option<String>,
    pub n: u8,
    pub aspect_ratio: Option<String>,
    pub model_name: String,
    pub metadata: Option<Map<String, Value>>,
    /// Where to notify the client of status changes (API only).
    pub notify_url: Option<String>,
    /// Order among the client's own waiting tasks (API only).
    pub priority: Priority,
}

/// Which fields besides the upstream ones a caller may send, and the upstream profile's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The REST API takes `metadata` and `notify_url`; the upstream does not.
    pub allow_metadata: bool,
    /// The upstream takes `callback_url` and `external_task_id`; the REST API makes its own.
    pub allow_upstream_routing: bool,
    /// Subject images per task, inclusive.
    pub subject_images: (usize, usize),
    pub default_model: &'a str,
    /// Models a request may name; empty: any well-formed name.
    pub models: &'a [String],
    /// Unknown top-level fields are refused (the REST API) or ignored (upstream ignores them).
    pub refuse_unknown_fields: bool,
}

impl<'a> Rules<'a> {
    /// The REST API's rules under an upstream profile's bounds.
    pub fn api(
        subject_images: (usize, usize),
        default_model: &'a str,
        models: &'a [String],
    ) -> Self {
        Rules {
            allow_metadata: true,
            allow_upstream_routing: false,
            subject_images,
            default_model,
            models,
            refuse_unknown_fields: true,
        }
    }

    /// What the upstream itself accepts on a create (the simulator's rules).
    pub fn upstream(subject_images: (usize, usize), default_model: &'a str) -> Self {
        Rules {
            allow_metadata: false,
            allow_upstream_routing: true,
            subject_images,
            default_model,
            models: &[],
            refuse_unknown_fields: false,
        }
    }
}

/// A model name as upstream spells them: letters, digits, `-`, `_`, `.`; at most 64 characters.
pub fn is_model_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Checks a request body against every rule and returns all failures at once.
pub fn validate_new_task(body: &Value, rules: Rules) -> Result<NewTask, Vec<FieldError>> {
    let Some(obj) = body.as_object() else {
        return Err(vec![FieldError::new("", "the body must be a JSON object")]);
    };
    let mut errors = Vec::new();

    for key in obj.keys() {
        let key_str = key.as_str();
        let known = TASK_FIELDS.contains(&key_str)
            || (rules.allow_metadata && API_ONLY_FIELDS.contains(&key_str))
            || (rules.allow_upstream_routing && UPSTREAM_ONLY_FIELDS.contains(&key_str));
        if !known && rules.refuse_unknown_fields {
            errors.push(FieldError::new(key.clone(), "unknown field"));
        }
    }

    let subject_images = subject_images(
        obj.get("subject_image_list"),
        rules.subject_images,
        &mut errors,
    );
    let prompt = optional_string(obj, "prompt", &mut errors);
    let negative_prompt = optional_string(obj, "negative_prompt", &mut errors);
    for (field, text) in [("prompt", &prompt), ("negative_prompt", &negative_prompt)] {
        if let Some(p) = text {
            let chars = p.chars().count();
            if chars > MAX_PROMPT_CHARS {
                errors.push(FieldError::new(
                    field,
                    format!("at most {MAX_PROMPT_CHARS} characters (got {chars})"),
                ));
            }
        }
    }
    let watermark_info = match obj.get("watermark_info") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            match m.get("enabled") {
                None | Some(Value::Bool(_)) => {}
                Some(_) => errors.push(FieldError::new(
                    "watermark_info.enabled",
                    "must be true or false",
                )),
            }
            Some(Value::Object(m.clone()))
        }
        Some(_) => {
            errors.push(FieldError::new(
                "watermark_info",
                "must be an object such as {\"enabled\": true}",
            ));
            None
        }
    };

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

    let model_name = optional_string(obj, "model_name", &mut errors)
        .unwrap_or_else(|| rules.default_model.to_owned());
    if !is_model_name(&model_name) {
        errors.push(FieldError::new(
            "model_name",
            "must be a model name such as `kling-v2-1` (letters, digits, `-`, `_`, `.`)",
        ));
    } else if !rules.models.is_empty() && !rules.models.contains(&model_name) {
        errors.push(FieldError::new(
            "model_name",
            format!("must be one of {}", rules.models.join(", ")),
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

    let priority = if rules.allow_metadata {
        match optional_string(obj, "priority", &mut errors) {
            None => Priority::default(),
            Some(p) => Priority::parse(&p).unwrap_or_else(|| {
                errors.push(FieldError::new(
                    "priority",
                    "must be one of high, normal, low",
                ));
                Priority::default()
            }),
        }
    } else {
        Priority::default()
    };

    if rules.allow_upstream_routing {
        optional_string(obj, "callback_url", &mut errors);
        optional_string(obj, "external_task_id", &mut errors);
    }

    if errors.is_empty() {
        Ok(NewTask {
            subject_images,
            prompt,
            negative_prompt,
            watermark_info,
            scene_image,
            style_image,
            n,
            aspect_ratio,
            model_name,
            metadata,
            notify_url,
            priority,
        })
    } else {
        Err(errors)
    }
}

fn subject_images(
    value: Option<&Value>,
    (min, max): (usize, usize),
    errors: &mut Vec<FieldError>,
) -> Vec<String> {
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
    if !(min..=max).contains(&list.len()) {
        errors.push(FieldError::new(
            FIELD,
            format!("must hold {min} to {max} images (got {})", list.len()),
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
        // Postgres text cannot hold NUL (SQLite can): refused the same way on both.
        Some(Value::String(s)) if s.contains('\0') => {
            errors.push(FieldError::new(field, NUL_REFUSED));
            None
        }
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
    if s.contains('\0') {
        return Err(NUL_REFUSED.into());
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
    let (width, height) = super::image_header::dimensions(&bytes).map_err(|e| e.to_string())?;
    check_dimensions(width, height)
}

/// Upstream's size rules, checked before anything is paid for: each side at least
/// `MIN_IMAGE_SIDE`, aspect ratio within 1:2.5 to 2.5:1.
pub fn check_dimensions(width: u32, height: u32) -> Result<(), String> {
    if width < MIN_IMAGE_SIDE || height < MIN_IMAGE_SIDE {
        return Err(format!(
            "image is {width}x{height} px: each side must be at least {MIN_IMAGE_SIDE} px"
        ));
    }
    let (long, short) = (width.max(height), width.min(height));
    if f64::from(long) > MAX_ASPECT * f64::from(short) {
        return Err(format!(
            "image is {width}x{height} px: the aspect ratio must be between 1:2.5 and 2.5:1"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A 300x300 grey PNG: the smallest size upstream takes.
    const PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAASwAAAEsCAAAAABcFtGpAAABo0lEQVR42u3QQREAAAwCIKMb3Qp77yACKWdRIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWrJ8GwefSQmRR+mcAAAAASUVORK5CYII=";
    /// A 1x1 PNG: a valid image upstream refuses as too small.
    const PIXEL_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

    fn api() -> Rules<'static> {
        Rules::api((1, 4), "kling-v2-1", &[])
    }

    fn valid() -> Value {
        json!({
            "subject_image_list": [{"subject_image": "https://example.com/a.png"}, {"subject_image": PNG_B64}],
            "prompt": "two cats",
            "n": 2,
            "aspect_ratio": "1:1",
        })
    }

    fn fields(v: Value) -> Vec<String> {
        validate_new_task(&v, api())
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn accepts_a_valid_request_with_defaults() {
        let t = validate_new_task(&valid(), api()).unwrap();
        assert_eq!(t.model_name, "kling-v2-1");
        assert_eq!(t.n, 2);
        assert_eq!(t.subject_images.len(), 2);
    }

    #[test]
    fn lists_every_failing_field_at_once() {
        let f = fields(json!({
            "subject_image_list": [],
            "prompt": "x".repeat(2501),
            "n": 10,
            "aspect_ratio": "5:4",
            "metadata": [1],
            "colour": "red",
        }));
        for want in [
            "subject_image_list",
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
        assert!(validate_new_task(&v, api()).unwrap().scene_image.is_some());
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
        assert!(check_image(PIXEL_B64)
            .unwrap_err()
            .contains("at least 300 px"));
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
        assert!(validate_new_task(&v, Rules::upstream((1, 4), "kling-v2-1")).is_ok());
    }

    #[test]
    fn nul_characters_are_refused_in_every_text_field() {
        for field in [
            "prompt",
            "negative_prompt",
            "model_name",
            "notify_url",
            "scene_image",
        ] {
            let mut v = valid();
            v[field] = json!("a\u{0}b");
            assert_eq!(fields(v), vec![field.to_owned()], "{field}");
        }
        let mut v = valid();
        v["subject_image_list"][0]["subject_image"] = json!("https://e.x/a\u{0}.png");
        assert_eq!(fields(v), vec!["subject_image_list[0].subject_image"]);
    }

    #[test]
    fn size_and_aspect_rules_name_the_problem() {
        assert!(check_dimensions(300, 300).is_ok());
        assert!(check_dimensions(300, 750).is_ok());
        assert!(check_dimensions(299, 500)
            .unwrap_err()
            .contains("at least 300"));
        assert!(check_dimensions(751, 300)
            .unwrap_err()
            .contains("aspect ratio"));
        assert!(check_dimensions(300, 751)
            .unwrap_err()
            .contains("aspect ratio"));
    }

    #[test]
    fn profile_bounds_models_and_new_fields() {
        let one = json!({"subject_image_list": [{"subject_image": PNG_B64}]});
        assert!(validate_new_task(&one, api()).is_ok());
        let old_page = Rules::api((2, 4), "kling-v2", &[]);
        assert_eq!(
            validate_new_task(&one, old_page).unwrap_err()[0].field,
            "subject_image_list"
        );
        let models = vec!["kling-v2-1".to_owned()];
        let mut v = valid();
        v["model_name"] = json!("kling-v9");
        let e = validate_new_task(&v, Rules::api((1, 4), "kling-v2-1", &models)).unwrap_err();
        assert!(e[0].message.contains("kling-v2-1"), "{e:?}");
        let mut v = valid();
        v["negative_prompt"] = json!("blurry");
        v["watermark_info"] = json!({"enabled": true});
        let t = validate_new_task(&v, api()).unwrap();
        assert_eq!(t.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(t.watermark_info, Some(json!({"enabled": true})));
        v["negative_prompt"] = json!("x".repeat(2501));
        v["watermark_info"] = json!({"enabled": "yes"});
        let f = fields(v);
        assert!(
            f.contains(&"negative_prompt".to_owned())
                && f.contains(&"watermark_info.enabled".to_owned()),
            "{f:?}"
        );
    }

    #[test]
    fn upstream_ignores_unknown_fields_the_api_refuses_them() {
        let mut v = valid();
        v["resolution"] = json!("2k");
        assert!(validate_new_task(&v, Rules::upstream((1, 4), "kling-v2-1")).is_ok());
        assert_eq!(fields(v), vec!["resolution"]);
    }
}

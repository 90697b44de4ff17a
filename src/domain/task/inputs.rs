//! A task's input images: kept whole until dispatch, summarized for as long as the task lives.

/// The request's images, kept until the task leaves `pending` (sent upstream, or final): after
/// that no dispatch can need them again, and a Base64 image is megabytes per task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskInputs {
    pub subject_images: Vec<String>,
    pub scene_image: Option<String>,
    pub style_image: Option<String>,
    pub negative_prompt: Option<String>,
    pub watermark_info: Option<serde_json::Value>,
}

/// What an input image was, kept for as long as the task: its URL, or the size of its Base64.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputImage {
    /// `subject`, `scene` or `style`.
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub url: Option<String>,
    /// Decoded size of a Base64 image.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub base64_bytes: Option<u64>,
    /// `png` or `jpeg`, with the size in pixels, read from a Base64 image's header.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub height: Option<u32>,
}

/// Format and pixel size of a Base64 image, from a decoded prefix (the header is near the
/// start; a JPEG's may follow up to 64 KB of metadata).
fn header_of(raw: &str) -> Option<(&'static str, u32, u32)> {
    use base64::Engine;
    let prefix = &raw.as_bytes()[..raw.len().min(87_384)];
    let usable = prefix.len() / 4 * 4;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&prefix[..usable])
        .ok()?;
    let format = if bytes.starts_with(b"\x89PNG") {
        "png"
    } else {
        "jpeg"
    };
    let (w, h) = crate::domain::image_header::dimensions(&bytes).ok()?;
    Some((format, w, h))
}

/// Bytes the summarized images take as Base64 (URLs count nothing).
pub fn base64_len(summary: &[InputImage]) -> usize {
    summary
        .iter()
        .filter_map(|i| i.base64_bytes)
        .map(|b| usize::try_from(b.div_ceil(3) * 4).unwrap_or(usize::MAX))
        .fold(0, usize::saturating_add)
}

impl TaskInputs {
    /// One entry per image, in request order: the summary that outlives the images.
    pub fn summary(&self) -> Vec<InputImage> {
        let entry = |role: &str, raw: &str| {
            let is_url = raw.starts_with("http://") || raw.starts_with("https://");
            let header = (!is_url).then(|| header_of(raw)).flatten();
            InputImage {
                role: role.to_owned(),
                url: is_url.then(|| raw.to_owned()),
                base64_bytes: (!is_url).then(|| {
                    let padding = raw.bytes().rev().take_while(|b| *b == b'=').count();
                    ((raw.len() / 4 * 3).saturating_sub(padding)) as u64
                }),
                format: header.map(|(f, _, _)| f.to_owned()),
                width: header.map(|(_, w, _)| w),
                height: header.map(|(_, _, h)| h),
            }
        };
        let mut out: Vec<InputImage> = self
            .subject_images
            .iter()
            .map(|s| entry("subject", s))
            .collect();
        if let Some(s) = &self.scene_image {
            out.push(entry("scene", s));
        }
        if let Some(s) = &self.style_image {
            out.push(entry("style", s));
        }
        out
    }
}

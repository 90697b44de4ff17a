//! `cometapi`: today's CometAPI multi-image page. The create route is `multi-image2image`; the
//! older `/images/generations` is now the text-to-image route. The lookup by `external_task_id`
//! is undocumented on CometAPI: `kling-relay doctor` tells which form answers.

use super::{Defaults, ExternalLookup, COMETAPI_BASE_URL, COMETAPI_MULTI_IMAGE_PATH};

pub(super) const DEFAULTS: Defaults = Defaults {
    base_url: COMETAPI_BASE_URL,
    create_path: COMETAPI_MULTI_IMAGE_PATH,
    scene_image_field: "scene_image",
    default_model: "kling-v2-1",
    subject_images: (1, 4),
    external_lookup: ExternalLookup::Query,
};

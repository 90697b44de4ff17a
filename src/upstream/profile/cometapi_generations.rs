//! `cometapi-generations`: the user's original CometAPI page, kept one setting away for accounts
//! where it is what works: `/images/generations`, the `scence_image` spelling, 2 to 4 subjects.

use super::{Defaults, ExternalLookup, COMETAPI_BASE_URL, COMETAPI_TEXT_TO_IMAGE_PATH};

pub(super) const DEFAULTS: Defaults = Defaults {
    base_url: COMETAPI_BASE_URL,
    create_path: COMETAPI_TEXT_TO_IMAGE_PATH,
    scene_image_field: "scence_image",
    default_model: "kling-v2",
    subject_images: (2, 4),
    external_lookup: ExternalLookup::Query,
};

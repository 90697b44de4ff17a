//! `kling`: Kling's own API, for teams with a direct Kling account. Authenticated with a JWT
//! (see `upstream::jwt`); the single-task query takes the `external_task_id` in its id slot.

use super::{Defaults, ExternalLookup, KLING_BASE_URL, KLING_MULTI_IMAGE_PATH};

pub(super) const DEFAULTS: Defaults = Defaults {
    base_url: KLING_BASE_URL,
    create_path: KLING_MULTI_IMAGE_PATH,
    scene_image_field: "scene_image",
    default_model: "kling-v2-1",
    subject_images: (1, 4),
    external_lookup: ExternalLookup::Path,
};

-- What intake has admitted, ever: in all (scope `*`) and per client (scope = its name). Only
-- intake makes tasks wait, so a count of the waiting tasks plus what was admitted since bounds
-- them without reading them all (storage/intake/pending.rs). Moved only by an insert batch,
-- under the submit lock.
CREATE TABLE intake_counts (
    scope TEXT PRIMARY KEY,
    admitted BIGINT NOT NULL
);

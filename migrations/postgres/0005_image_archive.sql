-- The image archive: one row per result image of a succeeded task, written in the same
-- transaction as the success (or by `kling-relay archive backfill`). A row is due for the archiver
-- while `next_attempt_at` is set; a claim moves it to the end of a lease.
CREATE TABLE task_images (
    task_id         TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    idx             BIGINT NOT NULL,       -- the image's index in the task result
    url             TEXT NOT NULL,         -- upstream URL (expires after about 30 days)
    state           TEXT NOT NULL,         -- pending | stored | failed | deleted
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,                -- due time while pending; NULL otherwise
    object_key      TEXT,                  -- where the bytes are, inside the archive
    content_type    TEXT,                  -- image/png or image/jpeg
    size_bytes      BIGINT,
    sha256          TEXT,                  -- hex; the image route's ETag
    error           TEXT,                  -- why the last attempt failed
    stored_at       BIGINT,
    deleted_at      BIGINT,                -- set by the retention sweep
    updated_at      BIGINT NOT NULL,
    PRIMARY KEY (task_id, idx)
);

CREATE INDEX task_images_due ON task_images (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX task_images_stored ON task_images (stored_at) WHERE state = 'stored';

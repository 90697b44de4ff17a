-- Times are Unix epoch milliseconds (UTC), as upstream reports them; JSON is stored as text.
CREATE TABLE tasks (
    id                  TEXT PRIMARY KEY,          -- UUIDv7, made here
    external_task_id    TEXT NOT NULL UNIQUE,      -- sent upstream; unique per upstream account
    upstream_task_id    TEXT UNIQUE,               -- upstream's task_id once known
    status              TEXT NOT NULL,
    upstream_status     TEXT,
    model_name          TEXT NOT NULL,
    prompt              TEXT,
    n                   INTEGER NOT NULL,
    aspect_ratio        TEXT,
    metadata            TEXT,
    images              TEXT,
    error_code          TEXT,
    error_message       TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    completed_at        INTEGER,
    upstream_updated_at INTEGER,
    version             INTEGER NOT NULL DEFAULT 0, -- optimistic concurrency for status changes
    dispatch_attempts   INTEGER NOT NULL DEFAULT 0,
    next_dispatch_at    INTEGER,                    -- set only while pending: when to (re)try the create call
    dispatch_started_at INTEGER,                    -- set while a create call may have reached upstream
    poll_due_at         INTEGER,                    -- set only while submitted/processing
    poll_count          INTEGER NOT NULL DEFAULT 0
);

-- History listing, newest first, with and without a status filter (keyset on created_at, id).
CREATE INDEX tasks_created ON tasks (created_at, id);
CREATE INDEX tasks_status_created ON tasks (status, created_at, id);
-- Background work reads only rows that have work: final tasks are not in these indexes at all.
CREATE INDEX tasks_dispatch_due ON tasks (next_dispatch_at) WHERE next_dispatch_at IS NOT NULL;
CREATE INDEX tasks_poll_due ON tasks (poll_due_at) WHERE poll_due_at IS NOT NULL;
CREATE INDEX tasks_open_by_age ON tasks (created_at) WHERE status IN ('pending', 'submitted', 'processing');

-- The request's images, needed to dispatch; kept out of `tasks` so listings never read them.
CREATE TABLE task_inputs (
    task_id        TEXT PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    subject_images TEXT NOT NULL,   -- JSON array of strings
    scene_image    TEXT,
    style_image    TEXT
);

CREATE TABLE task_events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id         TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    at              INTEGER NOT NULL,
    source          TEXT NOT NULL,
    status          TEXT NOT NULL,
    upstream_status TEXT,
    detail          TEXT
);
CREATE INDEX task_events_task ON task_events (task_id, id);

CREATE TABLE service_secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

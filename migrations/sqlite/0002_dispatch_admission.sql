-- Units possibly held upstream by creates in flight or in doubt (pending tasks with a create
-- that may have landed); counted on every dispatch pass.
CREATE INDEX tasks_dispatch_in_flight ON tasks (dispatch_started_at) WHERE dispatch_started_at IS NOT NULL;

-- Idempotency-Key of POST /v1/tasks: one task per key for 24 hours. `scope` is the caller
-- (empty until callers are authenticated).
CREATE TABLE idempotency_keys (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    task_id      TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

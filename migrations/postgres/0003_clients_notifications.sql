-- Internal clients. A client is known by its name for good: names are never reused, so a task's
-- `client` column can hold the name itself.
CREATE TABLE clients (
    name                    TEXT PRIMARY KEY,
    api_key_hash            TEXT NOT NULL UNIQUE,   -- SHA-256 of the key (hex); the key itself is never stored
    api_key_prefix          TEXT NOT NULL,          -- first characters, to tell keys apart in listings
    signing_secret          TEXT NOT NULL,          -- whsec_...: needed in clear to sign notifications
    previous_signing_secret TEXT,                   -- still valid (and still used) until it expires
    previous_secret_expires_at BIGINT,
    notify_url              TEXT,                   -- default for tasks that name none
    created_at              BIGINT NOT NULL,
    revoked_at              BIGINT
);

ALTER TABLE tasks ADD COLUMN client TEXT;
ALTER TABLE tasks ADD COLUMN notify_url TEXT;

-- History is always per client.
CREATE INDEX tasks_client_created ON tasks (client, created_at, id);
CREATE INDEX tasks_client_status_created ON tasks (client, status, created_at, id);

-- The outbox: one row per (status change, destination), written in the same transaction as the
-- change. `id` is the Standard Webhooks `webhook-id`, stable across attempts.
CREATE TABLE deliveries (
    id               TEXT PRIMARY KEY,
    task_id          TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    client           TEXT NOT NULL,
    url              TEXT NOT NULL,
    event_status     TEXT NOT NULL,
    payload          TEXT NOT NULL,
    state            TEXT NOT NULL,   -- pending | delivered | dead | disabled
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT,         -- set only while pending
    last_status_code BIGINT,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    delivered_at     BIGINT
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_task ON deliveries (task_id, created_at);
CREATE INDEX deliveries_pending_url ON deliveries (client, url) WHERE state = 'pending';

CREATE TABLE delivery_attempts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id TEXT NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    at          BIGINT NOT NULL,
    status_code BIGINT,
    error       TEXT,
    duration_ms BIGINT NOT NULL
);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id, id);

-- A receiver answered 410 Gone: nothing more is sent to this URL for this client.
CREATE TABLE disabled_urls (
    client      TEXT NOT NULL,
    url         TEXT NOT NULL,
    disabled_at BIGINT NOT NULL,
    PRIMARY KEY (client, url)
);

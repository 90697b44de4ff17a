-- Dashboard sign-ins: the cookie holds a random session id, never the API key; only its SHA-256
-- is stored. A session ends on sign-out, after its idle or absolute lifetime, and with its client.
CREATE TABLE ui_sessions (
    id_hash TEXT PRIMARY KEY,
    client TEXT NOT NULL REFERENCES clients (name),
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL
);
CREATE INDEX ui_sessions_client ON ui_sessions (client);

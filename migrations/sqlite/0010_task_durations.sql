-- When a task left `pending` (sent upstream): `submitted_at` on this service's clock, and
-- `upstream_started_at`, upstream's own `updated_at` in that first answer (its clock). Durations
-- learned from them tell the poller when a running task is likely finishing.
ALTER TABLE tasks ADD COLUMN submitted_at BIGINT;
ALTER TABLE tasks ADD COLUMN upstream_started_at BIGINT;

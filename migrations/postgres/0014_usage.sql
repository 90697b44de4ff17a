-- Usage and budgets (issue 16). A task's cost is upstream's `final_unit_deduction` (already
-- stored as text); `cost_source` says which channel reported it (callback, poll, dispatch).
ALTER TABLE tasks ADD COLUMN cost_source TEXT;
-- Per-client budgets in units; null: none.
ALTER TABLE clients ADD COLUMN units_per_day BIGINT;
ALTER TABLE clients ADD COLUMN units_per_month BIGINT;
-- Tasks that ended, by client, model, UTC hour of their end and final status, kept in the same
-- transaction as the status change: usage answers read these, never the tasks table. Each
-- group is split over a few `shard`s (by task id), so concurrent commits of one client do not
-- all queue on one row's lock; readers sum the shards.
CREATE TABLE usage_hourly (
    client TEXT NOT NULL,
    hour_start BIGINT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    shard BIGINT NOT NULL,
    tasks BIGINT NOT NULL,
    units_milli BIGINT NOT NULL,
    PRIMARY KEY (client, hour_start, model, status, shard)
);
CREATE INDEX usage_hourly_hour ON usage_hourly (hour_start);
-- Histogram of upstream durations (submitted to end) per client and hour: bin b holds durations
-- in [1.05^b, 1.05^(b+1)) ms.
CREATE TABLE usage_durations (
    client TEXT NOT NULL,
    hour_start BIGINT NOT NULL,
    bin BIGINT NOT NULL,
    shard BIGINT NOT NULL,
    tasks BIGINT NOT NULL,
    PRIMARY KEY (client, hour_start, bin, shard)
);
-- Budget thresholds a client was told about, once per threshold and period.
CREATE TABLE budget_alerts (
    client TEXT NOT NULL,
    period TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    threshold BIGINT NOT NULL,
    sent_at BIGINT NOT NULL,
    PRIMARY KEY (client, period, period_start, threshold)
);
CREATE INDEX usage_durations_hour ON usage_durations (hour_start);

-- What upstream sent (its task object, as JSON text) with the change an event records; shown by
-- the dashboard on demand. NULL for changes of our own (submit, cancel, time-out).
ALTER TABLE task_events ADD COLUMN upstream_payload TEXT;

-- The x-request-id of the POST that created the task, sent upstream with its create call so one
-- id follows the task across both services' logs.
ALTER TABLE tasks ADD COLUMN request_id TEXT;

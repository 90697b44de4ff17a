-- Each client's next dispatches without reading the whole backlog (storage::sql::DUE_DISPATCHES_PG):
-- the clients with due work are found by skipping through this index, and each client's first
-- few in dispatch order (priority, due time, id) are its first entries. The window query it
-- replaces on Postgres read and sorted every due task on every pass.
CREATE INDEX tasks_dispatch_by_client ON tasks (
    (COALESCE(client, '')),
    (CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END),
    next_dispatch_at,
    id
) WHERE next_dispatch_at IS NOT NULL;

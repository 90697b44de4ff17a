-- Fair share between clients (issue 15): a client's weight and optional cap in units, and a
-- task's priority within its client's queue.
ALTER TABLE clients ADD COLUMN weight BIGINT NOT NULL DEFAULT 1;
ALTER TABLE clients ADD COLUMN max_units BIGINT;
ALTER TABLE tasks ADD COLUMN priority TEXT NOT NULL DEFAULT 'normal';

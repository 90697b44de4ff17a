-- Fair share between clients (issue 15): a client's weight and optional cap in units, and a
-- task's priority within its client's queue.
ALTER TABLE clients ADD COLUMN weight INTEGER NOT NULL DEFAULT 1;
ALTER TABLE clients ADD COLUMN max_units INTEGER;
ALTER TABLE tasks ADD COLUMN priority TEXT NOT NULL DEFAULT 'normal';

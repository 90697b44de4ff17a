-- The dashboard's notifications view: deliveries that failed for good, or are failing now,
-- across tasks, newest first, without reading the delivered majority.
CREATE INDEX deliveries_troubled ON deliveries (created_at)
    WHERE state IN ('dead', 'disabled') OR (state = 'pending' AND attempts > 0);

-- Rates shared by every replica on the database (generic cell rate algorithm): `tat` is the
-- theoretical arrival time, in microseconds, of the next call the rate allows.
CREATE TABLE rate_limits (
    name TEXT PRIMARY KEY,
    tat BIGINT NOT NULL
);

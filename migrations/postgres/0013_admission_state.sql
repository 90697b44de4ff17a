-- What dispatch admission has learnt about the upstream account (issue 15): the working limit
-- after a `1303`, the pause, and how regrowth stands. One row per account; every replica adopts
-- it on each dispatch claim and changes it by read-modify-write, so a refusal seen by one
-- replica shrinks and pauses all of them, and a restart keeps what was learnt.
CREATE TABLE admission_state (
    account TEXT PRIMARY KEY,
    working_limit BIGINT NOT NULL,
    paused_until BIGINT NOT NULL,
    busy_streak BIGINT NOT NULL,
    finished_units BIGINT NOT NULL,
    refused_at BIGINT,
    last_refused_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

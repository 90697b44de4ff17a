-- Fair share's memory (domain/fair_share.rs, issue 15): each client's pass (units sent over its
-- weight, on one virtual clock) and the virtual time where a client that starts waiting again
-- begins. Read and moved in the dispatch claim's transaction, under the admission lock.
CREATE TABLE fair_passes (
    client TEXT PRIMARY KEY,
    pass BIGINT NOT NULL
);
CREATE TABLE fair_clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    virtual_time BIGINT NOT NULL
);
INSERT INTO fair_clock (id, virtual_time) VALUES (1, 0);

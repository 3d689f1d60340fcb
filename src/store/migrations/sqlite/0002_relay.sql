-- Upstream delivery state: one durable cursor per upstream (every rating with feed_seq <=
-- cursor was delivered or dead-lettered), and whether an operator paused it.
CREATE TABLE upstream_state (
    upstream    TEXT    PRIMARY KEY,
    cursor      INTEGER NOT NULL,
    paused      INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL
);

-- Ratings an upstream rejected permanently, with its error text. A replay re-sends them;
-- `resolved_at` is set when a replay delivered one.
CREATE TABLE dead_letters (
    id                INTEGER PRIMARY KEY,
    upstream          TEXT    NOT NULL,
    feed_seq          INTEGER NOT NULL,
    error             TEXT    NOT NULL,
    attempts          INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    replay_requested  INTEGER NOT NULL DEFAULT 0,
    resolved_at       INTEGER
);

CREATE INDEX dead_letters_upstream ON dead_letters (upstream, id);

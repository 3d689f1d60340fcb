-- The adapter's durable spool: a rating is acknowledged to its source only after it is here,
-- and leaves only when the hub answered for it.
CREATE TABLE spool (
    id          INTEGER PRIMARY KEY,
    source_key  TEXT    NOT NULL UNIQUE,
    rating      BLOB    NOT NULL,          -- ratinghub.v1.Rating, protobuf
    state       INTEGER NOT NULL DEFAULT 0, -- 0 waiting, 1 delivered, 2 refused by the hub
    attempts    INTEGER NOT NULL DEFAULT 0,
    outcome     TEXT    NOT NULL DEFAULT '', -- the hub's answer (refusal reasons)
    hub_id      TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE INDEX spool_waiting ON spool (state, id);

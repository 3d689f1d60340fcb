-- Every delivery attempt to an upstream (one send), kept for `[ops] attempt_log_days`.
CREATE TABLE relay_attempts (
    id           INTEGER PRIMARY KEY,
    upstream     TEXT    NOT NULL,
    at           INTEGER NOT NULL,
    first_seq    INTEGER NOT NULL,
    last_seq     INTEGER NOT NULL,
    records      INTEGER NOT NULL,
    outcome      TEXT    NOT NULL,
    detail       TEXT    NOT NULL,
    duration_ms  INTEGER NOT NULL,
    replay_id    INTEGER
);
CREATE INDEX relay_attempts_upstream ON relay_attempts (upstream, id);
CREATE INDEX relay_attempts_at ON relay_attempts (at);

-- An operator's request to send an upstream a range of the feed again: who, when, why, which
-- range, and how far it got.
CREATE TABLE relay_replays (
    id            INTEGER PRIMARY KEY,
    upstream      TEXT    NOT NULL,
    from_seq      INTEGER NOT NULL,
    to_seq        INTEGER NOT NULL,
    next_seq      INTEGER NOT NULL,
    requested_by  TEXT    NOT NULL,
    requested_at  INTEGER NOT NULL,
    reason        TEXT    NOT NULL,
    done_at       INTEGER
);
CREATE INDEX relay_replays_upstream ON relay_replays (upstream, id);

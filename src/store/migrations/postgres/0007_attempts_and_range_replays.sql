-- Every delivery attempt to an upstream (one send), kept for `[ops] attempt_log_days`.
CREATE TABLE relay_attempts (
    id           BIGSERIAL PRIMARY KEY,
    upstream     TEXT COLLATE "C" NOT NULL,
    at           BIGINT  NOT NULL,
    first_seq    BIGINT  NOT NULL,
    last_seq     BIGINT  NOT NULL,
    records      BIGINT  NOT NULL,
    outcome      TEXT    NOT NULL,
    detail       TEXT    NOT NULL,
    duration_ms  BIGINT  NOT NULL,
    replay_id    BIGINT
);
CREATE INDEX relay_attempts_upstream ON relay_attempts (upstream, id);
CREATE INDEX relay_attempts_at ON relay_attempts (at);

-- An operator's request to send an upstream a range of the feed again: who, when, why, which
-- range, and how far it got.
CREATE TABLE relay_replays (
    id            BIGSERIAL PRIMARY KEY,
    upstream      TEXT COLLATE "C" NOT NULL,
    from_seq      BIGINT  NOT NULL,
    to_seq        BIGINT  NOT NULL,
    next_seq      BIGINT  NOT NULL,
    requested_by  TEXT    NOT NULL,
    requested_at  BIGINT  NOT NULL,
    reason        TEXT    NOT NULL,
    done_at       BIGINT
);
CREATE INDEX relay_replays_upstream ON relay_replays (upstream, id);

-- Surveys: one per invitation the hub issued; the reply code (dest_code) identifies it.
CREATE TABLE surveys (
    id             INTEGER PRIMARY KEY,
    dest_code      TEXT    NOT NULL UNIQUE,
    invitation_id  INTEGER NOT NULL UNIQUE,
    service_case   BLOB    NOT NULL, -- ratinghub.v1.ServiceCase (applicant included)
    phone          TEXT    NOT NULL,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    sent_at        INTEGER,
    answered_at    INTEGER
);

-- Replies that are not ratings of a known, open survey: kept with the reason, never guessed.
CREATE TABLE unmatched_replies (
    id           INTEGER PRIMARY KEY,
    received_at  INTEGER NOT NULL,
    channel      TEXT    NOT NULL,
    dest_code    TEXT    NOT NULL,
    reason       TEXT    NOT NULL,
    content      TEXT    NOT NULL
);

CREATE TABLE cursors (
    name   TEXT    PRIMARY KEY,
    value  INTEGER NOT NULL
);

-- Ratings: append-only. feed_seq is the gapless feed position, assigned by the single writer.
CREATE TABLE ratings (
    feed_seq        INTEGER PRIMARY KEY,
    hub_id          BLOB    NOT NULL UNIQUE,
    source_system   TEXT    NOT NULL,
    source_key      TEXT    NOT NULL,
    content_hash    BLOB    NOT NULL,
    level           INTEGER NOT NULL,
    channel         INTEGER NOT NULL,
    target_kind     INTEGER NOT NULL,
    org_credit_code TEXT    NOT NULL,
    region_code     TEXT    NOT NULL,
    item_code       TEXT    NOT NULL,
    staff_id        TEXT    NOT NULL,
    case_number     TEXT    NOT NULL,
    rated_at        INTEGER NOT NULL, -- microseconds since the Unix epoch
    received_at     INTEGER NOT NULL, -- commit time, microseconds since the Unix epoch
    is_default      INTEGER NOT NULL,
    quality_flags   INTEGER NOT NULL, -- bit set of QualityFlag numbers
    body            BLOB    NOT NULL, -- the canonical ratinghub.v1.Rating without rater PII
    pii             BLOB,             -- rater name / ID number / phone, AEAD-sealed (privacy.rs)
    pii_key_id      TEXT,             -- the key that sealed `pii`
    follow_up_of    TEXT    NOT NULL, -- source key of the rating this one follows up ('' if none)
    batch_id        TEXT    NOT NULL,
    theme_id        TEXT    NOT NULL,
    device_id       TEXT    NOT NULL,
    template_hash   BLOB,             -- fingerprint of level + text + codes, when there is text
    phone_tag       BLOB,             -- keyed pseudonym of the rater's phone (bursts), never the phone
    UNIQUE (source_system, source_key)
);

CREATE INDEX ratings_org ON ratings (org_credit_code, feed_seq);
CREATE INDEX ratings_region ON ratings (region_code, feed_seq);
CREATE INDEX ratings_case ON ratings (case_number);
CREATE INDEX ratings_batch ON ratings (org_credit_code, batch_id) WHERE batch_id <> '';
CREATE INDEX ratings_theme ON ratings (org_credit_code, theme_id) WHERE theme_id <> '';
CREATE INDEX ratings_follow_up ON ratings (source_system, follow_up_of) WHERE follow_up_of <> '';
CREATE INDEX ratings_template ON ratings (source_system, template_hash, rated_at)
    WHERE template_hash IS NOT NULL;
CREATE INDEX ratings_device ON ratings (device_id, rated_at) WHERE device_id <> '';
CREATE INDEX ratings_phone ON ratings (phone_tag, rated_at) WHERE phone_tag IS NOT NULL;

CREATE TRIGGER ratings_append_only_update BEFORE UPDATE ON ratings
BEGIN
    SELECT RAISE(ABORT, 'ratings are append-only');
END;

CREATE TRIGGER ratings_append_only_delete BEFORE DELETE ON ratings
BEGIN
    SELECT RAISE(ABORT, 'ratings are append-only');
END;

-- 办件 events: append-only, one row per (source, case, event).
CREATE TABLE service_case_events (
    id              INTEGER PRIMARY KEY,
    source_system   TEXT    NOT NULL,
    case_number     TEXT    NOT NULL,
    event           INTEGER NOT NULL,
    occurred_at     INTEGER NOT NULL,
    item_code       TEXT    NOT NULL,
    region_code     TEXT    NOT NULL,
    org_credit_code TEXT    NOT NULL,
    staff_id        TEXT    NOT NULL,
    channel         INTEGER NOT NULL,
    batch_id        TEXT    NOT NULL,
    theme_id        TEXT    NOT NULL,
    content_hash    BLOB    NOT NULL,
    received_at     INTEGER NOT NULL,
    body            BLOB    NOT NULL, -- the canonical ratinghub.v1.ServiceCase without applicant PII
    pii             BLOB,
    pii_key_id      TEXT,
    UNIQUE (source_system, case_number, event)
);

CREATE INDEX service_case_events_org ON service_case_events (org_credit_code, occurred_at);

CREATE TRIGGER service_case_events_append_only_update BEFORE UPDATE ON service_case_events
BEGIN
    SELECT RAISE(ABORT, 'service case events are append-only');
END;

CREATE TRIGGER service_case_events_append_only_delete BEFORE DELETE ON service_case_events
BEGIN
    SELECT RAISE(ABORT, 'service case events are append-only');
END;

-- Every read of unmasked personal data: who, when, through which call, which rating.
CREATE TABLE pii_access (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL, -- microseconds since the Unix epoch
    principal   TEXT    NOT NULL,
    rpc         TEXT    NOT NULL,
    hub_id      BLOB    NOT NULL
);

CREATE INDEX pii_access_principal ON pii_access (principal, id);

CREATE TRIGGER pii_access_append_only_update BEFORE UPDATE ON pii_access
BEGIN
    SELECT RAISE(ABORT, 'the audit trail is append-only');
END;

CREATE TRIGGER pii_access_append_only_delete BEFORE DELETE ON pii_access
BEGIN
    SELECT RAISE(ABORT, 'the audit trail is append-only');
END;

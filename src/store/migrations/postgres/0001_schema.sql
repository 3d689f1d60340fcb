-- The PostgreSQL schema: the same tables as the SQLite backend (src/store/migrations/sqlite),
-- with PostgreSQL's types, plus what several hub instances on one database need: the feed
-- head row every writer locks (one sequencer) and relay leases.
--
-- Times are microseconds since the Unix epoch (BIGINT), as on SQLite, so both backends give
-- the same answers; UUIDs and digests are BYTEA. Codes and keys use the "C" collation: they
-- compare byte by byte, as on SQLite, so region prefix ranges and orderings agree.

-- The feed head. Every group commit locks this row first (SELECT … FOR UPDATE), so writers
-- of every instance commit one after another: feed sequences are assigned in commit order
-- with no gaps, and a reader never sees a rating before an earlier-numbered one.
CREATE TABLE feed_head (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    head    BIGINT  NOT NULL
);
INSERT INTO feed_head (id, head) VALUES (1, 0);

-- Ratings: append-only. feed_seq is the gapless feed position.
CREATE TABLE ratings (
    feed_seq        BIGINT  PRIMARY KEY,
    hub_id          BYTEA   NOT NULL UNIQUE,
    source_system   TEXT COLLATE "C" NOT NULL,
    source_key      TEXT COLLATE "C" NOT NULL,
    content_hash    BYTEA   NOT NULL,
    level           INTEGER NOT NULL,
    channel         INTEGER NOT NULL,
    target_kind     INTEGER NOT NULL,
    org_credit_code TEXT COLLATE "C" NOT NULL,
    region_code     TEXT COLLATE "C" NOT NULL,
    item_code       TEXT COLLATE "C" NOT NULL,
    staff_id        TEXT COLLATE "C" NOT NULL,
    case_number     TEXT COLLATE "C" NOT NULL,
    rated_at        BIGINT  NOT NULL,
    received_at     BIGINT  NOT NULL,
    is_default      BOOLEAN NOT NULL,
    quality_flags   BIGINT  NOT NULL, -- bit set of QualityFlag numbers
    body            BYTEA   NOT NULL, -- the canonical ratinghub.v1.Rating without rater PII
    pii             BYTEA,            -- rater name / ID number / phone, AEAD-sealed (privacy.rs)
    pii_key_id      TEXT,
    follow_up_of    TEXT    NOT NULL,
    batch_id        TEXT    NOT NULL,
    theme_id        TEXT    NOT NULL,
    device_id       TEXT    NOT NULL,
    template_hash   BYTEA,
    phone_tag       BYTEA,            -- keyed pseudonym of the rater's phone, never the phone
    UNIQUE (source_system, source_key)
);

CREATE INDEX ratings_org ON ratings (org_credit_code, feed_seq);
CREATE INDEX ratings_region ON ratings (region_code, feed_seq);
CREATE INDEX ratings_case ON ratings (case_number);
CREATE INDEX ratings_org_case ON ratings (org_credit_code, case_number);
CREATE INDEX ratings_batch ON ratings (org_credit_code, batch_id) WHERE batch_id <> '';
CREATE INDEX ratings_theme ON ratings (org_credit_code, theme_id) WHERE theme_id <> '';
CREATE INDEX ratings_follow_up ON ratings (source_system, follow_up_of) WHERE follow_up_of <> '';
CREATE INDEX ratings_template ON ratings (source_system, template_hash, rated_at)
    WHERE template_hash IS NOT NULL;
CREATE INDEX ratings_device ON ratings (device_id, rated_at) WHERE device_id <> '';
CREATE INDEX ratings_phone ON ratings (phone_tag, rated_at) WHERE phone_tag IS NOT NULL;

CREATE FUNCTION rating_hub_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER ratings_append_only BEFORE UPDATE OR DELETE ON ratings
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();

-- 办件 events: append-only, one row per (source, case, event).
CREATE TABLE service_case_events (
    id              BIGSERIAL PRIMARY KEY,
    source_system   TEXT COLLATE "C" NOT NULL,
    case_number     TEXT COLLATE "C" NOT NULL,
    event           INTEGER NOT NULL,
    occurred_at     BIGINT  NOT NULL,
    item_code       TEXT COLLATE "C" NOT NULL,
    region_code     TEXT COLLATE "C" NOT NULL,
    org_credit_code TEXT COLLATE "C" NOT NULL,
    staff_id        TEXT COLLATE "C" NOT NULL,
    channel         INTEGER NOT NULL,
    batch_id        TEXT    NOT NULL,
    theme_id        TEXT    NOT NULL,
    content_hash    BYTEA   NOT NULL,
    received_at     BIGINT  NOT NULL,
    body            BYTEA   NOT NULL, -- the canonical ratinghub.v1.ServiceCase without applicant PII
    pii             BYTEA,
    pii_key_id      TEXT,
    UNIQUE (source_system, case_number, event)
);

CREATE INDEX service_case_events_org ON service_case_events (org_credit_code, occurred_at);
CREATE INDEX service_case_events_completed ON service_case_events (event, id);

CREATE TRIGGER service_case_events_append_only BEFORE UPDATE OR DELETE ON service_case_events
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();

-- Every read of unmasked personal data.
CREATE TABLE pii_access (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT  NOT NULL,
    principal   TEXT    NOT NULL,
    rpc         TEXT    NOT NULL,
    hub_id      BYTEA   NOT NULL
);

CREATE INDEX pii_access_principal ON pii_access (principal, id);

CREATE TRIGGER pii_access_append_only BEFORE UPDATE OR DELETE ON pii_access
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();

-- Upstream delivery state, and which instance delivers to the upstream: the lease holder,
-- until `lease_until` (the database's clock) unless it renews.
CREATE TABLE upstream_state (
    upstream     TEXT    PRIMARY KEY,
    cursor       BIGINT  NOT NULL,
    paused       BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at   BIGINT  NOT NULL,
    lease_holder TEXT,
    lease_until  TIMESTAMPTZ
);

CREATE TABLE dead_letters (
    id                BIGSERIAL PRIMARY KEY,
    upstream          TEXT    NOT NULL,
    feed_seq          BIGINT  NOT NULL,
    error             TEXT    NOT NULL,
    attempts          BIGINT  NOT NULL,
    created_at        BIGINT  NOT NULL,
    replay_requested  BOOLEAN NOT NULL DEFAULT FALSE,
    resolved_at       BIGINT
);

CREATE INDEX dead_letters_upstream ON dead_letters (upstream, id);

CREATE TABLE invitations (
    id              BIGSERIAL PRIMARY KEY,
    source_system   TEXT COLLATE "C" NOT NULL,
    case_number     TEXT COLLATE "C" NOT NULL,
    event_id        BIGINT  NOT NULL,
    org_credit_code TEXT COLLATE "C" NOT NULL,
    region_code     TEXT COLLATE "C" NOT NULL,
    due_at          BIGINT  NOT NULL,
    created_at      BIGINT  NOT NULL,
    UNIQUE (source_system, case_number)
);

-- 差评工单: one case per 差评 a rater gave, opened in the rating's own transaction.
CREATE TABLE bad_rating_cases (
    id              BIGSERIAL PRIMARY KEY,
    hub_id          BYTEA   NOT NULL UNIQUE,
    org_credit_code TEXT COLLATE "C" NOT NULL,
    region_code     TEXT COLLATE "C" NOT NULL,
    opened_at       BIGINT  NOT NULL,
    real_name       BOOLEAN NOT NULL
);

CREATE INDEX bad_rating_cases_org ON bad_rating_cases (org_credit_code, id);

CREATE TABLE bad_rating_case_entries (
    id              BIGSERIAL PRIMARY KEY,
    case_id         BIGINT  NOT NULL REFERENCES bad_rating_cases (id),
    action          INTEGER NOT NULL,
    actor           TEXT    NOT NULL,
    at              BIGINT  NOT NULL,
    note            TEXT    NOT NULL,
    evidence_refs   TEXT    NOT NULL, -- newline-separated
    new_deadline    BIGINT,
    appeal_outcome  INTEGER NOT NULL
);

CREATE INDEX bad_rating_case_entries_case ON bad_rating_case_entries (case_id, id);

CREATE TRIGGER bad_rating_case_entries_append_only BEFORE UPDATE OR DELETE ON bad_rating_case_entries
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();

CREATE TABLE rating_exclusions (
    hub_id      BYTEA   PRIMARY KEY,
    reason      INTEGER NOT NULL,
    case_id     BIGINT  NOT NULL,
    at          BIGINT  NOT NULL
);

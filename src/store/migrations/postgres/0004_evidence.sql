-- Evidence of rectification (佐证材料): each file stored once, by its SHA-256, sealed like
-- rater PII; a case's attachments name it. Both append-only: a file attached stays as it was.
CREATE TABLE evidence_blobs (
    sha256        TEXT COLLATE "C" PRIMARY KEY,
    content_type  TEXT    NOT NULL,
    size          BIGINT  NOT NULL,
    key_id        TEXT    NOT NULL,
    content       BYTEA   NOT NULL,
    created_at    BIGINT  NOT NULL
);

CREATE TABLE case_evidence (
    id            BIGSERIAL PRIMARY KEY,
    case_id       BIGINT  NOT NULL REFERENCES bad_rating_cases (id),
    sha256        TEXT COLLATE "C" NOT NULL REFERENCES evidence_blobs (sha256),
    file_name     TEXT    NOT NULL,
    attached_by   TEXT    NOT NULL,
    attached_at   BIGINT  NOT NULL,
    UNIQUE (case_id, sha256)
);

CREATE TRIGGER evidence_blobs_append_only BEFORE UPDATE OR DELETE ON evidence_blobs
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER case_evidence_append_only BEFORE UPDATE OR DELETE ON case_evidence
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();

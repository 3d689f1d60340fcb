-- Evidence of rectification (佐证材料): each file stored once, by its SHA-256, sealed like
-- rater PII; a case's attachments name it. Both append-only: a file attached stays as it was.
CREATE TABLE evidence_blobs (
    sha256        TEXT    PRIMARY KEY,   -- lowercase hex of the plain content
    content_type  TEXT    NOT NULL,      -- as detected from the content
    size          INTEGER NOT NULL,      -- bytes of the plain content
    key_id        TEXT    NOT NULL,      -- the privacy key that sealed it
    content       BLOB    NOT NULL,      -- nonce ‖ ciphertext ‖ tag
    created_at    INTEGER NOT NULL
);

CREATE TABLE case_evidence (
    id            INTEGER PRIMARY KEY,
    case_id       INTEGER NOT NULL REFERENCES bad_rating_cases (id),
    sha256        TEXT    NOT NULL REFERENCES evidence_blobs (sha256),
    file_name     TEXT    NOT NULL,
    attached_by   TEXT    NOT NULL,
    attached_at   INTEGER NOT NULL,
    UNIQUE (case_id, sha256)
);

CREATE TRIGGER evidence_blobs_append_only_update BEFORE UPDATE ON evidence_blobs
BEGIN
    SELECT RAISE(ABORT, 'evidence is append-only');
END;
CREATE TRIGGER evidence_blobs_append_only_delete BEFORE DELETE ON evidence_blobs
BEGIN
    SELECT RAISE(ABORT, 'evidence is append-only');
END;
CREATE TRIGGER case_evidence_append_only_update BEFORE UPDATE ON case_evidence
BEGIN
    SELECT RAISE(ABORT, 'evidence is append-only');
END;
CREATE TRIGGER case_evidence_append_only_delete BEFORE DELETE ON case_evidence
BEGIN
    SELECT RAISE(ABORT, 'evidence is append-only');
END;

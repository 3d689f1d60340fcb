-- 差评工单: one case per 差评 a rater gave, opened in the rating's own transaction.
CREATE TABLE bad_rating_cases (
    id              INTEGER PRIMARY KEY,
    hub_id          BLOB    NOT NULL UNIQUE,
    org_credit_code TEXT    NOT NULL,
    region_code     TEXT    NOT NULL,
    opened_at       INTEGER NOT NULL,
    real_name       INTEGER NOT NULL
);

CREATE INDEX bad_rating_cases_org ON bad_rating_cases (org_credit_code, id);

-- Every step of a case, appended with its actor and time; never edited.
CREATE TABLE bad_rating_case_entries (
    id              INTEGER PRIMARY KEY,
    case_id         INTEGER NOT NULL REFERENCES bad_rating_cases (id),
    action          INTEGER NOT NULL,
    actor           TEXT    NOT NULL,
    at              INTEGER NOT NULL,
    note            TEXT    NOT NULL,
    evidence_refs   TEXT    NOT NULL, -- newline-separated
    new_deadline    INTEGER,
    appeal_outcome  INTEGER NOT NULL
);

CREATE INDEX bad_rating_case_entries_case ON bad_rating_case_entries (case_id, id);

CREATE TRIGGER bad_rating_case_entries_append_only_update BEFORE UPDATE ON bad_rating_case_entries
BEGIN
    SELECT RAISE(ABORT, 'case history is append-only');
END;

CREATE TRIGGER bad_rating_case_entries_append_only_delete BEFORE DELETE ON bad_rating_case_entries
BEGIN
    SELECT RAISE(ABORT, 'case history is append-only');
END;

-- Ratings an appeal found invalid or malicious: stored as ever, left out of scores and rates.
CREATE TABLE rating_exclusions (
    hub_id      BLOB    PRIMARY KEY,
    reason      INTEGER NOT NULL,
    case_id     INTEGER NOT NULL,
    at          INTEGER NOT NULL
);

-- Invitations (reminders to rate) the rules engine issued for completed, unrated cases; an
-- adapter (SMS, hotline) or upstream pulls them. One per case.
CREATE TABLE invitations (
    id              INTEGER PRIMARY KEY,
    source_system   TEXT    NOT NULL,
    case_number     TEXT    NOT NULL,
    event_id        INTEGER NOT NULL,   -- the completion event in service_case_events
    org_credit_code TEXT    NOT NULL,
    region_code     TEXT    NOT NULL,
    due_at          INTEGER NOT NULL,   -- when the profile said to remind
    created_at      INTEGER NOT NULL,
    UNIQUE (source_system, case_number)
);

CREATE INDEX service_case_events_completed ON service_case_events (event, id);
CREATE INDEX ratings_org_case ON ratings (org_credit_code, case_number);

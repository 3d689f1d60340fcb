-- 办件 records go upstream too (a case's record before any rating of it): each upstream
-- keeps a second cursor over service_case_events (every event with id <= case_cursor was
-- delivered or dead-lettered).
ALTER TABLE upstream_state ADD COLUMN case_cursor INTEGER NOT NULL DEFAULT 0;

-- A dead letter is a rating's (feed_seq), or, with case_event_id set, a 办件 event's
-- (feed_seq 0).
ALTER TABLE dead_letters ADD COLUMN case_event_id INTEGER;

-- Appeal outcomes go upstream too (a rating found invalid or malicious, a default rating a
-- rater's own replaced): each upstream's third cursor, over rating_exclusions.seq, the
-- order the hub decided them in (set on insert by the trigger below; a column of its own,
-- since a VACUUM may renumber rowids). The table becomes append-only.
ALTER TABLE rating_exclusions ADD COLUMN seq INTEGER;
UPDATE rating_exclusions SET seq = rowid;
CREATE UNIQUE INDEX rating_exclusions_seq ON rating_exclusions (seq);

CREATE TRIGGER rating_exclusions_seq AFTER INSERT ON rating_exclusions WHEN NEW.seq IS NULL
BEGIN
    UPDATE rating_exclusions SET seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM rating_exclusions)
    WHERE rowid = NEW.rowid;
END;

CREATE TRIGGER rating_exclusions_append_only_update BEFORE UPDATE ON rating_exclusions
WHEN OLD.seq IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'rating exclusions are append-only');
END;

CREATE TRIGGER rating_exclusions_append_only_delete BEFORE DELETE ON rating_exclusions
BEGIN
    SELECT RAISE(ABORT, 'rating exclusions are append-only');
END;

ALTER TABLE upstream_state ADD COLUMN update_cursor INTEGER NOT NULL DEFAULT 0;

-- A dead letter of such an update: the exclusion's seq (feed_seq 0).
ALTER TABLE dead_letters ADD COLUMN update_seq INTEGER;

-- Open letters by rating: what a delivered case or rating re-queues.
CREATE INDEX dead_letters_open ON dead_letters (upstream, feed_seq) WHERE resolved_at IS NULL;

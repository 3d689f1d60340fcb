-- 办件 records go upstream too (a case's record before any rating of it): each upstream
-- keeps a second cursor over service_case_events (every event with id <= case_cursor was
-- delivered or dead-lettered).
ALTER TABLE upstream_state ADD COLUMN case_cursor INTEGER NOT NULL DEFAULT 0;

-- A dead letter is a rating's (feed_seq), or, with case_event_id set, a 办件 event's
-- (feed_seq 0).
ALTER TABLE dead_letters ADD COLUMN case_event_id INTEGER;

-- Appeal outcomes go upstream too (a rating found invalid or malicious, a default rating a
-- rater's own replaced): each upstream's third cursor, over rating_exclusions in insertion
-- order (its rowid: the table is append-only and written by one writer).
ALTER TABLE upstream_state ADD COLUMN update_cursor INTEGER NOT NULL DEFAULT 0;

-- A dead letter of such an update: the exclusion's rowid (feed_seq 0).
ALTER TABLE dead_letters ADD COLUMN update_seq INTEGER;

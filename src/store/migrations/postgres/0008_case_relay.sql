-- 办件 records go upstream too (a case's record before any rating of it): each upstream
-- keeps a second cursor over service_case_events (every event with id <= case_cursor was
-- delivered or dead-lettered).
ALTER TABLE upstream_state ADD COLUMN case_cursor BIGINT NOT NULL DEFAULT 0;

-- A dead letter is a rating's (feed_seq), or, with case_event_id set, a 办件 event's
-- (feed_seq 0).
ALTER TABLE dead_letters ADD COLUMN case_event_id BIGINT;

-- Appeal outcomes go upstream too (a rating found invalid or malicious, a default rating a
-- rater's own replaced): each upstream's third cursor, over rating_exclusions.seq. Every
-- write that adds an exclusion takes the sequencer's turn (postgres.rs), so seq follows
-- commit order across instances.
ALTER TABLE rating_exclusions ADD COLUMN seq BIGSERIAL;
CREATE UNIQUE INDEX rating_exclusions_seq ON rating_exclusions (seq);
ALTER TABLE upstream_state ADD COLUMN update_cursor BIGINT NOT NULL DEFAULT 0;

-- A dead letter of such an update: the exclusion's seq (feed_seq 0).
ALTER TABLE dead_letters ADD COLUMN update_seq BIGINT;

-- Open letters by rating: what a delivered case or rating re-queues.
CREATE INDEX dead_letters_open ON dead_letters (upstream, feed_seq) WHERE resolved_at IS NULL;

-- The rating log's leaves packed (src/merkle.rs, Layout; decision 0009): a new log keeps its
-- leaves in `log_leaves`, up to 32 consecutive leaf hashes per row (each row within one
-- aligned run of 32 positions), written once per commit group instead of one `log_nodes` row
-- per rating; `log_nodes` keeps levels 4, 8, 12, …. A log created before this migration
-- keeps its leaves in `log_nodes` (packed_leaves false) and goes on doing so.
ALTER TABLE log_meta ADD COLUMN packed_leaves BOOLEAN NOT NULL DEFAULT false;

-- Leaves first .. first + length(hashes) / 32 - 1 (feed positions first + 1 ..).
-- The CHECK holds every row to what the hub writes: whole hashes, 1 to 32 of them, within
-- one run.
CREATE TABLE log_leaves (
    first  BIGINT PRIMARY KEY,
    hashes BYTEA  NOT NULL,
    CHECK (first >= 0 AND length(hashes) BETWEEN 32 AND 1024 AND length(hashes) % 32 = 0
           AND first / 32 = (first + length(hashes) / 32 - 1) / 32)
);
-- Nor may a row overlap another (both lie within one run: look there): a leaf two rows hold
-- is refused here, not only when the hub or log verify reads it. Writers hold the
-- sequencer, so no two inserts race past this check.
CREATE OR REPLACE FUNCTION rating_hub_log_leaves_no_overlap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM log_leaves
        WHERE first BETWEEN NEW.first / 32 * 32 AND NEW.first + length(NEW.hashes) / 32 - 1
          AND first + length(hashes) / 32 > NEW.first
    ) THEN
        RAISE EXCEPTION 'log_leaves rows may not overlap';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER log_leaves_no_overlap BEFORE INSERT ON log_leaves
    FOR EACH ROW EXECUTE FUNCTION rating_hub_log_leaves_no_overlap();
CREATE TRIGGER log_leaves_append_only BEFORE UPDATE OR DELETE ON log_leaves
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER log_leaves_append_only_truncate BEFORE TRUNCATE ON log_leaves
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();

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
CREATE TRIGGER log_leaves_append_only BEFORE UPDATE OR DELETE ON log_leaves
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER log_leaves_append_only_truncate BEFORE TRUNCATE ON log_leaves
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();

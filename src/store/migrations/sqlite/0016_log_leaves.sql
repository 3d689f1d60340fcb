-- The rating log's leaves packed (src/merkle.rs, Layout; decision 0009): a new log keeps its
-- leaves in `log_leaves`, up to 32 consecutive leaf hashes per row (each row within one
-- aligned run of 32 positions), written once per commit group instead of one `log_nodes` row
-- per rating; `log_nodes` keeps levels 4, 8, 12, …. A log created before this migration
-- keeps its leaves in `log_nodes` (packed_leaves 0) and goes on doing so.
ALTER TABLE log_meta ADD COLUMN packed_leaves INTEGER NOT NULL DEFAULT 0
    CHECK (packed_leaves IN (0, 1));

-- Leaves first .. first + length(hashes) / 32 - 1 (feed positions first + 1 ..).
-- The CHECK holds every row to what the hub writes: whole hashes, 1 to 32 of them, within
-- one run.
CREATE TABLE log_leaves (
    first  INTEGER PRIMARY KEY,
    hashes BLOB    NOT NULL,
    CHECK (typeof(hashes) = 'blob' AND first >= 0 AND length(hashes) BETWEEN 32 AND 1024
           AND length(hashes) % 32 = 0
           AND first / 32 = (first + length(hashes) / 32 - 1) / 32)
);

-- Nor may a row overlap another (both lie within one run: look there): a leaf two rows hold
-- is refused here, not only when the hub or log verify reads it.
CREATE TRIGGER log_leaves_no_overlap BEFORE INSERT ON log_leaves
WHEN EXISTS (
    SELECT 1 FROM log_leaves
    WHERE first BETWEEN NEW.first / 32 * 32 AND NEW.first + length(NEW.hashes) / 32 - 1
      AND first + length(hashes) / 32 > NEW.first
)
BEGIN
    SELECT RAISE(ABORT, 'log_leaves rows may not overlap');
END;

CREATE TRIGGER log_leaves_append_only_update BEFORE UPDATE ON log_leaves
BEGIN
    SELECT RAISE(ABORT, 'log_leaves is append-only');
END;
CREATE TRIGGER log_leaves_append_only_delete BEFORE DELETE ON log_leaves
BEGIN
    SELECT RAISE(ABORT, 'log_leaves is append-only');
END;

-- One row the health probe rewrites while commits fail for a storage reason (a full disk, a
-- read-only server): a real row write, committed and flushed, tells whether commits work
-- again.
CREATE TABLE storage_probe (
    id  INTEGER PRIMARY KEY,
    at  BIGINT  NOT NULL
);

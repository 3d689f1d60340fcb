-- One row the health probe rewrites while commits fail for a storage reason (a full disk, a
-- read-only server): a real row write, committed and flushed, tells whether commits work
-- again. Its `pad` holds what the probe writes besides: as much as a group of ratings, so
-- that a disk with room for a tiny row but not for ratings is not taken for a working one.
CREATE TABLE storage_probe (
    id  INTEGER PRIMARY KEY,
    at  BIGINT  NOT NULL,
    pad BYTEA
);

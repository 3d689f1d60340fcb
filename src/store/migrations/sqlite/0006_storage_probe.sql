-- One row the health probe rewrites while commits fail for a storage reason (a full disk):
-- a real row write, committed and synced, tells whether commits work again.
CREATE TABLE storage_probe (
    id  INTEGER PRIMARY KEY,
    at  INTEGER NOT NULL
);

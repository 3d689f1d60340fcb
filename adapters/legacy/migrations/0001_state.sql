-- Where each source stands: a table's watermark, a file's next row.
CREATE TABLE checkpoints (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- Table rows that could not be turned into ratings, with the reason.
CREATE TABLE table_rejects (
    id          INTEGER PRIMARY KEY,
    source      TEXT    NOT NULL,
    row_key     TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    at          INTEGER NOT NULL,
    UNIQUE (source, row_key)
);

-- The rating log (src/merkle.rs, src/store/log.rs): every complete subtree of the Merkle tree
-- over the feed, by level and index (level 0: each rating's leaf hash at its feed position,
-- feed_seq - 1). Written by the writer in the same transaction as the ratings it covers.
CREATE TABLE log_nodes (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB    NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;

CREATE TRIGGER log_nodes_append_only_update BEFORE UPDATE ON log_nodes
BEGIN
    SELECT RAISE(ABORT, 'log_nodes is append-only');
END;
CREATE TRIGGER log_nodes_append_only_delete BEFORE DELETE ON log_nodes
BEGIN
    SELECT RAISE(ABORT, 'log_nodes is append-only');
END;

-- The log's hash function, fixed when the log is first written, and the feed's head then:
-- ratings up to it were stored before the log and get their leaves when the hub starts;
-- every later rating gets its leaf in its own commit, so a later rating without one was
-- written around the hub.
CREATE TABLE log_meta (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    hash_alg    TEXT    NOT NULL,
    backfill_to BIGINT  NOT NULL
);

-- Tree heads lower hubs reported (IngestService.ReportTreeHead), each with what checking it
-- found: accepted (signed by the principal's registered log key and consistent with the
-- last accepted head), inconsistent (a rating removed, changed or reordered), self_check
-- (the lower hub found its own stored ratings differ from its log), bad_signature. The
-- last accepted head of a principal is what the next one must extend.
CREATE TABLE peer_heads (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    principal   TEXT    NOT NULL,
    size        BIGINT  NOT NULL,
    root        BLOB  NOT NULL,
    head_time   BIGINT  NOT NULL,
    received_at BIGINT  NOT NULL,
    outcome     TEXT    NOT NULL,
    first_bad   BIGINT  NOT NULL,
    detail      TEXT    NOT NULL
);
CREATE INDEX peer_heads_principal ON peer_heads (principal, outcome, id);

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

-- The rating log (src/merkle.rs, src/store/log.rs): every complete subtree of the Merkle tree
-- over the feed, by level and index (level 0: each rating's leaf hash at its feed position,
-- feed_seq - 1). Written by the writer holding the sequencer, in the same transaction as the
-- ratings it covers.
CREATE TABLE log_nodes (
    level SMALLINT NOT NULL,
    idx   BIGINT   NOT NULL,
    hash  BYTEA    NOT NULL,
    PRIMARY KEY (level, idx)
);
CREATE TRIGGER log_nodes_append_only BEFORE UPDATE OR DELETE ON log_nodes
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();

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
    id          BIGSERIAL PRIMARY KEY,
    principal   TEXT    NOT NULL,
    size        BIGINT  NOT NULL,
    root        BYTEA  NOT NULL,
    head_time   BIGINT  NOT NULL,
    received_at BIGINT  NOT NULL,
    outcome     TEXT    NOT NULL,
    first_bad   BIGINT  NOT NULL,
    detail      TEXT    NOT NULL
);
CREATE INDEX peer_heads_principal ON peer_heads (principal, outcome, id);

-- Which levels of the rating log's tree are stored (src/merkle.rs, Layout): every
-- node_stride-th level from the leaves. A log written before this migration stores every
-- level (1) and keeps doing so; a log created after it stores the leaves and every fourth
-- level (4), about 1.07 node rows per rating instead of 2.
ALTER TABLE log_meta ADD COLUMN node_stride INTEGER NOT NULL DEFAULT 1
    CHECK (node_stride IN (1, 4));

-- The log's hash, start and layout are fixed with its first row: a changed stride would have
-- the hub read nodes that were never written (or that someone inserted).
CREATE TRIGGER log_meta_fixed BEFORE UPDATE OR DELETE ON log_meta
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER log_meta_fixed_truncate BEFORE TRUNCATE ON log_meta
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();

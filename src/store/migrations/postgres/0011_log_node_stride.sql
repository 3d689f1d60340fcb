-- Which levels of the rating log's tree are stored (src/merkle.rs, Layout): every
-- node_stride-th level from the leaves. A log written before this migration stores every
-- level (1) and keeps doing so; a log created after it stores the leaves and every fourth
-- level (4), about 1.07 node rows per rating instead of 2. Fixed with the log.
ALTER TABLE log_meta ADD COLUMN node_stride INTEGER NOT NULL DEFAULT 1;

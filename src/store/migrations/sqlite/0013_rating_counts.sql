-- Rating counts (#23): what GetStats, ExportReport and the public results read instead of
-- scanning `ratings`, for queries they can answer (src/store/counts.rs): the ratings that
-- count (not left out by a rating exclusion) per China Standard Time day (UTC+8; days since
-- 1970-01-01), organisation, region, channel, target kind and source system. Kept by the
-- triggers below in the same transaction as the rating or exclusion that changes them, so
-- every writer (the hub's, a migration's, a backfill's) keeps them; both tables they follow
-- are append-only. Rows whose counts fall to zero stay (a later rating may reuse them).
CREATE TABLE rating_counts (
    day             INTEGER NOT NULL,
    org_credit_code TEXT    NOT NULL,
    region_code     TEXT    NOT NULL,
    channel         INTEGER NOT NULL,
    target_kind     INTEGER NOT NULL,
    source_system   TEXT    NOT NULL,
    total           INTEGER NOT NULL,
    l1              INTEGER NOT NULL,
    l2              INTEGER NOT NULL,
    l3              INTEGER NOT NULL,
    l4              INTEGER NOT NULL,
    l5              INTEGER NOT NULL,
    defaults        INTEGER NOT NULL,
    flagged         INTEGER NOT NULL,
    PRIMARY KEY (day, org_credit_code, region_code, channel, target_kind, source_system)
) WITHOUT ROWID;

INSERT INTO rating_counts
SELECT (rated_at / 1000000 + 28800) / 86400, org_credit_code, region_code, channel,
       target_kind, source_system, COUNT(*), SUM(level = 1), SUM(level = 2), SUM(level = 3),
       SUM(level = 4), SUM(level = 5), SUM(is_default <> 0), SUM(quality_flags <> 0)
FROM ratings WHERE hub_id NOT IN (SELECT hub_id FROM rating_exclusions)
GROUP BY 1, 2, 3, 4, 5, 6;

CREATE TRIGGER rating_counts_rating AFTER INSERT ON ratings
BEGIN
    INSERT INTO rating_counts VALUES ((NEW.rated_at / 1000000 + 28800) / 86400,
        NEW.org_credit_code, NEW.region_code, NEW.channel, NEW.target_kind, NEW.source_system,
        1, NEW.level = 1, NEW.level = 2, NEW.level = 3, NEW.level = 4, NEW.level = 5,
        NEW.is_default <> 0, NEW.quality_flags <> 0)
    ON CONFLICT DO UPDATE SET total = total + excluded.total, l1 = l1 + excluded.l1,
        l2 = l2 + excluded.l2, l3 = l3 + excluded.l3, l4 = l4 + excluded.l4,
        l5 = l5 + excluded.l5, defaults = defaults + excluded.defaults,
        flagged = flagged + excluded.flagged;
END;

-- An exclusion takes its rating out (one per rating: hub_id is the key, and an exclusion
-- that conflicts is not inserted, so this does not run for it).
CREATE TRIGGER rating_counts_exclusion AFTER INSERT ON rating_exclusions
BEGIN
    INSERT INTO rating_counts
    SELECT (rated_at / 1000000 + 28800) / 86400, org_credit_code, region_code, channel,
           target_kind, source_system, -1, -(level = 1), -(level = 2), -(level = 3),
           -(level = 4), -(level = 5), -(is_default <> 0), -(quality_flags <> 0)
    FROM ratings WHERE hub_id = NEW.hub_id
    ON CONFLICT DO UPDATE SET total = total + excluded.total, l1 = l1 + excluded.l1,
        l2 = l2 + excluded.l2, l3 = l3 + excluded.l3, l4 = l4 + excluded.l4,
        l5 = l5 + excluded.l5, defaults = defaults + excluded.defaults,
        flagged = flagged + excluded.flagged;
END;

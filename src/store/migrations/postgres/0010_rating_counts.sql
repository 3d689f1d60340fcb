-- Rating counts (#23): what GetStats, ExportReport and the public results read instead of
-- scanning `ratings`, for queries they can answer (src/store/counts.rs): the ratings that
-- count (not left out by a rating exclusion) per China Standard Time day (UTC+8; days since
-- 1970-01-01), organisation, region, channel, target kind and source system. Kept by the
-- statement triggers below in the same transaction as the ratings or exclusions that change
-- them (one upsert per statement and key). Every write of ratings or exclusions holds the
-- sequencer (feed_head), so two instances never update these rows in opposite orders. Rows
-- whose counts fall to zero stay (a later rating may reuse them).
CREATE TABLE rating_counts (
    day             INTEGER  NOT NULL,
    org_credit_code TEXT     NOT NULL,
    region_code     TEXT     NOT NULL,
    channel         INTEGER  NOT NULL,
    target_kind     INTEGER  NOT NULL,
    source_system   TEXT     NOT NULL,
    total           BIGINT   NOT NULL,
    l1              BIGINT   NOT NULL,
    l2              BIGINT   NOT NULL,
    l3              BIGINT   NOT NULL,
    l4              BIGINT   NOT NULL,
    l5              BIGINT   NOT NULL,
    defaults        BIGINT   NOT NULL,
    flagged         BIGINT   NOT NULL,
    PRIMARY KEY (day, org_credit_code, region_code, channel, target_kind, source_system)
);

INSERT INTO rating_counts
SELECT (rated_at / 1000000 + 28800) / 86400, org_credit_code, region_code, channel,
       target_kind, source_system, COUNT(*), COUNT(*) FILTER (WHERE level = 1),
       COUNT(*) FILTER (WHERE level = 2), COUNT(*) FILTER (WHERE level = 3),
       COUNT(*) FILTER (WHERE level = 4), COUNT(*) FILTER (WHERE level = 5),
       COUNT(*) FILTER (WHERE is_default), COUNT(*) FILTER (WHERE quality_flags <> 0)
FROM ratings WHERE hub_id NOT IN (SELECT hub_id FROM rating_exclusions)
GROUP BY 1, 2, 3, 4, 5, 6;

CREATE FUNCTION rating_counts_rating() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rating_counts AS c
    SELECT (rated_at / 1000000 + 28800) / 86400, org_credit_code, region_code, channel,
           target_kind, source_system, COUNT(*), COUNT(*) FILTER (WHERE level = 1),
           COUNT(*) FILTER (WHERE level = 2), COUNT(*) FILTER (WHERE level = 3),
           COUNT(*) FILTER (WHERE level = 4), COUNT(*) FILTER (WHERE level = 5),
           COUNT(*) FILTER (WHERE is_default), COUNT(*) FILTER (WHERE quality_flags <> 0)
    FROM new_ratings GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system)
    DO UPDATE SET total = c.total + EXCLUDED.total, l1 = c.l1 + EXCLUDED.l1,
        l2 = c.l2 + EXCLUDED.l2, l3 = c.l3 + EXCLUDED.l3, l4 = c.l4 + EXCLUDED.l4,
        l5 = c.l5 + EXCLUDED.l5, defaults = c.defaults + EXCLUDED.defaults,
        flagged = c.flagged + EXCLUDED.flagged;
    RETURN NULL;
END;
$$;
CREATE TRIGGER rating_counts_rating AFTER INSERT ON ratings
    REFERENCING NEW TABLE AS new_ratings
    FOR EACH STATEMENT EXECUTE FUNCTION rating_counts_rating();

-- An exclusion takes its rating out (one per rating: hub_id is the key, and an exclusion
-- that conflicts is not inserted, so it is not in the transition table).
CREATE FUNCTION rating_counts_exclusion() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rating_counts AS c
    SELECT (r.rated_at / 1000000 + 28800) / 86400, r.org_credit_code, r.region_code,
           r.channel, r.target_kind, r.source_system, -COUNT(*),
           -COUNT(*) FILTER (WHERE r.level = 1), -COUNT(*) FILTER (WHERE r.level = 2),
           -COUNT(*) FILTER (WHERE r.level = 3), -COUNT(*) FILTER (WHERE r.level = 4),
           -COUNT(*) FILTER (WHERE r.level = 5), -COUNT(*) FILTER (WHERE r.is_default),
           -COUNT(*) FILTER (WHERE r.quality_flags <> 0)
    FROM new_exclusions x JOIN ratings r ON r.hub_id = x.hub_id
    GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system)
    DO UPDATE SET total = c.total + EXCLUDED.total, l1 = c.l1 + EXCLUDED.l1,
        l2 = c.l2 + EXCLUDED.l2, l3 = c.l3 + EXCLUDED.l3, l4 = c.l4 + EXCLUDED.l4,
        l5 = c.l5 + EXCLUDED.l5, defaults = c.defaults + EXCLUDED.defaults,
        flagged = c.flagged + EXCLUDED.flagged;
    RETURN NULL;
END;
$$;
CREATE TRIGGER rating_counts_exclusion AFTER INSERT ON rating_exclusions
    REFERENCING NEW TABLE AS new_exclusions
    FOR EACH STATEMENT EXECUTE FUNCTION rating_counts_exclusion();

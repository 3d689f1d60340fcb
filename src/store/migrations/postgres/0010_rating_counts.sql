-- Rating counts (#23): what GetStats, ExportReport and the public results read instead of
-- scanning `ratings`, for queries they can answer (src/store/counts.rs): per China Standard
-- Time day (UTC+8; days since 1970-01-01), organisation, region, channel, target kind and
-- source system, the ratings that count (not left out by a rating exclusion) by level, and
-- their 差评 cases by state (rectified, called back, real-name, both, archived, spot-checked:
-- a state is reached by the case's first entry of its action). Kept by the triggers below
-- in the same transaction as the ratings, exclusions, cases or case entries that change
-- them. Every write of ratings, exclusions and cases, and every case step that moves a
-- state counted here, holds the sequencer (feed_head) first, so two instances never
-- update these rows in opposite orders. Rows whose counts fall to zero
-- stay (a later rating may reuse them).

-- No other instance (an older hub still running during a rolling upgrade) may write what
-- the counts follow between the backfills below and their triggers: held until this
-- migration commits. The sequencer first, as every writer of ratings, exclusions and events
-- takes it first (locking the tables in list order alone could deadlock with an older
-- instance's group that has stored an event and goes on to an exclusion).
SELECT 1 FROM feed_head WHERE id = 1 FOR UPDATE;
LOCK TABLE ratings, rating_exclusions, bad_rating_cases, bad_rating_case_entries,
    service_case_events IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE rating_counts (
    day             INTEGER NOT NULL,
    org_credit_code TEXT COLLATE "C" NOT NULL,
    region_code     TEXT COLLATE "C" NOT NULL,
    channel         INTEGER NOT NULL,
    target_kind     INTEGER NOT NULL,
    source_system   TEXT COLLATE "C" NOT NULL,
    total           BIGINT  NOT NULL,
    l1              BIGINT  NOT NULL,
    l2              BIGINT  NOT NULL,
    l3              BIGINT  NOT NULL,
    l4              BIGINT  NOT NULL,
    l5              BIGINT  NOT NULL,
    defaults        BIGINT  NOT NULL,
    flagged         BIGINT  NOT NULL,
    bad_cases       BIGINT  NOT NULL,
    rectified       BIGINT  NOT NULL,
    called_back     BIGINT  NOT NULL,
    real_name       BIGINT  NOT NULL,
    real_name_done  BIGINT  NOT NULL,
    archived        BIGINT  NOT NULL,
    spot_checked    BIGINT  NOT NULL,
    PRIMARY KEY (day, org_credit_code, region_code, channel, target_kind, source_system)
);

INSERT INTO rating_counts
SELECT (r.rated_at / 1000000 + 28800) / 86400, r.org_credit_code, r.region_code, r.channel, r.target_kind, r.source_system,
       COUNT(*),
       COUNT(*) FILTER (WHERE r.level = 1),
       COUNT(*) FILTER (WHERE r.level = 2),
       COUNT(*) FILTER (WHERE r.level = 3),
       COUNT(*) FILTER (WHERE r.level = 4),
       COUNT(*) FILTER (WHERE r.level = 5),
       COUNT(*) FILTER (WHERE r.is_default),
       COUNT(*) FILTER (WHERE r.quality_flags <> 0),
       SUM((c.id IS NOT NULL)::int),
       SUM((c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (2, 4)))::int),
       SUM((c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (6)))::int),
       SUM((c.id IS NOT NULL AND c.real_name)::int),
       SUM((c.id IS NOT NULL AND c.real_name AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (2, 4)) AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (6)))::int),
       SUM((c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (7)))::int),
       SUM((c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (8)))::int)
FROM ratings r LEFT JOIN bad_rating_cases c ON c.hub_id = r.hub_id
WHERE NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id)
GROUP BY 1, 2, 3, 4, 5, 6;

CREATE FUNCTION rating_counts_rating() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rating_counts AS c
    SELECT (r.rated_at / 1000000 + 28800) / 86400, r.org_credit_code, r.region_code, r.channel, r.target_kind, r.source_system,
           COUNT(*),
           COUNT(*) FILTER (WHERE r.level = 1),
           COUNT(*) FILTER (WHERE r.level = 2),
           COUNT(*) FILTER (WHERE r.level = 3),
           COUNT(*) FILTER (WHERE r.level = 4),
           COUNT(*) FILTER (WHERE r.level = 5),
           COUNT(*) FILTER (WHERE r.is_default),
           COUNT(*) FILTER (WHERE r.quality_flags <> 0), 0, 0, 0, 0, 0, 0, 0
    FROM new_ratings r GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system) DO UPDATE SET
        total = c.total + EXCLUDED.total,
        l1 = c.l1 + EXCLUDED.l1,
        l2 = c.l2 + EXCLUDED.l2,
        l3 = c.l3 + EXCLUDED.l3,
        l4 = c.l4 + EXCLUDED.l4,
        l5 = c.l5 + EXCLUDED.l5,
        defaults = c.defaults + EXCLUDED.defaults,
        flagged = c.flagged + EXCLUDED.flagged,
        bad_cases = c.bad_cases + EXCLUDED.bad_cases,
        rectified = c.rectified + EXCLUDED.rectified,
        called_back = c.called_back + EXCLUDED.called_back,
        real_name = c.real_name + EXCLUDED.real_name,
        real_name_done = c.real_name_done + EXCLUDED.real_name_done,
        archived = c.archived + EXCLUDED.archived,
        spot_checked = c.spot_checked + EXCLUDED.spot_checked;
    RETURN NULL;
END;
$$;
CREATE TRIGGER rating_counts_rating AFTER INSERT ON ratings
    REFERENCING NEW TABLE AS new_ratings
    FOR EACH STATEMENT EXECUTE FUNCTION rating_counts_rating();

-- An exclusion takes its rating, and its 差评 case as it stands, out (one per rating: hub_id
-- is the key, and an exclusion that conflicts is not inserted, so it is not in the
-- transition table).
CREATE FUNCTION rating_counts_exclusion() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rating_counts AS t
    SELECT (r.rated_at / 1000000 + 28800) / 86400, r.org_credit_code, r.region_code, r.channel, r.target_kind, r.source_system,
           -COUNT(*),
           -COUNT(*) FILTER (WHERE r.level = 1),
           -COUNT(*) FILTER (WHERE r.level = 2),
           -COUNT(*) FILTER (WHERE r.level = 3),
           -COUNT(*) FILTER (WHERE r.level = 4),
           -COUNT(*) FILTER (WHERE r.level = 5),
           -COUNT(*) FILTER (WHERE r.is_default),
           -COUNT(*) FILTER (WHERE r.quality_flags <> 0),
           -SUM((c.id IS NOT NULL)::int),
           -SUM((c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (2, 4)))::int),
           -SUM((c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (6)))::int),
           -SUM((c.id IS NOT NULL AND c.real_name)::int),
           -SUM((c.id IS NOT NULL AND c.real_name AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (2, 4)) AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (6)))::int),
           -SUM((c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (7)))::int),
           -SUM((c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (8)))::int)
    FROM new_exclusions x JOIN ratings r ON r.hub_id = x.hub_id
        LEFT JOIN bad_rating_cases c ON c.hub_id = r.hub_id
    GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system) DO UPDATE SET
        total = t.total + EXCLUDED.total,
        l1 = t.l1 + EXCLUDED.l1,
        l2 = t.l2 + EXCLUDED.l2,
        l3 = t.l3 + EXCLUDED.l3,
        l4 = t.l4 + EXCLUDED.l4,
        l5 = t.l5 + EXCLUDED.l5,
        defaults = t.defaults + EXCLUDED.defaults,
        flagged = t.flagged + EXCLUDED.flagged,
        bad_cases = t.bad_cases + EXCLUDED.bad_cases,
        rectified = t.rectified + EXCLUDED.rectified,
        called_back = t.called_back + EXCLUDED.called_back,
        real_name = t.real_name + EXCLUDED.real_name,
        real_name_done = t.real_name_done + EXCLUDED.real_name_done,
        archived = t.archived + EXCLUDED.archived,
        spot_checked = t.spot_checked + EXCLUDED.spot_checked;
    RETURN NULL;
END;
$$;
CREATE TRIGGER rating_counts_exclusion AFTER INSERT ON rating_exclusions
    REFERENCING NEW TABLE AS new_exclusions
    FOR EACH STATEMENT EXECUTE FUNCTION rating_counts_exclusion();

-- 差评 cases opened (in their ratings' transaction, after the ratings), unless left out.
CREATE FUNCTION rating_counts_case() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rating_counts AS c
    SELECT (r.rated_at / 1000000 + 28800) / 86400, r.org_credit_code, r.region_code, r.channel, r.target_kind, r.source_system, 0, 0, 0, 0, 0, 0, 0, 0,
           COUNT(*), 0, 0, COUNT(*) FILTER (WHERE n.real_name), 0, 0, 0
    FROM new_cases n JOIN ratings r ON r.hub_id = n.hub_id
    WHERE NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id)
    GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system) DO UPDATE SET
        total = c.total + EXCLUDED.total,
        l1 = c.l1 + EXCLUDED.l1,
        l2 = c.l2 + EXCLUDED.l2,
        l3 = c.l3 + EXCLUDED.l3,
        l4 = c.l4 + EXCLUDED.l4,
        l5 = c.l5 + EXCLUDED.l5,
        defaults = c.defaults + EXCLUDED.defaults,
        flagged = c.flagged + EXCLUDED.flagged,
        bad_cases = c.bad_cases + EXCLUDED.bad_cases,
        rectified = c.rectified + EXCLUDED.rectified,
        called_back = c.called_back + EXCLUDED.called_back,
        real_name = c.real_name + EXCLUDED.real_name,
        real_name_done = c.real_name_done + EXCLUDED.real_name_done,
        archived = c.archived + EXCLUDED.archived,
        spot_checked = c.spot_checked + EXCLUDED.spot_checked;
    RETURN NULL;
END;
$$;
CREATE TRIGGER rating_counts_case AFTER INSERT ON bad_rating_cases
    REFERENCING NEW TABLE AS new_cases
    FOR EACH STATEMENT EXECUTE FUNCTION rating_counts_case();

-- A case's first entry of an action moves it into that state (and into 'real-name, rectified
-- and called back' when it completes the pair), unless its rating is left out.
CREATE FUNCTION rating_counts_case_entry() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    other_rect BOOLEAN;
    other_cb   BOOLEAN;
    first      BOOLEAN;
    rect       BOOLEAN;
    cb         BOOLEAN;
BEGIN
    other_rect := EXISTS (SELECT 1 FROM bad_rating_case_entries x
        WHERE x.case_id = NEW.case_id AND x.id <> NEW.id AND x.action IN (2, 4));
    other_cb := EXISTS (SELECT 1 FROM bad_rating_case_entries x
        WHERE x.case_id = NEW.case_id AND x.id <> NEW.id AND x.action = 6);
    first := NOT EXISTS (SELECT 1 FROM bad_rating_case_entries x
        WHERE x.case_id = NEW.case_id AND x.id <> NEW.id
        AND (x.action = NEW.action OR (NEW.action IN (2, 4) AND x.action IN (2, 4))));
    rect := NEW.action IN (2, 4) AND first;
    cb := NEW.action = 6 AND first;
    INSERT INTO rating_counts AS c
    SELECT (r.rated_at / 1000000 + 28800) / 86400, r.org_credit_code, r.region_code, r.channel, r.target_kind, r.source_system, 0, 0, 0, 0, 0, 0, 0, 0,
           0, rect::int, cb::int, 0,
           (k.real_name AND ((rect AND other_cb) OR (cb AND other_rect)))::int,
           (NEW.action = 7 AND first)::int, (NEW.action = 8 AND first)::int
    FROM bad_rating_cases k JOIN ratings r ON r.hub_id = k.hub_id
    WHERE k.id = NEW.case_id AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id)
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system) DO UPDATE SET
        total = c.total + EXCLUDED.total,
        l1 = c.l1 + EXCLUDED.l1,
        l2 = c.l2 + EXCLUDED.l2,
        l3 = c.l3 + EXCLUDED.l3,
        l4 = c.l4 + EXCLUDED.l4,
        l5 = c.l5 + EXCLUDED.l5,
        defaults = c.defaults + EXCLUDED.defaults,
        flagged = c.flagged + EXCLUDED.flagged,
        bad_cases = c.bad_cases + EXCLUDED.bad_cases,
        rectified = c.rectified + EXCLUDED.rectified,
        called_back = c.called_back + EXCLUDED.called_back,
        real_name = c.real_name + EXCLUDED.real_name,
        real_name_done = c.real_name_done + EXCLUDED.real_name_done,
        archived = c.archived + EXCLUDED.archived,
        spot_checked = c.spot_checked + EXCLUDED.spot_checked;
    RETURN NULL;
END;
$$;
CREATE TRIGGER rating_counts_case_entry AFTER INSERT ON bad_rating_case_entries
    FOR EACH ROW WHEN (NEW.action IN (2, 4, 6, 7, 8))
    EXECUTE FUNCTION rating_counts_case_entry();

-- 办结 case counts (#23): per CST day of completion, organisation, region, channel and source
-- system, the 办结 events (completed), those a rating rates (rated: an item rating of the same
-- organisation for the case, or for its batch 批量业务 or theme 一件事, not a default that a
-- rater's own rating replaced) and those a rater rated (active: such a rating that is not a
-- default). What completed_case_counts reads instead of scanning the events. An event's state
-- changes when it is stored, when a rating that rates it is stored, and when a default that
-- rated it is replaced; the triggers below follow each, in the same transaction; every
-- such write holds the sequencer (feed_head).
CREATE TABLE case_counts (
    day             INTEGER NOT NULL,
    org_credit_code TEXT COLLATE "C" NOT NULL,
    region_code     TEXT COLLATE "C" NOT NULL,
    channel         INTEGER NOT NULL,
    source_system   TEXT COLLATE "C" NOT NULL,
    completed       BIGINT  NOT NULL,
    rated           BIGINT  NOT NULL,
    active          BIGINT  NOT NULL,
    PRIMARY KEY (day, org_credit_code, region_code, channel, source_system)
);

CREATE INDEX service_case_events_case ON service_case_events (org_credit_code, case_number);
CREATE INDEX service_case_events_batch ON service_case_events (org_credit_code, batch_id)
    WHERE batch_id <> '';
CREATE INDEX service_case_events_theme ON service_case_events (org_credit_code, theme_id)
    WHERE theme_id <> '';

INSERT INTO case_counts
SELECT (e.occurred_at / 1000000 + 28800) / 86400, e.org_credit_code, e.region_code, e.channel, e.source_system, COUNT(*),
       COUNT(*) FILTER (WHERE (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100)))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))))),
       COUNT(*) FILTER (WHERE (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default)
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default))))
FROM service_case_events e WHERE e.event = 2
GROUP BY 1, 2, 3, 4, 5;

CREATE FUNCTION case_counts_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO case_counts AS c
    SELECT (e.occurred_at / 1000000 + 28800) / 86400, e.org_credit_code, e.region_code, e.channel, e.source_system, COUNT(*),
        COUNT(*) FILTER (WHERE (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100)))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))))),
        COUNT(*) FILTER (WHERE (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default)
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default))))
    FROM new_events e WHERE e.event = 2
    GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, org_credit_code, region_code, channel, source_system) DO UPDATE SET completed = c.completed + EXCLUDED.completed, rated = c.rated + EXCLUDED.rated, active = c.active + EXCLUDED.active;
    RETURN NULL;
END;
$$;
CREATE TRIGGER case_counts_event AFTER INSERT ON service_case_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION case_counts_event();

-- Item ratings rate the 办结 events of their cases, batches and themes: each one no earlier
-- rating rated is now rated, and actively rated when one of the new ratings is a rater's.
CREATE FUNCTION case_counts_rating() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO case_counts AS c
    SELECT (e.occurred_at / 1000000 + 28800) / 86400, e.org_credit_code, e.region_code, e.channel, e.source_system, 0,
        COUNT(*) FILTER (WHERE NOT (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.hub_id NOT IN (SELECT hub_id FROM new_ratings))
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.hub_id NOT IN (SELECT hub_id FROM new_ratings)))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.hub_id NOT IN (SELECT hub_id FROM new_ratings))))),
        COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM new_ratings n WHERE NOT n.is_default
                AND n.target_kind = 1 AND n.org_credit_code = e.org_credit_code AND (n.case_number = e.case_number
                OR (e.batch_id <> '' AND n.batch_id = e.batch_id)
                OR (e.theme_id <> '' AND n.theme_id = e.theme_id)))
            AND NOT (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default AND r.hub_id NOT IN (SELECT hub_id FROM new_ratings))
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default AND r.hub_id NOT IN (SELECT hub_id FROM new_ratings)))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default AND r.hub_id NOT IN (SELECT hub_id FROM new_ratings)))))
    FROM service_case_events e WHERE e.id IN (SELECT m.id FROM new_ratings n CROSS JOIN LATERAL (
        SELECT e.id FROM service_case_events e WHERE e.org_credit_code = n.org_credit_code
            AND e.case_number = n.case_number AND e.event = 2
        UNION SELECT e.id FROM service_case_events e WHERE n.batch_id <> ''
            AND e.org_credit_code = n.org_credit_code AND e.batch_id = n.batch_id
            AND e.batch_id <> '' AND e.event = 2
        UNION SELECT e.id FROM service_case_events e WHERE n.theme_id <> ''
            AND e.org_credit_code = n.org_credit_code AND e.theme_id = n.theme_id
            AND e.theme_id <> '' AND e.event = 2) AS m WHERE n.target_kind = 1)
    GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, org_credit_code, region_code, channel, source_system) DO UPDATE SET completed = c.completed + EXCLUDED.completed, rated = c.rated + EXCLUDED.rated, active = c.active + EXCLUDED.active;
    RETURN NULL;
END;
$$;
CREATE TRIGGER case_counts_rating AFTER INSERT ON ratings
    REFERENCING NEW TABLE AS new_ratings
    FOR EACH STATEMENT EXECUTE FUNCTION case_counts_rating();

-- Defaults replaced by raters' own ratings (reason 100) no longer rate their events: each one
-- no other rating rates is unrated again (the replacing rating, stored first in the same
-- transaction, usually rates it).
CREATE FUNCTION case_counts_superseded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO case_counts AS c
    SELECT (e.occurred_at / 1000000 + 28800) / 86400, e.org_credit_code, e.region_code, e.channel, e.source_system, 0,
        -COUNT(*) FILTER (WHERE NOT (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100)))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))))),
        -COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM new_exclusions x JOIN ratings n
                ON n.hub_id = x.hub_id WHERE x.reason = 100 AND NOT n.is_default AND n.target_kind = 1 AND n.org_credit_code = e.org_credit_code AND (n.case_number = e.case_number
                OR (e.batch_id <> '' AND n.batch_id = e.batch_id)
                OR (e.theme_id <> '' AND n.theme_id = e.theme_id)))
            AND NOT (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default)
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND NOT r.is_default))))
    FROM service_case_events e WHERE e.id IN (SELECT m.id FROM new_exclusions x
        JOIN ratings n ON n.hub_id = x.hub_id CROSS JOIN LATERAL (
        SELECT e.id FROM service_case_events e WHERE e.org_credit_code = n.org_credit_code
            AND e.case_number = n.case_number AND e.event = 2
        UNION SELECT e.id FROM service_case_events e WHERE n.batch_id <> ''
            AND e.org_credit_code = n.org_credit_code AND e.batch_id = n.batch_id
            AND e.batch_id <> '' AND e.event = 2
        UNION SELECT e.id FROM service_case_events e WHERE n.theme_id <> ''
            AND e.org_credit_code = n.org_credit_code AND e.theme_id = n.theme_id
            AND e.theme_id <> '' AND e.event = 2) AS m WHERE x.reason = 100 AND n.target_kind = 1)
    GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, org_credit_code, region_code, channel, source_system) DO UPDATE SET completed = c.completed + EXCLUDED.completed, rated = c.rated + EXCLUDED.rated, active = c.active + EXCLUDED.active;
    RETURN NULL;
END;
$$;
CREATE TRIGGER case_counts_superseded AFTER INSERT ON rating_exclusions
    REFERENCING NEW TABLE AS new_exclusions
    FOR EACH STATEMENT EXECUTE FUNCTION case_counts_superseded();

-- Rating counts (#23): what GetStats, ExportReport and the public results read instead of
-- scanning `ratings`, for queries they can answer (src/store/counts.rs): per China Standard
-- Time day (UTC+8; days since 1970-01-01), organisation, region, channel, target kind and
-- source system, the ratings that count (not left out by a rating exclusion) by level, and
-- their 差评 cases by state (rectified, called back, real-name, both, archived, spot-checked:
-- a state is reached by the case's first entry of its action). Kept by the triggers below
-- in the same transaction as the rating, exclusion, case or case entry that changes them, so
-- every writer keeps them; the tables they follow are append-only. Rows whose counts fall
-- to zero stay (a later rating may reuse them).
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
    bad_cases       INTEGER NOT NULL,
    rectified       INTEGER NOT NULL,
    called_back     INTEGER NOT NULL,
    real_name       INTEGER NOT NULL,
    real_name_done  INTEGER NOT NULL,
    archived        INTEGER NOT NULL,
    spot_checked    INTEGER NOT NULL,
    PRIMARY KEY (day, org_credit_code, region_code, channel, target_kind, source_system)
) WITHOUT ROWID;

INSERT INTO rating_counts
SELECT (r.rated_at / 1000000 + 28800) / 86400, r.org_credit_code, r.region_code, r.channel, r.target_kind, r.source_system,
       COUNT(*), SUM(r.level = 1), SUM(r.level = 2), SUM(r.level = 3), SUM(r.level = 4),
       SUM(r.level = 5), SUM(r.is_default <> 0), SUM(r.quality_flags <> 0),
       SUM(c.id IS NOT NULL),
       SUM(c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (2, 4))),
       SUM(c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (6))),
       SUM(c.id IS NOT NULL AND c.real_name <> 0),
       SUM(c.id IS NOT NULL AND c.real_name <> 0 AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (2, 4)) AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (6))),
       SUM(c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (7))),
       SUM(c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (8)))
FROM ratings r LEFT JOIN bad_rating_cases c ON c.hub_id = r.hub_id
WHERE r.hub_id NOT IN (SELECT hub_id FROM rating_exclusions)
GROUP BY 1, 2, 3, 4, 5, 6;

CREATE TRIGGER rating_counts_rating AFTER INSERT ON ratings
BEGIN
    INSERT INTO rating_counts VALUES ((NEW.rated_at / 1000000 + 28800) / 86400,
        NEW.org_credit_code, NEW.region_code, NEW.channel, NEW.target_kind, NEW.source_system,
        1, NEW.level = 1, NEW.level = 2, NEW.level = 3, NEW.level = 4, NEW.level = 5,
        NEW.is_default <> 0, NEW.quality_flags <> 0, 0, 0, 0, 0, 0, 0, 0)
    ON CONFLICT  DO UPDATE SET
        total = total + excluded.total,
        l1 = l1 + excluded.l1,
        l2 = l2 + excluded.l2,
        l3 = l3 + excluded.l3,
        l4 = l4 + excluded.l4,
        l5 = l5 + excluded.l5,
        defaults = defaults + excluded.defaults,
        flagged = flagged + excluded.flagged,
        bad_cases = bad_cases + excluded.bad_cases,
        rectified = rectified + excluded.rectified,
        called_back = called_back + excluded.called_back,
        real_name = real_name + excluded.real_name,
        real_name_done = real_name_done + excluded.real_name_done,
        archived = archived + excluded.archived,
        spot_checked = spot_checked + excluded.spot_checked;
END;

-- An exclusion takes its rating, and its 差评 case as it stands, out (one per rating: hub_id
-- is the key, and an exclusion that conflicts is not inserted, so this does not run for it).
CREATE TRIGGER rating_counts_exclusion AFTER INSERT ON rating_exclusions
BEGIN
    INSERT INTO rating_counts
    SELECT (r.rated_at / 1000000 + 28800) / 86400, r.org_credit_code, r.region_code, r.channel, r.target_kind, r.source_system, -1,
           -(r.level = 1), -(r.level = 2), -(r.level = 3), -(r.level = 4), -(r.level = 5),
           -(r.is_default <> 0), -(r.quality_flags <> 0),
           -(c.id IS NOT NULL),
           -(c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (2, 4))),
           -(c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (6))),
           -(c.id IS NOT NULL AND c.real_name <> 0),
           -(c.id IS NOT NULL AND c.real_name <> 0 AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (2, 4)) AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (6))),
           -(c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (7))),
           -(c.id IS NOT NULL AND EXISTS (SELECT 1 FROM bad_rating_case_entries x WHERE x.case_id = c.id AND x.action IN (8)))
    FROM ratings r LEFT JOIN bad_rating_cases c ON c.hub_id = r.hub_id
    WHERE r.hub_id = NEW.hub_id
    ON CONFLICT  DO UPDATE SET
        total = total + excluded.total,
        l1 = l1 + excluded.l1,
        l2 = l2 + excluded.l2,
        l3 = l3 + excluded.l3,
        l4 = l4 + excluded.l4,
        l5 = l5 + excluded.l5,
        defaults = defaults + excluded.defaults,
        flagged = flagged + excluded.flagged,
        bad_cases = bad_cases + excluded.bad_cases,
        rectified = rectified + excluded.rectified,
        called_back = called_back + excluded.called_back,
        real_name = real_name + excluded.real_name,
        real_name_done = real_name_done + excluded.real_name_done,
        archived = archived + excluded.archived,
        spot_checked = spot_checked + excluded.spot_checked;
END;

-- A 差评 case opened (in its rating's transaction, after the rating), unless its rating
-- is left out.
CREATE TRIGGER rating_counts_case AFTER INSERT ON bad_rating_cases
BEGIN
    INSERT INTO rating_counts
    SELECT (r.rated_at / 1000000 + 28800) / 86400, r.org_credit_code, r.region_code, r.channel, r.target_kind, r.source_system, 0, 0, 0, 0, 0, 0, 0, 0,
           1, 0, 0, NEW.real_name <> 0, 0, 0, 0
    FROM ratings r
    WHERE r.hub_id = NEW.hub_id AND r.hub_id NOT IN (SELECT hub_id FROM rating_exclusions)
    ON CONFLICT  DO UPDATE SET
        total = total + excluded.total,
        l1 = l1 + excluded.l1,
        l2 = l2 + excluded.l2,
        l3 = l3 + excluded.l3,
        l4 = l4 + excluded.l4,
        l5 = l5 + excluded.l5,
        defaults = defaults + excluded.defaults,
        flagged = flagged + excluded.flagged,
        bad_cases = bad_cases + excluded.bad_cases,
        rectified = rectified + excluded.rectified,
        called_back = called_back + excluded.called_back,
        real_name = real_name + excluded.real_name,
        real_name_done = real_name_done + excluded.real_name_done,
        archived = archived + excluded.archived,
        spot_checked = spot_checked + excluded.spot_checked;
END;

-- A case's first entry of an action moves it into that state (and into 'real-name, rectified
-- and called back' when it completes the pair), unless its rating is left out.
CREATE TRIGGER rating_counts_case_entry AFTER INSERT ON bad_rating_case_entries
WHEN NEW.action IN (2, 4, 6, 7, 8)
BEGIN
    INSERT INTO rating_counts
    SELECT (r.rated_at / 1000000 + 28800) / 86400, r.org_credit_code, r.region_code, r.channel, r.target_kind, r.source_system, 0, 0, 0, 0, 0, 0, 0, 0,
           0, f.rect, f.cb, 0,
           c.real_name <> 0 AND ((f.rect AND f.had_cb) OR (f.cb AND f.had_rect)),
           NEW.action = 7 AND NOT EXISTS (SELECT 1 FROM bad_rating_case_entries x
               WHERE x.case_id = NEW.case_id AND x.id <> NEW.id AND x.action = 7),
           NEW.action = 8 AND NOT EXISTS (SELECT 1 FROM bad_rating_case_entries x
               WHERE x.case_id = NEW.case_id AND x.id <> NEW.id AND x.action = 8)
    FROM bad_rating_cases c JOIN ratings r ON r.hub_id = c.hub_id,
        (SELECT NEW.action IN (2, 4) AND NOT EXISTS (SELECT 1 FROM bad_rating_case_entries x
                    WHERE x.case_id = NEW.case_id AND x.id <> NEW.id AND x.action IN (2, 4))
                    AS rect,
                NEW.action = 6 AND NOT EXISTS (SELECT 1 FROM bad_rating_case_entries x
                    WHERE x.case_id = NEW.case_id AND x.id <> NEW.id AND x.action = 6) AS cb,
                EXISTS (SELECT 1 FROM bad_rating_case_entries x
                    WHERE x.case_id = NEW.case_id AND x.id <> NEW.id AND x.action IN (2, 4))
                    AS had_rect,
                EXISTS (SELECT 1 FROM bad_rating_case_entries x
                    WHERE x.case_id = NEW.case_id AND x.id <> NEW.id AND x.action = 6)
                    AS had_cb) AS f
    WHERE c.id = NEW.case_id AND r.hub_id NOT IN (SELECT hub_id FROM rating_exclusions)
    ON CONFLICT  DO UPDATE SET
        total = total + excluded.total,
        l1 = l1 + excluded.l1,
        l2 = l2 + excluded.l2,
        l3 = l3 + excluded.l3,
        l4 = l4 + excluded.l4,
        l5 = l5 + excluded.l5,
        defaults = defaults + excluded.defaults,
        flagged = flagged + excluded.flagged,
        bad_cases = bad_cases + excluded.bad_cases,
        rectified = rectified + excluded.rectified,
        called_back = called_back + excluded.called_back,
        real_name = real_name + excluded.real_name,
        real_name_done = real_name_done + excluded.real_name_done,
        archived = archived + excluded.archived,
        spot_checked = spot_checked + excluded.spot_checked;
END;

-- 办结 case counts (#23): per CST day of completion, organisation, region, channel and source
-- system, the 办结 events (completed), those a rating rates (rated: an item rating of the same
-- organisation for the case, or for its batch 批量业务 or theme 一件事, not a default that a
-- rater's own rating replaced) and those a rater rated (active: such a rating that is not a
-- default). What completed_case_counts reads instead of scanning the events. An event's state
-- changes when it is stored, when a rating that rates it is stored, and when a default that
-- rated it is replaced; the triggers below follow each, in the same transaction.
CREATE TABLE case_counts (
    day             INTEGER NOT NULL,
    org_credit_code TEXT    NOT NULL,
    region_code     TEXT    NOT NULL,
    channel         INTEGER NOT NULL,
    source_system   TEXT    NOT NULL,
    completed       INTEGER NOT NULL,
    rated           INTEGER NOT NULL,
    active          INTEGER NOT NULL,
    PRIMARY KEY (day, org_credit_code, region_code, channel, source_system)
) WITHOUT ROWID;

CREATE INDEX service_case_events_case ON service_case_events (org_credit_code, case_number);
CREATE INDEX service_case_events_batch ON service_case_events (org_credit_code, batch_id)
    WHERE batch_id <> '';
CREATE INDEX service_case_events_theme ON service_case_events (org_credit_code, theme_id)
    WHERE theme_id <> '';

INSERT INTO case_counts
SELECT (e.occurred_at / 1000000 + 28800) / 86400, e.org_credit_code, e.region_code, e.channel, e.source_system, COUNT(*),
       SUM((EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100)))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))))),
       SUM((EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0)
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0))))
FROM service_case_events e WHERE e.event = 2
GROUP BY 1, 2, 3, 4, 5;

CREATE TRIGGER case_counts_event AFTER INSERT ON service_case_events WHEN NEW.event = 2
BEGIN
    INSERT INTO case_counts
    SELECT (e.occurred_at / 1000000 + 28800) / 86400, e.org_credit_code, e.region_code, e.channel, e.source_system, 1,
        (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100)))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100)))),
        (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0)
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0)))
    FROM service_case_events e WHERE e.id = NEW.id
    ON CONFLICT  DO UPDATE SET completed = completed + excluded.completed, rated = rated + excluded.rated, active = active + excluded.active;
END;

-- An item rating rates the 办结 events of its case, batch and theme: each one no other rating
-- rated before is now rated, and actively rated when this is a rater's. (The WHEN clause is
-- a cheap probe first: most ratings arrive with no event of theirs stored.)
CREATE TRIGGER case_counts_rating AFTER INSERT ON ratings WHEN NEW.target_kind = 1
    AND (EXISTS (SELECT 1 FROM service_case_events e WHERE e.org_credit_code = NEW.org_credit_code
            AND e.case_number = NEW.case_number)
        OR (NEW.batch_id <> '' AND EXISTS (SELECT 1 FROM service_case_events e
            WHERE e.org_credit_code = NEW.org_credit_code AND e.batch_id = NEW.batch_id
            AND e.batch_id <> ''))
        OR (NEW.theme_id <> '' AND EXISTS (SELECT 1 FROM service_case_events e
            WHERE e.org_credit_code = NEW.org_credit_code AND e.theme_id = NEW.theme_id
            AND e.theme_id <> '')))
BEGIN
    INSERT INTO case_counts
    SELECT (e.occurred_at / 1000000 + 28800) / 86400, e.org_credit_code, e.region_code, e.channel, e.source_system, 0,
        SUM(NOT (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.hub_id <> NEW.hub_id)
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.hub_id <> NEW.hub_id))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.hub_id <> NEW.hub_id)))),
        SUM(NEW.is_default = 0 AND NOT (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0 AND r.hub_id <> NEW.hub_id)
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0 AND r.hub_id <> NEW.hub_id))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0 AND r.hub_id <> NEW.hub_id))))
    FROM service_case_events e WHERE e.id IN (
        SELECT e.id FROM service_case_events e WHERE e.org_credit_code = NEW.org_credit_code
            AND e.case_number = NEW.case_number AND e.event = 2
        UNION SELECT e.id FROM service_case_events e WHERE NEW.batch_id <> ''
            AND e.org_credit_code = NEW.org_credit_code AND e.batch_id = NEW.batch_id
            AND e.batch_id <> '' AND e.event = 2
        UNION SELECT e.id FROM service_case_events e WHERE NEW.theme_id <> ''
            AND e.org_credit_code = NEW.org_credit_code AND e.theme_id = NEW.theme_id
            AND e.theme_id <> '' AND e.event = 2)
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT  DO UPDATE SET completed = completed + excluded.completed, rated = rated + excluded.rated, active = active + excluded.active;
END;

-- A default replaced by a rater's own rating (reason 100) no longer rates its events: each one
-- no other rating rates is unrated again (the replacing rating, stored first in the same
-- transaction, usually rates it).
CREATE TRIGGER case_counts_superseded AFTER INSERT ON rating_exclusions WHEN NEW.reason = 100
BEGIN
    INSERT INTO case_counts
    SELECT (e.occurred_at / 1000000 + 28800) / 86400, e.org_credit_code, e.region_code, e.channel, e.source_system, 0,
        -SUM(NOT (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100)))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100))))),
        -SUM(d.is_default = 0 AND NOT (EXISTS (SELECT 1 FROM ratings r WHERE r.case_number = e.case_number AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0)
        OR (e.batch_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.batch_id = e.batch_id
            AND r.batch_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0))
        OR (e.theme_id <> '' AND EXISTS (SELECT 1 FROM ratings r WHERE r.theme_id = e.theme_id
            AND r.theme_id <> '' AND r.org_credit_code = e.org_credit_code AND r.target_kind = 1 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id AND x.reason = 100) AND r.is_default = 0))))
    FROM ratings d JOIN service_case_events e ON e.id IN (
        SELECT e.id FROM service_case_events e WHERE e.org_credit_code = d.org_credit_code
            AND e.case_number = d.case_number AND e.event = 2
        UNION SELECT e.id FROM service_case_events e WHERE d.batch_id <> ''
            AND e.org_credit_code = d.org_credit_code AND e.batch_id = d.batch_id
            AND e.batch_id <> '' AND e.event = 2
        UNION SELECT e.id FROM service_case_events e WHERE d.theme_id <> ''
            AND e.org_credit_code = d.org_credit_code AND e.theme_id = d.theme_id
            AND e.theme_id <> '' AND e.event = 2)
    WHERE d.hub_id = NEW.hub_id AND d.target_kind = 1
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT  DO UPDATE SET completed = completed + excluded.completed, rated = rated + excluded.rated, active = active + excluded.active;
END;

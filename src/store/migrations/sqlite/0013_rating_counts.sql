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

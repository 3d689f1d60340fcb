-- The statistics' counts by calendar quarter (src/store/counts.rs): the same sums as
-- rating_counts_month, one row per CST quarter (`day` is the quarter's first CST day number),
-- organisation, region, channel, target kind and source. A quarter over a province with
-- thousands of organisations read about 30,000 monthly rows (2,000 organisations, five
-- channels, three months), 60-100 ms; its quarterly rows are a third of those. Kept from
-- rating_counts_month's own changes, in the same transaction.
CREATE TABLE rating_counts_quarter (
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

INSERT INTO rating_counts_quarter
SELECT CAST(julianday(day * 86400, 'unixepoch', 'start of month', '-' || ((CAST(strftime('%m', day * 86400, 'unixepoch') AS INTEGER) - 1) % 3) || ' months') - 2440587.5 AS INTEGER), org_credit_code, region_code, channel, target_kind, source_system,
       SUM(total), SUM(l1), SUM(l2), SUM(l3), SUM(l4), SUM(l5), SUM(defaults), SUM(flagged), SUM(bad_cases), SUM(rectified), SUM(called_back), SUM(real_name), SUM(real_name_done), SUM(archived), SUM(spot_checked)
FROM rating_counts_month
GROUP BY 1, org_credit_code, region_code, channel, target_kind, source_system;

-- rating_counts_month is only ever inserted into or updated (0015's upserts): a new row adds
-- its sums to its quarter, a changed row what changed.
CREATE TRIGGER rating_counts_quarter_insert AFTER INSERT ON rating_counts_month
BEGIN
    INSERT INTO rating_counts_quarter VALUES (CAST(julianday(NEW.day * 86400, 'unixepoch', 'start of month', '-' || ((CAST(strftime('%m', NEW.day * 86400, 'unixepoch') AS INTEGER) - 1) % 3) || ' months') - 2440587.5 AS INTEGER),
        NEW.org_credit_code, NEW.region_code, NEW.channel, NEW.target_kind, NEW.source_system,
        NEW.total, NEW.l1, NEW.l2, NEW.l3, NEW.l4, NEW.l5, NEW.defaults, NEW.flagged, NEW.bad_cases, NEW.rectified, NEW.called_back, NEW.real_name, NEW.real_name_done, NEW.archived, NEW.spot_checked)
    ON CONFLICT DO UPDATE SET
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
CREATE TRIGGER rating_counts_quarter_update AFTER UPDATE ON rating_counts_month
    WHEN NEW.total <> OLD.total OR NEW.l1 <> OLD.l1 OR NEW.l2 <> OLD.l2 OR
        NEW.l3 <> OLD.l3 OR NEW.l4 <> OLD.l4 OR NEW.l5 <> OLD.l5 OR
        NEW.defaults <> OLD.defaults OR NEW.flagged <> OLD.flagged OR
        NEW.bad_cases <> OLD.bad_cases OR NEW.rectified <> OLD.rectified OR
        NEW.called_back <> OLD.called_back OR NEW.real_name <> OLD.real_name OR
        NEW.real_name_done <> OLD.real_name_done OR NEW.archived <> OLD.archived OR
        NEW.spot_checked <> OLD.spot_checked
BEGIN
    INSERT INTO rating_counts_quarter VALUES (CAST(julianday(NEW.day * 86400, 'unixepoch', 'start of month', '-' || ((CAST(strftime('%m', NEW.day * 86400, 'unixepoch') AS INTEGER) - 1) % 3) || ' months') - 2440587.5 AS INTEGER),
        NEW.org_credit_code, NEW.region_code, NEW.channel, NEW.target_kind, NEW.source_system,
        NEW.total - OLD.total, NEW.l1 - OLD.l1, NEW.l2 - OLD.l2, NEW.l3 - OLD.l3, NEW.l4 - OLD.l4, NEW.l5 - OLD.l5, NEW.defaults - OLD.defaults, NEW.flagged - OLD.flagged, NEW.bad_cases - OLD.bad_cases, NEW.rectified - OLD.rectified, NEW.called_back - OLD.called_back, NEW.real_name - OLD.real_name, NEW.real_name_done - OLD.real_name_done, NEW.archived - OLD.archived, NEW.spot_checked - OLD.spot_checked)
    ON CONFLICT DO UPDATE SET
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

-- The same for case_counts_month (办结 events completed, rated, actively rated), which
-- every statistics query reads too.
CREATE TABLE case_counts_quarter (
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

INSERT INTO case_counts_quarter
SELECT CAST(julianday(day * 86400, 'unixepoch', 'start of month', '-' || ((CAST(strftime('%m', day * 86400, 'unixepoch') AS INTEGER) - 1) % 3) || ' months') - 2440587.5 AS INTEGER), org_credit_code, region_code, channel, source_system,
       SUM(completed), SUM(rated), SUM(active)
FROM case_counts_month
GROUP BY 1, org_credit_code, region_code, channel, source_system;

CREATE TRIGGER case_counts_quarter_insert AFTER INSERT ON case_counts_month
BEGIN
    INSERT INTO case_counts_quarter VALUES (CAST(julianday(NEW.day * 86400, 'unixepoch', 'start of month', '-' || ((CAST(strftime('%m', NEW.day * 86400, 'unixepoch') AS INTEGER) - 1) % 3) || ' months') - 2440587.5 AS INTEGER),
        NEW.org_credit_code, NEW.region_code, NEW.channel, NEW.source_system,
        NEW.completed, NEW.rated, NEW.active)
    ON CONFLICT DO UPDATE SET
        completed = completed + excluded.completed,
        rated = rated + excluded.rated,
        active = active + excluded.active;
END;
CREATE TRIGGER case_counts_quarter_update AFTER UPDATE ON case_counts_month
    WHEN NEW.completed <> OLD.completed OR NEW.rated <> OLD.rated OR
        NEW.active <> OLD.active
BEGIN
    INSERT INTO case_counts_quarter VALUES (CAST(julianday(NEW.day * 86400, 'unixepoch', 'start of month', '-' || ((CAST(strftime('%m', NEW.day * 86400, 'unixepoch') AS INTEGER) - 1) % 3) || ' months') - 2440587.5 AS INTEGER),
        NEW.org_credit_code, NEW.region_code, NEW.channel, NEW.source_system,
        NEW.completed - OLD.completed, NEW.rated - OLD.rated, NEW.active - OLD.active)
    ON CONFLICT DO UPDATE SET
        completed = completed + excluded.completed,
        rated = rated + excluded.rated,
        active = active + excluded.active;
END;

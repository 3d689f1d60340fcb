-- The monthly and quarterly counts (0012, 0015) kept once per statement, not once per row.
-- Their row-level triggers ran a plpgsql upsert for every daily row a statement changed, and
-- with thousands of organisations nearly every rating changes its own daily row: a group
-- of 800 ratings ran about 1,600 upserts to keep its months and quarters (PostgreSQL ingest
-- at 2,000 organisations fell to 0.64 of the rate without quarters, docs/benchmarks.md).
-- These triggers read the statement's transition tables and fold all its rows into one
-- upsert per table: the same sums, a few statements per group.
--
-- An upsert fires both statement triggers: AFTER INSERT sees the rows it inserted, AFTER
-- UPDATE the rows it updated, before and after. An update adds its new rows and subtracts
-- its old ones, summed by month (or quarter) and key: no pairing of the two (a join of two
-- transition tables, which have no index, is quadratic in the group's rows). A month whose
-- sums do not change is not written.
--
-- The sequencer first, as 0012 and 0015, then the counts locked until this commits: no
-- other instance changes them while their triggers are swapped. DROP TRIGGER takes ACCESS
-- EXCLUSIVE, so that is taken here, at once, not raised table by table half-way through.
-- Statistics reads of other instances wait for this short migration; one that already holds
-- a later table of the list may be chosen to fail on a deadlock (the caller retries).
SELECT head FROM feed_head WHERE id = 1 FOR UPDATE;
LOCK TABLE rating_counts, rating_counts_month, case_counts, case_counts_month
    IN ACCESS EXCLUSIVE MODE;

CREATE OR REPLACE FUNCTION rating_counts_month_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An upsert fires its AFTER UPDATE trigger even when it updated nothing.
    IF NOT EXISTS (SELECT 1 FROM new_counts) THEN
        RETURN NULL;
    END IF;
    INSERT INTO rating_counts_month AS m
    SELECT ((date_trunc('month', (DATE '1970-01-01' + n.day::integer)::timestamp))::date - DATE '1970-01-01'), n.org_credit_code, n.region_code, n.channel, n.target_kind, n.source_system,
           SUM(n.total), SUM(n.l1), SUM(n.l2), SUM(n.l3), SUM(n.l4), SUM(n.l5), SUM(n.defaults), SUM(n.flagged), SUM(n.bad_cases), SUM(n.rectified), SUM(n.called_back), SUM(n.real_name), SUM(n.real_name_done), SUM(n.archived), SUM(n.spot_checked)
    FROM new_counts n GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system) DO UPDATE SET
        total = m.total + excluded.total,
        l1 = m.l1 + excluded.l1,
        l2 = m.l2 + excluded.l2,
        l3 = m.l3 + excluded.l3,
        l4 = m.l4 + excluded.l4,
        l5 = m.l5 + excluded.l5,
        defaults = m.defaults + excluded.defaults,
        flagged = m.flagged + excluded.flagged,
        bad_cases = m.bad_cases + excluded.bad_cases,
        rectified = m.rectified + excluded.rectified,
        called_back = m.called_back + excluded.called_back,
        real_name = m.real_name + excluded.real_name,
        real_name_done = m.real_name_done + excluded.real_name_done,
        archived = m.archived + excluded.archived,
        spot_checked = m.spot_checked + excluded.spot_checked;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE FUNCTION rating_counts_month_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An upsert fires its AFTER UPDATE trigger even when it updated nothing.
    IF NOT EXISTS (SELECT 1 FROM new_counts) THEN
        RETURN NULL;
    END IF;
    INSERT INTO rating_counts_month AS m
    SELECT ((date_trunc('month', (DATE '1970-01-01' + d.day::integer)::timestamp))::date - DATE '1970-01-01'), d.org_credit_code, d.region_code, d.channel, d.target_kind, d.source_system,
           SUM(d.total), SUM(d.l1), SUM(d.l2), SUM(d.l3), SUM(d.l4), SUM(d.l5), SUM(d.defaults), SUM(d.flagged), SUM(d.bad_cases), SUM(d.rectified), SUM(d.called_back), SUM(d.real_name), SUM(d.real_name_done), SUM(d.archived), SUM(d.spot_checked)
    FROM (SELECT day, org_credit_code, region_code, channel, target_kind, source_system, total, l1, l2, l3, l4, l5, defaults, flagged, bad_cases, rectified, called_back, real_name, real_name_done, archived, spot_checked FROM new_counts
          UNION ALL SELECT day, org_credit_code, region_code, channel, target_kind, source_system, -total, -l1, -l2, -l3, -l4, -l5, -defaults, -flagged, -bad_cases, -rectified, -called_back, -real_name, -real_name_done, -archived, -spot_checked FROM old_counts) d
    GROUP BY 1, 2, 3, 4, 5, 6
    HAVING SUM(d.total) <> 0 OR SUM(d.l1) <> 0 OR SUM(d.l2) <> 0 OR SUM(d.l3) <> 0 OR SUM(d.l4) <> 0 OR SUM(d.l5) <> 0 OR SUM(d.defaults) <> 0 OR SUM(d.flagged) <> 0 OR SUM(d.bad_cases) <> 0 OR SUM(d.rectified) <> 0 OR SUM(d.called_back) <> 0 OR SUM(d.real_name) <> 0 OR SUM(d.real_name_done) <> 0 OR SUM(d.archived) <> 0 OR SUM(d.spot_checked) <> 0
    ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system) DO UPDATE SET
        total = m.total + excluded.total,
        l1 = m.l1 + excluded.l1,
        l2 = m.l2 + excluded.l2,
        l3 = m.l3 + excluded.l3,
        l4 = m.l4 + excluded.l4,
        l5 = m.l5 + excluded.l5,
        defaults = m.defaults + excluded.defaults,
        flagged = m.flagged + excluded.flagged,
        bad_cases = m.bad_cases + excluded.bad_cases,
        rectified = m.rectified + excluded.rectified,
        called_back = m.called_back + excluded.called_back,
        real_name = m.real_name + excluded.real_name,
        real_name_done = m.real_name_done + excluded.real_name_done,
        archived = m.archived + excluded.archived,
        spot_checked = m.spot_checked + excluded.spot_checked;
    RETURN NULL;
END;
$$;
DROP TRIGGER rating_counts_month_insert ON rating_counts;
DROP TRIGGER rating_counts_month_update ON rating_counts;
CREATE TRIGGER rating_counts_month_insert AFTER INSERT ON rating_counts
    REFERENCING NEW TABLE AS new_counts
    FOR EACH STATEMENT EXECUTE FUNCTION rating_counts_month_insert();
CREATE TRIGGER rating_counts_month_update AFTER UPDATE ON rating_counts
    REFERENCING OLD TABLE AS old_counts NEW TABLE AS new_counts
    FOR EACH STATEMENT EXECUTE FUNCTION rating_counts_month_update();

CREATE OR REPLACE FUNCTION rating_counts_quarter_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An upsert fires its AFTER UPDATE trigger even when it updated nothing.
    IF NOT EXISTS (SELECT 1 FROM new_counts) THEN
        RETURN NULL;
    END IF;
    INSERT INTO rating_counts_quarter AS m
    SELECT ((date_trunc('quarter', (DATE '1970-01-01' + n.day::integer)::timestamp))::date - DATE '1970-01-01'), n.org_credit_code, n.region_code, n.channel, n.target_kind, n.source_system,
           SUM(n.total), SUM(n.l1), SUM(n.l2), SUM(n.l3), SUM(n.l4), SUM(n.l5), SUM(n.defaults), SUM(n.flagged), SUM(n.bad_cases), SUM(n.rectified), SUM(n.called_back), SUM(n.real_name), SUM(n.real_name_done), SUM(n.archived), SUM(n.spot_checked)
    FROM new_counts n GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system) DO UPDATE SET
        total = m.total + excluded.total,
        l1 = m.l1 + excluded.l1,
        l2 = m.l2 + excluded.l2,
        l3 = m.l3 + excluded.l3,
        l4 = m.l4 + excluded.l4,
        l5 = m.l5 + excluded.l5,
        defaults = m.defaults + excluded.defaults,
        flagged = m.flagged + excluded.flagged,
        bad_cases = m.bad_cases + excluded.bad_cases,
        rectified = m.rectified + excluded.rectified,
        called_back = m.called_back + excluded.called_back,
        real_name = m.real_name + excluded.real_name,
        real_name_done = m.real_name_done + excluded.real_name_done,
        archived = m.archived + excluded.archived,
        spot_checked = m.spot_checked + excluded.spot_checked;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE FUNCTION rating_counts_quarter_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An upsert fires its AFTER UPDATE trigger even when it updated nothing.
    IF NOT EXISTS (SELECT 1 FROM new_counts) THEN
        RETURN NULL;
    END IF;
    INSERT INTO rating_counts_quarter AS m
    SELECT ((date_trunc('quarter', (DATE '1970-01-01' + d.day::integer)::timestamp))::date - DATE '1970-01-01'), d.org_credit_code, d.region_code, d.channel, d.target_kind, d.source_system,
           SUM(d.total), SUM(d.l1), SUM(d.l2), SUM(d.l3), SUM(d.l4), SUM(d.l5), SUM(d.defaults), SUM(d.flagged), SUM(d.bad_cases), SUM(d.rectified), SUM(d.called_back), SUM(d.real_name), SUM(d.real_name_done), SUM(d.archived), SUM(d.spot_checked)
    FROM (SELECT day, org_credit_code, region_code, channel, target_kind, source_system, total, l1, l2, l3, l4, l5, defaults, flagged, bad_cases, rectified, called_back, real_name, real_name_done, archived, spot_checked FROM new_counts
          UNION ALL SELECT day, org_credit_code, region_code, channel, target_kind, source_system, -total, -l1, -l2, -l3, -l4, -l5, -defaults, -flagged, -bad_cases, -rectified, -called_back, -real_name, -real_name_done, -archived, -spot_checked FROM old_counts) d
    GROUP BY 1, 2, 3, 4, 5, 6
    HAVING SUM(d.total) <> 0 OR SUM(d.l1) <> 0 OR SUM(d.l2) <> 0 OR SUM(d.l3) <> 0 OR SUM(d.l4) <> 0 OR SUM(d.l5) <> 0 OR SUM(d.defaults) <> 0 OR SUM(d.flagged) <> 0 OR SUM(d.bad_cases) <> 0 OR SUM(d.rectified) <> 0 OR SUM(d.called_back) <> 0 OR SUM(d.real_name) <> 0 OR SUM(d.real_name_done) <> 0 OR SUM(d.archived) <> 0 OR SUM(d.spot_checked) <> 0
    ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system) DO UPDATE SET
        total = m.total + excluded.total,
        l1 = m.l1 + excluded.l1,
        l2 = m.l2 + excluded.l2,
        l3 = m.l3 + excluded.l3,
        l4 = m.l4 + excluded.l4,
        l5 = m.l5 + excluded.l5,
        defaults = m.defaults + excluded.defaults,
        flagged = m.flagged + excluded.flagged,
        bad_cases = m.bad_cases + excluded.bad_cases,
        rectified = m.rectified + excluded.rectified,
        called_back = m.called_back + excluded.called_back,
        real_name = m.real_name + excluded.real_name,
        real_name_done = m.real_name_done + excluded.real_name_done,
        archived = m.archived + excluded.archived,
        spot_checked = m.spot_checked + excluded.spot_checked;
    RETURN NULL;
END;
$$;
DROP TRIGGER rating_counts_quarter_insert ON rating_counts_month;
DROP TRIGGER rating_counts_quarter_update ON rating_counts_month;
CREATE TRIGGER rating_counts_quarter_insert AFTER INSERT ON rating_counts_month
    REFERENCING NEW TABLE AS new_counts
    FOR EACH STATEMENT EXECUTE FUNCTION rating_counts_quarter_insert();
CREATE TRIGGER rating_counts_quarter_update AFTER UPDATE ON rating_counts_month
    REFERENCING OLD TABLE AS old_counts NEW TABLE AS new_counts
    FOR EACH STATEMENT EXECUTE FUNCTION rating_counts_quarter_update();

CREATE OR REPLACE FUNCTION case_counts_month_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An upsert fires its AFTER UPDATE trigger even when it updated nothing.
    IF NOT EXISTS (SELECT 1 FROM new_counts) THEN
        RETURN NULL;
    END IF;
    INSERT INTO case_counts_month AS m
    SELECT ((date_trunc('month', (DATE '1970-01-01' + n.day::integer)::timestamp))::date - DATE '1970-01-01'), n.org_credit_code, n.region_code, n.channel, n.source_system,
           SUM(n.completed), SUM(n.rated), SUM(n.active)
    FROM new_counts n GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, org_credit_code, region_code, channel, source_system) DO UPDATE SET
        completed = m.completed + excluded.completed,
        rated = m.rated + excluded.rated,
        active = m.active + excluded.active;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE FUNCTION case_counts_month_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An upsert fires its AFTER UPDATE trigger even when it updated nothing.
    IF NOT EXISTS (SELECT 1 FROM new_counts) THEN
        RETURN NULL;
    END IF;
    INSERT INTO case_counts_month AS m
    SELECT ((date_trunc('month', (DATE '1970-01-01' + d.day::integer)::timestamp))::date - DATE '1970-01-01'), d.org_credit_code, d.region_code, d.channel, d.source_system,
           SUM(d.completed), SUM(d.rated), SUM(d.active)
    FROM (SELECT day, org_credit_code, region_code, channel, source_system, completed, rated, active FROM new_counts
          UNION ALL SELECT day, org_credit_code, region_code, channel, source_system, -completed, -rated, -active FROM old_counts) d
    GROUP BY 1, 2, 3, 4, 5
    HAVING SUM(d.completed) <> 0 OR SUM(d.rated) <> 0 OR SUM(d.active) <> 0
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, org_credit_code, region_code, channel, source_system) DO UPDATE SET
        completed = m.completed + excluded.completed,
        rated = m.rated + excluded.rated,
        active = m.active + excluded.active;
    RETURN NULL;
END;
$$;
DROP TRIGGER case_counts_month_insert ON case_counts;
DROP TRIGGER case_counts_month_update ON case_counts;
CREATE TRIGGER case_counts_month_insert AFTER INSERT ON case_counts
    REFERENCING NEW TABLE AS new_counts
    FOR EACH STATEMENT EXECUTE FUNCTION case_counts_month_insert();
CREATE TRIGGER case_counts_month_update AFTER UPDATE ON case_counts
    REFERENCING OLD TABLE AS old_counts NEW TABLE AS new_counts
    FOR EACH STATEMENT EXECUTE FUNCTION case_counts_month_update();

CREATE OR REPLACE FUNCTION case_counts_quarter_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An upsert fires its AFTER UPDATE trigger even when it updated nothing.
    IF NOT EXISTS (SELECT 1 FROM new_counts) THEN
        RETURN NULL;
    END IF;
    INSERT INTO case_counts_quarter AS m
    SELECT ((date_trunc('quarter', (DATE '1970-01-01' + n.day::integer)::timestamp))::date - DATE '1970-01-01'), n.org_credit_code, n.region_code, n.channel, n.source_system,
           SUM(n.completed), SUM(n.rated), SUM(n.active)
    FROM new_counts n GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, org_credit_code, region_code, channel, source_system) DO UPDATE SET
        completed = m.completed + excluded.completed,
        rated = m.rated + excluded.rated,
        active = m.active + excluded.active;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE FUNCTION case_counts_quarter_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An upsert fires its AFTER UPDATE trigger even when it updated nothing.
    IF NOT EXISTS (SELECT 1 FROM new_counts) THEN
        RETURN NULL;
    END IF;
    INSERT INTO case_counts_quarter AS m
    SELECT ((date_trunc('quarter', (DATE '1970-01-01' + d.day::integer)::timestamp))::date - DATE '1970-01-01'), d.org_credit_code, d.region_code, d.channel, d.source_system,
           SUM(d.completed), SUM(d.rated), SUM(d.active)
    FROM (SELECT day, org_credit_code, region_code, channel, source_system, completed, rated, active FROM new_counts
          UNION ALL SELECT day, org_credit_code, region_code, channel, source_system, -completed, -rated, -active FROM old_counts) d
    GROUP BY 1, 2, 3, 4, 5
    HAVING SUM(d.completed) <> 0 OR SUM(d.rated) <> 0 OR SUM(d.active) <> 0
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, org_credit_code, region_code, channel, source_system) DO UPDATE SET
        completed = m.completed + excluded.completed,
        rated = m.rated + excluded.rated,
        active = m.active + excluded.active;
    RETURN NULL;
END;
$$;
DROP TRIGGER case_counts_quarter_insert ON case_counts_month;
DROP TRIGGER case_counts_quarter_update ON case_counts_month;
CREATE TRIGGER case_counts_quarter_insert AFTER INSERT ON case_counts_month
    REFERENCING NEW TABLE AS new_counts
    FOR EACH STATEMENT EXECUTE FUNCTION case_counts_quarter_insert();
CREATE TRIGGER case_counts_quarter_update AFTER UPDATE ON case_counts_month
    REFERENCING OLD TABLE AS old_counts NEW TABLE AS new_counts
    FOR EACH STATEMENT EXECUTE FUNCTION case_counts_quarter_update();


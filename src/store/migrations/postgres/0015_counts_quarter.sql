-- The statistics' counts by calendar quarter (src/store/counts.rs): the same sums as
-- rating_counts_month, one row per CST quarter (`day` is the quarter's first CST day number),
-- organisation, region, channel, target kind and source; a quarter over a province reads a
-- third of the monthly rows. Kept from rating_counts_month's own changes, in the same
-- transaction.
--
-- The sequencer first, then the monthly counts locked until this commits: an older instance
-- still running during an upgrade could otherwise change them between the backfill and the
-- triggers (0012 takes them in the same order).
SELECT head FROM feed_head WHERE id = 1 FOR UPDATE;
LOCK TABLE rating_counts_month IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE rating_counts_quarter (LIKE rating_counts_month INCLUDING ALL);

INSERT INTO rating_counts_quarter
SELECT ((date_trunc('quarter', (DATE '1970-01-01' + day::integer)::timestamp))::date - DATE '1970-01-01'), org_credit_code, region_code, channel, target_kind, source_system,
       SUM(total), SUM(l1), SUM(l2), SUM(l3), SUM(l4), SUM(l5), SUM(defaults), SUM(flagged), SUM(bad_cases), SUM(rectified), SUM(called_back), SUM(real_name), SUM(real_name_done), SUM(archived), SUM(spot_checked)
FROM rating_counts_month
GROUP BY 1, org_credit_code, region_code, channel, target_kind, source_system;

-- rating_counts_month is only ever inserted into or updated (0012's upserts; an upsert that
-- updates fires the UPDATE trigger, not the INSERT one): a new row adds its sums to its
-- quarter, a changed row what changed.
CREATE FUNCTION rating_counts_quarter_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rating_counts_quarter AS m VALUES (((date_trunc('quarter', (DATE '1970-01-01' + NEW.day::integer)::timestamp))::date - DATE '1970-01-01'),
        NEW.org_credit_code, NEW.region_code, NEW.channel, NEW.target_kind, NEW.source_system,
        NEW.total, NEW.l1, NEW.l2, NEW.l3, NEW.l4, NEW.l5, NEW.defaults, NEW.flagged, NEW.bad_cases, NEW.rectified, NEW.called_back, NEW.real_name, NEW.real_name_done, NEW.archived, NEW.spot_checked)
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system)
    DO UPDATE SET
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
CREATE FUNCTION rating_counts_quarter_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rating_counts_quarter AS m VALUES (((date_trunc('quarter', (DATE '1970-01-01' + NEW.day::integer)::timestamp))::date - DATE '1970-01-01'),
        NEW.org_credit_code, NEW.region_code, NEW.channel, NEW.target_kind, NEW.source_system,
        NEW.total - OLD.total, NEW.l1 - OLD.l1, NEW.l2 - OLD.l2, NEW.l3 - OLD.l3, NEW.l4 - OLD.l4, NEW.l5 - OLD.l5, NEW.defaults - OLD.defaults, NEW.flagged - OLD.flagged, NEW.bad_cases - OLD.bad_cases, NEW.rectified - OLD.rectified, NEW.called_back - OLD.called_back, NEW.real_name - OLD.real_name, NEW.real_name_done - OLD.real_name_done, NEW.archived - OLD.archived, NEW.spot_checked - OLD.spot_checked)
    ON CONFLICT (day, org_credit_code, region_code, channel, target_kind, source_system)
    DO UPDATE SET
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
CREATE TRIGGER rating_counts_quarter_insert AFTER INSERT ON rating_counts_month
    FOR EACH ROW EXECUTE FUNCTION rating_counts_quarter_insert();
CREATE TRIGGER rating_counts_quarter_update AFTER UPDATE ON rating_counts_month
    FOR EACH ROW WHEN (NEW IS DISTINCT FROM OLD) EXECUTE FUNCTION rating_counts_quarter_update();

-- The same for case_counts_month (办结 events completed, rated, actively rated), which
-- every statistics query reads too.
LOCK TABLE case_counts_month IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE case_counts_quarter (LIKE case_counts_month INCLUDING ALL);

INSERT INTO case_counts_quarter
SELECT ((date_trunc('quarter', (DATE '1970-01-01' + day::integer)::timestamp))::date - DATE '1970-01-01'), org_credit_code, region_code, channel, source_system,
       SUM(completed), SUM(rated), SUM(active)
FROM case_counts_month
GROUP BY 1, org_credit_code, region_code, channel, source_system;

CREATE FUNCTION case_counts_quarter_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO case_counts_quarter AS m VALUES (((date_trunc('quarter', (DATE '1970-01-01' + NEW.day::integer)::timestamp))::date - DATE '1970-01-01'),
        NEW.org_credit_code, NEW.region_code, NEW.channel, NEW.source_system,
        NEW.completed, NEW.rated, NEW.active)
    ON CONFLICT (day, org_credit_code, region_code, channel, source_system)
    DO UPDATE SET
        completed = m.completed + excluded.completed,
        rated = m.rated + excluded.rated,
        active = m.active + excluded.active;
    RETURN NULL;
END;
$$;
CREATE FUNCTION case_counts_quarter_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO case_counts_quarter AS m VALUES (((date_trunc('quarter', (DATE '1970-01-01' + NEW.day::integer)::timestamp))::date - DATE '1970-01-01'),
        NEW.org_credit_code, NEW.region_code, NEW.channel, NEW.source_system,
        NEW.completed - OLD.completed, NEW.rated - OLD.rated, NEW.active - OLD.active)
    ON CONFLICT (day, org_credit_code, region_code, channel, source_system)
    DO UPDATE SET
        completed = m.completed + excluded.completed,
        rated = m.rated + excluded.rated,
        active = m.active + excluded.active;
    RETURN NULL;
END;
$$;
CREATE TRIGGER case_counts_quarter_insert AFTER INSERT ON case_counts_month
    FOR EACH ROW EXECUTE FUNCTION case_counts_quarter_insert();
CREATE TRIGGER case_counts_quarter_update AFTER UPDATE ON case_counts_month
    FOR EACH ROW WHEN (NEW IS DISTINCT FROM OLD) EXECUTE FUNCTION case_counts_quarter_update();

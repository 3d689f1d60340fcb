-- Guangdong 第十四条「评价人每次到窗口办理后均可对服务人员进行1次评价」: a staff rating is one
-- per visit; the source names the visit (a queue ticket, a window session). '' is "the case".
ALTER TABLE ratings ADD COLUMN visit_id TEXT COLLATE "C" NOT NULL DEFAULT '';

-- Ordos 第二十条(一)「不得由被评价人与评价人直接沟通」: a CONTACT step names who spoke with the
-- rater. Ordos 第十六条「须由评价主体提出」: an appeal raised by the rater, registered by the
-- authority.
ALTER TABLE bad_rating_case_entries ADD COLUMN contacted_by TEXT NOT NULL DEFAULT '';
ALTER TABLE bad_rating_case_entries ADD COLUMN by_rater BOOLEAN NOT NULL DEFAULT FALSE;

-- Ordos 第二十条(四)「抽查率不低于50%」: the spot-check sample is drawn per organisation and
-- month of opening (China Standard Time, YYYYMM), by each case's place in that month.
ALTER TABLE bad_rating_cases ADD COLUMN opened_month INTEGER NOT NULL DEFAULT 0;
UPDATE bad_rating_cases
   SET opened_month = CAST(to_char(to_timestamp(opened_at / 1000000 + 28800) AT TIME ZONE 'UTC', 'YYYYMM') AS INTEGER);
CREATE INDEX bad_rating_cases_org_month ON bad_rating_cases (org_credit_code, opened_month, id);

-- Ordos 第十六条: a rating the authority found invalid on its rater's claim, without a 差评
-- case: who registered it and why.
ALTER TABLE rating_exclusions ADD COLUMN decided_by TEXT NOT NULL DEFAULT '';
ALTER TABLE rating_exclusions ADD COLUMN note TEXT NOT NULL DEFAULT '';

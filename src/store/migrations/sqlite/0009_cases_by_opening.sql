-- The public site lists a region's 差评 cases of one period: found by when they opened.
CREATE INDEX bad_rating_cases_opened ON bad_rating_cases (opened_at);

-- A default rating that a rater's own rating replaced (made before the default's deadline,
-- it arrived after the default was recorded) is excluded with reason 100 and the id of the
-- rating that replaced it.
ALTER TABLE rating_exclusions ADD COLUMN superseded_by BLOB;

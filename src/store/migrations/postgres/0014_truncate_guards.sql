-- TRUNCATE fires no row trigger: every append-only table refuses it too, as log_meta and
-- log_leaves already do, so emptying one takes dropping its guards first, as on SQLite.
CREATE TRIGGER ratings_append_only_truncate BEFORE TRUNCATE ON ratings
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER log_nodes_append_only_truncate BEFORE TRUNCATE ON log_nodes
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER service_case_events_append_only_truncate BEFORE TRUNCATE ON service_case_events
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER bad_rating_case_entries_append_only_truncate
    BEFORE TRUNCATE ON bad_rating_case_entries
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER evidence_blobs_append_only_truncate BEFORE TRUNCATE ON evidence_blobs
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER case_evidence_append_only_truncate BEFORE TRUNCATE ON case_evidence
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER pii_access_append_only_truncate BEFORE TRUNCATE ON pii_access
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();

-- Rating exclusions (a rating taken out of the counts: invalid, malicious, superseded) are
-- append-only on SQLite; here too, rows and TRUNCATE.
CREATE TRIGGER rating_exclusions_append_only BEFORE UPDATE OR DELETE ON rating_exclusions
    FOR EACH ROW EXECUTE FUNCTION rating_hub_append_only();
CREATE TRIGGER rating_exclusions_append_only_truncate BEFORE TRUNCATE ON rating_exclusions
    FOR EACH STATEMENT EXECUTE FUNCTION rating_hub_append_only();

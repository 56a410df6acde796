-- wrenn-ctl schema, migration 13 (issue 16): ctl's traffic proxy keeps each running sandbox's
-- traffic row (team, host, traffic token, public flag, auto_resume) in memory, per replica.
-- Every change that could make such a row wrong notifies every replica, at commit, on the
-- channel `wrenn_sandbox_traffic` with the sandbox's UUID: a running sandbox leaving
-- `running`, moving host, or changing its token, public flag or auto_resume, or deleted
-- while running. Only rows that were running notify, so creating a sandbox pays nothing.
CREATE FUNCTION wrenn_sandbox_traffic_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('wrenn_sandbox_traffic', OLD.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER sandbox_traffic_changed
    AFTER UPDATE ON sandboxes
    FOR EACH ROW
    WHEN (OLD.state = 'running' AND (
        NEW.state IS DISTINCT FROM OLD.state
        OR NEW.host_id IS DISTINCT FROM OLD.host_id
        OR NEW.traffic_token IS DISTINCT FROM OLD.traffic_token
        OR NEW.allow_public_traffic IS DISTINCT FROM OLD.allow_public_traffic
        OR NEW.auto_resume IS DISTINCT FROM OLD.auto_resume
        OR NEW.team_id IS DISTINCT FROM OLD.team_id))
    EXECUTE FUNCTION wrenn_sandbox_traffic_notify();

CREATE TRIGGER sandbox_traffic_deleted
    AFTER DELETE ON sandboxes
    FOR EACH ROW
    WHEN (OLD.state = 'running')
    EXECUTE FUNCTION wrenn_sandbox_traffic_notify();

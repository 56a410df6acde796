-- wrenn-ctl schema, migration 5: template builds from a recipe, as jobs (issue 17 §1).
--
-- Only the tables and the build.finished event so far: no runner takes queued builds yet
-- and no API call creates them (see docs/operations.md, "Template builds").

CREATE TABLE template_builds (
    id              uuid PRIMARY KEY,
    team_id         uuid NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    -- The template's name once built.
    name            text NOT NULL,
    -- The recipe as given (at most 64 KiB: proto::recipe::RECIPE_LEN_MAX).
    recipe          text NOT NULL CHECK (octet_length(recipe) <= 65536),
    status          text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- Why it failed or was cancelled (the failing step and its exit code, a dead ctl, ...).
    reason          text NOT NULL DEFAULT '',
    host_id         uuid REFERENCES hosts(id) ON DELETE SET NULL,
    -- The build sandbox (destroyed whatever happens).
    sandbox_id      uuid,
    -- The snapshot template made, once succeeded.
    template_id     uuid,
    -- The ctl replica running it and when it last said so: a build whose runner stopped
    -- renewing is failed by the reconciler, which destroys its sandbox.
    runner          text NOT NULL DEFAULT '',
    runner_seen_at  timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    CHECK ((status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CHECK (status <> 'succeeded' OR template_id IS NOT NULL)
);
CREATE INDEX template_builds_team ON template_builds (team_id, created_at DESC, id DESC);
-- Builds in flight per host (at most N at once per host).
CREATE INDEX template_builds_active ON template_builds (host_id) WHERE status IN ('queued', 'running');

-- One row per recipe step, with its output kept bounded (the last 256 KiB: ctl's
-- limits::BUILD_STEP_LOG_MAX).
CREATE TABLE template_build_steps (
    build_id        uuid NOT NULL REFERENCES template_builds(id) ON DELETE CASCADE,
    n               integer NOT NULL CHECK (n >= 0 AND n < 256),
    line            integer NOT NULL,
    instruction     text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'skipped')),
    exit_code       integer,
    log             bytea NOT NULL DEFAULT '' CHECK (length(log) <= 262144),
    log_truncated   boolean NOT NULL DEFAULT false,
    started_at      timestamptz,
    finished_at     timestamptz,
    PRIMARY KEY (build_id, n)
);

CREATE FUNCTION wrenn_build_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wrenn_raise_event(NEW.team_id, 'build.finished', jsonb_build_object(
        'build_id', NEW.id::text, 'name', NEW.name, 'status', NEW.status,
        'reason', NEW.reason,
        'template_id', CASE WHEN NEW.template_id IS NULL THEN '' ELSE 'tpl-' || NEW.template_id::text END));
    RETURN NULL;
END $$;

CREATE TRIGGER template_builds_finished AFTER UPDATE OF status ON template_builds
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       AND NEW.status IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION wrenn_build_finished();

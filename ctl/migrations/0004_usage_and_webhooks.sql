-- wrenn-ctl schema, migration 4: sandbox state history and stored usage samples (usage per
-- team per day), and signed event webhooks (subscriptions, an outbox of events, deliveries).
--
-- State history and events are written by triggers, in the transaction of the change that
-- causes them, whoever makes it (an API call, a heartbeat, the reconciler, a TTL report):
-- no code path can change a sandbox's state without its history and its events.

-- Every state a sandbox entered, with the resources it held then.
CREATE TABLE sandbox_transitions (
    sandbox_id  uuid NOT NULL,
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    team_id     uuid NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    state       text NOT NULL,
    vcpus       integer NOT NULL,
    memory_mib  integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (sandbox_id, seq)
);
CREATE INDEX sandbox_transitions_team ON sandbox_transitions (team_id, at);

-- Existing sandboxes start their history with the state they are in.
INSERT INTO sandbox_transitions (sandbox_id, team_id, state, vcpus, memory_mib, at)
SELECT id, team_id, state, vcpus, memory_mib, updated_at FROM sandboxes WHERE state <> 'stopped';

-- Host-side samples the agents kept, stored at pause and destroy (and by the usage flush).
-- step_s 1: the last ten minutes (for Sandboxes/Metrics); step_s 30: the usage series.
CREATE TABLE sandbox_samples (
    sandbox_id    uuid NOT NULL,
    step_s        integer NOT NULL CHECK (step_s IN (1, 30)),
    end_at        timestamptz NOT NULL,
    team_id       uuid NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    covered_s     integer NOT NULL CHECK (covered_s > 0),
    cpu_usec      bigint NOT NULL,
    memory_bytes  bigint NOT NULL,
    disk_bytes    bigint NOT NULL,
    net_rx_bytes  bigint NOT NULL,
    net_tx_bytes  bigint NOT NULL,
    PRIMARY KEY (sandbox_id, step_s, end_at)
);
CREATE INDEX sandbox_samples_team ON sandbox_samples (team_id, end_at) WHERE step_s = 30;

-- Webhook endpoints of a team.
CREATE TABLE webhooks (
    id          uuid PRIMARY KEY,
    team_id     uuid NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    url         text NOT NULL,
    -- Event types; empty = all.
    events      text[] NOT NULL DEFAULT '{}',
    -- The HMAC key (shown once at create; ctl needs it to sign).
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_team ON webhooks (team_id, created_at, id);

-- The outbox: one row per event raised for a team that has a matching webhook.
CREATE TABLE webhook_events (
    id          uuid PRIMARY KEY,
    team_id     uuid NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    type        text NOT NULL,
    data        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One event's delivery to one webhook, and its outcome.
CREATE TABLE webhook_deliveries (
    webhook_id       uuid NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event_id         uuid NOT NULL REFERENCES webhook_events(id) ON DELETE CASCADE,
    status           text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed', 'dropped')),
    attempts         integer NOT NULL DEFAULT 0,
    -- Due time of the next attempt; while an attempt runs, the end of its lease (a ctl that
    -- dies mid-attempt leaves the row due again when the lease ends: at least once).
    next_attempt_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_http_status integer NOT NULL DEFAULT 0,
    last_error       text NOT NULL DEFAULT '',
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_page ON webhook_deliveries (webhook_id, created_at DESC, event_id DESC);

-- Raises an event: an outbox row and one delivery per matching webhook of the team. A
-- webhook with 1000 deliveries pending (ctl's limits::WEBHOOK_QUEUE_MAX) gets the new one
-- as 'dropped', listed with its outcome, so a dead endpoint never grows the table without
-- bound. Teams without a matching webhook pay one indexed lookup.
CREATE FUNCTION wrenn_raise_event(p_team uuid, p_type text, p_data jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    ev uuid;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM webhooks w WHERE w.team_id = p_team
                   AND (w.events = '{}' OR p_type = ANY (w.events))) THEN
        RETURN;
    END IF;
    ev := gen_random_uuid();
    INSERT INTO webhook_events (id, team_id, type, data) VALUES (ev, p_team, p_type, p_data);
    INSERT INTO webhook_deliveries (webhook_id, event_id, status, last_error)
    SELECT w.id, ev,
           CASE WHEN q.n >= 1000 THEN 'dropped' ELSE 'pending' END,
           CASE WHEN q.n >= 1000 THEN 'queue full: 1000 deliveries pending' ELSE '' END
    FROM webhooks w,
         LATERAL (SELECT count(*) AS n FROM (SELECT 1 FROM webhook_deliveries d
                  WHERE d.webhook_id = w.id AND d.status = 'pending' LIMIT 1000) p) q
    WHERE w.team_id = p_team AND (w.events = '{}' OR p_type = ANY (w.events));
END $$;

CREATE FUNCTION wrenn_sandbox_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    kind text;
BEGIN
    INSERT INTO sandbox_transitions (sandbox_id, team_id, state, vcpus, memory_mib)
    VALUES (NEW.id, NEW.team_id, NEW.state, NEW.vcpus, NEW.memory_mib);
    IF TG_OP = 'INSERT' THEN
        kind := 'sandbox.created';
    ELSIF NEW.state = 'running' AND OLD.state = 'resuming' THEN
        kind := 'sandbox.resumed';
    ELSIF NEW.state = 'running' THEN
        kind := 'sandbox.running';
    ELSIF NEW.state = 'paused' THEN
        kind := 'sandbox.paused';
    ELSIF NEW.state = 'stopped' THEN
        kind := 'sandbox.destroyed';
    ELSIF NEW.state = 'error' THEN
        kind := 'sandbox.error';
    END IF;
    IF kind IS NOT NULL THEN
        PERFORM wrenn_raise_event(NEW.team_id, kind, jsonb_build_object(
            'sandbox_id', 'sb-' || NEW.id::text,
            'state', NEW.state,
            'reason', NEW.state_reason,
            'host_id', CASE WHEN NEW.host_id IS NULL THEN '' ELSE 'host-' || NEW.host_id::text END,
            'template_id', 'tpl-' || NEW.template_id::text));
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER sandboxes_inserted AFTER INSERT ON sandboxes
    FOR EACH ROW EXECUTE FUNCTION wrenn_sandbox_changed();
CREATE TRIGGER sandboxes_state_changed AFTER UPDATE OF state ON sandboxes
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION wrenn_sandbox_changed();

CREATE FUNCTION wrenn_template_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM wrenn_raise_event(NEW.team_id, 'template.created', jsonb_build_object(
            'template_id', 'tpl-' || NEW.id::text, 'name', NEW.name, 'kind', NEW.kind));
    ELSE
        PERFORM wrenn_raise_event(OLD.team_id, 'template.deleted', jsonb_build_object(
            'template_id', 'tpl-' || OLD.id::text, 'name', OLD.name, 'kind', OLD.kind));
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER templates_changed AFTER INSERT OR DELETE ON templates
    FOR EACH ROW EXECUTE FUNCTION wrenn_template_changed();

-- Host up/down go to the platform team's webhooks only.
CREATE FUNCTION wrenn_host_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'online' AND (TG_OP = 'INSERT' OR OLD.status <> 'online') THEN
        PERFORM wrenn_raise_event('00000000-0000-0000-0000-000000000000', 'host.up',
            jsonb_build_object('host_id', 'host-' || NEW.id::text, 'hostname', NEW.hostname,
                               'status', NEW.status));
    ELSIF TG_OP = 'UPDATE' AND NEW.status = 'unreachable' AND OLD.status <> 'unreachable' THEN
        PERFORM wrenn_raise_event('00000000-0000-0000-0000-000000000000', 'host.down',
            jsonb_build_object('host_id', 'host-' || NEW.id::text, 'hostname', NEW.hostname,
                               'status', NEW.status));
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER hosts_inserted AFTER INSERT ON hosts
    FOR EACH ROW EXECUTE FUNCTION wrenn_host_changed();
CREATE TRIGGER hosts_status_changed AFTER UPDATE OF status ON hosts
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION wrenn_host_changed();

-- The usage flush (stores running sandboxes' samples so long runs are covered) runs as a
-- background job like the others.
INSERT INTO background_jobs (name) VALUES ('usage_flush');

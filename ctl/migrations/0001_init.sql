-- wrenn-ctl schema, migration 1: the whole schema.
-- UUID primary keys everywhere; TEXT only for the polymorphic audit columns (actor_id,
-- resource_id) and for template names (plus ordinary text: names, emails, states).

CREATE TABLE teams (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id          uuid PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    team_id     uuid NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, user_id),
    -- The platform team has no members.
    CHECK (team_id <> '00000000-0000-0000-0000-000000000000')
);
CREATE INDEX memberships_user ON memberships (user_id);

CREATE TABLE api_keys (
    id              uuid PRIMARY KEY,
    team_id         uuid NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    name            text NOT NULL,
    -- First characters of the plaintext ("wrn_" + 8 hex): lookup index and display.
    lookup          text NOT NULL,
    key_hash        bytea NOT NULL CHECK (length(key_hash) = 32),
    created_by      uuid REFERENCES users(id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz,
    -- Platform-admin keys belong to the platform team only.
    platform_admin  boolean NOT NULL DEFAULT false,
    CHECK (NOT platform_admin OR team_id = '00000000-0000-0000-0000-000000000000')
);
CREATE INDEX api_keys_lookup ON api_keys (lookup) WHERE revoked_at IS NULL;
CREATE INDEX api_keys_team ON api_keys (team_id, created_at DESC, id DESC);

CREATE TABLE hosts (
    id                  uuid PRIMARY KEY,
    address             text NOT NULL,
    hostname            text NOT NULL DEFAULT '',
    status              text NOT NULL CHECK (status IN ('online', 'unreachable', 'draining')),
    capacity_vcpus      integer NOT NULL CHECK (capacity_vcpus >= 0),
    capacity_memory_mib bigint NOT NULL CHECK (capacity_memory_mib >= 0),
    capacity_disk_mib   bigint NOT NULL CHECK (capacity_disk_mib >= 0),
    -- Reserved by sandboxes placed here (the scheduler's ledger, changed in SQL only).
    used_vcpus          integer NOT NULL DEFAULT 0 CHECK (used_vcpus >= 0),
    used_memory_mib     bigint NOT NULL DEFAULT 0 CHECK (used_memory_mib >= 0),
    used_disk_mib       bigint NOT NULL DEFAULT 0 CHECK (used_disk_mib >= 0),
    agent_version       text NOT NULL DEFAULT '',
    firecracker_version text NOT NULL DEFAULT '',
    can_host            boolean NOT NULL DEFAULT false,
    problems            jsonb NOT NULL DEFAULT '[]',
    last_heartbeat_at   timestamptz,
    -- SHA-256 of the token the agent presents to ctl (ctl never keeps the token).
    host_token_hash     bytea NOT NULL UNIQUE CHECK (length(host_token_hash) = 32),
    -- The token ctl presents to the agent (the database is the trust root).
    agent_token         text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

CREATE TABLE registration_tokens (
    id          uuid PRIMARY KEY,
    token_hash  bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_by  uuid REFERENCES api_keys(id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    host_id     uuid REFERENCES hosts(id) ON DELETE SET NULL
);

CREATE TABLE templates (
    id                  uuid PRIMARY KEY,
    team_id             uuid NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    name                text NOT NULL,
    kind                text NOT NULL CHECK (kind IN ('base', 'snapshot')),
    vcpus               integer NOT NULL CHECK (vcpus > 0),
    memory_mib          integer NOT NULL CHECK (memory_mib > 0),
    disk_mib            bigint NOT NULL CHECK (disk_mib > 0),
    size_bytes          bigint NOT NULL DEFAULT 0,
    -- The host holding a snapshot template's files (base templates are on every host).
    host_id             uuid REFERENCES hosts(id) ON DELETE RESTRICT,
    source_sandbox_id   uuid,
    -- envd access token baked into a snapshot (restored sandboxes authenticate with it
    -- before their own token is set); NULL when the agent keeps it with the files.
    access_token        text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (team_id, name),
    CHECK (kind = 'base' OR host_id IS NOT NULL)
);
CREATE INDEX templates_host ON templates (host_id) WHERE host_id IS NOT NULL;

CREATE TABLE sandboxes (
    id              uuid PRIMARY KEY,
    team_id         uuid NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    -- NULL while pending; a deleted host (only possible once its sandboxes stopped) leaves
    -- its stopped sandboxes' history.
    host_id         uuid REFERENCES hosts(id) ON DELETE SET NULL,
    -- No foreign key: deleting a template leaves its sandboxes (and their history) alone.
    template_id     uuid NOT NULL,
    state           text NOT NULL CHECK (state IN ('pending', 'starting', 'running', 'pausing',
                        'paused', 'resuming', 'stopping', 'stopped', 'error')),
    state_reason    text NOT NULL DEFAULT '',
    vcpus           integer NOT NULL CHECK (vcpus > 0),
    memory_mib      integer NOT NULL CHECK (memory_mib > 0),
    disk_mib        bigint NOT NULL CHECK (disk_mib > 0),
    -- Host resources this sandbox holds in hosts.used_* (kept with the state, see scheduler.rs).
    held_vcpus      integer NOT NULL DEFAULT 0,
    held_memory_mib bigint NOT NULL DEFAULT 0,
    held_disk_mib   bigint NOT NULL DEFAULT 0,
    timeout_s       bigint NOT NULL CHECK (timeout_s > 0),
    on_timeout      text NOT NULL CHECK (on_timeout IN ('pause', 'destroy')),
    metadata        jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz
) WITH (fillfactor = 80);
CREATE INDEX sandboxes_team ON sandboxes (team_id, created_at DESC, id DESC);
-- Plain (not partial on state): state changes then touch no indexed column, so they are
-- HOT updates (no index writes) given the free space fillfactor leaves on each page.
CREATE INDEX sandboxes_host ON sandboxes (host_id);

CREATE TABLE audit_logs (
    id              uuid PRIMARY KEY,
    team_id         uuid REFERENCES teams(id) ON DELETE CASCADE,
    actor_type      text NOT NULL CHECK (actor_type IN ('api_key', 'user', 'host', 'system')),
    actor_id        text NOT NULL,
    actor_name      text NOT NULL DEFAULT '',
    resource_type   text NOT NULL,
    resource_id     text NOT NULL,
    action          text NOT NULL,
    status          text NOT NULL CHECK (status IN ('success', 'failure')),
    metadata        jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Keyset pagination: newest first, ties broken by id.
CREATE INDEX audit_logs_team_page ON audit_logs (team_id, created_at DESC, id DESC);
CREATE INDEX audit_logs_page ON audit_logs (created_at DESC, id DESC);

-- Background jobs: when each last ran (with advisory locks: N replicas run each job once
-- per period).
CREATE TABLE background_jobs (
    name        text PRIMARY KEY,
    last_run_at timestamptz NOT NULL DEFAULT 'epoch'
);
INSERT INTO background_jobs (name) VALUES ('reconciler'), ('monitor');

-- The platform team (all-zeros UUID; owns shared templates; nobody is its member) and the
-- `minimal` base template (all-zeros UUID; 1 vCPU, 512 MiB, 5 GiB).
INSERT INTO teams (id, name) VALUES ('00000000-0000-0000-0000-000000000000', 'platform');
INSERT INTO templates (id, team_id, name, kind, vcpus, memory_mib, disk_mib)
VALUES ('00000000-0000-0000-0000-000000000000', '00000000-0000-0000-0000-000000000000',
        'minimal', 'base', 1, 512, 5120);

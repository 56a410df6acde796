-- wrenn-ctl schema, migration 10 (issue 16): a sandbox's traffic token (the secret its ports
-- answer to through ctl's traffic proxy; returned to its team by Create and Get, so stored as
-- given, like the sandbox itself it never leaves the team) and whether its ports are public.
-- NULL token: a sandbox created before tokens; only an API key reaches it until a rotate.
ALTER TABLE sandboxes
    ADD COLUMN traffic_token text CHECK (length(traffic_token) BETWEEN 16 AND 128),
    ADD COLUMN allow_public_traffic boolean NOT NULL DEFAULT false;

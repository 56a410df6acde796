-- wrenn-ctl schema, migration 9: a template's process defaults (issue 17 §1). A recipe's
-- final USER, WORKDIR and ENV become the defaults of every process of sandboxes created from
-- the template: default_user and default_cwd ('' = envd's own: `user` when the image has
-- it, else root; that user's home) and env (a JSON object of strings). A create sends the
-- template's env merged with its own (the create's value wins per key) and records the
-- template's three on the sandbox, so a template made from that sandbox keeps them even if
-- the first template is deleted. The create's own env is not stored (it may hold secrets;
-- the agent keeps it with the sandbox, as before). A process call's own user, cwd and env
-- still win over all of these (envd).
ALTER TABLE templates
    ADD COLUMN default_user text NOT NULL DEFAULT '',
    ADD COLUMN default_cwd text NOT NULL DEFAULT '',
    ADD COLUMN env jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(env) = 'object');
ALTER TABLE sandboxes
    ADD COLUMN default_user text NOT NULL DEFAULT '',
    ADD COLUMN default_cwd text NOT NULL DEFAULT '',
    ADD COLUMN env jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(env) = 'object');

-- A sandbox's network policy (wrenn.ctl.v1.NetworkPolicy as JSON: allow_internet_access,
-- deny_out, allow_out); NULL = open. Checked by ctl before it is stored.
ALTER TABLE sandboxes ADD COLUMN network jsonb;

-- wrenn-ctl schema, migration 3: drift seen in a host's heartbeat is recorded in the database
-- (not in the memory of the replica that received the heartbeat), so the early reconcile it
-- triggers runs once, under an advisory lock, on whichever replica's jobs take it.
ALTER TABLE hosts ADD COLUMN drift_seen_at timestamptz;

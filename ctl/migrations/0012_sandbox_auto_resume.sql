-- wrenn-ctl schema, migration 12 (issue 16, optional part): a paused sandbox created with
-- auto_resume is resumed by the first request to one of its ports through ctl's traffic proxy.
ALTER TABLE sandboxes
    ADD COLUMN auto_resume boolean NOT NULL DEFAULT false;

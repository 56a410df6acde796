-- wrenn-ctl schema, migration 11 (issue 14): revoked host certificates, by serial. A row stays
-- until the certificate expires (a revoked certificate past its expiry is refused anyway);
-- host_id has no foreign key because deleting a host is what revokes its certificates.
-- Every replica loads the unexpired rows when its LISTEN connection starts and hears new
-- ones by NOTIFY wrenn_cert_revoked.
CREATE TABLE revoked_certificates (
    serial     bytea PRIMARY KEY CHECK (octet_length(serial) BETWEEN 1 AND 21),
    host_id    uuid NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX revoked_certificates_expires ON revoked_certificates (expires_at);
-- Renewal: the certificate a renewal replaced stays valid until it expires (connections
-- opened with it keep working); it is revoked with the host's current one.
ALTER TABLE hosts
    ADD COLUMN prev_cert_serial bytea CHECK (octet_length(prev_cert_serial) BETWEEN 1 AND 20),
    ADD COLUMN prev_cert_expires_at timestamptz;

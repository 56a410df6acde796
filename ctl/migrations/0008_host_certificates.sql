-- wrenn-ctl schema, migration 8 (issue 14): the certificate ctl issued a host at registration,
-- by serial number (what a revocation names) and expiry (when renewal is due). NULL: the host
-- registered without a key (an older agent) or ctl issued nothing (an operator's own PKI).
ALTER TABLE hosts
    ADD COLUMN cert_serial bytea CHECK (octet_length(cert_serial) BETWEEN 1 AND 20),
    ADD COLUMN cert_expires_at timestamptz;
CREATE UNIQUE INDEX hosts_cert_serial ON hosts (cert_serial) WHERE cert_serial IS NOT NULL;

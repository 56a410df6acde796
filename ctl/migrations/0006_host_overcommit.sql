-- wrenn-ctl schema, migration 6: a host's own CPUs and memory and its overcommit ratios, as
-- its agent reports them at registration and in each heartbeat. `capacity_*` stays what the
-- scheduler places against (physical times the ratio); these columns say how it was made.
-- Rows of agents that report no ratios (older agents) read as ratio 1, physical = capacity.
ALTER TABLE hosts
    ADD COLUMN physical_vcpus integer NOT NULL DEFAULT 0 CHECK (physical_vcpus >= 0),
    ADD COLUMN physical_memory_mib bigint NOT NULL DEFAULT 0 CHECK (physical_memory_mib >= 0),
    ADD COLUMN vcpu_overcommit double precision NOT NULL DEFAULT 1 CHECK (vcpu_overcommit > 0),
    ADD COLUMN memory_overcommit double precision NOT NULL DEFAULT 1 CHECK (memory_overcommit > 0);
UPDATE hosts SET physical_vcpus = capacity_vcpus, physical_memory_mib = capacity_memory_mib;

//! Bounds of a sandbox that ctl and the agent must agree on, in one place: ctl refuses a
//! request beyond them before it reserves capacity, and the agent refuses the same request
//! with the same numbers, so ctl never places a sandbox its host would refuse. (Bounds of
//! one crate alone stay in that crate's `limits.rs`.)

/// vCPUs of one sandbox: Firecracker's own maximum (`MAX_SUPPORTED_VCPUS`, 32).
pub const VCPUS_MAX: u32 = 32;
/// Guest memory of one sandbox: 256 GiB, far above any sandbox's need and within what
/// Firecracker maps for one guest; it also bounds the capacity arithmetic.
pub const MEMORY_MIB_MAX: u32 = 256 * 1024;
/// Disk of one sandbox: 16 TiB (a sparse or reflinked file; the bound keeps the byte
/// count, `disk_mib << 20`, far from overflow).
pub const DISK_MIB_MAX: u64 = 16 * 1024 * 1024;
/// Entries of a sandbox's metadata or env map (stored as one JSONB row by ctl, as state-file
/// lines by the agent).
pub const MAP_ENTRIES_MAX: usize = 64;
/// Bytes of a key of those maps.
pub const MAP_KEY_LEN_MAX: usize = 256;
/// Bytes of a value of those maps.
pub const MAP_VALUE_LEN_MAX: usize = 4096;

/// A host's overcommit ratios (capacity offered to sandboxes per unit of the host's own):
/// reported by the agent at registration and in every heartbeat, checked by ctl with the
/// same bounds. vCPUs: 4 per core by default (idle sandboxes, most of them most of the
/// time, use almost no CPU; peers run many per core), at most 32. Memory: 1.0 by default
/// (guest memory once touched is not given back: there is no balloon), at most 4. At least
/// 0.1 for either (a ratio below 1 keeps part of the host for itself).
pub const VCPU_OVERCOMMIT_DEFAULT: f64 = 4.0;
pub const VCPU_OVERCOMMIT_MAX: f64 = 32.0;
pub const MEMORY_OVERCOMMIT_DEFAULT: f64 = 1.0;
pub const MEMORY_OVERCOMMIT_MAX: f64 = 4.0;
pub const OVERCOMMIT_MIN: f64 = 0.1;

/// Whether `ratio` is a vCPU (or, with `memory`, a memory) overcommit ratio both sides accept.
pub fn overcommit_ok(ratio: f64, memory: bool) -> bool {
    let max = if memory {
        MEMORY_OVERCOMMIT_MAX
    } else {
        VCPU_OVERCOMMIT_MAX
    };
    ratio.is_finite() && (OVERCOMMIT_MIN..=max).contains(&ratio)
}

const _: () = assert!(VCPUS_MAX as u64 <= i32::MAX as u64);
const _: () = assert!(MEMORY_MIB_MAX as u64 <= i32::MAX as u64);
const _: () = assert!(DISK_MIB_MAX <= (u64::MAX >> 20));
const _: () = assert!(DISK_MIB_MAX <= i64::MAX as u64);

/// Addresses/networks in a sandbox's `deny_out`, and in its `allow_out`. Each becomes one
/// element of an nftables interval set in the sandbox's slot; 256 keeps the slot's ruleset
/// well inside one pipe buffer for `nft`.
pub const EGRESS_RULES_MAX: usize = 256;
/// Domain names (and `*.` wildcards) in a sandbox's `allow_out`. The slot's resolver scans
/// them for every query; 256 keeps that scan far below a microsecond.
pub const EGRESS_DOMAINS_MAX: usize = 256;

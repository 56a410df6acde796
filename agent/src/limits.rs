//! Every bound of the agent, with its reason.

use std::time::Duration;

/// Largest state file read back (`sandbox.conf`, `template.conf`, `identity.conf`). A
/// record holds a few dozen fields plus env and metadata maps; 1 MiB is the RPC message
/// bound, so nothing ctl can send makes a record larger than about that.
pub const STATE_FILE_LEN_MAX: u64 = 2 << 20;

/// Lines in one state file: fields plus map entries (env and metadata are bounded below).
pub const STATE_FILE_LINES_MAX: usize = 2 * MAP_ENTRIES_MAX + 256;

/// Entries of an env or metadata map read back from a state file. A create request is held
/// to `proto::sandbox_limits::MAP_ENTRIES_MAX` (what ctl allows); records written by older
/// agents may hold more, and still load.
pub const MAP_ENTRIES_MAX: usize = 1024;
const _: () = assert!(MAP_ENTRIES_MAX >= proto::sandbox_limits::MAP_ENTRIES_MAX);
const _: () = assert!(FIELD_LEN_MAX >= proto::sandbox_limits::MAP_VALUE_LEN_MAX);

/// Length of a key or value of env and metadata, and of user/cwd strings.
pub const FIELD_LEN_MAX: usize = 64 * 1024;

/// Sandboxes (records) one agent holds, running or paused. Also the slot capacity: every
/// running sandbox needs a slot and the slot layout has room for 4096.
pub const SANDBOXES_MAX: usize = 1024;
/// First uid of jailed Firecrackers by default (`--uid-base`): far above the uids of
/// people and system accounts, below the 32-bit overflow uids.
pub const JAIL_UID_BASE_DEFAULT: u32 = 900_000;
/// Uids in the default range (`--uid-count`): at least one per slot ([`SANDBOXES_MAX`]),
/// with room so a released uid is not handed out again at once.
pub const JAIL_UID_COUNT_DEFAULT: u32 = 4096;

/// Lifecycle operations (create, pause, resume, template) doing slow work at once. A host
/// with 2 cores saturates its disk with a few copies or snapshots; more in parallel only
/// makes each slower. Further operations wait their turn.
pub const LIFECYCLE_CONCURRENCY_MAX: usize = 4;

/// Operations allowed to wait for a lifecycle turn; beyond that the call fails with
/// RESOURCE_EXHAUSTED instead of piling up threads.
pub const LIFECYCLE_QUEUE_MAX: usize = 64;

/// Default sandbox timeout when a create request says 0.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(300);

/// Longest timeout accepted (30 days): ctl enforces its own plan limits, this only keeps
/// `now + timeout` far from overflow.
pub const TIMEOUT_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// When the reaper finds a sandbox busy with another operation at expiry, it retries after
/// this long instead of blocking behind it.
pub const TTL_RETRY: Duration = Duration::from_secs(5);

/// Longest sleep of the reaper thread; it wakes at least this often even without changes,
/// so a clock step is noticed.
pub const TTL_TICK_MAX: Duration = Duration::from_secs(30);

/// Bytes of each of stdout and stderr kept by a unary Exec by default, and at most.
pub const EXEC_OUTPUT_DEFAULT: u64 = 1 << 20;
pub const EXEC_OUTPUT_MAX: u64 = 16 << 20;

/// Deadline of calls to envd that should answer at once (stat, signal, init), and of the
/// hello of a new connection to envd; envd waits for that hello as long
/// (`proto::limits::GUEST_HELLO_TIMEOUT`, checked by a test).
pub const ENVD_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long Exec waits for envd's `started` event. envd answers once fork and exec
/// succeeded (before a dynamic program's loader runs), so this covers a starved guest, not a
/// slow program; past it the call fails `unavailable` instead of holding a worker forever on a
/// guest that stopped answering (seen on nested KVM: the connection stays up, no event comes).
pub const EXEC_START_TIMEOUT: Duration = Duration::from_secs(120);

/// Time envd gets past a process's own `timeout_ms` to report its exit (it kills the process
/// at the timeout and then reports): the most an Exec with a timeout waits.
pub const EXEC_EXIT_GRACE: Duration = Duration::from_secs(30);

/// How often a forwarded call checks whether ctl cancelled it while it waits on envd: the
/// most a cancelled call keeps envd's side open.
pub const CANCEL_POLL: Duration = Duration::from_millis(200);

/// Time allowed for envd's readiness push after InstanceStart. A cold boot on nested KVM
/// takes 4-6 minutes (see the machines' notes); real hosts take about a second.
pub const BOOT_READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Time allowed from snapshot/load to envd answering again.
pub const RESTORE_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Access tokens: 32 random bytes, hex.
pub const ACCESS_TOKEN_BYTES: usize = 32;

/// Heartbeat interval until ctl names one.
pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(10);

/// Bounds on the interval ctl may set, so a bad value neither floods ctl nor goes silent.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(500);
pub const HEARTBEAT_INTERVAL_MAX: Duration = Duration::from_secs(300);

/// State reports waiting to be sent to ctl; the oldest are dropped beyond this (ctl's
/// reconciler catches up with List), so an unreachable ctl never grows the agent's memory.
pub const REPORT_QUEUE_MAX: usize = 1024;

/// Deadline of calls to ctl.
pub const CTL_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The agent renews its host certificate once this fraction of its lifetime has passed
/// (`CERT_RENEW_AT_NUM / CERT_RENEW_AT_DEN`, two thirds): a 90-day certificate after 60
/// days, leaving 30 days for a ctl outage before it expires.
pub const CERT_RENEW_AT_NUM: u64 = 2;
pub const CERT_RENEW_AT_DEN: u64 = 3;
const _: () = assert!(CERT_RENEW_AT_NUM < CERT_RENEW_AT_DEN);

/// After a failed renewal the agent tries again after this long (not at every heartbeat).
pub const CERT_RENEW_RETRY: Duration = Duration::from_secs(60);

/// The metrics/health HTTP listener (for a scraper and a load balancer's probe, nothing
/// more): connections at once. A connection costs a slot on the event loop, not a thread;
/// a new one beyond the bound evicts the oldest connection still sending its request.
pub const HTTP_CONNECTIONS_MAX: usize = 64;
/// Connections from one source address (a quarter of [`HTTP_CONNECTIONS_MAX`]); beyond it a
/// new connection evicts that source's oldest unanswered one, so one host's flood churns
/// its own connections and leaves the rest to the probes.
pub const HTTP_SOURCE_CONNECTIONS_MAX: usize = 16;
/// Largest request head (the codec's 16 KiB ceiling is for API clients; a probe's head is a
/// line and a Host header).
pub const HTTP_REQUEST_LEN_MAX: usize = 8 * 1024;
/// A request must arrive whole, and its answer be taken, within this time of the accept.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

const _: () = assert!(LIFECYCLE_CONCURRENCY_MAX <= LIFECYCLE_QUEUE_MAX);
const _: () = assert!(HTTP_SOURCE_CONNECTIONS_MAX <= HTTP_CONNECTIONS_MAX);
const _: () = assert!(HTTP_REQUEST_LEN_MAX <= proto::limits::HTTP_HEAD_LEN_MAX);
const _: () = assert!(SANDBOXES_MAX <= 4096, "slot layout has 4096 slots");
const _: () = assert!(JAIL_UID_COUNT_DEFAULT as usize >= SANDBOXES_MAX);

/// Ports.Connect streams open on this agent at once. While it moves bytes each holds up to
/// two threads (ctl's side, at first on its RPC worker, and the guest's side); idle, none
/// ([`PORT_PARK_AFTER`]). Bounded anyway: a busy stream's RPC worker is not free for
/// lifecycle and file calls until its side goes quiet.
pub const PORT_STREAMS_MAX: usize = 64;
/// Ports.Connect streams to one sandbox at once, so one sandbox's traffic cannot take the
/// whole budget.
pub const PORT_STREAMS_PER_SANDBOX_MAX: usize = 16;
const _: () = assert!(PORT_STREAMS_PER_SANDBOX_MAX <= PORT_STREAMS_MAX);
/// A port relay half whose side brought nothing for this long parks and gives its thread
/// back (ctl's traffic proxy uses the same value, `PROXY_PARK_AFTER`).
pub const PORT_PARK_AFTER: Duration = proto::limits::RELAY_PARK_AFTER;
/// A guest side parked this long without a byte from the guest looks at its socket again
/// and parks anew: only a bound on the parking loop's deadlines (ctl's idle bounds end
/// quiet connections).
pub const PORT_PARK_RECHECK: Duration = Duration::from_secs(600);
/// Threads of the port relay pool exit after this long without work.
pub const PORT_RELAY_THREAD_IDLE: Duration = Duration::from_secs(30);
/// How long the agent waits for the guest to accept a Ports.Connect connection.
pub const PORT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from the guest per message sent to ctl: the protocol's port message size
/// (ctl relays the same size on, see `proto::limits::PORT_CHUNK_LEN` for the reason).
pub const PORT_CHUNK_LEN: usize = proto::limits::PORT_CHUNK_LEN;
/// envd's API port inside the guest: never reachable through Ports.Connect.
pub const ENVD_PORT: u32 = 49983;
/// Per-sandbox usage samples (`samples.rs`): the sampler reads every running VM once a
/// second ([`SAMPLE_INTERVAL`]) into three rings allocated at once, so each sandbox costs a
/// fixed ~55 KiB: 10 min at 1 s, 2 h at 30 s, 24 h at 5 min. The tiers' steps are what
/// ctl's `Sandboxes/Metrics` picks from by range (ctl's `limits.rs` holds the same numbers).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
pub const TIER_FINE_LEN: usize = 600;
pub const TIER_MID_STEP_S: u32 = 30;
pub const TIER_MID_LEN: usize = 240;
pub const TIER_COARSE_STEP_S: u32 = 300;
pub const TIER_COARSE_LEN: usize = 288;
/// Sandboxes with sample rings at once: every sandbox the agent may hold, plus the frozen.
pub const SAMPLED_SANDBOXES_MAX: usize = SANDBOXES_MAX + FROZEN_MAX;
/// Rings of sandboxes whose VM is gone (paused, destroyed) are kept this long, so ctl can
/// store them after a pause or destroy it did not make itself (TTL, a VM that died), at
/// most this many (the oldest frozen are dropped first).
pub const FROZEN_RETAIN: Duration = Duration::from_secs(3600);
pub const FROZEN_MAX: usize = 256;

const _: () = assert!(TIER_FINE_LEN == 10 * 60);
const _: () = assert!(TIER_MID_LEN * TIER_MID_STEP_S as usize == 2 * 3600);
const _: () = assert!(TIER_COARSE_LEN * TIER_COARSE_STEP_S as usize == 24 * 3600);
const _: () = assert!(TIER_COARSE_STEP_S % TIER_MID_STEP_S == 0);

/// Largest registration-token file (`--registration-token-file`): a token is under 100
/// bytes; a larger file is not one.
pub const REGISTRATION_TOKEN_FILE_MAX: usize = 4096;

/// How often a restore's watcher reads wrenn-uffd's stats file (the page server rewrites it
/// about once a second and at every phase change).
pub const RESTORE_STATS_POLL: Duration = Duration::from_millis(250);
/// How long a restore's watcher waits for the page server's final report: a restore's
/// background fill takes seconds per GiB; past this the restore is logged as unsettled and
/// the thread ends (one watcher per restore, so at most one per sandbox).
pub const RESTORE_SETTLE_MAX: Duration = Duration::from_secs(600);
/// Most of wrenn-uffd's stats file the agent reads: it is about 400 bytes of counters.
pub const UFFD_STATS_FILE_MAX: u64 = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envd_waits_for_our_hello_as_long_as_we_do() {
        assert_eq!(ENVD_CALL_TIMEOUT, proto::limits::GUEST_HELLO_TIMEOUT);
    }
}

//! Every bound envd applies, with the reason for its value.

use std::time::Duration;

/// Largest /etc/passwd or /etc/group envd reads: far above any guest image's, small enough
/// that a hostile file cannot exhaust memory.
pub const ACCOUNT_FILE_LEN_MAX: u64 = 4 << 20;
/// Supplementary groups set for a child: the kernel allows 65536, a real user has a handful.
pub const SUPPLEMENTARY_GROUPS_MAX: usize = 256;

/// Processes envd runs at once (started through the API). Each holds a ring and a thread.
pub const PROCESSES_MAX: usize = 256;
/// RPC worker threads: every attached process stream, read, write and watch holds one for
/// its whole life, so room for all processes' streams plus as many other calls.
pub const RPC_WORKERS_MAX: usize = 2 * PROCESSES_MAX;
/// Arguments plus environment entries of one process.
pub const PROCESS_ARGS_MAX: usize = 4096;
/// Stack of a child between clone and exec. It runs a few raw system calls in frames of
/// well under 1 KiB (see spawn.rs); 64 KiB leaves room for any signal frame too.
pub const CHILD_STACK_LEN: usize = 64 * 1024;
/// Inaccessible page below the child's stack: an overflow faults instead of writing over
/// the mapping below.
pub const CHILD_STACK_GUARD_LEN: usize = 4096;
/// PATH entries searched for a command without a slash (each is one exec attempt, prepared
/// in the parent): real PATHs have about ten.
pub const PATH_SEARCH_DIRS_MAX: usize = 256;
/// Bytes of recent output kept per process for replay on reconnect; also the most output
/// envd buffers for a slow client before it stops reading the child's pipe.
pub const OUTPUT_RING_LEN: usize = 1 << 20;
/// Output read from a pipe per read call: the RPC chunk size, so one read is one message.
pub const OUTPUT_CHUNK_LEN: usize = proto::limits::CHUNK_LEN;
/// After the child exited, how long envd keeps draining pipes held open by its
/// descendants before it ends the output stream.
pub const OUTPUT_DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);
/// Longest process tag.
pub const TAG_LEN_MAX: usize = 256;
/// Clients attached to one process's output at once.
pub const SUBSCRIBERS_PER_PROCESS_MAX: usize = 16;
/// Ended processes remembered for a late reconnect (exit status and replay ring), and for
/// how long: enough for a client whose connection broke to come back.
pub const RECENT_EXITED_MAX: usize = 64;
pub const RECENT_EXITED_TTL: Duration = Duration::from_secs(60);
/// Exit statuses of children reaped before anyone claimed them, kept for a late claim.
pub const UNCLAIMED_EXITS_MAX: usize = 1024;

/// Entries a recursive listing returns; deeper trees need paging by path.
pub const LIST_ENTRIES_MAX: usize = 10_000;
/// Encoded bytes of listing entries per message: well under the 1 MiB message limit even
/// when one more entry of maximum path length is added.
pub const LIST_BATCH_BYTES_MAX: usize = 256 * 1024;
/// Depth of a recursive listing.
pub const LIST_DEPTH_MAX: u32 = 32;
/// Attempts to find an unused temporary name for an atomic write.
pub const TEMP_NAME_ATTEMPTS: u32 = 16;
/// Longest path accepted (PATH_MAX).
pub const PATH_LEN_MAX: usize = 4096;

/// Directories one recursive watch follows (each is an inotify watch; the default
/// fs.inotify.max_user_watches is 8192 per user).
pub const WATCH_DIRS_MAX: usize = 4096;
/// Events buffered by a watch before it reports an overflow.
pub const WATCH_EVENTS_MAX: usize = 4096;

/// Difference between guest and reference clock above which envd steps the clock instead
/// of slewing it: adjtimex slews at most 0.5 ms/s, so 100 ms already takes minutes.
pub const CLOCK_STEP_THRESHOLD: Duration = Duration::from_millis(100);
/// Samples per PTP_SYS_OFFSET* read (the kernel's PTP_MAX_SAMPLES is 25).
pub const CLOCK_SAMPLES: u32 = 15;
/// How often envd re-reads the PTP clock and slews.
pub const CLOCK_SYNC_INTERVAL: Duration = Duration::from_secs(60);

/// MMDS connect/read/write timeout: the service is local to the VMM, an answer takes
/// microseconds; a missing MMDS must not delay start-up.
pub const MMDS_TIMEOUT: Duration = Duration::from_millis(300);
/// Largest MMDS response envd reads.
pub const MMDS_RESPONSE_LEN_MAX: usize = 64 * 1024;
/// Header lines of an MMDS response.
pub const MMDS_HEADERS_MAX: usize = 32;

/// Ports forwarded from loopback to the guest interface at once.
pub const FORWARDED_PORTS_MAX: usize = 64;
/// Forwarded connections at once, across all ports.
pub const FORWARDED_CONNECTIONS_MAX: usize = 256;
/// Buffer per direction of a forwarded connection.
pub const FORWARD_BUFFER_LEN: usize = 16 * 1024;
/// How often /proc/net/tcp{,6} is scanned for new loopback listeners.
pub const PORT_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes per round of `envd selftest`, in MiB: it holds the source and a copy per memcpy
/// thread in memory, and guests have a few hundred MiB.
pub const SELFTEST_MIB_MAX: u64 = 1024;
/// Threads copying at once in the self-test's memcpy case.
pub const SELFTEST_THREADS_MAX: usize = 64;
/// Differing runs the self-test prints per stage (all are counted).
pub const SELFTEST_RUNS_SHOWN: usize = 32;

const _: () = assert!(OUTPUT_RING_LEN >= 4 * OUTPUT_CHUNK_LEN);
const _: () =
    assert!(CHILD_STACK_LEN % CHILD_STACK_GUARD_LEN == 0 && CHILD_STACK_GUARD_LEN % 4096 == 0);
const _: () = assert!(CLOCK_SAMPLES >= 3 && CLOCK_SAMPLES <= 25);

//! Every bound of vmm-glue outside `net/` (which keeps its own), each with its reason.

use std::time::Duration;

/// Longest request line plus headers we send to Firecracker's API. Ours are about 150 bytes;
/// the bound catches a runaway path (an ID is at most [`API_ID_LEN_MAX`]).
pub const API_REQUEST_HEAD_LEN_MAX: usize = 1024;
/// Largest request body: Firecracker's default `--http-api-max-payload-size` (51,200 bytes).
/// A larger body would be refused by Firecracker after we sent it; we refuse it first.
pub const API_REQUEST_BODY_LEN_MAX: usize = 51_200;
/// Longest response head we accept. Firecracker's are about 130 bytes.
pub const API_RESPONSE_HEAD_LEN_MAX: usize = 1024;
/// Largest response body we read: Firecracker never sends more than it accepts (its largest
/// answers, `GET /vm/config` and `GET /mmds`, are bounded by the same payload limit).
pub const API_RESPONSE_BODY_LEN_MAX: usize = 51_200;
/// Longest fault message kept from an error response (the rest is cut).
pub const API_FAULT_MESSAGE_LEN_MAX: usize = 2048;
/// Default time for one API call: configuration calls answer in microseconds, but the nested
/// hypervisor of test hosts makes InstanceStart take a while.
pub const API_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// `snapshot/create` writes the whole guest memory for a Full snapshot (0.35–0.7 s for
/// 256 MiB measured here; a 4 GiB guest on a slow disk takes far longer).
pub const API_TIMEOUT_SNAPSHOT_CREATE: Duration = Duration::from_secs(300);
/// `snapshot/load` blocks Firecracker while it maps memory and, with the Uffd backend, while
/// the page server accepts the handshake.
pub const API_TIMEOUT_SNAPSHOT_LOAD: Duration = Duration::from_secs(120);
/// Firecracker's own limit on device and drive IDs (path segments of the API).
pub const API_ID_LEN_MAX: usize = 64;
/// Longest kernel command line we pass. x86's COMMAND_LINE_SIZE is 2048 and Firecracker
/// appends `root=`, `virtio_mmio.device=` entries (about 40 bytes per device) to ours.
pub const BOOT_ARGS_LEN_MAX: usize = 1536;
/// Longest path Firecracker may be given for a Unix socket (`sun_path` is 108 bytes with NUL).
pub const UNIX_SOCKET_PATH_LEN_MAX: usize = 107;

/// Default time from spawning Firecracker to its API socket accepting connections
/// (tens of milliseconds normally; the bound only catches a Firecracker that never listens).
pub const API_SOCKET_WAIT_DEFAULT: Duration = Duration::from_secs(10);
/// Interval between checks for the API socket while waiting.
pub const API_SOCKET_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How long to wait for a killed Firecracker to exit before giving up. SIGKILL cannot be
/// caught; only a process stuck in an uninterruptible sleep (a hung disk) takes longer.
pub const KILL_WAIT: Duration = Duration::from_secs(10);
/// Longest command line read from /proc/PID/cmdline when re-adopting a process.
pub const PROC_CMDLINE_LEN_MAX: usize = 64 * 1024;
/// Largest process state file we read back.
pub const STATE_FILE_LEN_MAX: usize = 16 * 1024;
/// Lines of a process state file: a handful of fields, one line per cgroup directory (one
/// per controller on cgroup v1) and per file to clean up.
pub const STATE_FILE_LINES_MAX: usize = 64;
/// Size of the tmpfs that holds the stable paths in a Firecracker's mount namespace: it only
/// holds empty files used as bind-mount targets.
pub const STABLE_TMPFS_SIZE: &str = "size=64k,nr_inodes=64,mode=0755";

/// Longest `OK <port>\n` reply to a hybrid-vsock `CONNECT`: "OK " + u32 digits + '\n' is 14;
/// anything longer is not Firecracker.
pub const VSOCK_REPLY_LEN_MAX: usize = 32;
/// Default time for the hybrid-vsock handshake (connect, CONNECT, OK). Firecracker answers
/// once the guest accepts, which a loaded or just-restored guest may take a second to do.
pub const VSOCK_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes asked of one `copy_file_range` call in a sparse copy, so one call never ties up
/// the thread for long on a slow disk.
pub const COPY_CHUNK_LEN: usize = 64 << 20;

/// CFS period for CPU quotas (the kernel's default, 100 ms); a quota of one period is one CPU.
pub const CGROUP_CPU_PERIOD_US: u64 = 100_000;
/// Memory a Firecracker needs besides guest memory (its own heap, the API and device
/// threads' stacks, virtio queues, the copied static binary's pages): the cgroup memory limit
/// is guest memory plus this.
pub const VMM_MEMORY_OVERHEAD_BYTES: u64 = 128 << 20;
/// Tasks of a jailed Firecracker besides its vCPU threads: the main (VMM) thread, the API
/// thread, the jailer's clone while it execs, and headroom for threads a release adds.
pub const JAIL_PIDS_BASE: u32 = 16;
/// One thread per vCPU.
pub const JAIL_PIDS_PER_VCPU: u32 = 1;
/// `RLIMIT_NOFILE` of a jailed Firecracker: the jailer's own default (2048); Firecracker
/// holds a few dozen descriptors (KVM, vCPUs, eventfds, tap, disk, sockets).
pub const JAIL_NO_FILE: u64 = 2048;
/// How long the jailer may take to set up the jail and exit after writing the pid file
/// (it copies the Firecracker binary, a few MiB, into the chroot).
pub const JAILER_EXIT_WAIT: Duration = Duration::from_secs(30);
/// Longest pid file read (a decimal pid).
pub const PID_FILE_LEN_MAX: usize = 32;

const _: () = assert!(API_REQUEST_HEAD_LEN_MAX >= 256);
const _: () = assert!(API_RESPONSE_BODY_LEN_MAX >= API_FAULT_MESSAGE_LEN_MAX);
const _: () = assert!(BOOT_ARGS_LEN_MAX < 2048);
const _: () = assert!(VSOCK_REPLY_LEN_MAX >= "OK 4294967295\n".len());
const _: () = assert!(JAIL_PIDS_BASE >= 4);

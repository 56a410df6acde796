//! Every bound of this crate, each with its reason.

/// Size of one block of the header, the unit of every diff: the 4 KiB x86 page. Dirty-page
/// tracking in KVM works per 4 KiB page, so a larger block would copy clean pages into diffs.
pub const BLOCK_SIZE: u64 = 4096;

/// Largest guest memory a header may describe: 1 TiB. Far above any sandbox, low enough that
/// the page server's per-page state (one byte a page) stays bounded (256 Mi entries).
pub const MEMORY_SIZE_MAX: u64 = 1 << 40;

/// Most extents in one header. A generation's diff after a pause has a few hundred extents
/// (measured: 221–233); merged chains fragment further. 1 Mi extents is a 12 MiB header
/// (40 MiB in version 1), well past anything real, and bounds what a corrupt file can make the
/// parser allocate.
pub const EXTENT_COUNT_MAX: u32 = 1 << 20;

/// Most layers (distinct generations) one header may reference. The chain is squashed long
/// before this (see [`SQUASH_LAYER_COUNT`]); the bound only protects the parser.
pub const LAYER_COUNT_MAX: u32 = 1024;

/// Squash a chain once it references more layers than this: each layer is one more open file
/// and mapping in the page server, and one more file to keep per sandbox.
pub const SQUASH_LAYER_COUNT: usize = 8;

/// Largest header file accepted, derived from the counts above and the larger extent record
/// (version 1's, still read); the exact length for the file's version is checked after.
pub const HEADER_SIZE_MAX: u64 = crate::header::HEADER_FIXED_SIZE as u64
    + LAYER_COUNT_MAX as u64 * crate::header::LAYER_RECORD_SIZE as u64
    + EXTENT_COUNT_MAX as u64 * crate::header::EXTENT_RECORD_SIZE_V1 as u64
    + 4;

/// Largest handshake message from Firecracker. Each region is about 120 bytes of JSON; a
/// Firecracker VM has a handful of regions (two around the x86 MMIO hole, plus hotplug slots),
/// so 64 KiB leaves room for hundreds.
pub const HANDSHAKE_SIZE_MAX: usize = 64 * 1024;

/// Most memory regions accepted in the handshake (see [`HANDSHAKE_SIZE_MAX`]).
pub const REGION_COUNT_MAX: usize = 256;

/// File descriptors received with the handshake: Firecracker sends exactly one; room for a few
/// more lets the server see (and reject) a message that carries two instead of truncating it.
pub const HANDSHAKE_FD_MAX: usize = 4;

/// How long the server waits, after the connection, for the handshake message (ms).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// `uffd_msg`s read per `read(2)`: one syscall drains a burst of faults from many vCPUs.
pub const EVENT_BATCH: usize = 64;

/// Largest fault-around window (bytes). The goal is measured with at most 64 KiB;
/// beyond 2 MiB one fault would install a whole huge page worth of memory.
pub const FAULT_AROUND_MAX: u64 = 2 << 20;

/// Fault-around is installed in steps of at most this many bytes between reads of the
/// userfaultfd, so that a demand fault never waits behind more than one step (a page install
/// costs about 1–3 µs here).
pub const AROUND_STEP: u64 = 16 * 1024;

/// Fault-around windows queued at most; the oldest is dropped beyond (an optimization only).
pub const AROUND_QUEUE_MAX: usize = 256;

/// Default fault-around window (bytes): 16 pages per fault.
pub const FAULT_AROUND_DEFAULT: u64 = 64 * 1024;

/// Bytes installed by one background-fill or prefetch `UFFDIO_COPY`: large copies run at
/// memory bandwidth, but each one delays demand faults queued behind it, so keep it at 2 MiB.
pub const FILL_CHUNK: u64 = 2 << 20;

/// Most entries in a working-set file: one per page of the largest memory.
pub const WORKING_SET_COUNT_MAX: u64 = MEMORY_SIZE_MAX / BLOCK_SIZE;

/// Most faults waiting for a retry after `EAGAIN` (the memory map was changing): at most one
/// batch of events can be pending at a time.
pub const RETRY_QUEUE_MAX: usize = EVENT_BATCH;

/// Spin (busy-poll the userfaultfd) for this long after the last event before sleeping in
/// epoll (µs). Off by default: on these 2-core hosts a wake-up from epoll cost about 4 µs (the
/// same as a page install) and a spinning handler took the core the woken vCPU needed
/// (`bench uffd_*` with `WRENN_BENCH_SPIN_US=200` was no faster and had worse tails). Raise it
/// with `--spin-us` on hosts with spare cores where wake-ups are slow (67 µs a page was measured
/// for a sleeping handler on one nested-KVM host).
pub const SPIN_DEFAULT_US: u64 = 0;

/// Longest accepted spin (µs): beyond this the handler just burns a core.
pub const SPIN_MAX_US: u64 = 100_000;

/// Read buffer when scanning a memory file for a new generation (bytes).
pub const SCAN_CHUNK: usize = 1 << 20;

const _: () = assert!(BLOCK_SIZE.is_power_of_two());
const _: () = assert!(FAULT_AROUND_DEFAULT <= FAULT_AROUND_MAX);
const _: () = assert!(FAULT_AROUND_MAX % BLOCK_SIZE == 0);
const _: () = assert!(FILL_CHUNK % BLOCK_SIZE == 0);
const _: () = assert!(AROUND_STEP % BLOCK_SIZE == 0 && AROUND_STEP <= FAULT_AROUND_MAX);
const _: () = assert!(SCAN_CHUNK as u64 % BLOCK_SIZE == 0);
const _: () = assert!(MEMORY_SIZE_MAX % BLOCK_SIZE == 0);
// Version-2 headers store lengths and storage offsets as u32 block counts: every length fits,
// and so does every storage offset, since a layer is never larger than the memory.
const _: () = assert!(MEMORY_SIZE_MAX / BLOCK_SIZE <= u32::MAX as u64);
// `HEADER_SIZE_MAX` is derived from the larger of the two extent records.
const _: () = assert!(crate::header::EXTENT_RECORD_SIZE_V1 >= crate::header::EXTENT_RECORD_SIZE);
const _: () = assert!(HANDSHAKE_FD_MAX >= 2);

/// Largest piece a squash copies from a mapped layer to the new layer in one write, and the
/// new layer's write buffer: a squash streams through the mapped layers (`page_server::
/// LayerSet`), so its heap does not grow with the layers' sizes.
pub const SQUASH_CHUNK: usize = 1 << 20;
/// Anonymous memory a squash may add to its process beyond the header itself, whatever the
/// layer sizes: the write buffer ([`SQUASH_CHUNK`]) with room for the allocator and a thread
/// stack. A test squashes layers larger than this and checks the peak `RssAnon`.
pub const SQUASH_MEMORY_MAX: u64 = 4 << 20;

const _: () = assert!(SQUASH_CHUNK as u64 * 2 <= SQUASH_MEMORY_MAX);

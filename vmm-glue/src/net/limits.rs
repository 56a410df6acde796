//! Every bound of the network-slot code, with the reason for its value.

use std::time::Duration;

/// Slots a host can hold. A host runs at most a few hundred microVMs (each needs memory
/// and a vCPU), so 4096 leaves ample room while keeping the allocator's bitmap at 512 bytes
/// and every interface name short (`wrenn-v4095` is 11 of the 15 bytes Linux allows).
pub const SLOT_COUNT_MAX: u32 = 4096;

/// Each slot's veth link is a /30 in the lower half of the slot subnet (a /16): 4 addresses
/// per slot must fit in 32,768.
pub const SLOT_LINK_BLOCK_LEN: u32 = 4;
/// The per-slot guest alias is one address taken from a /30 block in the upper half, so
/// that no alias is the network or broadcast address of anything.
pub const SLOT_ALIAS_BLOCK_LEN: u32 = 4;
/// Half of the slot /16.
pub const SUBNET_HALF_LEN: u32 = 1 << 15;
const _: () = assert!(SLOT_COUNT_MAX * SLOT_LINK_BLOCK_LEN <= SUBNET_HALF_LEN);
const _: () = assert!(SLOT_COUNT_MAX * SLOT_ALIAS_BLOCK_LEN <= SUBNET_HALF_LEN);

/// Longest name prefix (`wrenn` by default). Interface names are `<prefix>-v<index>` and
/// Linux caps them at 15 bytes (IFNAMSIZ - 1): 8 + 2 + 4 digits = 14.
pub const NAME_PREFIX_LEN_MAX: usize = 8;
/// Longest interface name Linux accepts (IFNAMSIZ = 16 including the NUL).
pub const IFNAME_LEN_MAX: usize = 15;
/// Digits of the largest slot index.
const SLOT_INDEX_DIGITS_MAX: usize = 4;
const _: () = assert!(NAME_PREFIX_LEN_MAX + 2 + SLOT_INDEX_DIGITS_MAX <= IFNAME_LEN_MAX);
const _: () = assert!(SLOT_COUNT_MAX <= 10_000); // fits in SLOT_INDEX_DIGITS_MAX digits

/// Longest network namespace name: it becomes a file name under /run/netns.
pub const NETNS_NAME_LEN_MAX: usize = 64;

/// Entries in each of a slot's egress allow and deny lists. Each becomes one element of an
/// nftables set; the bound keeps a ruleset small enough to pass through a pipe in one go.
pub const EGRESS_RULES_MAX: usize = 256;

/// Largest request we build. Our biggest (a veth pair with its peer's attributes) is
/// under 200 bytes; the bound catches a builder bug instead of sending garbage.
pub const NETLINK_REQUEST_LEN_MAX: usize = 4096;
/// Receive buffer for one netlink datagram. The kernel fills dump datagrams up to 32 KiB
/// (NLMSG_GOODSIZE grows to the reader's buffer, capped at 32 KiB); twice that is safe, and
/// a datagram that still does not fit is reported as truncated, never half-parsed.
pub const NETLINK_RECV_BUFFER_LEN: usize = 64 * 1024;
/// Datagrams read while waiting for one reply or one dump. A dump of every link on a host
/// with the maximum number of slots is a few hundred datagrams.
pub const NETLINK_DATAGRAMS_MAX: usize = 16 * 1024;
/// Times a dump is restarted when the kernel says it was interrupted (NLM_F_DUMP_INTR:
/// the table changed while it was being read).
pub const NETLINK_DUMP_RETRIES_MAX: u32 = 3;
/// How long one receive may wait for the kernel. rtnetlink answers in microseconds; a
/// missing answer means a bug, and this turns it into an error instead of a hang.
pub const NETLINK_RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `nft -f -` may run. Applying a slot's table takes milliseconds.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often we look whether nft has exited.
pub const NFT_POLL_INTERVAL: Duration = Duration::from_millis(2);
/// Largest ruleset fed to nft. It must fit in a pipe's buffer (64 KiB on Linux) so that
/// writing it never waits on nft. A slot's table is about 1 KiB plus at most
/// 2 × EGRESS_RULES_MAX CIDRs of at most 20 bytes each.
pub const NFT_RULESET_LEN_MAX: usize = 32 * 1024;
const _: () = assert!(2048 + 2 * EGRESS_RULES_MAX * 20 <= NFT_RULESET_LEN_MAX);
const _: () = assert!(NFT_RULESET_LEN_MAX <= 64 * 1024);
/// Bytes of nft's stderr kept for an error message.
pub const NFT_STDERR_LEN_MAX: usize = 4096;
/// Bytes of `nft list tables` output we read (one short line per table).
pub const NFT_STDOUT_LEN_MAX: usize = 256 * 1024;

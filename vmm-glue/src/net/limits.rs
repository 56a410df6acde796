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

/// Entries in each of a slot's egress allow and deny lists (ctl checks the same bound:
/// `proto::sandbox_limits`). Each becomes one element of an nftables set; the bound keeps a
/// ruleset small enough to pass through a pipe in one go.
pub const EGRESS_RULES_MAX: usize = proto::sandbox_limits::EGRESS_RULES_MAX;

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
/// writing it never waits on nft. A slot's table is about 2 KiB plus at most
/// 2 × EGRESS_RULES_MAX + NEVER_OUT_MAX CIDRs of at most 20 bytes each, plus the DNS set's
/// live addresses carried over on an update (`a.b.c.d timeout 3600s, `: at most 32 bytes).
pub const NFT_RULESET_LEN_MAX: usize = 60 * 1024;
const _: () = assert!(
    3072 + (2 * EGRESS_RULES_MAX + NEVER_OUT_MAX) * 20 + DNS_SET_LEN_MAX * 32
        <= NFT_RULESET_LEN_MAX
);
const _: () = assert!(NFT_RULESET_LEN_MAX <= 64 * 1024);
/// Bytes of nft's stderr kept for an error message.
pub const NFT_STDERR_LEN_MAX: usize = 4096;
/// Bytes of `nft list tables` output we read (one short line per table).
pub const NFT_STDOUT_LEN_MAX: usize = 256 * 1024;

// ---- egress policy ----

/// Entries in the operator's `never_out` list (host-wide). A handful of ranges in practice
/// (private, link-local, loopback, the control network); 64 leaves room and keeps the
/// ruleset small.
pub const NEVER_OUT_MAX: usize = 64;
/// Domain names (and `*.` wildcards) in one slot's allow list (`proto::sandbox_limits`, as
/// ctl checks). Each is matched against every query by a linear scan.
pub const EGRESS_DOMAINS_MAX: usize = proto::sandbox_limits::EGRESS_DOMAINS_MAX;

// ---- the per-slot DNS resolver ----

/// Largest query a guest may send. A question is at most 255 + 4 bytes, plus an EDNS
/// record; 512 is the classic UDP DNS size and every real query fits.
pub const DNS_QUERY_LEN_MAX: usize = 512;
/// Receive buffer for one upstream answer. Our query advertises at most
/// [`DNS_EDNS_UDP_PAYLOAD_MAX`], so a compliant upstream never sends more; a larger datagram
/// is detected (MSG_TRUNC) and answered SERVFAIL.
pub const DNS_MESSAGE_LEN_MAX: usize = 4096;
/// The EDNS UDP payload size we advertise upstream (the size DNS Flag Day 2020 settled on:
/// no IP fragmentation on common paths).
pub const DNS_EDNS_UDP_PAYLOAD_MAX: u16 = 1232;
const _: () = assert!(DNS_EDNS_UDP_PAYLOAD_MAX as usize <= DNS_MESSAGE_LEN_MAX);
/// Longest name on the wire (RFC 1035 2.3.4).
pub const DNS_NAME_LEN_MAX: usize = 255;
/// Longest label (RFC 1035 2.3.4).
pub const DNS_LABEL_LEN_MAX: usize = 63;
/// Compression pointers followed while reading one name. Pointers must point backwards, so
/// a chain always ends; this bounds the work on a message built to make it long.
pub const DNS_POINTER_JUMPS_MAX: usize = 32;
/// Records read from an answer section. Real answers hold a few; more is refused.
pub const DNS_ANSWER_RECORDS_MAX: usize = 64;
/// CNAME links followed from the question's name to its addresses. Resolvers give up far
/// earlier in practice; a loop ends here.
pub const DNS_CNAME_CHAIN_MAX: usize = 8;
/// Addresses of one answer added to the slot's set: a name with more is cut to these.
pub const DNS_ADDRESSES_PER_NAME_MAX: usize = 32;
/// Addresses a slot's DNS set holds (the nftables set's `size`). When it is full, new answers
/// are SERVFAIL until entries expire; 1024 is far beyond what one sandbox's allow list
/// resolves to.
pub const DNS_SET_LEN_MAX: usize = 1024;
/// Shortest time an address stays in the set, whatever the record's TTL: guests and their
/// libraries keep answers a little longer than the TTL, and a connection opened just before
/// expiry must get through.
pub const DNS_TTL_MIN: Duration = Duration::from_secs(30);
/// Longest time an address stays in the set: an allowed name that moves away from an
/// address stops granting it within this time.
pub const DNS_TTL_MAX: Duration = Duration::from_secs(3600);
/// Queries per second a slot's guest may send (a token bucket with this rate)...
pub const DNS_QUERIES_PER_SEC: u32 = 50;
/// ...and burst. A page load resolves a few dozen names; beyond, queries are dropped.
pub const DNS_QUERY_BURST: u32 = 100;
/// Datagrams read from one slot's socket before the loop turns to the other slots (and
/// comes back): one guest's flood delays the others' queries by at most this many reads.
pub const DNS_READS_PER_TURN: usize = 32;
/// Queries of one slot waiting for the upstream; more are answered SERVFAIL.
pub const DNS_PENDING_PER_SLOT_MAX: usize = 64;
/// How long a query waits for the upstream before the guest gets SERVFAIL.
pub const DNS_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(4);
/// Slots one resolver serves (the same bound as the host's slots).
pub const DNS_SLOTS_MAX: usize = SLOT_COUNT_MAX as usize;
/// Commands (add, update, remove a slot) queued for the resolver thread.
pub const DNS_COMMANDS_MAX: usize = 256;

// ---- DNS over TCP (RFC 7766), same address and policy as UDP ----

/// TCP connections to one slot's resolver at a time. A stub resolver opens one when a UDP
/// answer came back truncated and closes it after its answer; 8 covers a guest resolving
/// several large names at once. Connections beyond are accepted and closed at once, so they
/// never wait in the kernel's queue.
pub const DNS_TCP_CONNS_PER_SLOT_MAX: usize = 8;
/// Longest upstream answer relayed over TCP (the frame's 2-byte length can say 65,535). The
/// resolver reads at most [`DNS_ANSWER_RECORDS_MAX`] records, which fit in a few KiB even
/// with long names; 16 KiB keeps a slot's TCP memory at 8 × 16 KiB while leaving room for
/// large TXT answers. A longer answer is SERVFAIL. Guest queries over TCP have the UDP bound,
/// [`DNS_QUERY_LEN_MAX`]: a longer length prefix closes the connection.
pub const DNS_TCP_ANSWER_LEN_MAX: usize = 16 * 1024;
const _: () = assert!(DNS_TCP_ANSWER_LEN_MAX <= u16::MAX as usize);
/// How long a guest's TCP connection may sit without a complete query (from the accept, or
/// from the end of the previous answer), and how long the guest may take to read an answer.
/// A stub sends its query right after connecting; RFC 7766 (6.2.3) asks servers for idle
/// timeouts "of the order of seconds". A connection that sends nothing, or a length prefix
/// and then stalls, is closed at this deadline, whatever it sends meanwhile.
pub const DNS_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries answered on one TCP connection before the resolver closes it (RFC 7766 lets
/// servers close at any time; a guest reconnects). Keeps one connection from holding its
/// place forever.
pub const DNS_TCP_QUERIES_PER_CONN_MAX: u32 = 32;

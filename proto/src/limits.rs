//! Every bound of the wire protocol and the RPC runtime, with the reason for its value.
//! PROTOCOL.md repeats the wire-visible ones.

use std::time::Duration;

/// Bytes in the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;
/// Bytes of the fixed frame header after the length prefix: stream id (4), kind (1), flags (1).
pub const FRAME_HEADER_LEN: usize = 6;
/// Largest protobuf message a peer accepts by default: 1 MiB. Bulk data (files, process
/// output) travels in chunks of [`CHUNK_LEN`], so only listings come near this.
pub const MESSAGE_LEN_MAX: usize = 1 << 20;
/// Longest method name (`package.Service/Method`).
pub const METHOD_LEN_MAX: usize = 128;
/// Longest error message carried in an ERROR or GOAWAY frame; longer ones are cut.
pub const ERROR_MESSAGE_LEN_MAX: usize = 4096;
/// Request envelope bytes ahead of the message: method length (1) + method + timeout (4).
pub const REQUEST_ENVELOPE_LEN_MAX: usize = 1 + METHOD_LEN_MAX + 4;
/// Default maximum of the length field (frame header + body). An oversized length is
/// refused before a single byte of the body is buffered.
pub const FRAME_LEN_MAX_DEFAULT: u32 =
    (FRAME_HEADER_LEN + REQUEST_ENVELOPE_LEN_MAX + MESSAGE_LEN_MAX) as u32;
/// Smallest frame length limit a peer may advertise: enough for any control frame and a
/// modest message, so the protocol can always make progress.
pub const FRAME_LEN_MAX_FLOOR: u32 = 16 * 1024;
/// Hard ceiling of any frame length limit (16 MiB).
pub const FRAME_LEN_MAX_CEILING: u32 = 16 << 20;

/// Smallest receive window (stream or connection) a peer may announce next to a frame length
/// limit of `frame_len_max`: four thirds of it, rounded up. Window credit is returned in
/// quarters, so a blocked sender waits for a quarter of the window to come back; with a
/// window of at least 4/3 of the largest frame, a largest frame always fits in what is left
/// (PROTOCOL.md §4, §6). Smaller windows would make every call fail or hang.
pub const fn window_min(frame_len_max: u32) -> u32 {
    (frame_len_max as u64 * 4).div_ceil(3) as u32
}
/// Bulk chunk size used by services that move bytes (file read/write, process output).
pub const CHUNK_LEN: usize = 64 * 1024;

/// Bytes of one data message of a port stream (`Ports.Connect` of ctl and of the agent, and
/// ctl's traffic proxy that rides on them): the most a relay reads from a socket before it
/// sends. 256 KiB, not [`CHUNK_LEN`]: bulk TCP through two relays costs a read, a frame, a
/// wake-up and a write per message at each hop, so larger messages cut that overhead
/// fourfold, while eight of them still fit a stream window (the sender keeps several in
/// flight instead of waiting for each quarter of credit). Each relay holds at most one per
/// direction, so a proxied connection still costs ctl and the agent a bounded buffer.
pub const PORT_CHUNK_LEN: usize = 256 * 1024;
/// Default per-stream receive window: two maximum messages, so a sender streaming maximum
/// messages still overlaps sending with the receiver's consumption.
pub const STREAM_WINDOW_DEFAULT: u32 = 2 * MESSAGE_LEN_MAX as u32;
/// Default per-connection receive window across all streams: 16 MiB.
pub const CONN_WINDOW_DEFAULT: u32 = 16 << 20;
/// Default maximum number of concurrently open streams per connection.
pub const STREAMS_PER_CONN_MAX: u32 = 128;
/// Bytes of non-flow-controlled frames (PONG, WINDOW, ERROR, CANCEL) a connection may queue
/// for a peer that does not read before it is closed: such a peer is flooding us.
pub const CONTROL_QUEUE_LEN_MAX: usize = 256 * 1024;
/// A server stops its senders while this many bytes wait for the socket.
pub const OUT_HIGH_WATER: usize = 512 * 1024;
/// A client's reader wakes at least this often (receive timeout) to check deadlines and
/// keepalive; call deadlines are honoured to within this.
pub const READER_TICK: Duration = Duration::from_millis(50);
/// Read syscall size.
pub const READ_CHUNK_LEN: usize = 256 * 1024;

/// A new connection must complete its hello within this time.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for envd's listener inside a guest, whose only peer is the host's agent: a
/// starved guest (ten idle guests on a 2-core host) reads the agent's hello late by its own
/// clock, and the 10 s network default then closed a healthy link ("no hello in time" on a
/// first exec, 10 creates at once). It equals the agent's own budget for that hello (its
/// envd call timeout, `agent::limits::ENVD_CALL_TIMEOUT`), so neither side gives up first.
pub const GUEST_HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that has been quiet this long checks, before its next call, whether the server
/// closed the connection meanwhile.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);
/// A byte relay's half (ctl's traffic proxy, the agent's port streams) whose side brought
/// nothing for this long parks ([`crate::rpc::park`]) and gives its thread back: short, so
/// idle connections do not pile up threads; long enough that a connection moving bytes
/// never parks between two reads.
pub const RELAY_PARK_AFTER: Duration = Duration::from_secs(1);
/// After this long without receiving anything, a side sends a PING.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// After this long without receiving anything while streams are open, the peer is dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(90);
/// An idle connection (no streams) that stays silent this long is closed by the server.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// After GOAWAY, open streams get this long to finish before the connection is dropped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Default maximum number of authenticated connections one server holds at once (those
/// still before their hello have their own budget, [`PRE_HELLO_MAX_DEFAULT`]); more are
/// refused with `resource_exhausted`. Each costs a slot, two small buffers and at most its
/// windows; 1024 keeps a server's worst case within a few hundred MiB.
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// Default number of connections a server holds that have not finished their hello (TCP
/// accept to HELLO_ACK; a TLS handshake would count too). Small: such a connection proves
/// nothing, and a legitimate client finishes its hello within one round trip. When it is
/// full, the oldest is evicted for the newcomer, so a flood delays but never locks out.
pub const PRE_HELLO_MAX_DEFAULT: usize = 64;
/// Default number of pre-hello connections one source address holds; its next one evicts
/// its own oldest, so one address cannot push other addresses' newcomers out.
pub const PRE_HELLO_PER_SOURCE_MAX_DEFAULT: usize = 8;
/// Default rate of new connections per source address (per second) and the burst above
/// it (token bucket). A client pool opens a handful; a flood opens thousands. Over it, the
/// connection is refused at once, which bounds the accept work one address causes.
pub const ACCEPT_RATE_PER_SOURCE_DEFAULT: u32 = 100;
pub const ACCEPT_BURST_PER_SOURCE_DEFAULT: u32 = 200;
/// Source addresses whose accept rate is tracked at once (idle ones are forgotten first);
/// bounds the rate table against an attacker with many addresses.
pub const SOURCES_TRACKED_MAX: usize = 4096;
/// Default number of authenticated connections one credential holds at once: a pooled
/// client needs a few, so one leaked or hostile key cannot take `CONNECTIONS_MAX_DEFAULT`.
pub const CONNECTIONS_PER_CREDENTIAL_DEFAULT: usize = 256;
/// Default number of the `CONNECTIONS_MAX_DEFAULT` slots kept for a server's privileged
/// credential kind (ctl's AGENT_TOKEN on an agent, agents' HOST_TOKEN on ctl), so neither
/// a flood nor one credential can lock that peer out.
pub const RESERVED_CONNECTIONS_DEFAULT: usize = 64;
/// Default maximum number of worker threads a server runs handlers on.
pub const WORKERS_MAX_DEFAULT: usize = 256;
/// How long an idle worker thread waits for new work before it exits.
pub const WORKER_IDLE: Duration = Duration::from_secs(10);

const _: () = assert!(STREAM_WINDOW_DEFAULT as usize >= MESSAGE_LEN_MAX);
// Window credit is returned in quarters; a frame may cost at most three quarters of a
// stream window or a blocked sender could wait for credit that never comes (conn.rs).
const _: () = assert!(FRAME_LEN_MAX_DEFAULT as u64 * 4 <= STREAM_WINDOW_DEFAULT as u64 * 3);
const _: () = assert!(STREAM_WINDOW_DEFAULT >= window_min(FRAME_LEN_MAX_DEFAULT));
const _: () = assert!(CONN_WINDOW_DEFAULT >= STREAM_WINDOW_DEFAULT);
const _: () = assert!(FRAME_LEN_MAX_DEFAULT <= FRAME_LEN_MAX_CEILING);
const _: () = assert!(FRAME_LEN_MAX_FLOOR as usize > FRAME_HEADER_LEN + ERROR_MESSAGE_LEN_MAX + 6);
const _: () = assert!(CHUNK_LEN <= MESSAGE_LEN_MAX);
// A port message with its protobuf framing (tag, length varint) fits a message, and four
// of them a stream window (several in flight).
const _: () = assert!(PORT_CHUNK_LEN + 16 <= MESSAGE_LEN_MAX);
const _: () = assert!(4 * PORT_CHUNK_LEN <= STREAM_WINDOW_DEFAULT as usize);
const _: () = assert!(PRE_HELLO_PER_SOURCE_MAX_DEFAULT <= PRE_HELLO_MAX_DEFAULT);
const _: () = assert!(RESERVED_CONNECTIONS_DEFAULT < CONNECTIONS_MAX_DEFAULT);
const _: () = assert!(CONNECTIONS_PER_CREDENTIAL_DEFAULT <= CONNECTIONS_MAX_DEFAULT);
const _: () = assert!(ACCEPT_BURST_PER_SOURCE_DEFAULT >= ACCEPT_RATE_PER_SOURCE_DEFAULT);
const _: () = assert!(KEEPALIVE_TIMEOUT.as_secs() > 2 * KEEPALIVE_INTERVAL.as_secs());

/// Longest credential or client name accepted in a HELLO.
pub const CREDENTIAL_LEN_MAX: usize = 1024;

// HTTP/1.1 codec (`http`), shared by ctl's gateway, the agent's health/metrics listener and
// the HTTP clients (Firecracker's API, MMDS, `wrenn up`). Each server or client may bound a
// head more tightly (its own limits.rs); these are the codec's ceilings.

/// Largest HTTP head (request or status line + headers) the codec parses: what common
/// servers allow; heads here are a URL, a key and a few headers.
pub const HTTP_HEAD_LEN_MAX: usize = 16 * 1024;
/// Most headers in one head (and most trailers after a chunked body); more is not a client
/// or server of ours.
pub const HTTP_HEADERS_MAX: usize = 64;
/// Longest chunk-size line (with extensions) or trailer line of a chunked body: a size is at
/// most 16 hex digits, so anything near this is padding meant to cost memory.
pub const HTTP_CHUNK_LINE_MAX: usize = 1024;

const _: () = assert!(HTTP_CHUNK_LINE_MAX < HTTP_HEAD_LEN_MAX);

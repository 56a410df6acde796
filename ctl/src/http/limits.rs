//! Bounds of the HTTP gateway, each with its reason. docs/operations.md and the "Listener
//! budgets" table of ARCHITECTURE.md repeat them.

use std::time::Duration;

/// Largest request head (request line + headers): the shared codec's ceiling
/// (`proto::limits::HTTP_HEAD_LEN_MAX`, 16 KiB). Heads are a URL, a key and a few headers.
pub const HEAD_MAX: usize = proto::limits::HTTP_HEAD_LEN_MAX;
/// Largest JSON request body (413 beyond): the protobuf transport's message bound
/// (`proto::limits`, 1 MiB), since every JSON body becomes one message.
pub const JSON_BODY_MAX: usize = proto::limits::MESSAGE_LEN_MAX;
/// Raw bytes of a buffered body, chunk framing included: twice the body bound. A client
/// sending a 1 MiB body in one-byte chunks (6 bytes of framing each) is refused with 413
/// rather than costing six times the memory of its body.
pub const BODY_RAW_MAX: usize = 2 * JSON_BODY_MAX;
/// Body bytes read for a request that no handler reads (`/health`, documents, unknown
/// routes, answered 404/405): enough to keep a keep-alive connection, no more (413 beyond).
pub const OPEN_BODY_MAX: usize = DRAIN_MAX as usize;
/// Request bytes (heads and bodies) the event loop holds in all connection buffers at
/// once: 256 complete 1 MiB bodies. Beyond it, reads wait until requests move on (the
/// kernel's receive window pushes back on the clients), so memory stays bounded whatever
/// the number of stalled bodies.
pub const BUFFER_MAX: usize = 256 * JSON_BODY_MAX;
/// Request bytes held for one source address: a quarter of [`BUFFER_MAX`], so one host's
/// stalled bodies cannot pause everyone else's reads.
pub const SOURCE_BUFFER_MAX: usize = BUFFER_MAX / 4;
/// Largest part-header block of a multipart body.
pub const MULTIPART_HEAD_MAX: usize = 8 * 1024;
/// Largest non-file form field of a multipart upload (a path, a user, a mode).
pub const FORM_FIELD_MAX: usize = 8 * 1024;

/// Open connections at once (idle, reading, queued or being served); more are answered 503
/// and closed, so a flood cannot exhaust file descriptors.
pub const CONNECTIONS_MAX: usize = 1024;
/// Open connections from one source address: a quarter of [`CONNECTIONS_MAX`], so one host
/// cannot take every connection, while a NAT gateway or a busy CI runner still fits.
pub const SOURCE_CONNECTIONS_MAX: usize = 256;
/// Requests served at once (worker threads). A worker only ever gets a complete request
/// (head and body), or a streamed upload that has already sent [`STREAM_HANDOFF`] bytes.
pub const WORKERS_MAX: usize = 64;
/// Workers one source address may hold at once (half the pool): one client running long
/// streams (exec output, downloads) leaves the other half to everyone else. Its further
/// requests wait in the queue, they are not refused.
pub const SOURCE_WORKERS_MAX: usize = WORKERS_MAX / 2;
/// Workers one API key may hold at once (half the pool), whatever the addresses it comes
/// from: one team's key running many long streams leaves the other half to other keys. Its
/// further requests wait in the queue.
pub const KEY_WORKERS_MAX: usize = WORKERS_MAX / 2;
/// Workers held by requests whose body streams into the call (file uploads, stdin) after
/// the hand-off: such a body can stall a worker until [`IO_TIMEOUT`], so at most a quarter
/// of the pool, whatever the source.
pub const STREAM_WORKERS_MAX: usize = WORKERS_MAX / 4;
/// Complete requests waiting for a worker. Keep-alive clients beyond the pool wait here;
/// past it they get 503 with `Retry-After` ([`RETRY_AFTER_SECS`]): a wait behind 512
/// requests is already longer than a retry. Each connection has at most one request queued.
pub const QUEUE_MAX: usize = 512;
/// Queued requests of one source address: half the queue, so one host's burst leaves room
/// for others.
pub const SOURCE_QUEUED_MAX: usize = QUEUE_MAX / 2;
/// `Retry-After` of a 503 at the queue or connection bound.
pub const RETRY_AFTER_SECS: u32 = 1;
/// Threads reserved for `/health` and `/metrics`, outside the worker pool, so probes and
/// scrapes answer even when every worker is busy; two, so one slow health check (it runs a
/// `SELECT 1`) does not hold up a scrape.
pub const OPS_WORKERS: usize = 2;
/// `/health` and `/metrics` requests waiting for an ops thread (503 beyond): probes and
/// scrapers send one at a time.
pub const OPS_QUEUE_MAX: usize = 64;

/// A request head must arrive whole within this time of its first byte, or of the accept
/// for a new connection (slowloris; a connection that sends nothing).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection idle between requests is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request body must arrive whole (or, for a streamed upload, its first
/// [`STREAM_HANDOFF`] bytes) within this time of its head; else 408 naming this deadline.
/// The event loop reads it, so a stalled body costs a buffer, never a worker.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of a streamed upload the loop buffers before a worker takes over (the rest
/// streams into the call without a size bound): a client must show this much of its body
/// before it costs a worker. Smaller uploads arrive whole. Stdin bodies are handed over at
/// their first byte (interactive input), still within [`STREAM_WORKERS_MAX`].
pub const STREAM_HANDOFF: usize = 1024 * 1024;
/// After the hand-off: longest wait for the next bytes of a streamed body, or for the
/// client to take response bytes (a server stream's reader). No total bound: exec output
/// and downloads, and later exposed ports, are long-lived by design.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Unread body bytes skipped after an error answer to keep the connection; beyond this the
/// connection is closed instead.
pub const DRAIN_MAX: u64 = 64 * 1024;
/// Closing after an answer while the client may still be sending: half-close, then read
/// and drop at most this long and [`LINGER_BYTES`], so the kernel does not reset the
/// connection (which can destroy the answer before the client reads it).
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// See [`LINGER_TIMEOUT`].
pub const LINGER_BYTES: usize = 1024 * 1024;
/// Bytes of file data per upload message (the protobuf transport's bulk chunk size).
pub const UPLOAD_CHUNK: usize = proto::limits::CHUNK_LEN;
/// Bytes read from a socket per read call on the loop.
pub const READ_CHUNK: usize = 16 * 1024;
/// Events handled per poll.
pub const EVENTS: usize = 256;

const _: () = assert!(SOURCE_CONNECTIONS_MAX <= CONNECTIONS_MAX);
const _: () = assert!(SOURCE_WORKERS_MAX <= WORKERS_MAX && STREAM_WORKERS_MAX < WORKERS_MAX);
const _: () = assert!(KEY_WORKERS_MAX <= WORKERS_MAX);
const _: () = assert!(SOURCE_QUEUED_MAX <= QUEUE_MAX);
const _: () = assert!(STREAM_HANDOFF <= BODY_RAW_MAX);
const _: () = assert!(BODY_RAW_MAX <= SOURCE_BUFFER_MAX && SOURCE_BUFFER_MAX <= BUFFER_MAX);

/// Proxied sandbox-port connections open at once on this gateway (traffic proxy), 503 with
/// `Retry-After` beyond. Each holds up to two relay threads (one per direction) while it
/// moves bytes and none while idle ([`PROXY_PARK_AFTER`]), never a worker; the team and
/// sandbox bounds (`crate::limits::PORT_STREAMS_PER_*`, 429 beyond) come first, this one
/// bounds the threads whatever the number of teams.
pub const PROXY_CONNECTIONS_MAX: usize = 256;
/// Bytes a relay thread reads from one side before it writes them to the other: one
/// message of the ctl↔agent port stream (`proto::limits::PORT_CHUNK_LEN`, the agent's
/// size too). With the stream's window this is all ctl holds of a proxied connection, so a
/// client that stops reading stops the sandbox's server (backpressure) instead of growing
/// a buffer.
pub const PROXY_CHUNK: usize = proto::limits::PORT_CHUNK_LEN;
/// A kept-alive proxied connection between requests (no answer in progress) with no byte
/// either way for this long is let go (the sandbox's server reads the end of the stream).
pub const PROXY_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// A relay half whose side brought nothing for this long gives its thread back and waits
/// parked (for the client's socket, or the port stream) until its side has something: an
/// idle connection holds no thread (the agent's side of the stream parks after as long).
pub const PROXY_PARK_AFTER: Duration = proto::limits::RELAY_PARK_AFTER;
/// A proxied connection with no byte in either direction for this long is closed (an idle
/// WebSocket stays open, parked, until then).
pub const PROXY_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

const _: () = assert!(PROXY_PARK_AFTER.as_millis() < LINGER_TIMEOUT.as_millis());

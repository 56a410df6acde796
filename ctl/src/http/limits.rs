//! Bounds of the HTTP gateway, each with its reason.

use std::time::Duration;

/// Largest request head (request line + headers). Heads are a URL, a key and a few
/// headers; 16 KiB is what common servers allow and keeps a slow client's buffer small.
pub const HEAD_MAX: usize = 16 * 1024;
/// Most headers in one request; more is not a client of this API.
pub const HEADERS_MAX: usize = 64;
/// Largest JSON request body (413 beyond): the protobuf transport's message bound
/// (`proto::limits`, 1 MiB), since every JSON body becomes one message.
pub const JSON_BODY_MAX: usize = 1024 * 1024;
/// Longest chunk-size or trailer line of a chunked body.
pub const CHUNK_LINE_MAX: usize = 1024;
/// Largest part-header block of a multipart body.
pub const MULTIPART_HEAD_MAX: usize = 8 * 1024;
/// Largest non-file form field of a multipart upload (a path, a user, a mode).
pub const FORM_FIELD_MAX: usize = 8 * 1024;
/// Open connections at once (idle, reading or being served); more are refused with 503, so
/// a flood cannot exhaust file descriptors.
pub const CONNECTIONS_MAX: usize = 1024;
/// Requests served at once (worker threads). Streams (exec, download, upload) hold one for
/// their duration; the rest get 503 instead of an unbounded queue.
pub const WORKERS_MAX: usize = 64;
/// A request head must arrive whole within this time of its first byte (slowloris).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the next bytes of a body, or for the client to take response bytes.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Unread body bytes skipped after an error answer to keep the connection; beyond this the
/// connection is closed instead.
pub const DRAIN_MAX: u64 = 64 * 1024;
/// Bytes of file data per upload message (the protobuf transport's bulk chunk size).
pub const UPLOAD_CHUNK: usize = 64 * 1024;
/// Events handled per poll.
pub const EVENTS: usize = 256;
/// A JSON body (≤ 1 MiB) must arrive whole within this time of its first read, so a client
/// dripping bytes cannot hold a worker for IO_TIMEOUT per byte. File uploads have no total
/// bound (any size), only IO_TIMEOUT between reads.
pub const JSON_BODY_TIMEOUT: Duration = Duration::from_secs(30);

//! Bounds of the TLS transport, each with its reason.

/// TLS records (and plaintext queued during the handshake) rustls may hold for one
/// connection before `write` answers `WouldBlock`: sixteen full records. The frame layer
/// keeps its own bounded queue (`proto::limits::OUT_HIGH_WATER`); this covers what one
/// socket write cannot take, large enough that a bulk stream is not cut into small turns.
pub const SEND_BUFFERED_MAX: usize = 256 * 1024;

/// Decrypted bytes rustls holds before we stop feeding it records: rustls itself refuses
/// more than 16 KiB of unread plaintext, so we take plaintext out before feeding on.
pub const PLAINTEXT_BUFFERED_MAX: usize = 16 * 1024;

/// Bytes one receive from the socket takes at most: eight full TLS records (16 KiB of
/// plaintext plus at most 256 bytes of record overhead each), so a bulk stream costs one
/// system call per eight records.
pub const RAW_READ_CHUNK: usize = 8 * (16 * 1024 + 256);

/// Largest PEM file (certificate chain, key or CA bundle) we read: a chain of a few
/// certificates is a few KiB; a CA bundle of a few hundred fits.
pub const PEM_FILE_MAX: u64 = 1 << 20;

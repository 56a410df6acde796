//! Bounds of the TLS transport, each with its reason.

/// TLS records (and, separately, plaintext queued during the handshake) the transport
/// holds for one connection before `write` answers `WouldBlock`: sixteen full records. The
/// frame layer keeps its own bounded queue (`proto::limits::OUT_HIGH_WATER`); this covers
/// what one socket write cannot take, large enough that a bulk stream is not cut into small
/// turns.
pub const SEND_BUFFERED_MAX: usize = 256 * 1024;

/// Plaintext copies that would land 1..=this many bytes past their source modulo 4 KiB go
/// in pieces: glibc before 2.39 copies large blocks with `rep movsb`, which on AMD Zen is
/// ~20x slower when the destination is 1–15 bytes past the source modulo 4 KiB (glibc bug
/// 30994); the margin covers CPUs whose window is wider.
pub const SLOW_COPY_WINDOW_MAX: usize = 63;

/// The piece size of such copies: below glibc's smallest `rep movsb` threshold (2112
/// bytes on CPUs with fast short `rep movsb`), so each piece is copied with vector moves.
pub const PLAINTEXT_COPY_PIECE: usize = 2048;

/// Bytes one receive from the socket takes at most: eight full TLS records (16 KiB of
/// plaintext plus at most 256 bytes of record overhead each), so a bulk stream costs one
/// system call per eight records.
pub const RAW_READ_CHUNK: usize = 8 * (16 * 1024 + 256);

/// Largest PEM file (certificate chain, key or CA bundle) we read: a chain of a few
/// certificates is a few KiB; a CA bundle of a few hundred fits.
pub const PEM_FILE_MAX: u64 = 1 << 20;

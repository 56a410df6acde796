//! The frame codec: pure functions over byte slices, no I/O.
//!
//! ```text
//! frame   = length:u32be  stream:u32be  kind:u8  flags:u8  body
//! length  = 6 + len(body), at most the receiver's advertised frame_len_max
//! ```
//! PROTOCOL.md is the normative description; this file implements it.

use std::fmt;

use crate::limits::{ERROR_MESSAGE_LEN_MAX, FRAME_HEADER_LEN, LENGTH_PREFIX_LEN, METHOD_LEN_MAX};
use crate::status::Code;

/// Frame kinds. Values are wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloAck = 2,
    Request = 3,
    Data = 4,
    End = 5,
    Error = 6,
    Cancel = 7,
    Window = 8,
    Ping = 9,
    Pong = 10,
    GoAway = 11,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Request,
            4 => Kind::Data,
            5 => Kind::End,
            6 => Kind::Error,
            7 => Kind::Cancel,
            8 => Kind::Window,
            9 => Kind::Ping,
            10 => Kind::Pong,
            11 => Kind::GoAway,
            _ => return None,
        })
    }

    /// Kinds valid on stream 0 and on streams alike (WINDOW, ERROR).
    pub fn is_any_stream_frame(self) -> bool {
        matches!(self, Kind::Window | Kind::Error)
    }

    /// Frames on stream 0 (connection frames) versus frames on a stream.
    pub fn is_connection_frame(self) -> bool {
        matches!(
            self,
            Kind::Hello | Kind::HelloAck | Kind::Ping | Kind::Pong | Kind::GoAway
        )
    }
}

/// REQUEST/DATA flag: the sender sends nothing more on this stream after this frame.
pub const FLAG_END_STREAM: u8 = 0x01;
/// A frame of an unknown kind with this flag is skipped instead of closing the connection,
/// so later protocol versions can add advisory frames.
pub const FLAG_IGNORABLE: u8 = 0x80;
/// Bytes of a PING/PONG body.
pub const PING_LEN: usize = 8;

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is below the fixed header size.
    TooShort { len: u32 },
    /// The length field exceeds the receiver's limit.
    TooLong { len: u32, max: u32 },
    /// An unknown kind without the ignorable flag.
    UnknownKind { kind: u8 },
    /// A connection frame on a stream, or a stream frame on stream 0.
    WrongStream { kind: Kind, stream: u32 },
    /// A body that does not have its kind's layout.
    BadBody { kind: Kind, reason: &'static str },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooShort { len } => {
                write!(f, "frame length {len} is below the 6-byte header")
            }
            FrameError::TooLong { len, max } => {
                write!(f, "frame length {len} exceeds the limit {max}")
            }
            FrameError::UnknownKind { kind } => write!(f, "unknown frame kind {kind}"),
            FrameError::WrongStream { kind, stream } => {
                write!(f, "{kind:?} frame not allowed on stream {stream}")
            }
            FrameError::BadBody { kind, reason } => write!(f, "malformed {kind:?} frame: {reason}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// One decoded frame borrowing its body from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub stream: u32,
    pub kind: Kind,
    pub flags: u8,
    pub body: &'a [u8],
}

/// Outcome of [`decode`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// Not enough bytes yet; at least `need` bytes in total are required to make progress.
    Incomplete { need: usize },
    /// A frame and the number of input bytes it used.
    Frame(Frame<'a>, usize),
    /// An unknown, ignorable frame of this many bytes: skip it.
    Skip(usize),
}

/// Decodes the first frame of `buf`. Checks the length against `frame_len_max` as soon as the
/// 4 length bytes are present, so a claimed size is never buffered.
pub fn decode(buf: &[u8], frame_len_max: u32) -> Result<Decoded<'_>, FrameError> {
    if buf.len() < LENGTH_PREFIX_LEN {
        return Ok(Decoded::Incomplete {
            need: LENGTH_PREFIX_LEN,
        });
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if (len as usize) < FRAME_HEADER_LEN {
        return Err(FrameError::TooShort { len });
    }
    if len > frame_len_max {
        return Err(FrameError::TooLong {
            len,
            max: frame_len_max,
        });
    }
    let total = LENGTH_PREFIX_LEN + len as usize;
    if buf.len() < total {
        return Ok(Decoded::Incomplete { need: total });
    }
    let stream = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let kind_byte = buf[8];
    let flags = buf[9];
    let Some(kind) = Kind::from_u8(kind_byte) else {
        if flags & FLAG_IGNORABLE != 0 {
            return Ok(Decoded::Skip(total));
        }
        return Err(FrameError::UnknownKind { kind: kind_byte });
    };
    // WINDOW and ERROR are valid on both: on stream 0 they concern the connection.
    if !kind.is_any_stream_frame() && kind.is_connection_frame() != (stream == 0) {
        return Err(FrameError::WrongStream { kind, stream });
    }
    let body = &buf[LENGTH_PREFIX_LEN + FRAME_HEADER_LEN..total];
    let frame = Frame {
        stream,
        kind,
        flags,
        body,
    };
    check_body(&frame)?;
    Ok(Decoded::Frame(frame, total))
}

/// Checks the fixed-layout bodies so that every later accessor is infallible.
fn check_body(f: &Frame<'_>) -> Result<(), FrameError> {
    let bad = |reason| {
        Err(FrameError::BadBody {
            kind: f.kind,
            reason,
        })
    };
    match f.kind {
        Kind::Request => parse_request(f.body)
            .map(|_| ())
            .map_err(|reason| FrameError::BadBody {
                kind: f.kind,
                reason,
            }),
        Kind::End | Kind::Cancel if !f.body.is_empty() => bad("body must be empty"),
        Kind::Window if f.body.len() != 4 => bad("body must be a 4-byte increment"),
        Kind::Window if f.body == [0, 0, 0, 0] => bad("increment must not be zero"),
        Kind::Ping | Kind::Pong if f.body.len() != PING_LEN => bad("body must be 8 bytes"),
        Kind::Error => parse_error(f.body)
            .map(|_| ())
            .map_err(|reason| FrameError::BadBody {
                kind: f.kind,
                reason,
            }),
        Kind::GoAway => {
            if f.body.len() < 6 {
                return bad("body shorter than last stream id and code");
            }
            parse_error(&f.body[4..])
                .map(|_| ())
                .map_err(|reason| FrameError::BadBody {
                    kind: f.kind,
                    reason,
                })
        }
        _ => Ok(()),
    }
}

/// A REQUEST body: the method, the caller's timeout, then the first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Milliseconds the caller will wait; 0 means no deadline.
    pub timeout_ms: u32,
    pub message: &'a [u8],
}

/// Parses a REQUEST body.
pub fn parse_request(body: &[u8]) -> Result<Request<'_>, &'static str> {
    let (&mlen, rest) = body.split_first().ok_or("missing method length")?;
    let mlen = mlen as usize;
    if mlen == 0 || mlen > METHOD_LEN_MAX {
        return Err("method length out of range");
    }
    if rest.len() < mlen + 4 {
        return Err("body shorter than method and timeout");
    }
    let raw = &rest[..mlen];
    // Printable ASCII is valid UTF-8, so checking it first makes the conversion infallible.
    if !raw.iter().all(|b| b.is_ascii_graphic()) {
        return Err("method has a character outside printable ascii");
    }
    let method = std::str::from_utf8(raw).map_err(|_| "method is not utf-8")?;
    let t = &rest[mlen..mlen + 4];
    let timeout_ms = u32::from_be_bytes([t[0], t[1], t[2], t[3]]);
    Ok(Request {
        method,
        timeout_ms,
        message: &rest[mlen + 4..],
    })
}

/// Parses an ERROR body (also the tail of GOAWAY): code u16be, then a UTF-8 message.
pub fn parse_error(body: &[u8]) -> Result<(Code, &str), &'static str> {
    if body.len() < 2 {
        return Err("missing code");
    }
    let code = Code::from_u16(u16::from_be_bytes([body[0], body[1]]));
    if body.len() - 2 > ERROR_MESSAGE_LEN_MAX {
        return Err("message too long");
    }
    let msg = std::str::from_utf8(&body[2..]).map_err(|_| "message is not utf-8")?;
    Ok((code, msg))
}

/// Reads a WINDOW increment (the body was checked by [`decode`]).
pub fn window_increment(body: &[u8]) -> u32 {
    u32::from_be_bytes([body[0], body[1], body[2], body[3]])
}

/// Reads a GOAWAY body (checked by [`decode`]): last stream id, code, message.
pub fn parse_goaway(body: &[u8]) -> (u32, Code, &str) {
    let last = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let (code, msg) = parse_error(&body[4..]).unwrap_or((Code::Unknown, ""));
    (last, code, msg)
}

/// Appends a frame header for a body of `body_len` bytes.
pub fn put_header(out: &mut Vec<u8>, stream: u32, kind: Kind, flags: u8, body_len: usize) {
    debug_assert!(kind.is_any_stream_frame() || kind.is_connection_frame() == (stream == 0));
    let len = (FRAME_HEADER_LEN + body_len) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&stream.to_be_bytes());
    out.push(kind as u8);
    out.push(flags);
}

/// Appends a whole frame.
pub fn put_frame(out: &mut Vec<u8>, stream: u32, kind: Kind, flags: u8, body: &[u8]) {
    put_header(out, stream, kind, flags, body.len());
    out.extend_from_slice(body);
}

/// Appends a REQUEST frame. `message` is the encoded first message.
pub fn put_request(
    out: &mut Vec<u8>,
    stream: u32,
    flags: u8,
    method: &str,
    timeout_ms: u32,
    message: &[u8],
) {
    assert!(
        !method.is_empty() && method.len() <= METHOD_LEN_MAX,
        "method length"
    );
    put_header(
        out,
        stream,
        Kind::Request,
        flags,
        1 + method.len() + 4 + message.len(),
    );
    out.push(method.len() as u8);
    out.extend_from_slice(method.as_bytes());
    out.extend_from_slice(&timeout_ms.to_be_bytes());
    out.extend_from_slice(message);
}

/// Appends an ERROR frame; the message is cut at a character boundary to the limit.
pub fn put_error(out: &mut Vec<u8>, stream: u32, code: Code, message: &str) {
    let msg = truncate_utf8(message, ERROR_MESSAGE_LEN_MAX);
    put_header(out, stream, Kind::Error, 0, 2 + msg.len());
    out.extend_from_slice(&(code as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Appends a GOAWAY frame.
pub fn put_goaway(out: &mut Vec<u8>, last_stream: u32, code: Code, message: &str) {
    let msg = truncate_utf8(message, ERROR_MESSAGE_LEN_MAX);
    put_header(out, 0, Kind::GoAway, 0, 4 + 2 + msg.len());
    out.extend_from_slice(&last_stream.to_be_bytes());
    out.extend_from_slice(&(code as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Appends a WINDOW frame.
pub fn put_window(out: &mut Vec<u8>, stream: u32, increment: u32) {
    assert!(increment > 0);
    put_frame(out, stream, Kind::Window, 0, &increment.to_be_bytes());
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Fuzz entry point: decode a byte stream frame by frame (as a connection would, with the
/// default limit) and re-encode every accepted frame, checking it round-trips to the same
/// bytes. Never panics on any input.
pub fn fuzz_decode(data: &[u8]) {
    let max = crate::limits::FRAME_LEN_MAX_DEFAULT;
    let mut rest = data;
    loop {
        match decode(rest, max) {
            Ok(Decoded::Frame(f, used)) => {
                let mut again = Vec::new();
                put_frame(&mut again, f.stream, f.kind, f.flags, f.body);
                assert_eq!(&again[..], &rest[..used]);
                if f.kind == Kind::Request {
                    let r = parse_request(f.body).expect("checked by decode");
                    let mut re = Vec::new();
                    put_request(
                        &mut re,
                        f.stream,
                        f.flags,
                        r.method,
                        r.timeout_ms,
                        r.message,
                    );
                    assert_eq!(&re[..], &rest[..used]);
                }
                rest = &rest[used..];
            }
            Ok(Decoded::Skip(used)) => rest = &rest[used..],
            Ok(Decoded::Incomplete { need }) => {
                assert!(need > rest.len());
                return;
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::FRAME_LEN_MAX_DEFAULT;

    const MAX: u32 = FRAME_LEN_MAX_DEFAULT;

    #[test]
    fn request_round_trip() {
        let mut out = Vec::new();
        put_request(
            &mut out,
            7,
            FLAG_END_STREAM,
            "wrenn.envd.v1.Process/Start",
            1500,
            b"\x0a\x01x",
        );
        let Ok(Decoded::Frame(f, used)) = decode(&out, MAX) else {
            panic!("no frame")
        };
        assert_eq!(used, out.len());
        assert_eq!(
            (f.stream, f.kind, f.flags),
            (7, Kind::Request, FLAG_END_STREAM)
        );
        let r = parse_request(f.body).unwrap();
        assert_eq!(r.method, "wrenn.envd.v1.Process/Start");
        assert_eq!(r.timeout_ms, 1500);
        assert_eq!(r.message, b"\x0a\x01x");
    }

    /// The worked example of PROTOCOL.md §8, byte for byte.
    #[test]
    fn protocol_md_example() {
        let mut out = Vec::new();
        put_request(
            &mut out,
            1,
            FLAG_END_STREAM,
            "wrenn.envd.v1.Health/Check",
            0,
            &[],
        );
        let mut want = vec![0, 0, 0, 0x25, 0, 0, 0, 1, 3, 1, 0x1a];
        want.extend_from_slice(b"wrenn.envd.v1.Health/Check");
        want.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(out, want);
    }

    #[test]
    fn split_at_every_byte() {
        let mut out = Vec::new();
        put_request(&mut out, 1, 0, "a.B/C", 0, &[9; 300]);
        put_frame(&mut out, 1, Kind::Data, FLAG_END_STREAM, b"hello");
        put_error(&mut out, 3, Code::NotFound, "no such file");
        put_frame(&mut out, 0, Kind::Ping, 0, &[1; 8]);
        for split in 0..=out.len() {
            // Feed `split` bytes first, then the rest, as a reader would.
            let mut buf = out[..split].to_vec();
            let mut frames = 0;
            let mut pos = 0;
            let mut fed_rest = false;
            loop {
                match decode(&buf[pos..], MAX).unwrap() {
                    Decoded::Frame(_, used) => {
                        frames += 1;
                        pos += used;
                    }
                    Decoded::Skip(used) => pos += used,
                    Decoded::Incomplete { .. } if !fed_rest => {
                        buf.extend_from_slice(&out[split..]);
                        fed_rest = true;
                    }
                    Decoded::Incomplete { .. } => break,
                }
            }
            assert_eq!(frames, 4, "split at {split}");
            assert_eq!(pos, out.len());
        }
    }

    #[test]
    fn oversized_is_refused_from_the_length_alone() {
        let huge = (MAX + 1).to_be_bytes();
        assert_eq!(
            decode(&huge, MAX),
            Err(FrameError::TooLong {
                len: MAX + 1,
                max: MAX
            })
        );
        assert_eq!(
            decode(&[0, 0, 0, 5], MAX),
            Err(FrameError::TooShort { len: 5 })
        );
        assert_eq!(decode(&[0, 0], MAX), Ok(Decoded::Incomplete { need: 4 }));
    }

    #[test]
    fn unknown_kinds() {
        let mut out = Vec::new();
        out.extend_from_slice(&[0, 0, 0, 6, 0, 0, 0, 1, 200, 0]);
        assert_eq!(
            decode(&out, MAX),
            Err(FrameError::UnknownKind { kind: 200 })
        );
        out[9] = FLAG_IGNORABLE;
        assert_eq!(decode(&out, MAX), Ok(Decoded::Skip(10)));
    }

    #[test]
    fn malformed_bodies() {
        let cases: Vec<(u32, Kind, Vec<u8>)> = vec![
            (1, Kind::Window, vec![0, 0, 1]),
            (1, Kind::Window, vec![0, 0, 0, 0]),
            (0, Kind::Ping, vec![1, 2, 3]),
            (1, Kind::End, vec![1]),
            (1, Kind::Cancel, vec![1]),
            (1, Kind::Request, vec![]),
            (1, Kind::Request, vec![0, 0, 0, 0, 0]),
            (1, Kind::Request, vec![3, b'a', b'b']),
            (1, Kind::Request, vec![1, b' ', 0, 0, 0, 0]),
            (1, Kind::Error, vec![0]),
            (1, Kind::Error, vec![0, 5, 0xff]),
            (0, Kind::GoAway, vec![0, 0, 0]),
        ];
        for (stream, kind, body) in cases {
            let mut out = Vec::new();
            put_frame(&mut out, stream, kind, 0, &body);
            assert!(
                matches!(decode(&out, MAX), Err(FrameError::BadBody { .. })),
                "{kind:?} {body:?} accepted"
            );
        }
    }

    #[test]
    fn stream_zero_rules() {
        let out = [0, 0, 0, 6, 0, 0, 0, 0, Kind::Data as u8, 0];
        assert!(matches!(
            decode(&out, MAX),
            Err(FrameError::WrongStream { .. })
        ));
        let mut out = Vec::new();
        out.extend_from_slice(&[0, 0, 0, 14, 0, 0, 0, 3, Kind::Ping as u8, 0]);
        out.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode(&out, MAX),
            Err(FrameError::WrongStream { .. })
        ));
    }

    #[test]
    fn error_and_goaway_bodies() {
        let long = "é".repeat(ERROR_MESSAGE_LEN_MAX);
        let mut out = Vec::new();
        put_error(&mut out, 5, Code::PermissionDenied, &long);
        let Ok(Decoded::Frame(f, _)) = decode(&out, MAX) else {
            panic!()
        };
        let (code, msg) = parse_error(f.body).unwrap();
        assert_eq!(code, Code::PermissionDenied);
        assert!(msg.len() <= ERROR_MESSAGE_LEN_MAX && msg.chars().all(|c| c == 'é'));
        let mut out = Vec::new();
        put_goaway(&mut out, 41, Code::Unavailable, "draining");
        let Ok(Decoded::Frame(f, _)) = decode(&out, MAX) else {
            panic!()
        };
        assert_eq!(parse_goaway(f.body), (41, Code::Unavailable, "draining"));
    }

    #[test]
    fn fuzz_entry_handles_garbage() {
        fuzz_decode(&[]);
        fuzz_decode(&[0xff; 64]);
        fuzz_decode(&[0, 0, 0, 6, 0, 0, 0, 1, 4, 1]);
    }
}

//! The one HTTP/1.1 codec of wrenn (feature `http`): ctl's JSON gateway, the agent's
//! health/metrics listener, and the HTTP clients (Firecracker's API, envd's MMDS reader,
//! `wrenn up`) all parse and write HTTP through this module.
//!
//! - heads: [`parse_request_head`] and [`parse_response_head`] (httparse, then the framing
//!   rules of RFC 9112 §6: one Content-Length, `chunked` as the only transfer coding, never
//!   both), each bounded by a caller's head length and [`HTTP_HEADERS_MAX`];
//! - bodies: [`BodyDecoder`], a push decoder (fed whatever bytes arrived: an event loop) and
//!   [`BodyReader`], the same decoder behind `Read` (a blocking worker or client), both with a
//!   size limit; neither reads a byte past the body, so pipelined bytes stay in place;
//! - [`Wire`]: a stream with the bytes already read from it (`BufRead`);
//! - writing: [`request_head`], [`response_head`], [`write_chunk`], [`write_last_chunk`];
//! - clients: [`read_response`] reads one bounded response from a [`Wire`].
//!
//! Every error is typed ([`HeadError`], [`BodyError`], [`ResponseError`], [`EncodeError`]);
//! nothing here panics on input (the fuzz targets `http_request` and `http_response` call
//! [`fuzz_request`] and [`fuzz_response`]). Pure over `Read`/`Write`: no sockets, no threads.

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::ops::Range;

pub use crate::limits::{HTTP_CHUNK_LINE_MAX, HTTP_HEADERS_MAX, HTTP_HEAD_LEN_MAX};

/// How a message's body is delimited (RFC 9112 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (0: no body).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (a response with neither header).
    UntilClose,
}

/// Why a head was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x syntax (httparse's reason).
    Parse(String),
    /// Longer than the caller's bound, or more than [`HTTP_HEADERS_MAX`] headers.
    TooLarge,
    /// A Content-Length that is not a plain number, two that differ, or one next to
    /// Transfer-Encoding (a request smuggling vector, refused).
    BadContentLength,
    /// A transfer coding other than a single `chunked`.
    UnsupportedTransferEncoding,
    /// HTTP/2 or later on an HTTP/1.1 port.
    UnsupportedVersion,
    /// A status code outside 100..=599.
    BadStatus(u16),
    /// A 1xx, 204 or 304 response announcing a body.
    BodyNotAllowed(u16),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::Parse(e) => write!(f, "malformed head: {e}"),
            HeadError::TooLarge => f.write_str("head too large"),
            HeadError::BadContentLength => f.write_str("invalid or conflicting Content-Length"),
            HeadError::UnsupportedTransferEncoding => {
                f.write_str("unsupported Transfer-Encoding (only chunked)")
            }
            HeadError::UnsupportedVersion => f.write_str("unsupported HTTP version"),
            HeadError::BadStatus(s) => write!(f, "status {s:03} is not an HTTP status"),
            HeadError::BodyNotAllowed(s) => write!(f, "status {s} with a body"),
        }
    }
}

impl std::error::Error for HeadError {}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: String,
    /// Path without the query, still percent-encoded.
    pub path: String,
    /// The raw query string ("" when none).
    pub query: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl RequestHead {
    /// First value of a header (case-insensitive name) as UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }
    pub fn has_body(&self) -> bool {
        self.chunked || self.content_length.is_some_and(|n| n > 0)
    }
    /// A request without either header has no body (RFC 9112 §6.3).
    pub fn framing(&self) -> Framing {
        if self.chunked {
            Framing::Chunked
        } else {
            Framing::Length(self.content_length.unwrap_or(0))
        }
    }
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    pub framing: Framing,
    /// The server closes the connection after this response.
    pub close: bool,
}

impl ResponseHead {
    /// First value of a header (case-insensitive name) as UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }
}

fn header_of<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// The framing headers of a head: (Content-Length, chunked, connection tokens close /
/// keep-alive).
struct Framed {
    content_length: Option<u64>,
    chunked: bool,
    close: bool,
    keep_alive: bool,
}

fn framing_headers(headers: &[httparse::Header<'_>]) -> Result<Framed, HeadError> {
    let mut f = Framed {
        content_length: None,
        chunked: false,
        close: false,
        keep_alive: false,
    };
    for h in headers {
        let v = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            // Digits only: `u64::from_str` would take a leading `+`.
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::BadContentLength);
            }
            let len: u64 = v.parse().map_err(|_| HeadError::BadContentLength)?;
            if f.content_length.is_some_and(|l| l != len) {
                return Err(HeadError::BadContentLength);
            }
            f.content_length = Some(len);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if f.chunked || !v.eq_ignore_ascii_case("chunked") {
                return Err(HeadError::UnsupportedTransferEncoding);
            }
            f.chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in v.split(',') {
                let t = t.trim();
                if t.eq_ignore_ascii_case("close") {
                    f.close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    f.keep_alive = true;
                }
            }
        }
    }
    // RFC 9112 §6.3: both framing headers is a smuggling vector; refuse it.
    if f.chunked && f.content_length.is_some() {
        return Err(HeadError::BadContentLength);
    }
    Ok(f)
}

fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect()
}

/// Parses a request head from the start of `buf`: `Ok(None)` when more bytes are needed,
/// else the head and its length. A head longer than `max_len` (capped at
/// [`HTTP_HEAD_LEN_MAX`]) is [`HeadError::TooLarge`], complete or not.
pub fn parse_request_head(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let max_len = max_len.min(HTTP_HEAD_LEN_MAX);
    let window = &buf[..buf.len().min(max_len)];
    let mut headers = [httparse::EMPTY_HEADER; HTTP_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_len => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::UnsupportedVersion),
        Err(e) => return Err(HeadError::Parse(e.to_string())),
    };
    let version = req.version.unwrap_or(1);
    if version > 1 {
        return Err(HeadError::UnsupportedVersion);
    }
    let f = framing_headers(req.headers)?;
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target.to_owned(), String::new()),
    };
    let expect_continue = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("expect")
            && std::str::from_utf8(h.value)
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
    });
    let head = RequestHead {
        method: req.method.unwrap_or("").to_owned(),
        path,
        query,
        version,
        headers: owned_headers(req.headers),
        content_length: f.content_length,
        chunked: f.chunked,
        keep_alive: if version == 1 {
            !f.close
        } else {
            f.keep_alive && !f.close
        },
        expect_continue,
    };
    Ok(Some((head, n)))
}

/// Parses a response head from the start of `buf`, as [`parse_request_head`]. The framing
/// follows RFC 9112 §6.3: 1xx, 204 and 304 have no body; else chunked, Content-Length, or
/// the rest of the connection. `head_request`: the answer to a HEAD, which has no body
/// whatever its headers say.
pub fn parse_response_head(
    buf: &[u8],
    max_len: usize,
    head_request: bool,
) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let max_len = max_len.min(HTTP_HEAD_LEN_MAX);
    let window = &buf[..buf.len().min(max_len)];
    let mut headers = [httparse::EMPTY_HEADER; HTTP_HEADERS_MAX];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_len => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::UnsupportedVersion),
        Err(e) => return Err(HeadError::Parse(e.to_string())),
    };
    let version = resp.version.unwrap_or(1);
    if version > 1 {
        return Err(HeadError::UnsupportedVersion);
    }
    let status = resp.code.unwrap_or(0);
    // httparse takes any three digits.
    if !(100..=599).contains(&status) {
        return Err(HeadError::BadStatus(status));
    }
    let f = framing_headers(resp.headers)?;
    let framing = if matches!(status, 100..=199 | 204 | 304) {
        if f.chunked || f.content_length.is_some_and(|n| n > 0) {
            return Err(HeadError::BodyNotAllowed(status));
        }
        Framing::Length(0)
    } else if head_request {
        Framing::Length(0)
    } else if f.chunked {
        Framing::Chunked
    } else if let Some(n) = f.content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let close = f.close || (version == 0 && !f.keep_alive) || framing == Framing::UntilClose;
    Ok(Some((
        ResponseHead {
            status,
            version,
            headers: owned_headers(resp.headers),
            framing,
            close,
        },
        n,
    )))
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// More than the limit (bytes of body, after chunk decoding).
    TooLarge { limit: u64 },
    /// A chunk-size line that is not hex digits (with optional extensions).
    BadChunkSize,
    /// A chunk-size or trailer line over [`HTTP_CHUNK_LINE_MAX`].
    ChunkLineTooLong,
    /// A chunk's data not followed by CRLF.
    BadChunkEnd,
    /// More than [`HTTP_HEADERS_MAX`] trailer lines.
    TooManyTrailers,
    /// The connection ended inside the body.
    Truncated,
    /// Reading from the connection failed (a read timeout is `WouldBlock`/`TimedOut`).
    Io(io::Error),
}

impl BodyError {
    /// Whether this is a read that timed out (the socket's read timeout).
    pub fn is_timeout(&self) -> bool {
        matches!(self, BodyError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::TooLarge { limit } => write!(f, "body larger than {limit} bytes"),
            BodyError::BadChunkSize => f.write_str("bad chunk size"),
            BodyError::ChunkLineTooLong => {
                write!(f, "chunk line longer than {HTTP_CHUNK_LINE_MAX} bytes")
            }
            BodyError::BadChunkEnd => f.write_str("chunk data not followed by CRLF"),
            BodyError::TooManyTrailers => {
                write!(f, "more than {HTTP_HEADERS_MAX} trailer lines")
            }
            BodyError::Truncated => f.write_str("connection ended inside the body"),
            BodyError::Io(_) => f.write_str("read body"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<BodyError> for io::Error {
    fn from(e: BodyError) -> io::Error {
        match e {
            BodyError::Io(e) => e,
            BodyError::Truncated => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            e => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

impl From<io::Error> for BodyError {
    /// Recovers the typed error a [`BodyReader`] wrapped in an `io::Error`.
    fn from(e: io::Error) -> BodyError {
        if e.get_ref().is_some_and(|i| i.is::<BodyError>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(b) = inner.downcast::<BodyError>() {
                    return *b;
                }
            }
            return BodyError::Truncated;
        }
        BodyError::Io(e)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Length(u64),
    UntilClose,
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines up to the empty one.
    Trailer,
    Done,
}

/// What one [`BodyDecoder::advance`] did: `consumed` bytes of its input are used up, and
/// `data` (a range of the input, ending at `consumed`) is body data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub consumed: usize,
    pub data: Range<usize>,
}

/// A push decoder of one body: feed it the bytes that arrived, it says how many it used and
/// which of them are data. It never uses a byte past the body's end.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
    line: Vec<u8>,
    decoded: u64,
    limit: u64,
    trailers: usize,
}

impl BodyDecoder {
    /// A decoder for `framing` with no size limit (see [`BodyDecoder::with_limit`]).
    pub fn new(framing: Framing) -> BodyDecoder {
        BodyDecoder {
            state: match framing {
                Framing::Length(0) => State::Done,
                Framing::Length(n) => State::Length(n),
                Framing::Chunked => State::Size,
                Framing::UntilClose => State::UntilClose,
            },
            line: Vec::new(),
            decoded: 0,
            limit: u64::MAX,
            trailers: 0,
        }
    }

    /// At most `limit` bytes of body: a larger Content-Length or chunk size fails at once,
    /// before its data is read.
    pub fn with_limit(mut self, limit: u64) -> BodyDecoder {
        self.limit = limit;
        self
    }

    /// The whole body has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes decoded so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    fn admit(&self, more: u64) -> Result<(), BodyError> {
        if self.decoded.saturating_add(more) > self.limit {
            return Err(BodyError::TooLarge { limit: self.limit });
        }
        Ok(())
    }

    /// Uses bytes from the start of `input`: framing, then at most `max_data` bytes of data.
    /// Returns with `data` non-empty as soon as it has data, so a caller loops until its
    /// input is used up, [`BodyDecoder::is_done`], or its output is full.
    pub fn advance(&mut self, input: &[u8], max_data: usize) -> Result<Progress, BodyError> {
        let mut i = 0;
        loop {
            let none = |i| Progress {
                consumed: i,
                data: i..i,
            };
            match self.state {
                State::Done => return Ok(none(i)),
                State::Length(left) | State::Data(left) => {
                    self.admit(left)?;
                    let n = (input.len() - i)
                        .min(max_data)
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    if n == 0 {
                        return Ok(none(i));
                    }
                    let left = left - n as u64;
                    self.decoded += n as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), l) => State::Length(l),
                        (_, 0) => State::DataEnd,
                        (_, l) => State::Data(l),
                    };
                    return Ok(Progress {
                        consumed: i + n,
                        data: i..i + n,
                    });
                }
                State::UntilClose => {
                    let n = (input.len() - i).min(max_data);
                    if n == 0 {
                        return Ok(none(i));
                    }
                    self.admit(n as u64)?;
                    self.decoded += n as u64;
                    return Ok(Progress {
                        consumed: i + n,
                        data: i..i + n,
                    });
                }
                State::Size | State::DataEnd | State::Trailer => {
                    let rest = &input[i..];
                    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                        self.push_line(rest)?;
                        return Ok(none(input.len()));
                    };
                    self.push_line(&rest[..nl])?;
                    i += nl + 1;
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    self.line_done(&line)?;
                    line.clear();
                    self.line = line;
                }
            }
        }
    }

    fn push_line(&mut self, part: &[u8]) -> Result<(), BodyError> {
        // +1: the CR before the LF.
        if self.line.len() + part.len() > HTTP_CHUNK_LINE_MAX + 1 {
            return Err(BodyError::ChunkLineTooLong);
        }
        self.line.extend_from_slice(part);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8]) -> Result<(), BodyError> {
        match self.state {
            State::Size => {
                let size_part = line.split(|&b| b == b';').next().unwrap_or(&[]);
                let size_text = std::str::from_utf8(size_part)
                    .map_err(|_| BodyError::BadChunkSize)?
                    .trim_matches([' ', '\t']);
                if size_text.is_empty()
                    || size_text.len() > 16
                    || !size_text.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(BodyError::BadChunkSize);
                }
                let size =
                    u64::from_str_radix(size_text, 16).map_err(|_| BodyError::BadChunkSize)?;
                if size == 0 {
                    self.state = State::Trailer;
                } else {
                    self.admit(size)?;
                    self.state = State::Data(size);
                }
            }
            State::DataEnd => {
                if !line.is_empty() {
                    return Err(BodyError::BadChunkEnd);
                }
                self.state = State::Size;
            }
            State::Trailer => {
                if line.is_empty() {
                    self.state = State::Done;
                } else {
                    self.trailers += 1;
                    if self.trailers > HTTP_HEADERS_MAX {
                        return Err(BodyError::TooManyTrailers);
                    }
                }
            }
            State::Length(_) | State::UntilClose | State::Data(_) | State::Done => {}
        }
        Ok(())
    }

    /// The connection ended: fine for a body delimited by the close, else
    /// [`BodyError::Truncated`].
    pub fn end_of_input(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::Done => Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::Truncated),
        }
    }
}

/// A stream with the bytes already read from it but not yet used (the rest of a head, a
/// pipelined request). Reads take buffered bytes first.
#[derive(Debug)]
pub struct Wire<S> {
    pub stream: S,
    buf: Vec<u8>,
    pos: usize,
}

/// Bytes asked of the stream per read when the buffer is empty.
const WIRE_READ: usize = 16 * 1024;

impl<S> Wire<S> {
    pub fn new(stream: S, buffered: Vec<u8>) -> Wire<S> {
        Wire {
            stream,
            buf: buffered,
            pos: 0,
        }
    }

    /// Bytes read from the stream and not used yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Marks `n` buffered bytes used.
    pub fn consume_buffered(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// The stream and the unused bytes.
    pub fn into_parts(mut self) -> (S, Vec<u8>) {
        self.buf.drain(..self.pos);
        (self.stream, self.buf)
    }
}

impl<S: Read> Wire<S> {
    /// Reads once more from the stream, appending to the buffer; 0 at end of stream.
    pub fn fill_more(&mut self, max: usize) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + max.max(1), 0);
        let r = loop {
            match self.stream.read(&mut self.buf[old..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        self.buf.truncate(old + *r.as_ref().unwrap_or(&0));
        r
    }
}

impl<S: Read> Read for Wire<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.buf.len() {
            let n = out.len().min(self.buf.len() - self.pos);
            out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.consume_buffered(n);
            return Ok(n);
        }
        self.stream.read(out)
    }
}

impl<S: Read> BufRead for Wire<S> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos >= self.buf.len() {
            self.fill_more(WIRE_READ)?;
        }
        Ok(&self.buf[self.pos..])
    }
    fn consume(&mut self, n: usize) {
        self.consume_buffered(n);
    }
}

/// One body behind `Read`: decodes from a `BufRead` and stops at the body's end, leaving
/// what follows unread. Errors are `io::Error`s wrapping a [`BodyError`] (recover it with
/// `BodyError::from`).
#[derive(Debug)]
pub struct BodyReader<R> {
    inner: R,
    decoder: BodyDecoder,
}

impl<R: BufRead> BodyReader<R> {
    pub fn new(inner: R, decoder: BodyDecoder) -> BodyReader<R> {
        BodyReader { inner, decoder }
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.decoder.is_done()
    }

    /// Body bytes delivered so far.
    pub fn read_total(&self) -> u64 {
        self.decoder.decoded()
    }

    /// Reads the rest of the body into memory (the decoder's limit bounds it).
    pub fn read_to_vec(&mut self) -> Result<Vec<u8>, BodyError> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = self.read(&mut chunk).map_err(BodyError::from)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads and drops the rest of the body, up to `max` bytes (false when more remain or
    /// it failed).
    pub fn drain(&mut self, max: u64) -> bool {
        let mut chunk = [0u8; 8192];
        let start = self.decoder.decoded();
        while self.decoder.decoded() - start <= max {
            match self.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: BufRead> Read for BodyReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.decoder.is_done() {
                return Ok(0);
            }
            // A length over the limit fails before waiting for bytes.
            self.decoder.advance(&[], 0)?;
            let avail = self.inner.fill_buf()?;
            if avail.is_empty() {
                self.decoder.end_of_input()?;
                return Ok(0);
            }
            let p = self.decoder.advance(avail, out.len())?;
            let n = p.data.len();
            out[..n].copy_from_slice(&avail[p.data]);
            self.inner.consume(p.consumed);
            if n > 0 {
                return Ok(n);
            }
        }
    }
}

/// Why a request could not be written.
#[derive(Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// A method that is not an HTTP token.
    BadMethod,
    /// A target that does not start with `/` or holds a space or control byte.
    BadTarget,
    /// A header name that is not a token, or a value with CR, LF or NUL.
    BadHeader(String),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BadMethod => f.write_str("invalid HTTP method"),
            EncodeError::BadTarget => f.write_str("invalid request target"),
            EncodeError::BadHeader(n) => write!(f, "invalid header {n:?}"),
        }
    }
}

impl std::error::Error for EncodeError {}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn value_ok(v: &str) -> bool {
    !v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

/// The bytes of a request head: request line, `headers` in order, then `Content-Length`
/// when `body_len` is given, then the empty line. Every part is checked, so a value from
/// elsewhere can never add a header or a request.
pub fn request_head(
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body_len: Option<u64>,
) -> Result<Vec<u8>, EncodeError> {
    if !is_token(method) {
        return Err(EncodeError::BadMethod);
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(EncodeError::BadTarget);
    }
    let mut h = format!("{method} {target} HTTP/1.1\r\n");
    for (k, v) in headers {
        if !is_token(k) || !value_ok(v) {
            return Err(EncodeError::BadHeader((*k).to_owned()));
        }
        h.push_str(k);
        h.push_str(": ");
        h.push_str(v);
        h.push_str("\r\n");
    }
    if let Some(n) = body_len {
        h.push_str(&format!("Content-Length: {n}\r\n"));
    }
    h.push_str("\r\n");
    Ok(h.into_bytes())
}

/// The reason phrase of a status this codebase sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        499 => "Client Closed Request",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// The bytes of a response head: status line, `headers` in order (a value's CR, LF and NUL
/// become spaces: values are ours, this only keeps a mistake from splitting the head), then
/// `Content-Length` or, for `None`, `Transfer-Encoding: chunked`, `Connection: close` when
/// `close`, and the empty line. See [`BodyLen`] for the framing.
pub fn response_head(status: u16, headers: &[(&str, &str)], body: BodyLen, close: bool) -> Vec<u8> {
    let mut h = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        h.push_str(k);
        h.push_str(": ");
        h.extend(v.chars().map(|c| {
            if matches!(c, '\r' | '\n' | '\0') {
                ' '
            } else {
                c
            }
        }));
        h.push_str("\r\n");
    }
    match body {
        BodyLen::Length(n) => h.push_str(&format!("Content-Length: {n}\r\n")),
        BodyLen::Chunked => h.push_str("Transfer-Encoding: chunked\r\n"),
        BodyLen::UntilClose => {}
    }
    if close || body == BodyLen::UntilClose {
        h.push_str("Connection: close\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// How a response body is framed when writing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyLen {
    Length(u64),
    Chunked,
    /// Raw bytes ended by closing the connection (for HTTP/1.0 clients of a stream).
    UntilClose,
}

/// Writes one chunk of a chunked body (nothing for empty data: an empty chunk would end
/// the body).
pub fn write_chunk(w: &mut impl Write, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    write!(w, "{:x}\r\n", data.len())?;
    w.write_all(data)?;
    w.write_all(b"\r\n")
}

/// Writes the last chunk (no trailers).
pub fn write_last_chunk(w: &mut impl Write) -> io::Result<()> {
    w.write_all(b"0\r\n\r\n")
}

/// A complete response read by a client.
#[derive(Debug)]
pub struct Response {
    pub head: ResponseHead,
    pub body: Vec<u8>,
}

/// Why a client could not read a response.
#[derive(Debug)]
pub enum ResponseError {
    /// The peer closed before a complete head.
    Closed,
    /// Reading failed (a read timeout is `WouldBlock`/`TimedOut`).
    Io(io::Error),
    Head(HeadError),
    Body(BodyError),
}

impl ResponseError {
    /// Whether a read timed out.
    pub fn is_timeout(&self) -> bool {
        match self {
            ResponseError::Io(e) => {
                matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                )
            }
            ResponseError::Body(b) => b.is_timeout(),
            _ => false,
        }
    }
}

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResponseError::Closed => f.write_str("connection closed before a complete response"),
            ResponseError::Io(_) => f.write_str("read response"),
            ResponseError::Head(e) => write!(f, "response {e}"),
            ResponseError::Body(e) => write!(f, "response {e}"),
        }
    }
}

impl std::error::Error for ResponseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ResponseError::Io(e) => Some(e),
            ResponseError::Head(e) => Some(e),
            ResponseError::Body(e) => Some(e),
            ResponseError::Closed => None,
        }
    }
}

/// Reads one response from `wire`: a head of at most `head_max` bytes, then its body of at
/// most `body_max` bytes. Bytes after the response stay buffered in `wire` (a keep-alive
/// client checks there are none). `head_request`: the request was a HEAD.
pub fn read_response<S: Read>(
    wire: &mut Wire<S>,
    head_max: usize,
    body_max: u64,
    head_request: bool,
) -> Result<Response, ResponseError> {
    let head = loop {
        match parse_response_head(wire.buffered(), head_max, head_request) {
            Ok(Some((h, n))) => {
                wire.consume_buffered(n);
                break h;
            }
            Ok(None) => {}
            Err(e) => return Err(ResponseError::Head(e)),
        }
        let want = head_max.min(HTTP_HEAD_LEN_MAX) - wire.buffered().len();
        match wire.fill_more(want.clamp(1, WIRE_READ)) {
            Ok(0) => return Err(ResponseError::Closed),
            Ok(_) => {}
            Err(e) => return Err(ResponseError::Io(e)),
        }
    };
    let decoder = BodyDecoder::new(head.framing).with_limit(body_max);
    let body = BodyReader::new(&mut *wire, decoder)
        .read_to_vec()
        .map_err(ResponseError::Body)?;
    Ok(Response { head, body })
}

/// Fuzz entry point (`fuzz/fuzz_targets/http_request.rs`): any bytes as a request never
/// panic or hang; the head's length stays inside the input, and the body decodes to the
/// same bytes whether it arrives whole (pull, [`BodyReader`]) or a byte at a time (push,
/// [`BodyDecoder`]).
pub fn fuzz_request(data: &[u8]) {
    let Ok(Some((head, n))) = parse_request_head(data, HTTP_HEAD_LEN_MAX) else {
        return;
    };
    assert!(n <= data.len());
    let limit = 1 << 20;
    let rest = &data[n..];
    let mut wire = Wire::new(rest, Vec::new());
    let pulled = BodyReader::new(
        &mut wire,
        BodyDecoder::new(head.framing()).with_limit(limit),
    )
    .read_to_vec()
    .ok();
    let used = rest.len() - wire.buffered().len() - wire.stream.len();
    // Push, one byte at a time.
    let mut dec = BodyDecoder::new(head.framing()).with_limit(limit);
    let mut pushed = Vec::new();
    let mut failed = false;
    let mut consumed = 0;
    for (i, b) in rest.iter().enumerate() {
        if dec.is_done() {
            break;
        }
        match dec.advance(std::slice::from_ref(b), usize::MAX) {
            Ok(p) => {
                assert!(p.consumed <= 1 && p.data.end <= p.consumed);
                if !p.data.is_empty() {
                    pushed.push(*b);
                }
                consumed = i + p.consumed;
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    if !failed && !dec.is_done() && dec.end_of_input().is_err() {
        failed = true;
    }
    match pulled {
        Some(p) => {
            assert!(!failed, "push decoder failed where pull succeeded");
            assert_eq!(p, pushed);
            assert_eq!(consumed, used);
        }
        None => assert!(failed, "pull decoder failed where push succeeded"),
    }
}

/// Fuzz entry point (`fuzz/fuzz_targets/http_response.rs`): any bytes as a response never
/// panic or hang, and what is read stays within the bounds asked for.
pub fn fuzz_response(data: &[u8]) {
    for head_request in [false, true] {
        if let Ok(Some((h, n))) = parse_response_head(data, HTTP_HEAD_LEN_MAX, head_request) {
            assert!(n <= data.len());
            assert!((100..=599).contains(&h.status));
            if matches!(h.status, 100..=199 | 204 | 304) || head_request {
                assert_eq!(h.framing, Framing::Length(0));
            }
        }
    }
    let mut wire = Wire::new(data, Vec::new());
    if let Ok(r) = read_response(&mut wire, 1024, 4096, false) {
        assert!(r.body.len() <= 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(b: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
        parse_request_head(b, HTTP_HEAD_LEN_MAX)
    }

    #[test]
    fn request_heads_and_framing() {
        assert!(req(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let (h, n) = req(b"POST /v1/x?a=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!(n, 46);
        assert_eq!((h.path.as_str(), h.query.as_str()), ("/v1/x", "a=1"));
        assert_eq!(h.framing(), Framing::Length(3));
        assert!(h.keep_alive);
        let (h, _) = req(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let (h, _) = req(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let (h, _) = req(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let (h, _) =
            req(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(h.expect_continue && h.chunked && h.has_body());
        for (bad, want) in [
            (&b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..], HeadError::BadContentLength),
            (b"GET / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", HeadError::BadContentLength),
            (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", HeadError::BadContentLength),
            (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::BadContentLength),
            (b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", HeadError::UnsupportedTransferEncoding),
            (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::UnsupportedTransferEncoding),
        ] {
            assert_eq!(req(bad).unwrap_err(), want, "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(
            req(b"GET\x01 / HTTP/1.1\r\n\r\n"),
            Err(HeadError::Parse(_))
        ));
        assert_eq!(
            req(b"GET / HTTP/2.0\r\n\r\n").unwrap_err(),
            HeadError::UnsupportedVersion
        );
    }

    #[test]
    fn heads_are_bounded() {
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(200));
        assert_eq!(
            parse_request_head(long.as_bytes(), 100).unwrap_err(),
            HeadError::TooLarge
        );
        assert_eq!(
            parse_request_head(&long.as_bytes()[..150], 100).unwrap_err(),
            HeadError::TooLarge
        );
        assert!(parse_request_head(long.as_bytes(), 1000).unwrap().is_some());
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(HTTP_HEADERS_MAX + 1)
        );
        assert_eq!(req(many.as_bytes()).unwrap_err(), HeadError::TooLarge);
    }

    fn resp(b: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
        parse_response_head(b, HTTP_HEAD_LEN_MAX, false)
    }

    #[test]
    fn response_heads() {
        let h = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        let (r, n) = resp(h).unwrap().unwrap();
        assert_eq!(
            (r.status, n, r.framing, r.close),
            (204, h.len(), Framing::Length(0), false)
        );
        let (r, _) = resp(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.framing, r.close), (Framing::Length(1), true));
        let (r, _) = resp(b"HTTP/1.0 404 Not Found\r\n\r\n").unwrap().unwrap();
        assert_eq!((r.framing, r.close), (Framing::UntilClose, true));
        let (r, _) = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        let (r, _) =
            parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", 1024, true)
                .unwrap()
                .unwrap();
        assert_eq!(r.framing, Framing::Length(0));
        assert!(resp(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        assert_eq!(
            resp(b"HTTP/1.1 099 X\r\n\r\n").unwrap_err(),
            HeadError::BadStatus(99)
        );
        assert_eq!(
            resp(b"HTTP/1.1 999 X\r\n\r\n").unwrap_err(),
            HeadError::BadStatus(999)
        );
        assert_eq!(
            resp(b"HTTP/1.1 204 OK\r\nContent-Length: 3\r\n\r\n").unwrap_err(),
            HeadError::BodyNotAllowed(204)
        );
        assert!(resp(b"SMTP 200\r\n\r\n").is_err());
        assert!(resp(b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n").is_err());
    }

    fn decode_all(
        framing: Framing,
        input: &[u8],
        limit: u64,
    ) -> Result<(Vec<u8>, usize), BodyError> {
        let mut wire = Wire::new(input, Vec::new());
        let body = BodyReader::new(&mut wire, BodyDecoder::new(framing).with_limit(limit))
            .read_to_vec()?;
        let used = input.len() - wire.buffered().len() - wire.stream.len();
        Ok((body, used))
    }

    #[test]
    fn chunked_bodies_decode_and_stop_at_their_end() {
        let input = b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\nNEXT";
        let (b, used) = decode_all(Framing::Chunked, input, 10).unwrap();
        assert_eq!(b, b"abcde");
        assert_eq!(&input[used..], b"NEXT");
        assert!(matches!(
            decode_all(Framing::Chunked, b"3\r\nabc\r\n0\r\n\r\n", 2),
            Err(BodyError::TooLarge { limit: 2 })
        ));
        // A chunk size over the limit fails before its data arrives.
        let mut d = BodyDecoder::new(Framing::Chunked).with_limit(10);
        assert!(matches!(
            d.advance(b"ff\r\n", 100),
            Err(BodyError::TooLarge { .. })
        ));
        for (bad, what) in [
            (&b"zz\r\nabc\r\n"[..], "size"),
            (b"3\r\nabcX\r\n0\r\n\r\n", "end"),
            (b"3\r\nab", "truncated"),
            (b"11111111111111111\r\n", "size"),
        ] {
            let e = decode_all(Framing::Chunked, bad, 1 << 20).unwrap_err();
            let ok = match what {
                "size" => matches!(e, BodyError::BadChunkSize),
                "end" => matches!(e, BodyError::BadChunkEnd),
                _ => matches!(e, BodyError::Truncated),
            };
            assert!(ok, "{what}: {e:?}");
        }
        let long = format!("{}\r\n", "0".repeat(HTTP_CHUNK_LINE_MAX + 2));
        assert!(matches!(
            decode_all(Framing::Chunked, long.as_bytes(), 10),
            Err(BodyError::ChunkLineTooLong)
        ));
        let trailers = format!("0\r\n{}\r\n", "T: 1\r\n".repeat(HTTP_HEADERS_MAX + 1));
        assert!(matches!(
            decode_all(Framing::Chunked, trailers.as_bytes(), 10),
            Err(BodyError::TooManyTrailers)
        ));
    }

    #[test]
    fn length_and_close_bodies() {
        let (b, used) = decode_all(Framing::Length(3), b"abcGET", 10).unwrap();
        assert_eq!((b.as_slice(), used), (&b"abc"[..], 3));
        assert!(matches!(
            decode_all(Framing::Length(11), b"abc", 10),
            Err(BodyError::TooLarge { limit: 10 })
        ));
        assert!(matches!(
            decode_all(Framing::Length(5), b"abc", 10),
            Err(BodyError::Truncated)
        ));
        assert_eq!(
            decode_all(Framing::UntilClose, b"abc", 10).unwrap().0,
            b"abc"
        );
        assert!(matches!(
            decode_all(Framing::UntilClose, b"abc", 2),
            Err(BodyError::TooLarge { .. })
        ));
    }

    #[test]
    fn push_decoder_takes_any_split() {
        let input = b"4\r\nwxyz\r\n1;e\r\n!\r\n0\r\n\r\nrest";
        for split in 0..input.len() {
            let mut d = BodyDecoder::new(Framing::Chunked);
            let mut out = Vec::new();
            let mut used = 0;
            for part in [&input[..split], &input[split..]] {
                let mut at = 0;
                while at < part.len() && !d.is_done() {
                    let p = d.advance(&part[at..], 2).unwrap();
                    out.extend_from_slice(&part[at..][p.data]);
                    at += p.consumed;
                    if p.consumed == 0 {
                        break;
                    }
                }
                used += at;
            }
            assert!(d.is_done(), "split {split}");
            assert_eq!(out, b"wxyz!");
            assert_eq!(&input[used..], b"rest", "split {split}");
        }
    }

    #[test]
    fn encoding() {
        assert_eq!(
            request_head("GET", "/", &[("Host", "localhost")], Some(0)).unwrap(),
            b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
        );
        assert_eq!(
            request_head("G T", "/", &[], None),
            Err(EncodeError::BadMethod)
        );
        for t in ["", "x", "/a b", "/a\r\nX: y"] {
            assert_eq!(
                request_head("GET", t, &[], None),
                Err(EncodeError::BadTarget),
                "{t:?}"
            );
        }
        assert!(matches!(
            request_head("GET", "/", &[("X", "a\r\nY: b")], None),
            Err(EncodeError::BadHeader(_))
        ));
        let h = response_head(200, &[("X", "a\r\nb")], BodyLen::Chunked, true);
        assert_eq!(
            h,
            b"HTTP/1.1 200 OK\r\nX: a  b\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        write_chunk(&mut out, b"hello").unwrap();
        write_chunk(&mut out, b"").unwrap();
        write_chunk(&mut out, &[b'x'; 17]).unwrap();
        write_last_chunk(&mut out).unwrap();
        let (b, _) = decode_all(Framing::Chunked, &out, 100).unwrap();
        assert_eq!(b.len(), 22);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("5\r\nhello\r\n11\r\n{}\r\n0\r\n\r\n", "x".repeat(17))
        );
    }

    #[test]
    fn client_reads_one_bounded_response() {
        let data =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nEXTRA";
        let mut w = Wire::new(&data[..], Vec::new());
        let r = read_response(&mut w, 1024, 100, false).unwrap();
        assert_eq!((r.head.status, r.body.as_slice()), (200, &b"ok"[..]));
        let mut rest = Vec::new();
        w.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"EXTRA");
        let mut w = Wire::new(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc"[..],
            Vec::new(),
        );
        assert!(matches!(
            read_response(&mut w, 1024, 100, false),
            Err(ResponseError::Body(BodyError::Truncated))
        ));
        let mut w = Wire::new(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"[..],
            Vec::new(),
        );
        assert!(matches!(
            read_response(&mut w, 1024, 100, false),
            Err(ResponseError::Body(BodyError::TooLarge { limit: 100 }))
        ));
        let mut w = Wire::new(&b"HTTP/1.1 200 OK\r\n"[..], Vec::new());
        assert!(matches!(
            read_response(&mut w, 1024, 100, false),
            Err(ResponseError::Closed)
        ));
        let long = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(100));
        let mut w = Wire::new(long.as_bytes(), Vec::new());
        assert!(matches!(
            read_response(&mut w, 64, 100, false),
            Err(ResponseError::Head(HeadError::TooLarge))
        ));
    }
}

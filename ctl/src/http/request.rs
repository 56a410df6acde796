//! Request side of the gateway. Heads, framing and bodies are the shared codec's
//! (`proto::http`); this module adds what only the gateway needs: query strings,
//! percent-decoding and a streaming multipart/form-data reader. Pure over `Read`, so tests
//! feed it byte slices.

use std::fmt;
use std::io::{self, Read};

use proto::http::{BodyDecoder, BodyReader};
pub use proto::http::{BodyError, HeadError, RequestHead as Head, Wire};

use super::limits::{HEAD_MAX, MULTIPART_HEAD_MAX};

/// Parses a head from `buf` (at most [`HEAD_MAX`] bytes): `Ok(None)` when more bytes are
/// needed, else the head and its length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    proto::http::parse_request_head(buf, HEAD_MAX)
}

/// The body of the request `head` as a reader over `wire`, at most `limit` bytes.
pub fn body<'a, S: Read>(
    wire: &'a mut Wire<S>,
    head: &Head,
    limit: u64,
) -> BodyReader<&'a mut Wire<S>> {
    BodyReader::new(wire, BodyDecoder::new(head.framing()).with_limit(limit))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = hex(*b.get(i + 1)?)?;
                let lo = hex(*b.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-decodes a path segment; `None` for bad escapes or non-UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    decode(s, false)
}

/// Parses `a=1&b=x+y` into decoded pairs; `None` for bad escapes.
pub fn parse_query(q: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((decode(k, true)?, decode(v, true)?));
    }
    Some(out)
}

/// The boundary of a `multipart/form-data` content type.
pub fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    if !parts
        .next()?
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return None;
    }
    for p in parts {
        let (k, v) = p.trim().split_once('=')?;
        if k.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim().trim_matches('"');
            if v.is_empty() || v.len() > 70 {
                return None;
            }
            return Some(v.to_owned());
        }
    }
    None
}

/// Headers of one multipart part.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
}

/// Streams the parts of a multipart/form-data body without holding a part in memory.
pub struct Multipart<R> {
    inner: R,
    /// `\r\n--boundary`.
    delim: Vec<u8>,
    buf: Vec<u8>,
    eof: bool,
    state: MpState,
}

#[derive(PartialEq, Eq, Debug)]
enum MpState {
    Start,
    InPart,
    BetweenParts,
    End,
}

#[derive(Debug)]
pub enum MultipartError {
    Malformed(&'static str),
    Io(io::Error),
}

impl fmt::Display for MultipartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MultipartError::Malformed(w) => write!(f, "malformed multipart body: {w}"),
            MultipartError::Io(e) => write!(f, "read multipart body: {e}"),
        }
    }
}

impl std::error::Error for MultipartError {}

impl<R: Read> Multipart<R> {
    pub fn new(inner: R, boundary: &str) -> Multipart<R> {
        Multipart {
            inner,
            delim: format!("\r\n--{boundary}").into_bytes(),
            // The body starts with `--boundary` (no CRLF); pretend one precedes it.
            buf: b"\r\n".to_vec(),
            eof: false,
            state: MpState::Start,
        }
    }

    fn fill(&mut self, want: usize) -> Result<(), MultipartError> {
        let mut chunk = [0u8; 16384];
        while self.buf.len() < want && !self.eof {
            let n = self.inner.read(&mut chunk).map_err(MultipartError::Io)?;
            if n == 0 {
                self.eof = true;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// Moves to the next part and returns its headers; `None` after the last one. Unread
    /// data of the current part is skipped.
    pub fn next_part(&mut self) -> Result<Option<Part>, MultipartError> {
        let mut sink = [0u8; 8192];
        if self.state == MpState::InPart {
            while self.read_data(&mut sink)? > 0 {}
        }
        if self.state == MpState::End {
            return Ok(None);
        }
        if self.state == MpState::Start {
            // Skip the preamble up to the first delimiter.
            loop {
                self.fill(self.delim.len() + 2)?;
                if let Some(i) = Self::find(&self.buf, &self.delim) {
                    self.buf.drain(..i + self.delim.len());
                    break;
                }
                if self.eof {
                    return Err(MultipartError::Malformed("no boundary"));
                }
                let keep = self.delim.len();
                let cut = self.buf.len().saturating_sub(keep);
                self.buf.drain(..cut);
                if cut == 0 {
                    self.fill(self.buf.len() + 1)?;
                }
            }
            self.state = MpState::BetweenParts;
        }
        // After a delimiter: `--` ends the body, CRLF starts a part.
        self.fill(2)?;
        if self.buf.starts_with(b"--") {
            self.state = MpState::End;
            return Ok(None);
        }
        if !self.buf.starts_with(b"\r\n") {
            return Err(MultipartError::Malformed("bad delimiter line"));
        }
        self.buf.drain(..2);
        // Part headers up to the blank line.
        let end = loop {
            if let Some(i) = Self::find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > MULTIPART_HEAD_MAX {
                return Err(MultipartError::Malformed("part headers too large"));
            }
            if self.eof {
                return Err(MultipartError::Malformed("body ended in part headers"));
            }
            let want = self.buf.len() + 1;
            self.fill(want)?;
        };
        let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut part = Part::default();
        for line in text.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if !k.trim().eq_ignore_ascii_case("content-disposition") {
                continue;
            }
            for p in v.split(';').skip(1) {
                if let Some((pk, pv)) = p.trim().split_once('=') {
                    let pv = pv.trim().trim_matches('"').to_owned();
                    match pk.trim() {
                        "name" => part.name = pv,
                        "filename" => part.filename = Some(pv),
                        _ => {}
                    }
                }
            }
        }
        self.state = MpState::InPart;
        Ok(Some(part))
    }

    /// Reads the current part's data; 0 at its end.
    pub fn read_data(&mut self, out: &mut [u8]) -> Result<usize, MultipartError> {
        if self.state != MpState::InPart || out.is_empty() {
            return Ok(0);
        }
        self.fill(self.delim.len() + out.len().min(16384))?;
        if let Some(i) = Self::find(&self.buf, &self.delim) {
            if i == 0 {
                self.buf.drain(..self.delim.len());
                self.state = MpState::BetweenParts;
                return Ok(0);
            }
            let n = i.min(out.len());
            out[..n].copy_from_slice(&self.buf[..n]);
            self.buf.drain(..n);
            return Ok(n);
        }
        if self.eof {
            return Err(MultipartError::Malformed("body ended inside a part"));
        }
        // Keep enough bytes back that a delimiter split across reads is still found.
        let safe = self.buf.len().saturating_sub(self.delim.len() - 1);
        let n = safe.min(out.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        Ok(n)
    }

    /// Reads the whole current part as text, up to `max` bytes.
    pub fn read_text(&mut self, max: usize) -> Result<String, MultipartError> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = self.read_data(&mut chunk)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
            if out.len() > max {
                return Err(MultipartError::Malformed("form field too large"));
            }
        }
        String::from_utf8(out).map_err(|_| MultipartError::Malformed("form field is not UTF-8"))
    }
}

/// Fuzz entry point (with `proto::http::fuzz_request`, in `fuzz/fuzz_targets/http_request.rs`):
/// any bytes as a request through the gateway's own parsers (query, percent-decoding, route
/// matching, multipart) never panic and never hang. The unit tests run it over seeded
/// mutations of well-formed requests.
pub fn fuzz_request(data: &[u8]) {
    let Ok(Some((head, n))) = parse_head(data) else {
        return;
    };
    let _ = parse_query(&head.query);
    for seg in head.path.split('/') {
        let _ = percent_decode(seg);
    }
    if let Some(m) = super::routes::Method::parse(&head.method) {
        let _ = super::routes::match_route(&super::routes::ROUTES, m, &head.path);
    }
    let mut wire = Wire::new(&data[n..], Vec::new());
    let boundary = head.header("content-type").and_then(multipart_boundary);
    let mut body = body(&mut wire, &head, super::limits::JSON_BODY_MAX as u64);
    match boundary {
        Some(b) => {
            let mut mp = Multipart::new(&mut body, &b);
            let mut buf = [0u8; 64];
            // Each step consumes input or ends, so this is bounded by the input's length.
            while let Ok(Some(_)) = mp.next_part() {
                while let Ok(k) = mp.read_data(&mut buf) {
                    if k == 0 {
                        break;
                    }
                }
            }
        }
        None => {
            let _ = body.read_to_vec();
        }
    }
}

#[cfg(test)]
mod tests {
    /// The committed fuzz corpus keeps being replayed by `cargo test`.
    #[test]
    fn fuzz_corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/http_request");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            super::fuzz_request(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0);
    }

    use super::*;

    /// xorshift64*: a small seeded generator (the seed is printed on failure).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn fuzz_request_survives_mutations() {
        let seeds: [&[u8]; 4] = [
            b"POST /v1/sandboxes/sb-0c6f2c8e-3b0b-4f55-9d59-2b0f0c1d2e3f/exec?x=%41 HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"a\": [1,2]}",
            b"PUT /v1/sandboxes/x/files?path=/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"POST /v1/sandboxes/x/files HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: 60\r\n\r\n--B\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nhi\r\n--B--\r\n",
            b"GET /health HTTP/1.0\r\n\r\n",
        ];
        let iterations = 20_000u64;
        for seed in 1..=iterations {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut data = seeds[rng.below(seeds.len())].to_vec();
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(data.len());
                match rng.below(4) {
                    0 => data[i] = rng.next() as u8,
                    1 => {
                        data.remove(i);
                    }
                    2 => {
                        let alphabet = b"\r\n-:;=%0123456789abcdefB";
                        data.insert(i, alphabet[rng.below(alphabet.len())]);
                    }
                    _ => data.truncate(i),
                }
                if data.is_empty() {
                    break;
                }
            }
            let r = std::panic::catch_unwind(|| fuzz_request(&data));
            assert!(
                r.is_ok(),
                "fuzz_request panicked: seed {seed}, input {:?}",
                String::from_utf8_lossy(&data)
            );
        }
    }

    #[test]
    fn query_and_percent() {
        assert_eq!(
            parse_query("a=1&b=x+y%2F&c").unwrap(),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y/".into()),
                ("c".into(), String::new())
            ]
        );
        assert!(parse_query("a=%zz").is_none());
        assert_eq!(percent_decode("a%20b+c").unwrap(), "a b+c");
        assert!(percent_decode("%ff").is_none());
    }

    #[test]
    fn multipart_streams_parts() {
        assert_eq!(
            multipart_boundary("multipart/form-data; boundary=\"xyz\"").as_deref(),
            Some("xyz")
        );
        assert!(multipart_boundary("text/plain").is_none());
        let body = b"preamble\r\n--xyz\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n/tmp/a\r\n--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--xy world\r\n--xyz--\r\n";
        // Read through a 1-byte-at-a-time reader to exercise split delimiters.
        struct Slow<'a>(&'a [u8]);
        impl Read for Slow<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() || out.is_empty() {
                    return Ok(0);
                }
                out[0] = self.0[0];
                self.0 = &self.0[1..];
                Ok(1)
            }
        }
        let mut m = Multipart::new(Slow(body), "xyz");
        let p = m.next_part().unwrap().unwrap();
        assert_eq!(p.name, "path");
        assert_eq!(m.read_text(100).unwrap(), "/tmp/a");
        let p = m.next_part().unwrap().unwrap();
        assert_eq!(p.filename.as_deref(), Some("a.txt"));
        let mut data = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            let n = m.read_data(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        assert_eq!(data, b"hello\r\n--xy world");
        assert!(m.next_part().unwrap().is_none());
        let mut m = Multipart::new(
            &b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nabc"[..],
            "xyz",
        );
        m.next_part().unwrap();
        assert!(m.read_text(100).is_err());
        let mut m = Multipart::new(&b"nothing here"[..], "xyz");
        assert!(m.next_part().is_err());
    }
}

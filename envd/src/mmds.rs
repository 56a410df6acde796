//! Firecracker's MMDS (V2) as envd's source of identity before the first init.
//!
//! `PUT /latest/api/token` with `X-metadata-token-ttl-seconds`, then `GET <path>` with
//! `X-metadata-token` and `Accept: application/json`, over plain TCP to 169.254.169.254:80
//! with short timeouts. An absent MMDS (no route, refused, timeout, 404) is not an error:
//! envd then learns its identity from init. The layout envd reads is
//! `{"wrenn": {"sandbox_id": "sb-…", "template_id": "tpl-…"}}` (string leaves fetched one by
//! one, so envd needs only a JSON string decoder, not a JSON parser).
//!
//! HTTP goes through the shared codec (`proto::http`): one request per connection
//! (`Connection: close`), one bounded response (head and body).

#![forbid(unsafe_code)]

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use proto::http::{BodyError, HeadError, ResponseError, Wire};

use crate::limits::{MMDS_HEAD_LEN_MAX, MMDS_RESPONSE_LEN_MAX, MMDS_TIMEOUT};

/// Firecracker's default MMDS address.
pub const MMDS_ADDR: &str = "169.254.169.254:80";
/// Token lifetime asked for: envd reads MMDS once at start.
const TOKEN_TTL_SECONDS: u32 = 60;

#[derive(Debug)]
pub enum Error {
    Io(std::io::Error),
    /// Not an HTTP response (the codec's reason).
    Http(ResponseError),
    Malformed(&'static str),
    TooLarge,
    Status(u16),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "mmds i/o: {e}"),
            Error::Http(e) => write!(f, "malformed mmds response: {e}"),
            Error::Malformed(w) => write!(f, "malformed mmds response: {w}"),
            Error::TooLarge => write!(f, "mmds response larger than {MMDS_RESPONSE_LEN_MAX} bytes"),
            Error::Status(s) => write!(f, "mmds answered status {s}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::Http(e) => Some(e),
            _ => None,
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Reads one response from `wire`: a head of at most [`MMDS_HEAD_LEN_MAX`] bytes, a body of
/// at most [`MMDS_RESPONSE_LEN_MAX`].
fn read_response<S: Read>(wire: &mut Wire<S>) -> Result<Response, Error> {
    match proto::http::read_response(wire, MMDS_HEAD_LEN_MAX, MMDS_RESPONSE_LEN_MAX as u64, false) {
        Ok(r) => Ok(Response {
            status: r.head.status,
            body: r.body,
        }),
        Err(ResponseError::Head(HeadError::TooLarge))
        | Err(ResponseError::Body(BodyError::TooLarge { .. })) => Err(Error::TooLarge),
        Err(ResponseError::Io(e)) | Err(ResponseError::Body(BodyError::Io(e))) => Err(Error::Io(e)),
        Err(e) => Err(Error::Http(e)),
    }
}

/// Parses a complete HTTP/1.x response (the server closed the connection after it).
/// Public for the fuzz target: never panics, bounded by the buffer it is given.
pub fn parse_response(buf: &[u8]) -> Result<Response, Error> {
    read_response(&mut Wire::new(buf, Vec::new()))
}

fn exchange(addr: SocketAddr, request: &[u8]) -> Result<Response, Error> {
    let s = TcpStream::connect_timeout(&addr, MMDS_TIMEOUT).map_err(Error::Io)?;
    s.set_read_timeout(Some(MMDS_TIMEOUT)).map_err(Error::Io)?;
    s.set_write_timeout(Some(MMDS_TIMEOUT)).map_err(Error::Io)?;
    (&s).write_all(request).map_err(Error::Io)?;
    read_response(&mut Wire::new(s, Vec::new()))
}

fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Vec<u8>, Error> {
    let mut all = vec![("Host", "169.254.169.254")];
    all.extend_from_slice(headers);
    all.push(("Connection", "close"));
    let body = (method == "PUT").then_some(0);
    proto::http::request_head(method, path, &all, body)
        .map_err(|_| Error::Malformed("request path or token"))
}

/// Fetches `path` (e.g. `/wrenn/sandbox_id`) as JSON text; `Ok(None)` when it does not exist.
pub fn fetch(addr: SocketAddr, path: &str) -> Result<Option<String>, Error> {
    let ttl = TOKEN_TTL_SECONDS.to_string();
    let token_req = request(
        "PUT",
        "/latest/api/token",
        &[("X-metadata-token-ttl-seconds", &ttl)],
    )?;
    let t = exchange(addr, &token_req)?;
    if t.status != 200 {
        return Err(Error::Status(t.status));
    }
    let token = String::from_utf8(t.body).map_err(|_| Error::Malformed("token"))?;
    let token = token.trim();
    if token.is_empty() || token.contains(['\r', '\n']) {
        return Err(Error::Malformed("token"));
    }
    let get = request(
        "GET",
        path,
        &[("X-metadata-token", token), ("Accept", "application/json")],
    )?;
    let r = exchange(addr, &get)?;
    match r.status {
        200 => String::from_utf8(r.body)
            .map(Some)
            .map_err(|_| Error::Malformed("non-UTF-8 body")),
        404 => Ok(None),
        s => Err(Error::Status(s)),
    }
}

/// Decodes one JSON string literal (`"..."` with escapes). None when it is not one.
pub fn json_string(text: &str) -> Option<String> {
    let t = text.trim();
    let inner = t.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return None,
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                '/' => out.push('/'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let v = u32::from_str_radix(&hex, 16).ok()?;
                    // Surrogate pairs are not needed for ids; reject them.
                    out.push(char::from_u32(v)?);
                }
                _ => return None,
            },
            c if (c as u32) < 0x20 => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// What envd learns from MMDS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub sandbox_id: String,
    pub template_id: String,
}

/// Reads the identity from `addr`; None when MMDS is absent or holds none.
pub fn identity_from(addr: SocketAddr) -> Option<Identity> {
    let get = |key: &str| match fetch(addr, &format!("/wrenn/{key}")) {
        Ok(Some(text)) => json_string(&text),
        Ok(None) => None,
        Err(e) => {
            log::debug!("mmds read failed key={key} error={e}");
            None
        }
    };
    let sandbox_id = get("sandbox_id")?;
    let template_id = get("template_id").unwrap_or_default();
    Some(Identity {
        sandbox_id,
        template_id,
    })
}

/// Reads the identity from Firecracker's MMDS address.
pub fn identity() -> Option<Identity> {
    identity_from(MMDS_ADDR.parse().ok()?)
}

/// Fuzz entry point (`fuzz/fuzz_targets/mmds_response.rs`): an MMDS answer, as the host
/// sends it, never panics the parser, and a body that is text goes through the JSON string
/// reader too.
pub fn fuzz_response(data: &[u8]) {
    let _ = parse_response(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = json_string(text);
    }
}

#[cfg(test)]
mod tests {
    /// The committed fuzz corpus keeps being replayed by `cargo test`.
    #[test]
    fn fuzz_corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/mmds_response");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            super::fuzz_response(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0);
    }

    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    #[test]
    fn response_parser() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let r = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\n").unwrap();
        assert_eq!(r.status, 404);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"SMTP 200\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 999 X\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n").is_err());
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "A: b\r\n".repeat(65));
        assert!(parse_response(many.as_bytes()).is_err());
        for n in 0..40 {
            let _ = parse_response(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..n]);
        }
    }

    #[test]
    fn json_strings() {
        assert_eq!(json_string(r#""sb-1""#).as_deref(), Some("sb-1"));
        assert_eq!(
            json_string(r#" "a\"b\\c\u0041" "#).as_deref(),
            Some("a\"b\\cA")
        );
        assert_eq!(json_string("42"), None);
        assert_eq!(json_string(r#""unterminated"#), None);
        assert_eq!(json_string(r#""a"b""#), None);
        assert_eq!(json_string(r#""\x""#), None);
    }

    /// A fake MMDS V2: answers the token PUT and GETs that carry the token.
    fn fake_mmds() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let resp = if req.starts_with("PUT /latest/api/token")
                    && req.contains("X-metadata-token-ttl-seconds: 60")
                {
                    "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntok".to_string()
                } else if !req.contains("X-metadata-token: tok\r\n")
                    || !req.contains("Accept: application/json")
                {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_string()
                } else if req.starts_with("GET /wrenn/sandbox_id ") {
                    "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n\"sb-1\"".to_string()
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
                };
                let _ = s.write_all(resp.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn reads_identity_from_a_v2_service() {
        let addr = fake_mmds();
        let id = identity_from(addr).unwrap();
        assert_eq!(id.sandbox_id, "sb-1");
        assert_eq!(id.template_id, "");
    }

    #[test]
    fn absence_is_quick_and_not_an_error() {
        // A port nobody listens on: refused at once.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let start = std::time::Instant::now();
        assert_eq!(identity_from(addr), None);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}

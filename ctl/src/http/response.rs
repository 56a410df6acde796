//! Response side: status lines, the error body `{"error":{"code","message"}}` with the
//! HTTP status of each code, fixed-length and chunked bodies.

use std::io::{self, Write};

use proto::http::BodyLen;
use proto::{Code, Status};
use serde_json::{json, Value};

/// The HTTP status answering a call status code.
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::FailedPrecondition => 412,
        Code::ResourceExhausted => 429,
        Code::Cancelled => 499,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    }
}

pub use proto::http::reason;

/// The JSON error body.
pub fn error_body(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message}})
}

/// A complete response with a fixed-length body.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub extra: Vec<(&'static str, String)>,
}

impl Response {
    pub fn json(status: u16, v: &Value) -> Response {
        let mut body = serde_json::to_vec(v).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
            extra: Vec::new(),
        }
    }
    pub fn text(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            extra: Vec::new(),
        }
    }
    /// An error with its own HTTP status (for errors that are not call statuses: 404 route,
    /// 405, 413 ...) and a stable code.
    pub fn error(status: u16, code: &str, message: &str) -> Response {
        Response::json(status, &error_body(code, message))
    }
    pub fn from_status(s: &Status) -> Response {
        Response::error(http_status(s.code), s.code.name(), &s.message)
    }
}

/// Writes a status line and headers; `length` None means a chunked body follows.
pub fn write_head(
    w: &mut impl Write,
    status: u16,
    content_type: &str,
    length: Option<u64>,
    keep_alive: bool,
    extra: &[(&'static str, String)],
) -> io::Result<()> {
    let body = match length {
        Some(n) => BodyLen::Length(n),
        None => BodyLen::Chunked,
    };
    w.write_all(&head_bytes(status, content_type, body, !keep_alive, extra))
}

fn head_bytes(
    status: u16,
    content_type: &str,
    body: BodyLen,
    close: bool,
    extra: &[(&'static str, String)],
) -> Vec<u8> {
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra.len() + 2);
    if !content_type.is_empty() {
        headers.push(("Content-Type", content_type));
    }
    headers.push(("Cache-Control", "no-store"));
    headers.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
    proto::http::response_head(status, &headers, body, close)
}

/// A whole response as bytes (answers written from the event loop).
pub fn response_bytes(r: &Response, keep_alive: bool) -> Vec<u8> {
    let mut out = head_bytes(
        r.status,
        r.content_type,
        BodyLen::Length(r.body.len() as u64),
        !keep_alive,
        &r.extra,
    );
    out.extend_from_slice(&r.body);
    out
}

pub fn write_response(
    w: &mut impl Write,
    r: &Response,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    write_head(
        w,
        r.status,
        r.content_type,
        Some(r.body.len() as u64),
        keep_alive,
        &r.extra,
    )?;
    if !head_only {
        w.write_all(&r.body)?;
    }
    w.flush()
}

/// Writes a streamed body: chunked for HTTP/1.1 (each `write_chunk` is one chunk; `finish`
/// writes the last one); for an HTTP/1.0 client, which knows no chunks, the bytes as they
/// are, the end of the body being the end of the connection.
pub struct Chunked<W: Write> {
    pub inner: W,
    /// HTTP/1.0: no chunk framing.
    pub raw: bool,
}

/// Writes the head of a streamed answer and returns the body writer. `http11` false means
/// an HTTP/1.0 client: no Transfer-Encoding, and the connection closes after the body.
pub fn start_stream<W: Write>(
    mut w: W,
    status: u16,
    content_type: &str,
    http11: bool,
    keep_alive: bool,
    extra: &[(&'static str, String)],
) -> io::Result<Chunked<W>> {
    if http11 {
        write_head(&mut w, status, content_type, None, keep_alive, extra)?;
    } else {
        w.write_all(&head_bytes(
            status,
            content_type,
            BodyLen::UntilClose,
            true,
            extra,
        ))?;
    }
    Ok(Chunked {
        inner: w,
        raw: !http11,
    })
}

impl<W: Write> Chunked<W> {
    pub fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.raw {
            self.inner.write_all(data)?;
            return self.inner.flush();
        }
        proto::http::write_chunk(&mut self.inner, data)?;
        self.inner.flush()
    }
    pub fn finish(&mut self) -> io::Result<()> {
        if self.raw {
            return self.inner.flush();
        }
        proto::http::write_last_chunk(&mut self.inner)?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_an_error_status() {
        for c in Code::ALL {
            let s = http_status(c);
            if c == Code::Ok {
                assert_eq!(s, 200);
            } else {
                assert!((400..600).contains(&s), "{c}");
                assert_ne!(reason(s), "Unknown", "{s}");
            }
        }
    }

    #[test]
    fn chunked_framing() {
        let mut c = Chunked {
            inner: Vec::new(),
            raw: false,
        };
        c.write_chunk(b"hello").unwrap();
        c.write_chunk(b"").unwrap();
        c.write_chunk(&[b'x'; 17]).unwrap();
        c.finish().unwrap();
        let s = String::from_utf8(c.inner).unwrap();
        assert_eq!(
            s,
            format!("5\r\nhello\r\n11\r\n{}\r\n0\r\n\r\n", "x".repeat(17))
        );
    }

    #[test]
    fn http10_streams_are_raw_and_close() {
        let mut c =
            start_stream(Vec::new(), 200, "application/x-ndjson", false, true, &[]).unwrap();
        c.write_chunk(b"{}\n").unwrap();
        c.finish().unwrap();
        let s = String::from_utf8(c.inner).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(s.contains("Connection: close\r\n") && !s.contains("Transfer-Encoding"));
        assert!(s.ends_with("\r\n\r\n{}\n"));
    }

    #[test]
    fn error_response_shape() {
        let r = Response::from_status(&Status::not_found("no such sandbox"));
        assert_eq!(r.status, 404);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v, error_body("not_found", "no such sandbox"));
        let mut out = Vec::new();
        write_response(&mut out, &r, true, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains(&format!("Content-Length: {}\r\n", r.body.len())));
    }
}

//! Client of Firecracker's HTTP API on its Unix socket.
//!
//! HTTP/1.1 over one keep-alive connection, opened on first use and dropped after any error
//! that leaves its state unknown (a timeout, a malformed answer, a closed peer); the next call
//! opens a fresh one. Every request carries `Content-Length` (Firecracker's micro-http wants
//! it, even when zero). Heads and bodies go through the shared codec (`proto::http`). A
//! `204` has no body; an answer without `Content-Length` (or chunking) has none either, as
//! Firecracker omits the header only then, and the connection stays usable. Non-2xx
//! answers become [`ApiError::Fault`] with the message from `{"fault_message": ...}` or
//! `{"error": ...}`.
//!
//! Each call has its own deadline covering connect, write and the whole response, so a
//! Firecracker that stops answering costs at most that long.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::http::{BodyDecoder, BodyError, BodyReader, Framing, HeadError, Wire};

use crate::limits::{
    API_FAULT_MESSAGE_LEN_MAX, API_REQUEST_BODY_LEN_MAX, API_REQUEST_HEAD_LEN_MAX,
    API_RESPONSE_BODY_LEN_MAX, API_RESPONSE_HEAD_LEN_MAX, API_TIMEOUT_DEFAULT,
};
use crate::request::{RequestError, ToApiRequest};

/// HTTP methods Firecracker's API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One API request: what [`crate::request`] builds and [`ApiClient::send`] sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: Method,
    /// Absolute path, e.g. `/drives/rootfs`.
    pub path: String,
    /// JSON body, if any.
    pub body: Option<Vec<u8>>,
    /// Deadline of the whole call.
    pub timeout: Duration,
}

impl ApiRequest {
    /// A request without a body and the default timeout.
    pub fn get(path: &str) -> ApiRequest {
        ApiRequest {
            method: Method::Get,
            path: path.to_owned(),
            body: None,
            timeout: API_TIMEOUT_DEFAULT,
        }
    }

    /// `METHOD /path`, for messages.
    pub fn op(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A successful (2xx) answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `GET /`: what Firecracker says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    pub vmm_version: String,
}

/// What went wrong in an API call.
#[derive(Debug)]
pub enum ApiError {
    /// Connecting to the API socket failed.
    Connect { path: PathBuf, source: io::Error },
    /// A request path that is not a plain absolute path (space, control byte, `?`, `#`).
    InvalidPath { path: String },
    /// Request line and headers over [`API_REQUEST_HEAD_LEN_MAX`].
    RequestHeadTooLarge { len: usize },
    /// Request body over [`API_REQUEST_BODY_LEN_MAX`].
    RequestBodyTooLarge { op: String, len: usize },
    /// Writing the request failed.
    Write { op: String, source: io::Error },
    /// Reading the response failed.
    Read { op: String, source: io::Error },
    /// The call did not complete within its timeout.
    Timeout { op: String, timeout: Duration },
    /// Firecracker closed the connection before a complete response.
    Closed { op: String },
    /// The response head is over [`API_RESPONSE_HEAD_LEN_MAX`].
    ResponseHeadTooLarge { op: String },
    /// The response is not HTTP/1.1 as Firecracker speaks it.
    Malformed { op: String, reason: String },
    /// The response announces (or, chunked, sends) a body over [`API_RESPONSE_BODY_LEN_MAX`];
    /// `len` is the announced length, or the bound + 1 for a chunked body.
    ResponseBodyTooLarge { op: String, len: u64 },
    /// Firecracker refused the request.
    Fault {
        op: String,
        status: u16,
        message: String,
    },
    /// A 2xx body that is not what the API documents.
    UnexpectedBody { op: String, reason: String },
    /// A typed request could not be built.
    InvalidRequest(RequestError),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Connect { path, .. } => {
                write!(f, "connect to firecracker api socket {}", path.display())
            }
            ApiError::InvalidPath { path } => write!(f, "invalid api path {path:?}"),
            ApiError::RequestHeadTooLarge { len } => write!(
                f,
                "api request head of {len} bytes is over {API_REQUEST_HEAD_LEN_MAX}"
            ),
            ApiError::RequestBodyTooLarge { op, len } => write!(
                f,
                "{op}: request body of {len} bytes is over {API_REQUEST_BODY_LEN_MAX}"
            ),
            ApiError::Write { op, .. } => write!(f, "{op}: write request"),
            ApiError::Read { op, .. } => write!(f, "{op}: read response"),
            ApiError::Timeout { op, timeout } => {
                write!(f, "{op}: no complete response within {timeout:?}")
            }
            ApiError::Closed { op } => {
                write!(
                    f,
                    "{op}: firecracker closed the connection before responding"
                )
            }
            ApiError::ResponseHeadTooLarge { op } => write!(
                f,
                "{op}: response head over {API_RESPONSE_HEAD_LEN_MAX} bytes"
            ),
            ApiError::Malformed { op, reason } => write!(f, "{op}: malformed response: {reason}"),
            ApiError::ResponseBodyTooLarge { op, len } => write!(
                f,
                "{op}: response body of {len} bytes is over {API_RESPONSE_BODY_LEN_MAX}"
            ),
            ApiError::Fault {
                op,
                status,
                message,
            } => write!(f, "{op}: firecracker answered {status}: {message}"),
            ApiError::UnexpectedBody { op, reason } => {
                write!(f, "{op}: unexpected response body: {reason}")
            }
            ApiError::InvalidRequest(_) => write!(f, "build api request"),
        }
    }
}

impl std::error::Error for ApiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ApiError::Connect { source, .. }
            | ApiError::Write { source, .. }
            | ApiError::Read { source, .. } => Some(source),
            ApiError::InvalidRequest(e) => Some(e),
            _ => None,
        }
    }
}

/// A client of one Firecracker's API socket. Not shared between threads: each call needs the
/// connection to itself (Firecracker serves one request at a time anyway).
#[derive(Debug)]
pub struct ApiClient {
    socket_path: PathBuf,
    conn: Option<UnixStream>,
    /// Response head and body staging; allocated once, reused by every call.
    buf: Vec<u8>,
}

impl ApiClient {
    /// A client for the socket at `socket_path`; connects on the first call.
    pub fn new(socket_path: impl Into<PathBuf>) -> ApiClient {
        ApiClient {
            socket_path: socket_path.into(),
            conn: None,
            buf: Vec::with_capacity(API_RESPONSE_HEAD_LEN_MAX + API_RESPONSE_BODY_LEN_MAX),
        }
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// True while a keep-alive connection is open.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Drops the connection (the next call opens a new one).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Sends one request and reads its answer. A non-2xx status is [`ApiError::Fault`].
    pub fn send(&mut self, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
        let deadline = Instant::now() + req.timeout;
        let wire = encode_request(req)?;
        let result = self.exchange(req, &wire, deadline);
        if result.is_err() {
            // After a failed exchange we cannot know where the stream stands.
            self.conn = None;
        }
        let (status, body) = result?;
        if (200..300).contains(&status) {
            Ok(ApiResponse { status, body })
        } else {
            Err(ApiError::Fault {
                op: req.op(),
                status,
                message: fault_message(&body),
            })
        }
    }

    /// Builds and sends a typed request.
    pub fn call(&mut self, req: &impl ToApiRequest) -> Result<ApiResponse, ApiError> {
        let req = req.to_api_request().map_err(ApiError::InvalidRequest)?;
        self.send(&req)
    }

    /// `GET /`.
    pub fn describe_instance(&mut self) -> Result<InstanceInfo, ApiError> {
        let req = ApiRequest::get("/");
        let resp = self.send(&req)?;
        parse_instance_info(&resp.body).map_err(|reason| ApiError::UnexpectedBody {
            op: req.op(),
            reason,
        })
    }

    fn exchange(
        &mut self,
        req: &ApiRequest,
        wire: &[u8],
        deadline: Instant,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let op = || req.op();
        let timeout = || ApiError::Timeout {
            op: req.op(),
            timeout: req.timeout,
        };
        if self.conn.is_none() {
            // Connecting to a Unix socket does not block on the peer (a full backlog aside),
            // so the deadline is checked after it.
            let s = UnixStream::connect(&self.socket_path).map_err(|source| ApiError::Connect {
                path: self.socket_path.clone(),
                source,
            })?;
            self.conn = Some(s);
        }
        let Some(conn) = self.conn.as_mut() else {
            unreachable!("connection set just above");
        };

        // Write the whole request under the deadline.
        let mut written = 0;
        while written < wire.len() {
            let left = remaining(deadline).ok_or_else(timeout)?;
            conn.set_write_timeout(Some(left))
                .map_err(|source| ApiError::Write { op: op(), source })?;
            match conn.write(&wire[written..]) {
                Ok(0) => return Err(ApiError::Closed { op: op() }),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(timeout()),
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    return Err(ApiError::Closed { op: op() })
                }
                Err(source) => return Err(ApiError::Write { op: op(), source }),
            }
        }

        // Read the response under the deadline.
        let mut staging = std::mem::take(&mut self.buf);
        staging.clear();
        let mut wire = Wire::new(Deadlined { conn, deadline }, staging);
        let result = read_answer(&mut wire, req);
        let (_, mut staging) = wire.into_parts();
        let leftover = staging.len();
        staging.clear();
        self.buf = staging;
        let (status, body, close) = result?;
        if leftover > 0 {
            // Bytes after the response: Firecracker answers one request with one response.
            return Err(ApiError::Malformed {
                op: op(),
                reason: format!("{leftover} bytes after the response"),
            });
        }
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
}

/// A connection whose every read waits at most until `deadline`.
struct Deadlined<'a> {
    conn: &'a mut UnixStream,
    deadline: Instant,
}

impl Read for Deadlined<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let left = remaining(self.deadline)
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "api call deadline"))?;
        self.conn.set_read_timeout(Some(left))?;
        self.conn.read(out)
    }
}

/// Reads one answer: (status, body, the server closes after it).
fn read_answer(
    wire: &mut Wire<Deadlined<'_>>,
    req: &ApiRequest,
) -> Result<(u16, Vec<u8>, bool), ApiError> {
    let op = || req.op();
    let io_err = |e: io::Error| {
        if is_timeout(&e) {
            ApiError::Timeout {
                op: req.op(),
                timeout: req.timeout,
            }
        } else if e.kind() == io::ErrorKind::ConnectionReset {
            ApiError::Closed { op: req.op() }
        } else {
            ApiError::Read {
                op: req.op(),
                source: e,
            }
        }
    };
    let head = loop {
        match proto::http::parse_response_head(wire.buffered(), API_RESPONSE_HEAD_LEN_MAX, false) {
            Ok(Some((h, n))) => {
                wire.consume_buffered(n);
                break h;
            }
            Ok(None) => {}
            Err(HeadError::TooLarge) => return Err(ApiError::ResponseHeadTooLarge { op: op() }),
            Err(e) => {
                return Err(ApiError::Malformed {
                    op: op(),
                    reason: e.to_string(),
                })
            }
        }
        let want = API_RESPONSE_HEAD_LEN_MAX - wire.buffered().len();
        match wire.fill_more(want.max(1)) {
            Ok(0) => return Err(ApiError::Closed { op: op() }),
            Ok(_) => {}
            Err(e) => return Err(io_err(e)),
        }
    };
    if head.version != 1 {
        return Err(ApiError::Malformed {
            op: op(),
            reason: "not HTTP/1.1".to_owned(),
        });
    }
    let framing = match head.framing {
        // Firecracker omits Content-Length only when there is no body.
        Framing::UntilClose => Framing::Length(0),
        f => f,
    };
    if let Framing::Length(n) = framing {
        if n > API_RESPONSE_BODY_LEN_MAX as u64 {
            return Err(ApiError::ResponseBodyTooLarge { op: op(), len: n });
        }
    }
    let decoder = BodyDecoder::new(framing).with_limit(API_RESPONSE_BODY_LEN_MAX as u64);
    let body = BodyReader::new(&mut *wire, decoder)
        .read_to_vec()
        .map_err(|e| match e {
            BodyError::Io(e) => io_err(e),
            BodyError::Truncated => ApiError::Closed { op: op() },
            BodyError::TooLarge { limit } => ApiError::ResponseBodyTooLarge {
                op: op(),
                len: limit + 1,
            },
            e => ApiError::Malformed {
                op: op(),
                reason: e.to_string(),
            },
        })?;
    // The codec marks a close-delimited answer as closing; here it was an empty body.
    let close = if head.framing == Framing::UntilClose {
        head.header("connection")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("close"))
    } else {
        head.close
    };
    Ok((head.status, body, close))
}

fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        None
    } else {
        Some(left)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Checks `path` and lays out the request bytes: request line, headers, body.
pub fn encode_request(req: &ApiRequest) -> Result<Vec<u8>, ApiError> {
    let path_ok = req.path.starts_with('/')
        && req
            .path
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#' && b != b'%');
    if !path_ok {
        return Err(ApiError::InvalidPath {
            path: req.path.clone(),
        });
    }
    let body = req.body.as_deref().unwrap_or(&[]);
    if body.len() > API_REQUEST_BODY_LEN_MAX {
        return Err(ApiError::RequestBodyTooLarge {
            op: req.op(),
            len: body.len(),
        });
    }
    let mut headers = vec![("Host", "localhost"), ("Accept", "application/json")];
    if req.body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let head = proto::http::request_head(
        req.method.as_str(),
        &req.path,
        &headers,
        Some(body.len() as u64),
    )
    .map_err(|_| ApiError::InvalidPath {
        path: req.path.clone(),
    })?;
    if head.len() > API_REQUEST_HEAD_LEN_MAX {
        return Err(ApiError::RequestHeadTooLarge { len: head.len() });
    }
    let mut wire = head;
    wire.extend_from_slice(body);
    Ok(wire)
}

/// Parses a response head with the shared codec, as the client does. `Ok(None)`:
/// incomplete. `Ok(Some((status, head_len, body_len, close)))`: complete (`body_len` of a
/// chunked answer: `u64::MAX`, read by the decoder).
pub fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, u64, bool)>, String> {
    match proto::http::parse_response_head(buf, API_RESPONSE_HEAD_LEN_MAX, false) {
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
        Ok(Some((h, _))) if h.version != 1 => Err("not HTTP/1.1".to_owned()),
        Ok(Some((h, n))) => {
            let len = match h.framing {
                Framing::Length(n) => n,
                Framing::UntilClose => 0,
                Framing::Chunked => u64::MAX,
            };
            let close = if h.framing == Framing::UntilClose {
                h.header("connection")
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("close"))
            } else {
                h.close
            };
            Ok(Some((h.status, n, len, close)))
        }
    }
}

/// The message of an error body: `fault_message`, else `error`, else the body as text.
pub fn fault_message(body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let obj = v.as_object()?;
            ["fault_message", "error"]
                .iter()
                .find_map(|k| obj.get(*k).and_then(|m| m.as_str()).map(str::to_owned))
        });
    let mut msg = match from_json {
        Some(m) => m,
        None if body.is_empty() => "(no message)".to_owned(),
        None => String::from_utf8_lossy(body).trim().to_owned(),
    };
    if msg.len() > API_FAULT_MESSAGE_LEN_MAX {
        let mut cut = API_FAULT_MESSAGE_LEN_MAX;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push_str("...");
    }
    msg
}

fn parse_instance_info(body: &[u8]) -> Result<InstanceInfo, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let field = |k: &str| -> Result<String, String> {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("no string field {k:?}"))
    };
    Ok(InstanceInfo {
        id: field("id")?,
        state: field("state")?,
        vmm_version: field("vmm_version")?,
    })
}

/// Fuzz target body (`fuzz/fuzz_targets/api_response.rs`): a response as it arrives from the
/// socket goes through the head parser, and the body through the fault and `GET /` parsers.
pub fn fuzz_response(data: &[u8]) {
    if let Ok(Some((status, head_len, body_len, _close))) = parse_head(data) {
        assert!(head_len <= data.len());
        assert!((100..1000).contains(&status));
        if matches!(status, 204 | 304 | 100..=199) {
            assert_eq!(body_len, 0);
        }
        let rest = &data[head_len..];
        let msg = fault_message(rest);
        assert!(msg.len() <= API_FAULT_MESSAGE_LEN_MAX + 3);
        let _ = parse_instance_info(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_get_with_zero_length() {
        let wire = encode_request(&ApiRequest::get("/")).unwrap();
        assert_eq!(
            wire,
            b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn refuses_bad_paths() {
        for p in ["", "drives", "/a b", "/a\r\nX: y", "/a?b", "/%2e"] {
            let r = ApiRequest::get(p);
            assert!(
                matches!(encode_request(&r), Err(ApiError::InvalidPath { .. })),
                "{p:?}"
            );
        }
    }

    #[test]
    fn refuses_long_head_and_body() {
        let r = ApiRequest::get(&format!("/{}", "a".repeat(API_REQUEST_HEAD_LEN_MAX)));
        assert!(matches!(
            encode_request(&r),
            Err(ApiError::RequestHeadTooLarge { .. })
        ));
        let mut r = ApiRequest::get("/mmds");
        r.method = Method::Put;
        r.body = Some(vec![b' '; API_REQUEST_BODY_LEN_MAX + 1]);
        assert!(matches!(
            encode_request(&r),
            Err(ApiError::RequestBodyTooLarge { .. })
        ));
        r.body = Some(vec![b' '; API_REQUEST_BODY_LEN_MAX]);
        assert!(encode_request(&r).is_ok());
    }

    #[test]
    fn parses_firecracker_heads() {
        let h = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(parse_head(h).unwrap(), Some((204, h.len(), 0, false)));
        let h = b"HTTP/1.1 400 \r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(parse_head(h).unwrap(), Some((400, h.len(), 12, false)));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        let h = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(parse_head(h).unwrap(), Some((200, h.len(), 1, true)));
    }

    #[test]
    fn refuses_bad_heads() {
        for h in [
            &b"HTTP/1.0 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 204 OK\r\nContent-Length: 3\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert!(parse_head(h).is_err(), "{:?}", String::from_utf8_lossy(h));
        }
    }

    #[test]
    fn fault_messages() {
        assert_eq!(fault_message(br#"{"fault_message":"bad"}"#), "bad");
        assert_eq!(fault_message(br#"{"error":"worse"}"#), "worse");
        assert_eq!(fault_message(b"plain text\n"), "plain text");
        assert_eq!(fault_message(b""), "(no message)");
        let long = format!(r#"{{"error":"{}"}}"#, "é".repeat(API_FAULT_MESSAGE_LEN_MAX));
        let m = fault_message(long.as_bytes());
        assert!(m.len() <= API_FAULT_MESSAGE_LEN_MAX + 3);
    }

    #[test]
    fn instance_info() {
        let b =
            br#"{"id":"x","state":"Not started","vmm_version":"1.16.1","app_name":"Firecracker"}"#;
        let i = parse_instance_info(b).unwrap();
        assert_eq!(i.state, "Not started");
        assert!(parse_instance_info(b"{}").is_err());
        assert!(parse_instance_info(b"[").is_err());
    }
}

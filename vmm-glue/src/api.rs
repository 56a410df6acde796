//! Client of Firecracker's HTTP API on its Unix socket.
//!
//! HTTP/1.1 over one keep-alive connection, opened on first use and dropped after any error
//! that leaves its state unknown (a timeout, a malformed answer, a closed peer); the next call
//! opens a fresh one. Every request carries `Content-Length` (Firecracker's micro-http wants
//! it, even when zero); response heads are parsed with `httparse`. A `204` has no body; any
//! other answer's body is exactly `Content-Length` bytes (Firecracker never chunks). Non-2xx
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

use crate::limits::{
    API_FAULT_MESSAGE_LEN_MAX, API_REQUEST_BODY_LEN_MAX, API_REQUEST_HEAD_LEN_MAX,
    API_RESPONSE_BODY_LEN_MAX, API_RESPONSE_HEADERS_MAX, API_RESPONSE_HEAD_LEN_MAX,
    API_TIMEOUT_DEFAULT,
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
    /// The response announces a body over [`API_RESPONSE_BODY_LEN_MAX`].
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

        // Read until the head is complete.
        self.buf.clear();
        let (status, head_len, body_len, close) = loop {
            if let Some(parsed) =
                parse_head(&self.buf).map_err(|reason| ApiError::Malformed { op: op(), reason })?
            {
                break parsed;
            }
            if self.buf.len() >= API_RESPONSE_HEAD_LEN_MAX {
                return Err(ApiError::ResponseHeadTooLarge { op: op() });
            }
            let want = API_RESPONSE_HEAD_LEN_MAX - self.buf.len();
            read_some(conn, &mut self.buf, want, deadline, req)?;
        };
        if body_len > API_RESPONSE_BODY_LEN_MAX as u64 {
            return Err(ApiError::ResponseBodyTooLarge {
                op: op(),
                len: body_len,
            });
        }
        // Checked just above: fits in usize.
        let total = head_len + body_len as usize;
        while self.buf.len() < total {
            let want = total - self.buf.len();
            read_some(conn, &mut self.buf, want, deadline, req)?;
        }
        if self.buf.len() > total {
            // Bytes after the response: Firecracker answers one request with one response.
            return Err(ApiError::Malformed {
                op: op(),
                reason: format!("{} bytes after the response", self.buf.len() - total),
            });
        }
        let body = self.buf[head_len..total].to_vec();
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
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

/// Reads at most `want` bytes (at least one) into `buf` before `deadline`.
fn read_some(
    conn: &mut UnixStream,
    buf: &mut Vec<u8>,
    want: usize,
    deadline: Instant,
    req: &ApiRequest,
) -> Result<(), ApiError> {
    debug_assert!(want > 0);
    let mut chunk = [0u8; 4096];
    let n_max = want.min(chunk.len());
    loop {
        let Some(left) = remaining(deadline) else {
            return Err(ApiError::Timeout {
                op: req.op(),
                timeout: req.timeout,
            });
        };
        conn.set_read_timeout(Some(left))
            .map_err(|source| ApiError::Read {
                op: req.op(),
                source,
            })?;
        match conn.read(&mut chunk[..n_max]) {
            Ok(0) => return Err(ApiError::Closed { op: req.op() }),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(ApiError::Timeout {
                    op: req.op(),
                    timeout: req.timeout,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ApiError::Closed { op: req.op() })
            }
            Err(source) => {
                return Err(ApiError::Read {
                    op: req.op(),
                    source,
                })
            }
        }
    }
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
    let mut head = String::with_capacity(256);
    head.push_str(req.method.as_str());
    head.push(' ');
    head.push_str(&req.path);
    head.push_str(" HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if req.body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("Content-Length: ");
    head.push_str(&body.len().to_string());
    head.push_str("\r\n\r\n");
    if head.len() > API_REQUEST_HEAD_LEN_MAX {
        return Err(ApiError::RequestHeadTooLarge { len: head.len() });
    }
    let mut wire = Vec::with_capacity(head.len() + body.len());
    wire.extend_from_slice(head.as_bytes());
    wire.extend_from_slice(body);
    Ok(wire)
}

/// Parses a response head. `Ok(None)`: incomplete. `Ok(Some((status, head_len, body_len,
/// close)))`: complete; `close` if the server said `Connection: close`.
pub fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, u64, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; API_RESPONSE_HEADERS_MAX];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("{e}")),
    };
    if resp.version != Some(1) {
        return Err("not HTTP/1.1".to_owned());
    }
    let Some(status) = resp.code else {
        return Err("no status code".to_owned());
    };
    // httparse takes any three digits; a status below 100 is not HTTP (found by fuzzing).
    if status < 100 {
        return Err(format!("status {status:03} is not a valid HTTP status"));
    }
    let mut content_length: Option<u64> = None;
    let mut close = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| "bad Content-Length".to_owned())?;
            if content_length.is_some_and(|old| old != v) {
                return Err("conflicting Content-Length headers".to_owned());
            }
            content_length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("Transfer-Encoding is not supported".to_owned());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    let body_len = match status {
        // No body by definition (RFC 9112 §6.3); a Content-Length here would be a lie.
        100..=199 | 204 | 304 => match content_length {
            None | Some(0) => 0,
            Some(_) => return Err(format!("{status} with a body")),
        },
        // Firecracker omits Content-Length only when there is no body.
        _ => content_length.unwrap_or(0),
    };
    Ok(Some((status, head_len, body_len, close)))
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
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
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

//! The traffic proxy: an HTTP/1.1 request for a sandbox port (`P-sb-<uuid>.<traffic
//! domain>` or `/v1/sandboxes/sb-<uuid>/ports/P/...`, [`super::port_route`]) relayed over a
//! `Ports.Connect` stream to the sandbox's agent, and the answer relayed back.
//!
//! How one connection goes:
//! 1. the event loop parses the head and sees a port route; nothing of the body is read on
//!    the loop (it is the sandbox's to read);
//! 2. a worker checks the credentials and opens the stream ([`Backend::port_open`]: 401,
//!    403, 404, 409, 429, 502 with a JSON error body otherwise), writes nothing else and
//!    hands the connection to two relay threads of its own: the worker is free at once;
//! 3. up: the rewritten request head ([`super::proxy_head::upstream_request`]: credentials
//!    and hop-by-hop headers out, `Connection: close`, or the WebSocket upgrade kept), then
//!    every byte the client sends, in chunks of [`PROXY_CHUNK`], until it half-closes;
//! 4. down: the sandbox's response head rewritten
//!    ([`super::proxy_head::downstream_response`]: cookie domains and hop-by-hop headers
//!    out), then every byte as it comes (a body of any length, chunked or not, or a
//!    WebSocket's frames after its 101), until the sandbox's server closes; then the
//!    client's connection is closed (one request per connection).
//!
//! Memory and threads: each direction holds one chunk at a time and writes it before it
//! reads the next, and the ctl↔agent stream has a bounded window, so a client that stops
//! reading stops the sandbox's server (its writes block) instead of growing a buffer; a
//! client that reads nothing for the gateway's I/O timeout is dropped. A proxied connection
//! holds its two relay threads, never a gateway worker, within the team and sandbox budgets
//! (429) and [`PROXY_CONNECTIONS_MAX`] per gateway (503).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::http::parse_response_head;
use proto::rpc::{Bytes, BytesMut, Transport};
use proto::{Code, Status};

use super::backend::{Backend, PortConn, PortDown, PortUp, TrafficCreds};
use super::limits::{HEAD_MAX, LINGER_TIMEOUT, PROXY_CHUNK, PROXY_IDLE_TIMEOUT};
use super::port_route::PortRoute;
use super::proxy_head::{
    cookie_token, downstream_response, query_token, target_without_token, token_cookie,
    upstream_request, TRAFFIC_TOKEN_HEADER, TRAFFIC_TOKEN_HEADER_ALT,
};
use super::request::Head;
use super::response::Response;

/// The answer to a request the proxy does not relay, from the status the backend gave.
pub fn refusal(s: &Status) -> Response {
    let status = match s.code {
        Code::NotFound => 404,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::FailedPrecondition => 409,
        Code::ResourceExhausted => 429,
        Code::InvalidArgument => 400,
        // Nothing listens on the port, the agent cannot be reached, it failed.
        _ => 502,
    };
    let mut r = Response::error(status, s.code.name(), &s.message);
    if status == 429 {
        r.extra
            .push(("Retry-After", super::limits::RETRY_AFTER_SECS.to_string()));
    }
    r
}

/// Checks the request's credentials and opens the stream (a worker's part). The traffic
/// token comes from the header; in the host form also from the query parameter
/// [`super::proxy_head::TRAFFIC_TOKEN_PARAM`] or the cookie
/// [`super::proxy_head::TRAFFIC_COOKIE`]. A GET or HEAD whose token came
/// in the query is not relayed: once the token checks out, the answer is a `302` to the same
/// URL without the parameter that sets the cookie (`Secure` when `tls`), so the token leaves
/// the address bar and later requests (and the page's own) carry the cookie.
pub fn open(
    backend: &dyn Backend,
    head: &Head,
    route: &PortRoute,
    tls: bool,
) -> Result<PortConn, Response> {
    let header = head
        .header(TRAFFIC_TOKEN_HEADER)
        .or_else(|| head.header(TRAFFIC_TOKEN_HEADER_ALT))
        .map(str::trim);
    let (query, rest) = if route.by_path {
        (None, String::new())
    } else {
        query_token(&head.query)
    };
    let cookie = if route.by_path {
        None
    } else {
        cookie_token(head)
    };
    let token = header.or(query).or(cookie);
    let creds = TrafficCreds {
        token,
        api_key: super::handler::api_key(head),
    };
    if let (None, Some(t)) = (header, query) {
        if head.method == "GET" || head.method == "HEAD" {
            backend
                .port_authorize(route.sandbox, creds)
                .map_err(|s| refusal(&s))?;
            let location = if rest.is_empty() {
                head.path.clone()
            } else {
                format!("{}?{rest}", head.path)
            };
            let mut r = Response::text(302, "text/plain", "the traffic token is now a cookie\n");
            r.extra.push(("Location", location));
            r.extra.push(("Set-Cookie", token_cookie(t, tls)));
            r.extra.push(("Cache-Control", "no-store".to_owned()));
            return Err(r);
        }
    }
    backend
        .port_open(route.sandbox, route.port, creds)
        .map_err(|s| refusal(&s))
}

/// The bytes the relay starts with: the request head for the sandbox (without our token
/// parameter in the host form), then whatever of the body the gateway already read.
pub fn first_bytes(head: &Head, route: &PortRoute) -> Result<Vec<u8>, Response> {
    let target = if route.by_path {
        route.target.clone()
    } else {
        target_without_token(&route.target)
    };
    upstream_request(head, &target)
        .map_err(|e| Response::error(400, "invalid_argument", &format!("request head: {e}")))
}

/// Writes all of `data` to the client within `timeout` (a client that takes no byte for
/// that long is gone), TLS records included.
fn write_all(io: &dyn Transport, mut data: &[u8], timeout: Duration) -> io::Result<()> {
    let mut deadline = Instant::now() + timeout;
    let wait = |deadline: Instant| -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client not reading",
            ));
        }
        io.poll(true, left).map(|_| ())
    };
    while !data.is_empty() {
        match io.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                // Progress: the client reads.
                deadline = Instant::now() + timeout;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(deadline)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    while io.flush()? {
        wait(deadline)?;
    }
    Ok(())
}

/// Shared between the two directions of one connection.
struct Sides {
    /// The downward side finished: the upward reader stops.
    done: AtomicBool,
    /// Milliseconds since `start` of the last byte either way (the idle bound).
    last: AtomicU64,
    start: Instant,
}

impl Sides {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Relays one connection until both sides are done; runs on a thread of its own (the
/// downward side) and starts one more (the upward side). `first` goes up before the
/// client's further bytes; `io_timeout` bounds each write to the client; `head_request`:
/// the client asked HEAD (its answer has no body).
pub fn relay(
    pool: &Arc<proto::pool::Pool>,
    io: Box<dyn Transport>,
    first: Vec<u8>,
    conn: PortConn,
    io_timeout: Duration,
    head_request: bool,
) {
    let PortConn {
        mut up,
        mut down,
        guard,
    } = conn;
    let io: Arc<dyn Transport> = Arc::from(io);
    let sides = Arc::new(Sides {
        done: AtomicBool::new(false),
        last: AtomicU64::new(0),
        start: Instant::now(),
    });
    let (up_done_tx, up_done) = mpsc::channel::<()>();
    let up_job = {
        let io = io.clone();
        let sides = sides.clone();
        Box::new(move || {
            upward(&*io, &mut *up, first, &sides);
            let _ = up_done_tx.send(());
        })
    };
    if pool.spawn(up_job).is_err() {
        // No thread: the client sees its connection close.
        io.shutdown();
        return;
    }
    let io_ref = &*io;
    downward(io_ref, &mut *down, io_timeout, head_request, &sides);
    sides.done.store(true, Ordering::SeqCst);
    // The answer is complete: end our direction, let the client's last bytes (if any) and
    // its close arrive for a moment so nothing it has not read yet is lost to a reset, then
    // close both ways, which also wakes the upward reader.
    io.shutdown_write();
    if up_done.recv_timeout(LINGER_TIMEOUT).is_err() {
        io.shutdown();
        // The shutdown wakes the upward reader; a send blocked on the agent's window ends
        // with the call (the stream's permit is dropped only after both halves are done).
        let _ = up_done.recv();
    }
    io.shutdown();
    drop(guard);
}

/// Client → sandbox.
fn upward(io: &dyn Transport, up: &mut dyn PortUp, first: Vec<u8>, sides: &Sides) {
    if !first.is_empty() && up.send(Bytes::from(first)).is_err() {
        return;
    }
    loop {
        if sides.done.load(Ordering::SeqCst) {
            return;
        }
        let mut b = BytesMut::with_capacity(PROXY_CHUNK);
        match io.read_into(&mut b, true) {
            Ok(0) => {
                // Half-close: the sandbox's server reads the end of the request.
                let _ = up.close_send();
                return;
            }
            Ok(_) => {
                sides.touch();
                if up.send(b.freeze()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if sides.idle() >= PROXY_IDLE_TIMEOUT {
                    up.cancel();
                    io.shutdown();
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                // Reset, or shut down by the other side.
                if !sides.done.load(Ordering::SeqCst) {
                    up.cancel();
                }
                return;
            }
        }
    }
}

/// Sandbox → client: the head rewritten, then the bytes as they come.
fn downward(
    io: &dyn Transport,
    down: &mut dyn PortDown,
    timeout: Duration,
    head_request: bool,
    sides: &Sides,
) {
    let mut head: Vec<u8> = Vec::new();
    let mut in_head = true;
    let fail = |why: &str| {
        let r = Response::error(502, "bad_gateway", why);
        let _ = write_all(io, &super::response::response_bytes(&r, false), timeout);
    };
    loop {
        let chunk = match down.recv() {
            Ok(Some(c)) => c,
            Ok(None) => {
                if in_head {
                    fail("the sandbox's server closed the connection without an answer");
                }
                return;
            }
            Err(e) => {
                if in_head {
                    fail(&format!("the sandbox's port stream failed: {}", e.message));
                }
                return;
            }
        };
        sides.touch();
        if !in_head {
            if write_all(io, &chunk, timeout).is_err() {
                return;
            }
            continue;
        }
        head.extend_from_slice(&chunk);
        // Heads until a final one (1xx interim answers pass as they are, 101 included
        // as final: the bytes after it are the upgraded protocol's).
        loop {
            match parse_response_head(&head, HEAD_MAX, head_request) {
                Ok(Some((h, n))) => {
                    let interim = (100..200).contains(&h.status) && h.status != 101;
                    let out = if interim {
                        format!(
                            "HTTP/1.1 {} {}\r\n\r\n",
                            h.status,
                            proto::http::reason(h.status)
                        )
                        .into_bytes()
                    } else {
                        downstream_response(&h)
                    };
                    if write_all(io, &out, timeout).is_err() {
                        return;
                    }
                    head.drain(..n);
                    if interim {
                        continue;
                    }
                    in_head = false;
                    let rest = std::mem::take(&mut head);
                    if !rest.is_empty() && write_all(io, &rest, timeout).is_err() {
                        return;
                    }
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    fail(&format!(
                        "the sandbox's server answered a malformed head: {e}"
                    ));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_http() {
        for (code, status) in [
            (Code::NotFound, 404),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::FailedPrecondition, 409),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 502),
            (Code::Internal, 502),
        ] {
            let r = refusal(&Status::new(code, "why"));
            assert_eq!(r.status, status, "{code:?}");
        }
        assert!(refusal(&Status::resource_exhausted("x"))
            .extra
            .iter()
            .any(|(n, _)| *n == "Retry-After"));
    }
}

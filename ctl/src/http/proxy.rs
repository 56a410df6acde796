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
//!    and hop-by-hop headers out, the WebSocket upgrade kept), then the client's bytes in
//!    chunks of [`PROXY_CHUNK`];
//! 4. down: the sandbox's response head rewritten
//!    ([`super::proxy_head::downstream_response`]: cookie domains and hop-by-hop headers
//!    out), then the bytes as they come;
//! 5. keep-alive (an HTTP/1.1 request without `Connection: close`, not an upgrade): the
//!    relays follow each body's framing (Content-Length or chunked, [`BodyDecoder`] over the
//!    bytes as they pass, nothing buffered) to find the next request head and the next
//!    answer's head; each later request must name the same sandbox port and its
//!    credentials are checked again ([`Backend::port_authorize`]: a rotated token stops
//!    working at the next request); one that does not pass is not relayed: the sandbox
//!    reads the end of the stream and the connection ends after the previous answer. An
//!    answer framed by the close, a `Connection: close` either way, HTTP/1.0, or a `101`
//!    turn the rest of the connection into bytes as they come, until the sandbox's server
//!    closes. Between requests a connection quiet for [`PROXY_KEEPALIVE_IDLE`] is let go.
//!    It stays one ctl↔agent stream and one connection to the sandbox's server per client
//!    connection.
//!
//! The relays are two halves, one per direction, each on a relay pool thread while it has
//! bytes to move. A half whose side stays quiet for [`PROXY_PARK_AFTER`] parks
//! ([`proto::rpc::park`]): the upward one until the client's socket is readable, the downward
//! one until its port stream has something; it resumes on a pool thread where it stopped.
//! So an idle connection (kept alive between requests, or a quiet WebSocket) holds no
//! thread, only its sockets, its stream and its state.
//!
//! Memory and threads: each direction holds one chunk at a time and writes it before it
//! reads the next, and the ctl↔agent stream has a bounded window, so a client that stops
//! reading stops the sandbox's server (its writes block) instead of growing a buffer; a
//! client that reads nothing for the gateway's I/O timeout is dropped. A proxied connection
//! holds at most two relay threads (none while idle), never a gateway worker, within the
//! team and sandbox budgets (429) and [`PROXY_CONNECTIONS_MAX`] per gateway (503).

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::http::{parse_response_head, BodyDecoder, BodyError, Framing};
use proto::rpc::{Bytes, BytesMut, ReadMode, Transport};
use proto::{Code, Status};

use super::backend::{Backend, PortConn, PortDown, PortUp, TrafficCreds};
use super::limits::{
    HEAD_MAX, LINGER_TIMEOUT, PROXY_CHUNK, PROXY_IDLE_TIMEOUT, PROXY_KEEPALIVE_IDLE,
    PROXY_PARK_AFTER,
};
use super::port_route::PortRoute;
use super::proxy_head::{
    cookie_token, downstream_response, keeps_alive, query_token, target_without_token,
    token_cookie, upstream_request, TRAFFIC_TOKEN_HEADER, TRAFFIC_TOKEN_HEADER_ALT,
};
use super::request::Head;
use super::response::Response;
use proto::rpc::park::Parking;

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

/// What the relay needs to carry more requests after the first on one connection.
pub struct Next {
    pub backend: Arc<dyn Backend>,
    /// The first request's route: later ones must be for the same sandbox port.
    pub route: PortRoute,
    /// The first request's `Host` (host form: later ones must name the same).
    pub host: String,
    /// The first request keeps the connection open ([`keeps_alive`]).
    pub keep_alive: bool,
    /// The first request's body framing and whether it is a WebSocket upgrade.
    pub framing: Framing,
    pub websocket: bool,
    /// The first request was HEAD (its answer has no body).
    pub head_request: bool,
}

/// The credentials of a request, as [`open`] reads them: the token from the header, or on
/// the host form from the query or the cookie; also the query's token alone (a browser link).
fn creds_of<'a>(head: &'a Head, by_path: bool) -> (TrafficCreds<'a>, Option<&'a str>, bool) {
    let header = head
        .header(TRAFFIC_TOKEN_HEADER)
        .or_else(|| head.header(TRAFFIC_TOKEN_HEADER_ALT))
        .map(str::trim);
    let query = if by_path {
        None
    } else {
        query_token(&head.query).0
    };
    let cookie = if by_path { None } else { cookie_token(head) };
    let creds = TrafficCreds {
        token: header.or(query).or(cookie),
        api_key: super::handler::api_key(head),
    };
    (creds, query, header.is_some())
}

/// The sandbox-side target of a later request on a kept-alive connection, after checking it
/// is for the same sandbox port and its credentials still reach it (a rotated token stops
/// working at the next request, as on a new connection). `None`: relay no more requests.
fn next_target(next: &Next, head: &Head) -> Option<String> {
    let full = if head.query.is_empty() {
        head.path.clone()
    } else {
        format!("{}?{}", head.path, head.query)
    };
    let target = if next.route.by_path {
        match super::port_route::route_path(&full) {
            Some(Ok(r)) if r.sandbox == next.route.sandbox && r.port == next.route.port => r.target,
            _ => return None,
        }
    } else {
        if !head
            .header("host")
            .is_some_and(|h| h.trim().eq_ignore_ascii_case(&next.host))
        {
            return None;
        }
        target_without_token(&full)
    };
    let (creds, query, header) = creds_of(head, next.route.by_path);
    // A link with the token: a new connection answers it with the cookie's redirect.
    if query.is_some() && !header && (head.method == "GET" || head.method == "HEAD") {
        return None;
    }
    next.backend
        .port_authorize(next.route.sandbox, creds)
        .ok()?;
    Some(target)
}

/// Bytes of `input` that belong to the body `dec` is tracking (all of it unless the body
/// ends inside).
fn body_take(dec: &mut BodyDecoder, input: &[u8]) -> Result<usize, BodyError> {
    let mut at = 0;
    while at < input.len() && !dec.is_done() {
        let p = dec.advance(&input[at..], usize::MAX)?;
        if p.consumed == 0 {
            break;
        }
        at += p.consumed;
    }
    Ok(at)
}

/// What both halves of a relayed connection share. Dropped with the last half: the
/// client's connection closes, the stream's budget place is given back, `on_end` runs.
struct Link {
    io: Box<dyn Transport>,
    park: Arc<Parking>,
    io_timeout: Duration,
    /// The downward half finished: the upward one stops.
    done: AtomicBool,
    /// Milliseconds since `start` of the last byte either way (the idle bounds).
    last: AtomicU64,
    start: Instant,
    /// Requests sent up whose answers have not been relayed to their end yet.
    in_flight: AtomicUsize,
    /// (HEAD, keeps alive) of each request sent up, in order, for the answers' framing.
    methods: Mutex<VecDeque<(bool, bool)>>,
    /// The upward half's parking token while it waits for the client (to cut the wait
    /// short once the answer is complete).
    up_parked: Mutex<Option<usize>>,
    guard: Mutex<Option<Box<dyn Send>>>,
    on_end: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Link {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
    fn methods(&self) -> std::sync::MutexGuard<'_, VecDeque<(bool, bool)>> {
        self.methods.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn up_parked(&self) -> std::sync::MutexGuard<'_, Option<usize>> {
        self.up_parked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.io.shutdown();
        drop(self.guard.get_mut().map(Option::take));
        if let Ok(Some(f)) = self.on_end.get_mut().map(Option::take) {
            f();
        }
    }
}

/// Relays one connection: the downward half runs on this thread (a relay pool thread),
/// the upward one on another from `park`'s pool. Each half parks when its side is quiet
/// ([`PROXY_PARK_AFTER`]) and resumes when it has something to do, so an idle connection
/// holds no thread. `first` (the first request's head for the sandbox) goes up, then
/// `rest` (the client's bytes the gateway already read) and the client's further bytes;
/// `io_timeout` bounds each write to the client. With `next.keep_alive` each further
/// request head is parsed, checked and rewritten, and each answer's framing followed, so
/// the connection carries one request after another. `on_end` runs once both halves are
/// done and the connection is closed.
#[allow(clippy::too_many_arguments)]
pub fn relay(
    park: &Arc<Parking>,
    io: Box<dyn Transport>,
    first: Vec<u8>,
    rest: Vec<u8>,
    conn: PortConn,
    io_timeout: Duration,
    next: Next,
    on_end: Box<dyn FnOnce() + Send>,
) {
    let PortConn { up, down, guard } = conn;
    // Reads wait this long before the upward half parks.
    let _ = io.set_read_mode(ReadMode::Blocking {
        tick: PROXY_PARK_AFTER,
    });
    let link = Arc::new(Link {
        io,
        park: park.clone(),
        io_timeout,
        done: AtomicBool::new(false),
        last: AtomicU64::new(0),
        start: Instant::now(),
        in_flight: AtomicUsize::new(1),
        methods: Mutex::new(VecDeque::from([(next.head_request, next.keep_alive)])),
        up_parked: Mutex::new(None),
        guard: Mutex::new(Some(guard)),
        on_end: Mutex::new(Some(on_end)),
    });
    let state = if next.keep_alive && !next.websocket {
        UpState::Body(BodyDecoder::new(next.framing))
    } else {
        UpState::Raw
    };
    // The request head goes from this thread, before the upward half's thread starts
    // (one thread hop less before the sandbox sees the request). If the stream failed, the
    // downward half reads why and answers it.
    let mut up = up;
    let sent = first.is_empty() || up.send(Bytes::from(first)).is_ok();
    let upper = Upward {
        link: link.clone(),
        up,
        state,
        next: Box::new(next),
        rest,
    };
    if sent && park.pool().spawn(Box::new(move || upper.run())).is_err() {
        // No thread: the client sees its connection close (with `link`'s last owner).
        return;
    }
    Downward {
        link,
        down,
        state: DownState::Head(Vec::new()),
        answered: false,
        current: None,
    }
    .run();
}

/// Where the upward relay is in the client's byte stream.
enum UpState {
    /// Inside a request body.
    Body(BodyDecoder),
    /// Between requests: the next head's bytes so far.
    Head(Vec<u8>),
    /// Bytes as they come (no keep-alive, an upgraded connection, or after the last request).
    Raw,
}

/// Client → sandbox.
struct Upward {
    link: Arc<Link>,
    up: Box<dyn PortUp>,
    state: UpState,
    next: Box<Next>,
    /// The client's bytes the gateway already read, until the first run sends them.
    rest: Vec<u8>,
}

/// What to do after feeding bytes up.
enum Fed {
    More,
    /// Relay no more requests: the sandbox reads the end of the stream.
    Stop,
    /// The stream failed.
    Failed,
}

impl Upward {
    fn feed(&mut self, mut data: Bytes) -> Fed {
        while !data.is_empty() {
            match &mut self.state {
                UpState::Raw => {
                    return match self.up.send(data) {
                        Ok(()) => Fed::More,
                        Err(_) => Fed::Failed,
                    };
                }
                UpState::Body(dec) => {
                    let Ok(n) = body_take(dec, &data) else {
                        return Fed::Stop;
                    };
                    let done = dec.is_done();
                    if n > 0 && self.up.send(data.slice(..n)).is_err() {
                        return Fed::Failed;
                    }
                    data = data.slice(n..);
                    if done {
                        self.state = UpState::Head(Vec::new());
                    } else if n == 0 {
                        return Fed::More;
                    }
                }
                UpState::Head(buf) => {
                    buf.extend_from_slice(&data);
                    let (h, n) = match proto::http::parse_request_head(buf, HEAD_MAX) {
                        Ok(Some(x)) => x,
                        Ok(None) => return Fed::More,
                        Err(_) => return Fed::Stop,
                    };
                    let Some(target) = next_target(&self.next, &h) else {
                        return Fed::Stop;
                    };
                    let Ok(out) = upstream_request(&h, &target) else {
                        return Fed::Stop;
                    };
                    let keep = keeps_alive(&h);
                    let after = Bytes::copy_from_slice(&buf[n..]);
                    self.link.in_flight.fetch_add(1, Ordering::SeqCst);
                    self.link.methods().push_back((h.method == "HEAD", keep));
                    if self.up.send(Bytes::from(out)).is_err() {
                        return Fed::Failed;
                    }
                    data = after;
                    self.state = if keep {
                        UpState::Body(BodyDecoder::new(h.framing()))
                    } else {
                        UpState::Raw
                    };
                }
            }
        }
        Fed::More
    }

    /// Runs until the half is done (returns, dropping it) or parks (it comes back here).
    fn run(mut self) {
        let park = self.link.park.clone();
        let _running = park.running();
        *self.link.up_parked() = None;
        let rest = std::mem::take(&mut self.rest);
        if !rest.is_empty() {
            match self.feed(Bytes::from(rest)) {
                Fed::More => {}
                Fed::Stop => return self.stop(),
                Fed::Failed => return,
            }
        }
        loop {
            if self.link.done.load(Ordering::SeqCst) {
                // The answer is complete, and the client's last bytes (if any) or its close
                // arrived, or the linger passed: nothing of it was left unread to a reset.
                return;
            }
            let mut b = BytesMut::with_capacity(PROXY_CHUNK);
            match self.link.io.read_into(&mut b, true) {
                Ok(0) => {
                    // Half-close: the sandbox's server reads the end of the request.
                    let _ = self.up.close_send();
                    return;
                }
                Ok(_) => {
                    self.link.touch();
                    match self.feed(b.freeze()) {
                        Fed::More => {}
                        Fed::Stop => return self.stop(),
                        Fed::Failed => return,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let between = matches!(&self.state, UpState::Head(b) if b.is_empty())
                        && self.link.in_flight.load(Ordering::SeqCst) == 0;
                    let idle = self.link.idle();
                    if between && idle >= PROXY_KEEPALIVE_IDLE {
                        // A kept-alive connection with nothing to do: let it go.
                        return self.stop();
                    }
                    if idle >= PROXY_IDLE_TIMEOUT {
                        self.up.cancel();
                        self.link.io.shutdown();
                        return;
                    }
                    let bound = if between {
                        PROXY_KEEPALIVE_IDLE
                    } else {
                        PROXY_IDLE_TIMEOUT
                    };
                    match self.park(bound) {
                        Ok(()) => return,
                        Err(back) => self = back,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Reset, or shut down by the other side.
                    if !self.link.done.load(Ordering::SeqCst) {
                        self.up.cancel();
                    }
                    return;
                }
            }
        }
    }

    /// Waits off-thread until the client sends or closes, or the idle `bound` (counted from
    /// the last byte either way) passes.
    fn park(self, bound: Duration) -> Result<(), Upward> {
        let link = self.link.clone();
        let deadline = Instant::now() + bound.saturating_sub(link.idle());
        let fd = link.io.fd().as_raw_fd();
        let token = link.park.park_readable(fd, deadline, self, Upward::run)?;
        let mut g = link.up_parked();
        *g = Some(token);
        if link.done.load(Ordering::SeqCst) {
            link.park.hurry(token, Instant::now() + LINGER_TIMEOUT);
        }
        Ok(())
    }

    fn stop(mut self) {
        let _ = self.up.close_send();
    }
}

/// Where the downward relay is in the sandbox's byte stream.
enum DownState {
    Head(Vec<u8>),
    Body(BodyDecoder),
    Raw,
}

/// Sandbox → client: each head rewritten, then the bytes as they come.
struct Downward {
    link: Arc<Link>,
    down: Box<dyn PortDown>,
    state: DownState,
    /// A final answer head went to the client.
    answered: bool,
    /// (HEAD, keeps alive) of the request whose answer comes next.
    current: Option<(bool, bool)>,
}

impl Downward {
    /// Answers the client in the proxy's own name (nothing of the sandbox's answer went).
    fn answer(&self, r: &Response) {
        let _ = write_all(
            &*self.link.io,
            &super::response::response_bytes(r, false),
            self.link.io_timeout,
        );
    }

    fn fail(&self, why: &str) {
        self.answer(&Response::error(502, "bad_gateway", why));
    }

    fn body_done(&mut self) {
        if matches!(&self.state, DownState::Body(d) if d.is_done()) {
            self.state = DownState::Head(Vec::new());
            self.link.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Writes one chunk of the sandbox's bytes to the client; false: the half is done.
    fn feed(&mut self, mut data: Bytes) -> bool {
        let link = self.link.clone();
        let io = &*link.io;
        let timeout = self.link.io_timeout;
        while !data.is_empty() {
            match &mut self.state {
                DownState::Raw => {
                    if write_all(io, &data, timeout).is_err() {
                        return false;
                    }
                    data = Bytes::new();
                }
                DownState::Body(dec) => {
                    let n = match body_take(dec, &data) {
                        Ok(n) => n,
                        Err(_) => {
                            // Not the framing it announced: pass the rest as it comes.
                            self.state = DownState::Raw;
                            continue;
                        }
                    };
                    if write_all(io, &data[..n], timeout).is_err() {
                        return false;
                    }
                    data = data.slice(n..);
                    self.body_done();
                    if n == 0 && matches!(self.state, DownState::Body(_)) {
                        break;
                    }
                }
                DownState::Head(head) => {
                    head.extend_from_slice(&data);
                    data = Bytes::new();
                    // Heads until a final one (1xx interim answers pass as they are, 101
                    // included as final: the bytes after it are the upgraded protocol's).
                    while let DownState::Head(head) = &mut self.state {
                        let (head_request, keep) = match self.current {
                            Some(c) => c,
                            None => {
                                let c = self.link.methods().pop_front().unwrap_or((false, false));
                                self.current = Some(c);
                                c
                            }
                        };
                        match parse_response_head(head, HEAD_MAX, head_request) {
                            Ok(Some((h, n))) => {
                                let interim = (100..200).contains(&h.status) && h.status != 101;
                                let keep = keep
                                    && !interim
                                    && h.status != 101
                                    && !h.close
                                    && h.framing != Framing::UntilClose;
                                let out = if interim {
                                    format!(
                                        "HTTP/1.1 {} {}\r\n\r\n",
                                        h.status,
                                        proto::http::reason(h.status)
                                    )
                                    .into_bytes()
                                } else {
                                    downstream_response(&h, keep)
                                };
                                if write_all(io, &out, timeout).is_err() {
                                    return false;
                                }
                                self.answered = true;
                                if interim {
                                    head.drain(..n);
                                    continue;
                                }
                                self.current = None;
                                data = Bytes::copy_from_slice(&head[n..]);
                                self.state = if keep {
                                    DownState::Body(BodyDecoder::new(h.framing))
                                } else {
                                    DownState::Raw
                                };
                                self.body_done();
                                break;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                self.fail(&format!(
                                    "the sandbox's server answered a malformed head: {e}"
                                ));
                                return false;
                            }
                        }
                    }
                }
            }
        }
        true
    }

    /// Runs until the half is done or parks (it comes back here when woken).
    fn run(mut self) {
        let park = self.link.park.clone();
        let running = park.running();
        loop {
            let chunk = match self.down.recv_within(PROXY_PARK_AFTER) {
                Ok(Some(Some(c))) => c,
                Ok(Some(None)) => {
                    if !self.answered {
                        self.fail("the sandbox's server closed the connection without an answer");
                    }
                    break;
                }
                Ok(None) => {
                    // Quiet: wait off-thread until the stream has something.
                    match park.park_woken(self, |d, w| d.down.park(w), Downward::run) {
                        Ok(_) => return,
                        Err(back) => {
                            self = back;
                            continue;
                        }
                    }
                }
                Err(e) => {
                    if !self.answered {
                        // The agent's refusal of the open (the request went with it) keeps
                        // its meaning: 429 for a budget, 502 when nothing listens.
                        self.answer(&refusal(&e));
                    }
                    break;
                }
            };
            self.link.touch();
            if !self.feed(chunk) {
                break;
            }
        }
        drop(running);
        let link = self.link.clone();
        link.done.store(true, Ordering::SeqCst);
        // The answer is complete: end our direction and give the client's last bytes (if
        // any) and its close a moment to arrive, so nothing it has not read yet is lost to
        // a reset; the upward half ends then, and with it the connection.
        link.io.shutdown_write();
        if let Some(t) = *link.up_parked() {
            link.park.hurry(t, Instant::now() + LINGER_TIMEOUT);
        }
        drop(self);
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

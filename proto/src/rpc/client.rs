//! The blocking client: open a connection, say hello, then make calls from any thread.
//!
//! There is no background thread: the thread waiting for a reply reads the socket itself
//! (other waiters sleep on a condvar until it hands over), so a lone caller pays no thread
//! hop. The exception is a parked stream ([`StreamReceiver::park`]): while one is parked
//! and no call waits, a pump thread of the connection's own reads for it. A connection the
//! server closed while idle is noticed before the next call starts.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use prost::Message;

use super::conn::{Conn, Limits, Side, Wake};
use super::transport::{SocketTransport, Transport};
use crate::frame::Kind;
use crate::gen::wrenn::wire::v1::{CredentialKind, Hello, HelloAck};
use crate::limits::{
    CONN_WINDOW_DEFAULT, FRAME_LEN_MAX_CEILING, FRAME_LEN_MAX_DEFAULT, FRAME_LEN_MAX_FLOOR,
    HELLO_TIMEOUT, STREAM_WINDOW_DEFAULT,
};
use crate::status::{Code, Status};

/// The credential a client presents in its hello.
#[derive(Clone, Debug)]
pub struct Credential {
    pub kind: CredentialKind,
    pub secret: String,
}

impl Credential {
    pub fn none() -> Credential {
        Credential {
            kind: CredentialKind::None,
            secret: String::new(),
        }
    }
    pub fn api_key(s: impl Into<String>) -> Credential {
        Credential {
            kind: CredentialKind::ApiKey,
            secret: s.into(),
        }
    }
    pub fn host_token(s: impl Into<String>) -> Credential {
        Credential {
            kind: CredentialKind::HostToken,
            secret: s.into(),
        }
    }
    pub fn agent_token(s: impl Into<String>) -> Credential {
        Credential {
            kind: CredentialKind::AgentToken,
            secret: s.into(),
        }
    }
    pub fn access_token(s: impl Into<String>) -> Credential {
        Credential {
            kind: CredentialKind::AccessToken,
            secret: s.into(),
        }
    }
}

/// Client settings; `Default` gives the protocol defaults.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Name sent in the hello, e.g. `wrenn-cli/0.1.0`.
    pub name: String,
    pub connect_timeout: Duration,
    pub hello_timeout: Duration,
    pub frame_len_max: u32,
    pub stream_window: u32,
    pub conn_window: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            name: format!("wrenn-proto/{}", env!("CARGO_PKG_VERSION")),
            connect_timeout: Duration::from_secs(10),
            hello_timeout: HELLO_TIMEOUT,
            frame_len_max: FRAME_LEN_MAX_DEFAULT,
            stream_window: STREAM_WINDOW_DEFAULT,
            conn_window: CONN_WINDOW_DEFAULT,
        }
    }
}

/// Options of one call.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallOpts {
    /// Deadline for the whole call; sent to the server, which enforces it too.
    pub timeout: Option<Duration>,
    /// The request message is the only one: half-close at once (server-streaming calls).
    pub end_stream: bool,
}

/// A connection to a server. Cheap to clone; usable from many threads at once.
#[derive(Clone)]
pub struct Client {
    conn: Arc<Conn>,
    server: Arc<HelloAck>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.server.server)
            .finish()
    }
}

impl Client {
    /// Connects to a Unix socket and says hello.
    pub fn connect_unix(path: impl AsRef<Path>, cred: Credential) -> Result<Client, Status> {
        let path = path.as_ref();
        let sock = UnixStream::connect(path)
            .map_err(|e| Status::unavailable(format!("connect {}: {e}", path.display())))?;
        Client::from_stream(sock.into(), cred, &ClientConfig::default())
    }

    /// Connects over TCP (TCP_NODELAY on) and says hello.
    pub fn connect_tcp(addr: impl ToSocketAddrs, cred: Credential) -> Result<Client, Status> {
        Client::connect_tcp_with(addr, cred, &ClientConfig::default())
    }

    pub fn connect_tcp_with(
        addr: impl ToSocketAddrs,
        cred: Credential,
        cfg: &ClientConfig,
    ) -> Result<Client, Status> {
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| Status::invalid_argument(format!("bad address: {e}")))?
            .collect();
        let mut last = Status::invalid_argument("address resolved to nothing");
        for a in addrs {
            match TcpStream::connect_timeout(&a, cfg.connect_timeout) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Client::from_stream(s.into(), cred, cfg);
                }
                Err(e) => last = Status::unavailable(format!("connect {a}: {e}")),
            }
        }
        Err(last)
    }

    /// Says hello over an already connected stream socket (TCP, Unix, or vsock; its kind is
    /// read from the socket).
    pub fn from_stream(
        fd: OwnedFd,
        cred: Credential,
        cfg: &ClientConfig,
    ) -> Result<Client, Status> {
        Client::from_transport(Box::new(SocketTransport::new(fd)), cred, cfg)
    }

    /// Says hello over any transport (e.g. [`SocketTransport::hybrid_vsock`]).
    pub fn from_transport(
        io: Box<dyn Transport>,
        cred: Credential,
        cfg: &ClientConfig,
    ) -> Result<Client, Status> {
        super::check_announced_limits(cfg.frame_len_max, cfg.stream_window, cfg.conn_window)?;
        // Until the server answers, assume the protocol defaults for what we may send.
        let provisional = Limits {
            recv_frame_len_max: cfg.frame_len_max,
            recv_stream_window: cfg.stream_window,
            recv_conn_window: cfg.conn_window,
            send_frame_len_max: FRAME_LEN_MAX_FLOOR,
            send_stream_window: STREAM_WINDOW_DEFAULT,
            send_conn_window: CONN_WINDOW_DEFAULT,
            max_streams: 0,
        };
        let conn = Conn::new(io, Side::Client, provisional)
            .map_err(|e| Status::unavailable(format!("set up socket: {e}")))?;
        let hello = Hello {
            version: crate::PROTOCOL_VERSION,
            credential_kind: cred.kind as i32,
            credential: cred.secret,
            client: cfg.name.clone(),
            frame_len_max: cfg.frame_len_max,
            stream_window: cfg.stream_window,
            conn_window: cfg.conn_window,
        };
        {
            let mut st = conn.lock();
            conn.send_raw(&mut st, Kind::Hello, &hello.encode_to_vec());
            if let Some(d) = Conn::dead(&st) {
                return Err(d.clone());
            }
        }
        let body = conn.read_hello_ack(Instant::now() + cfg.hello_timeout)?;
        let ack = HelloAck::decode(&body[..])
            .map_err(|e| Status::invalid_argument(format!("protocol error: bad HELLO_ACK: {e}")))?;
        if ack.version != crate::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "server speaks protocol version {}, we speak {}",
                ack.version,
                crate::PROTOCOL_VERSION
            )));
        }
        super::check_announced_limits(ack.frame_len_max, ack.stream_window, ack.conn_window)
            .map_err(|s| Status::invalid_argument(format!("HELLO_ACK: {}", s.message)))?;
        let limits = Limits {
            send_frame_len_max: send_frame_limit(ack.frame_len_max, ack.stream_window),
            send_stream_window: nonzero(ack.stream_window, STREAM_WINDOW_DEFAULT),
            send_conn_window: nonzero(ack.conn_window, CONN_WINDOW_DEFAULT),
            max_streams: ack.max_streams,
            ..provisional
        };
        // Rebuild the connection with the negotiated limits, keeping the socket and any
        // bytes already read after the HELLO_ACK.
        let conn = conn.renegotiate(limits);
        Ok(Client {
            conn: Arc::new(conn),
            server: Arc::new(ack),
        })
    }

    /// What the server said about itself in its hello answer.
    pub fn server_info(&self) -> &HelloAck {
        &self.server
    }

    /// Whether the connection is known to be unusable (closed, failed, or going away).
    pub fn is_closed(&self) -> bool {
        let st = self.conn.lock();
        Conn::dead(&st).is_some() || st.goaway
    }

    /// A unary call: one request, one response.
    pub fn unary<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp, Status> {
        let mut s = self.call(
            method,
            req,
            CallOpts {
                timeout,
                end_stream: true,
            },
        )?;
        match s.recv::<Resp>()? {
            Some(resp) => Ok(resp),
            None => Err(Status::internal(format!(
                "{method}: the server sent no response"
            ))),
        }
    }

    /// Opens a call of any shape. The request is the first message; more may follow with
    /// [`ClientStream::send`] unless `opts.end_stream` is set.
    pub fn call<Req: Message>(
        &self,
        method: &str,
        req: &Req,
        opts: CallOpts,
    ) -> Result<ClientStream, Status> {
        self.call_bytes(method, &req.encode_to_vec(), opts)
    }

    /// Opens a call whose first message is already encoded (forwarding).
    pub fn call_bytes(
        &self,
        method: &str,
        body: &[u8],
        opts: CallOpts,
    ) -> Result<ClientStream, Status> {
        self.conn.poll_idle();
        let deadline = opts.timeout.map(|t| Instant::now() + t);
        let timeout_ms = opts
            .timeout
            .map(|t| t.as_millis().clamp(1, u32::MAX as u128) as u32)
            .unwrap_or(0);
        let id = {
            let mut st = self.conn.lock();
            self.conn
                .open_stream(&mut st, method, timeout_ms, opts.end_stream, body)?
        };
        Ok(ClientStream {
            conn: self.conn.clone(),
            id,
            deadline,
            method: method.to_owned(),
            finished: false,
        })
    }

    /// Closes the connection now: GOAWAY, then the socket is shut down; calls still open
    /// on it fail with `unavailable` (the server's handlers see the cancellation).
    pub fn close(&self) {
        let mut st = self.conn.lock();
        self.conn.send_goaway(&mut st, Code::Ok, "client closing");
        self.conn.kill(
            &mut st,
            Status::unavailable("connection closed by this client"),
        );
    }
}

/// What we may send to a peer that announced `frame_len_max` and `stream_window`: at most
/// three quarters of its window per frame (see limits.rs).
pub(crate) fn send_frame_limit(frame_len_max: u32, stream_window: u32) -> u32 {
    clamp_frame(frame_len_max)
        .min((nonzero(stream_window, STREAM_WINDOW_DEFAULT) / 4).saturating_mul(3))
}

fn clamp_frame(v: u32) -> u32 {
    if v == 0 {
        FRAME_LEN_MAX_DEFAULT
    } else {
        v.clamp(FRAME_LEN_MAX_FLOOR, FRAME_LEN_MAX_CEILING)
    }
}

fn nonzero(v: u32, default: u32) -> u32 {
    if v == 0 {
        default
    } else {
        v
    }
}

pub(crate) fn negotiated_window(v: u32, default: u32) -> u32 {
    nonzero(v, default)
}

/// One call in progress on the client side. Dropping it before the server finished
/// cancels the call.
pub struct ClientStream {
    conn: Arc<Conn>,
    id: u32,
    deadline: Option<Instant>,
    method: String,
    finished: bool,
}

impl std::fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStream")
            .field("id", &self.id)
            .field("method", &self.method)
            .finish()
    }
}

impl ClientStream {
    /// Sends one more message; blocks while the server's window is exhausted.
    pub fn send<M: Message>(&mut self, msg: &M) -> Result<(), Status> {
        let len = msg.encoded_len();
        self.conn
            .send_data(self.id, len, false, self.deadline, true, |out| {
                // Encoding into a Vec cannot fail: it grows as needed.
                let _ = msg.encode(out);
            })
            .map(|_| ())
    }

    /// Sends `msg` with its bytes field `tag` set to `payload`, without copying the payload.
    /// `msg` must leave that field empty.
    pub fn send_payload<M: Message>(
        &mut self,
        msg: &M,
        tag: u32,
        payload: Bytes,
    ) -> Result<(), Status> {
        let prefix = super::payload_prefix(msg, tag, payload.len());
        self.conn
            .send_data_payload(self.id, &prefix, payload, false, self.deadline)
            .map(|_| ())
    }

    /// Sends one more message and half-closes in the same frame.
    pub fn send_last<M: Message>(&mut self, msg: &M) -> Result<(), Status> {
        let len = msg.encoded_len();
        self.conn
            .send_data(self.id, len, true, self.deadline, true, |out| {
                let _ = msg.encode(out);
            })
            .map(|_| ())
    }

    /// Sends an encoded message as is (forwarding); blocks like [`ClientStream::send`].
    pub fn send_bytes(&mut self, msg: Bytes) -> Result<(), Status> {
        self.conn
            .send_data_payload(self.id, &[], msg, false, self.deadline)
            .map(|_| ())
    }

    /// Largest message the server accepts in one DATA frame (its `frame_len_max` less the
    /// frame header).
    pub fn max_message_len(&self) -> usize {
        self.conn.max_data_len()
    }

    /// Whether the call already ended (its deadline passed, the peer cancelled it, or the
    /// connection died), without waiting.
    pub fn is_cancelled(&self) -> bool {
        let st = self.conn.lock();
        Conn::is_cancelled(&st, self.id)
    }

    /// Moves this call's local deadline (`None`: wait without one). A later `recv` past it
    /// fails `deadline_exceeded`; the server is not told (dropping the stream cancels it).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Half-closes: the server's `recv` returns `None` after the queued messages.
    pub fn close_send(&mut self) -> Result<(), Status> {
        let mut st = self.conn.lock();
        if let Some(d) = Conn::dead(&st) {
            return Err(d.clone());
        }
        self.conn.send_end(&mut st, self.id);
        Ok(())
    }

    /// Receives the next message; `Ok(None)` once the server finished successfully.
    pub fn recv<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        match self.recv_bytes()? {
            Some(b) => M::decode(b).map(Some).map_err(|e| {
                Status::internal(format!("{}: malformed response message: {e}", self.method))
            }),
            None => Ok(None),
        }
    }

    /// Receives the next message undecoded.
    pub fn recv_bytes(&mut self) -> Result<Option<Bytes>, Status> {
        if self.finished {
            return Ok(None);
        }
        let id = self.id;
        let conn = self.conn.clone();
        let r = conn
            .wait(self.deadline, |st| conn.take_message(st, id))
            .map(|(_, m)| m);
        match r {
            Ok(Some(msg)) => Ok(Some(msg)),
            Ok(None) => {
                self.finished = true;
                Ok(None)
            }
            Err(e) => {
                self.finished = true;
                Err(e)
            }
        }
    }

    /// Splits the stream so one thread can send while another receives (bidi proxies).
    /// The call is cancelled once both halves are dropped before it finished.
    pub fn split(self) -> (StreamSender, StreamReceiver) {
        let shared = Arc::new(std::sync::Mutex::new(self));
        (StreamSender(shared.clone()), StreamReceiver(shared))
    }

    /// Cancels the call (the server's handler sees the cancellation).
    pub fn cancel(mut self) {
        self.release(true);
    }

    /// The stream id on the wire (for logs).
    pub fn id(&self) -> u32 {
        self.id
    }

    fn release(&mut self, cancel: bool) {
        let mut st = self.conn.lock();
        self.conn.release_stream(&mut st, self.id, cancel);
        self.finished = true;
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        let mut st = self.conn.lock();
        self.conn.release_stream(&mut st, self.id, true);
    }
}

/// The sending half of a split [`ClientStream`].
#[derive(Debug)]
pub struct StreamSender(Arc<std::sync::Mutex<ClientStream>>);
/// The receiving half of a split [`ClientStream`].
#[derive(Debug)]
pub struct StreamReceiver(Arc<std::sync::Mutex<ClientStream>>);

impl StreamSender {
    /// Sends one message (blocks under flow control, without blocking the receiver).
    pub fn send<M: Message>(&self, msg: &M) -> Result<(), Status> {
        let (conn, id, deadline) = self.parts();
        let len = msg.encoded_len();
        conn.send_data(id, len, false, deadline, true, |out| {
            let _ = msg.encode(out);
        })
        .map(|_| ())
    }

    /// Sends `msg` with its bytes field `tag` set to `payload`, without copying the payload.
    pub fn send_payload<M: Message>(
        &self,
        msg: &M,
        tag: u32,
        payload: Bytes,
    ) -> Result<(), Status> {
        let (conn, id, deadline) = self.parts();
        let prefix = super::payload_prefix(msg, tag, payload.len());
        conn.send_data_payload(id, &prefix, payload, false, deadline)
            .map(|_| ())
    }

    pub fn close_send(&self) -> Result<(), Status> {
        let (conn, id, _) = self.parts();
        let mut st = conn.lock();
        if let Some(d) = Conn::dead(&st) {
            return Err(d.clone());
        }
        conn.send_end(&mut st, id);
        Ok(())
    }

    /// Cancels the call for both halves (a relay whose other side went away). A receiver
    /// blocked in `recv` sees the call end at its next wake-up.
    pub fn cancel(&self) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !g.finished {
            g.release(true);
        }
    }

    fn parts(&self) -> (Arc<Conn>, u32, Option<Instant>) {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (g.conn.clone(), g.id, g.deadline)
    }
}

impl StreamReceiver {
    /// Receives the next message; `Ok(None)` once the server finished successfully.
    pub fn recv<M: Message + Default>(&self) -> Result<Option<M>, Status> {
        // Without a wait of its own the call's deadline is the only bound: never "quiet".
        Ok(self.recv_until(None)?.flatten())
    }

    /// Receives the next message if one comes within `wait`: `Ok(None)` when none did (the
    /// stream stays open), `Ok(Some(None))` at the stream's end.
    pub fn recv_within<M: Message + Default>(
        &self,
        wait: Duration,
    ) -> Result<Option<Option<M>>, Status> {
        self.recv_until(Some(Instant::now() + wait))
    }

    /// Waits until the next message, the stream's end, the call's deadline or `until`
    /// (then `Ok(None)`).
    fn recv_until<M: Message + Default>(
        &self,
        until: Option<Instant>,
    ) -> Result<Option<Option<M>>, Status> {
        // Receiving holds only this half's view; the sender never takes this lock while
        // blocked, so both directions proceed at once.
        let (conn, id, own, method) = {
            let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
            (g.conn.clone(), g.id, g.deadline, g.method.clone())
        };
        let deadline = match (own, until) {
            (Some(o), Some(u)) => Some(o.min(u)),
            (o, u) => o.or(u),
        };
        let r = conn
            .wait(deadline, |st| conn.take_message(st, id))
            .map(|(_, m)| m);
        match r {
            Ok(Some(b)) => M::decode(b).map(|m| Some(Some(m))).map_err(|e| {
                Status::internal(format!("{method}: malformed response message: {e}"))
            }),
            Ok(None) => {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).finished = true;
                Ok(Some(None))
            }
            Err(e)
                if until.is_some()
                    && e.code == Code::DeadlineExceeded
                    && own.is_none_or(|o| Instant::now() < o) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs `wake` once the stream has something to receive (a message, its end or
    /// error, the connection's death), so the receiving thread can do something else
    /// meanwhile; `Err(wake)` when it has something now (receive it). A pump thread of
    /// the connection reads for parked streams while no call does.
    pub fn park(&self, wake: Wake) -> Result<(), Wake> {
        let (conn, id) = {
            let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if g.finished {
                return Err(wake);
            }
            (g.conn.clone(), g.id)
        };
        conn.park(id, wake)
    }
}

//! The connection core shared by clients and servers: stream table, flow-control windows,
//! the outbound buffer, and frame processing.
//!
//! One `Conn` is shared (`Arc`) by every thread that uses the connection. All state sits
//! behind one mutex; one condvar wakes threads waiting for messages, credit or death.
//!
//! Reading is done by exactly one thread at a time: on a server, the event-loop thread; on a
//! client, whichever waiting thread takes the reader role (leader/follower, so a lone caller
//! reads its own reply without a thread hop). Writing is done by whoever has a frame to
//! send, under the lock, straight to the non-blocking socket; what the socket does not take
//! stays in the outbound buffer until the reader side sees the socket writable again.
//!
//! Architecture invariant: bytes buffered per connection are bounded. Received messages are
//! bounded by the windows we advertise (a peer exceeding them is a protocol error), sent
//! messages by the windows the peer grants (senders block), and control frames by
//! `CONTROL_QUEUE_LEN_MAX` (a peer that makes us exceed it is closed).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::bytes::{Bytes, BytesMut};

use super::transport::{ReadMode, Transport};
use crate::frame::{self, Decoded, Kind, FLAG_END_STREAM};
use crate::limits::{
    CONTROL_QUEUE_LEN_MAX, FRAME_HEADER_LEN, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT,
    LENGTH_PREFIX_LEN, OUT_HIGH_WATER, READER_TICK, READ_CHUNK_LEN,
};
use crate::status::{Code, Status};

/// Which side of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

/// Receive and send limits in force on a connection after the hello.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Largest frame we accept (length field).
    pub recv_frame_len_max: u32,
    /// Our per-stream and per-connection receive windows.
    pub recv_stream_window: u32,
    pub recv_conn_window: u32,
    /// Largest frame the peer accepts.
    pub send_frame_len_max: u32,
    /// The peer's windows: our initial send credit.
    pub send_stream_window: u32,
    pub send_conn_window: u32,
    /// Streams open at once (server-enforced).
    pub max_streams: u32,
}

/// A message received on a stream, with the window cost to credit back once consumed.
struct Msg {
    /// A slice of the read buffer: no copy between the socket and the decoder.
    bytes: Bytes,
    cost: u32,
}

#[derive(Default)]
struct Stream {
    queue: VecDeque<Msg>,
    /// The peer sends nothing more (END_STREAM flag, END frame).
    peer_done: bool,
    /// Terminal error from the peer (ERROR frame) or a local cancellation.
    error: Option<Status>,
    /// The peer cancelled this stream (server side).
    cancelled: bool,
    /// We sent END/ERROR/CANCEL: nothing more may be sent.
    local_done: bool,
    send_window: i64,
    credit_pending: u32,
    /// Server side: when the call's deadline passes.
    deadline: Option<Instant>,
    /// Run once the stream has something to receive ([`Conn::park`]).
    wake: Option<Wake>,
}

/// What a parked stream runs when it has something to receive. It runs under the
/// connection's lock: it must not block or touch the connection (it queues work elsewhere).
pub type Wake = Box<dyn FnOnce() + Send>;

pub(crate) struct State {
    out: Vec<u8>,
    out_pos: usize,
    /// Whole segments queued ahead of `out` (large payloads sent without copying, and the
    /// part of `out` that preceded them).
    segs: VecDeque<Bytes>,
    segs_len: usize,
    /// Bytes of flow-controlled frames currently in `out` (the rest are control frames).
    out_data: usize,
    streams: HashMap<u32, Stream, BuildHasherDefault<IdHasher>>,
    /// Highest stream id opened so far (client: allocated, server: seen).
    last_stream: u32,
    conn_send_window: i64,
    conn_credit_pending: u32,
    /// Set once the connection is unusable; every waiter returns this.
    dead: Option<Status>,
    /// GOAWAY sent or received: no new streams.
    pub goaway: bool,
    /// A client thread is currently doing the reading.
    reader_busy: bool,
    pub last_rx: Instant,
    /// Threads sleeping on the condvar.
    waiters: usize,
    ping_sent: Option<Instant>,
    /// The transport holds bytes of its own not yet on the wire.
    io_pending: bool,
    /// Streams parked with a [`Wake`], and whether a pump thread reads for them.
    parked: usize,
    pump: bool,
}

pub(crate) struct Conn {
    /// The byte stream: frame handling never learns what carries it.
    pub io: Box<dyn Transport>,
    pub side: Side,
    pub limits: Limits,
    state: Mutex<State>,
    cv: Condvar,
    /// Client only: the reader's buffer (touched only by the thread holding the reader role).
    rbuf: Mutex<RecvBuf>,
}

/// A read buffer that grows only as bytes arrive. Frames are split off it as `Bytes`, so
/// message bodies are never copied between the socket and the decoder.
pub(crate) struct RecvBuf {
    buf: BytesMut,
}

impl RecvBuf {
    pub fn new() -> RecvBuf {
        RecvBuf {
            buf: BytesMut::new(),
        }
    }

    /// Reads once from `sock` (non-blocking). Returns bytes read (0 at EOF) and whether
    /// the read filled all the room it had (more may be waiting).
    pub fn read_from(&mut self, io: &dyn Transport, block: bool) -> io::Result<(usize, bool)> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK_LEN / 4 {
            self.buf.reserve(READ_CHUNK_LEN);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = io.read_into(&mut self.buf, block)?;
        Ok((n, n == room))
    }

    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Splits the first `n` bytes off as an immutable buffer.
    pub fn take(&mut self, n: usize) -> Bytes {
        assert!(n <= self.buf.len());
        self.buf.split_to(n).freeze()
    }

    /// Releases memory of an idle connection.
    pub fn shrink(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 4 * READ_CHUNK_LEN {
            self.buf = BytesMut::new();
        }
    }
}

/// A call opened by the peer (server side), handed to the service.
pub(crate) struct NewCall {
    pub stream: u32,
    pub method: String,
    pub message: Bytes,
}

/// What processing a batch of frames produced that must be acted on outside the lock.
#[derive(Default)]
pub(crate) struct Events {
    pub calls: Vec<NewCall>,
    /// Bytes of a HELLO or HELLO_ACK body (first frame of a connection).
    pub hello: Option<Bytes>,
    pub hello_ack: Option<Bytes>,
}

/// A protocol fault by the peer (a reused stream id, a frame for a stream never opened, a
/// window overflow, a misplaced frame): the peer's error, so `invalid_argument`, never
/// `internal` (issue 12 item 14). Exceeding flow-control credit is `resource_exhausted`.
fn proto_err(msg: impl Into<String>) -> Status {
    Status::new(
        Code::InvalidArgument,
        format!("protocol error: {}", msg.into()),
    )
}

impl Conn {
    pub fn new(io: Box<dyn Transport>, side: Side, limits: Limits) -> io::Result<Conn> {
        // A server socket is non-blocking (the event loop). A client socket blocks, with a
        // receive timeout: its reader sleeps inside recv itself, one system call fewer than
        // poll + recv on every reply. Every write passes MSG_DONTWAIT, so writers never
        // block under the lock on either side.
        io.set_read_mode(match side {
            Side::Server => ReadMode::NonBlocking,
            Side::Client => ReadMode::Blocking { tick: READER_TICK },
        })?;
        Ok(Conn {
            io,
            side,
            limits,
            state: Mutex::new(State {
                out: Vec::new(),
                out_pos: 0,
                segs: VecDeque::new(),
                segs_len: 0,
                out_data: 0,
                streams: HashMap::default(),
                last_stream: 0,
                conn_send_window: limits.send_conn_window as i64,
                conn_credit_pending: 0,
                dead: None,
                goaway: false,
                reader_busy: false,
                last_rx: Instant::now(),
                waiters: 0,
                ping_sent: None,
                io_pending: false,
                parked: 0,
                pump: false,
            }),
            cv: Condvar::new(),
            rbuf: Mutex::new(RecvBuf::new()),
        })
    }

    /// Client: applies the limits the server announced in its HELLO_ACK.
    pub fn renegotiate(mut self, limits: Limits) -> Conn {
        self.limits = limits;
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.conn_send_window = limits.send_conn_window as i64;
        self
    }

    /// Wakes threads sleeping on the condvar, if any (a futex wake is a system call: the
    /// hot path skips it when nobody waits).
    fn wake_waiters(&self, st: &State) {
        if st.waiters > 0 {
            self.cv.notify_all();
        }
    }

    /// Wakes every thread waiting on the connection (one of them has a condition of its own
    /// that changed); the caller holds the lock, so no waiter misses it.
    pub fn wake_all(&self, st: &State) {
        self.wake_waiters(st);
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state for shutdown paths;
        // recover the guard instead of propagating the poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- writing -------------------------------------------------------------------

    /// Writes as much of the outbound buffer as the socket takes. Marks the connection dead
    /// on a write error.
    pub fn flush(&self, st: &mut State) {
        while Self::has_queued(st) {
            let sent = if st.segs.is_empty() {
                self.io.write(&st.out[st.out_pos..])
            } else {
                let mut iov: [io::IoSlice<'_>; IOV_MAX] = [io::IoSlice::new(&[]); IOV_MAX];
                let mut n = 0;
                for s in st.segs.iter().take(IOV_MAX - 1) {
                    iov[n] = io::IoSlice::new(s);
                    n += 1;
                }
                if n < IOV_MAX - 1 || st.segs.len() == n {
                    iov[n] = io::IoSlice::new(&st.out[st.out_pos..]);
                    n += 1;
                }
                self.io.write_vectored(&iov[..n])
            };
            match sent {
                Ok(0) => {
                    self.kill(st, Status::unavailable("connection closed while writing"));
                    return;
                }
                Ok(n) => {
                    Self::consume_output(st, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.kill(st, Status::unavailable(format!("write failed: {e}")));
                    return;
                }
            }
        }
        // Bytes the transport buffered itself (TLS records) count as pending output.
        match self.io.flush() {
            Ok(pending) => st.io_pending = pending,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => st.io_pending = true,
            Err(e) => {
                self.kill(st, Status::unavailable(format!("write failed: {e}")));
                return;
            }
        }
        if !Self::has_queued(st) {
            st.out.clear();
            st.out_pos = 0;
            st.out_data = 0;
            if st.out.capacity() > 4 * READ_CHUNK_LEN {
                st.out.shrink_to(READ_CHUNK_LEN);
            }
        } else if st.out_pos > READ_CHUNK_LEN {
            st.out.drain(..st.out_pos);
            st.out_pos = 0;
        }
        // Senders held back by the high-water mark may go on.
        if Self::pending_output(st) < OUT_HIGH_WATER {
            self.wake_waiters(st);
        }
    }

    /// Bytes queued for the socket.
    pub fn pending_output(st: &State) -> usize {
        st.segs_len + st.out.len() - st.out_pos
    }

    /// Drops `n` written bytes from the front of the queue (segments first, then `out`).
    fn consume_output(st: &mut State, mut n: usize) {
        while n > 0 {
            let Some(front) = st.segs.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                st.segs_len -= front.len();
                st.segs.pop_front();
            } else {
                prost::bytes::Buf::advance(front, n);
                st.segs_len -= n;
                n = 0;
            }
        }
        st.out_pos += n;
        assert!(st.out_pos <= st.out.len());
    }

    /// Queues `payload` as its own segment after what is already queued, without copying.
    fn push_segment(st: &mut State, payload: Bytes) {
        if st.out_pos < st.out.len() {
            let tail = Bytes::from(std::mem::take(&mut st.out)).slice(st.out_pos..);
            st.segs_len += tail.len();
            st.segs.push_back(tail);
        } else {
            st.out.clear();
        }
        st.out_pos = 0;
        st.segs_len += payload.len();
        st.segs.push_back(payload);
    }

    /// Client: flushes from the calling thread until the socket took everything (a client
    /// has no event loop to do it later).
    fn flush_blocking<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> Result<MutexGuard<'a, State>, Status> {
        while Self::has_pending_output(&st) {
            if let Some(d) = &st.dead {
                return Err(d.clone());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Status::deadline_exceeded("deadline exceeded while sending"));
            }
            let mut tick = READER_TICK;
            if let Some(d) = deadline {
                tick = tick.min(d.saturating_duration_since(Instant::now()));
            }
            if st.reader_busy {
                // Another thread reads (and answers what arrives); this one only waits for
                // room. A readable socket can make this poll return at once until that
                // reader has taken the bytes: a short wait, not a spin.
                drop(st);
                let _ = self.io.poll(true, tick);
                st = self.lock();
                self.flush(&mut st);
            } else {
                // Nobody reads: this thread does, while it waits for room. A poll that
                // reported the peer's unread bytes (a PING, window updates) without taking
                // them would return at once forever, burning a core for as long as the peer
                // does not read (seen with a stalled guest: 52k poll+send pairs per 0.3 s).
                st.reader_busy = true;
                drop(st);
                let io = self.poll_once(true, tick);
                st = self.lock();
                st.reader_busy = false;
                self.after_poll(&mut st, io);
                self.wake_waiters(&st);
            }
        }
        Ok(st)
    }

    /// Bytes of ours queued for the transport.
    fn has_queued(st: &State) -> bool {
        st.segs_len > 0 || st.out_pos < st.out.len()
    }

    pub fn has_pending_output(st: &State) -> bool {
        st.segs_len > 0 || st.out_pos < st.out.len() || st.io_pending
    }

    /// Appends a control frame and flushes; a peer that lets control frames pile up is
    /// closed rather than buffered without bound.
    fn control(&self, st: &mut State, build: impl FnOnce(&mut Vec<u8>)) {
        if st.dead.is_some() {
            return;
        }
        build(&mut st.out);
        let pending = Self::pending_output(st);
        let control_bytes = pending - st.out_data.min(pending);
        if control_bytes > CONTROL_QUEUE_LEN_MAX {
            self.kill(
                st,
                Status::resource_exhausted("peer does not read its control frames"),
            );
            return;
        }
        self.flush(st);
    }

    /// Marks the connection dead, fails every stream, wakes every waiter, and shuts the
    /// socket down so the peer sees the end even while threads still hold the `Conn`.
    pub fn kill(&self, st: &mut State, status: Status) {
        if st.dead.is_some() {
            return;
        }
        st.dead = Some(status);
        for s in st.streams.values_mut() {
            if let Some(w) = s.wake.take() {
                w();
            }
        }
        st.parked = 0;
        st.streams.clear();
        self.io.shutdown();
        self.wake_waiters(st);
    }

    /// Sends a connection error (ERROR on stream 0) and kills the connection.
    pub fn fail_connection(&self, st: &mut State, status: Status) {
        if st.dead.is_none() {
            frame::put_error(&mut st.out, 0, status.code, &status.message);
            self.flush(st);
        }
        self.kill(st, status);
    }

    pub fn dead(st: &State) -> Option<&Status> {
        st.dead.as_ref()
    }

    /// Appends a hello-phase frame (HELLO / HELLO_ACK) without flow control.
    pub fn send_raw(&self, st: &mut State, kind: Kind, body: &[u8]) {
        frame::put_frame(&mut st.out, 0, kind, 0, body);
        self.flush(st);
    }

    pub fn send_goaway(&self, st: &mut State, code: Code, msg: &str) {
        st.goaway = true;
        let last = st.last_stream;
        self.control(st, |out| frame::put_goaway(out, last, code, msg));
    }

    pub fn send_ping(&self, st: &mut State) {
        st.ping_sent = Some(Instant::now());
        self.control(st, |out| frame::put_frame(out, 0, Kind::Ping, 0, &[0; 8]));
    }

    // ---- streams -------------------------------------------------------------------

    /// Client: allocates a stream id and sends REQUEST. `message` is the encoded request.
    pub fn open_stream(
        &self,
        st: &mut State,
        method: &str,
        timeout_ms: u32,
        end_stream: bool,
        message: &[u8],
    ) -> Result<u32, Status> {
        if let Some(d) = &st.dead {
            return Err(d.clone());
        }
        if st.goaway {
            return Err(Status::unavailable("connection is closing (goaway)"));
        }
        if method.is_empty()
            || method.len() > crate::limits::METHOD_LEN_MAX
            || !method.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Status::invalid_argument(format!(
                "bad method name {method:?}"
            )));
        }
        let id = st
            .last_stream
            .checked_add(1)
            .ok_or_else(|| Status::resource_exhausted("stream ids exhausted on this connection"))?;
        let cost = (FRAME_HEADER_LEN + 1 + method.len() + 4 + message.len()) as u32;
        if cost > self.limits.send_frame_len_max {
            return Err(Status::invalid_argument(format!(
                "request of {} bytes exceeds the peer's frame limit {}",
                message.len(),
                self.limits.send_frame_len_max
            )));
        }
        st.last_stream = id;
        // A REQUEST counts against the connection window only; the stream's window
        // starts full once the stream exists.
        let s = Stream {
            send_window: self.limits.send_stream_window as i64,
            local_done: end_stream,
            ..Stream::default()
        };
        st.conn_send_window -= cost as i64;
        st.streams.insert(id, s);
        let flags = if end_stream { FLAG_END_STREAM } else { 0 };
        frame::put_request(&mut st.out, id, flags, method, timeout_ms, message);
        st.out_data += cost as usize + LENGTH_PREFIX_LEN;
        self.flush(st);
        Ok(id)
    }

    /// Server: registers a stream opened by the peer.
    fn accept_stream(&self, st: &mut State, id: u32, peer_done: bool, timeout_ms: u32) {
        let deadline =
            (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms as u64));
        st.streams.insert(
            id,
            Stream {
                peer_done,
                send_window: self.limits.send_stream_window as i64,
                deadline,
                ..Stream::default()
            },
        );
    }

    /// Waits until the stream and the connection have the frame's cost in credit, then
    /// appends the DATA frame produced by `encode` (which must write exactly `body_len`
    /// bytes). With `block == false` it returns `Ok(false)` instead of waiting.
    pub fn send_data(
        &self,
        id: u32,
        body_len: usize,
        end_stream: bool,
        deadline: Option<Instant>,
        block: bool,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<bool, Status> {
        self.send_data_with(id, body_len, end_stream, deadline, block, |st| {
            encode(&mut st.out)
        })
    }

    /// Largest message body the peer accepts in one DATA frame.
    pub fn max_data_len(&self) -> usize {
        (self.limits.send_frame_len_max as usize).saturating_sub(FRAME_HEADER_LEN)
    }

    /// Like [`Conn::send_data`] for a message whose last field is a large byte payload:
    /// `prefix` is the encoded message up to the payload's length varint; the payload is
    /// queued as its own segment and written with `writev`, never copied.
    pub fn send_data_payload(
        &self,
        id: u32,
        prefix: &[u8],
        payload: Bytes,
        end_stream: bool,
        deadline: Option<Instant>,
    ) -> Result<bool, Status> {
        let len = prefix.len() + payload.len();
        self.send_data_with(id, len, end_stream, deadline, true, |st| {
            st.out.extend_from_slice(prefix);
            if payload.len() >= ZERO_COPY_MIN {
                Self::push_segment(st, payload);
            } else {
                st.out.extend_from_slice(&payload);
            }
        })
    }

    fn send_data_with(
        &self,
        id: u32,
        body_len: usize,
        end_stream: bool,
        deadline: Option<Instant>,
        block: bool,
        emit: impl FnOnce(&mut State),
    ) -> Result<bool, Status> {
        let cost = (FRAME_HEADER_LEN + body_len) as u32;
        if cost > self.limits.send_frame_len_max {
            return Err(Status::invalid_argument(format!(
                "message of {body_len} bytes exceeds the peer's frame limit {}",
                self.limits.send_frame_len_max
            )));
        }
        let ready = |st: &mut State| -> Result<Option<()>, Status> {
            let conn_window = st.conn_send_window;
            let s = st
                .streams
                .get(&id)
                .ok_or_else(|| st.dead.clone().unwrap_or_else(closed_stream))?;
            if let Some(e) = &s.error {
                return Err(e.clone());
            }
            if s.cancelled {
                return Err(Status::cancelled("the peer cancelled the call"));
            }
            if s.local_done {
                return Err(Status::failed_precondition(
                    "send after the stream was closed",
                ));
            }
            // A server's senders also wait while the socket is backed up, so the outbound
            // buffer stays near the high-water mark instead of growing to the windows.
            let backed_up = self.side == Side::Server && Self::pending_output(st) >= OUT_HIGH_WATER;
            Ok(
                (s.send_window >= cost as i64 && conn_window >= cost as i64 && !backed_up)
                    .then_some(()),
            )
        };
        let mut st = if block {
            self.wait(deadline, ready)?.0
        } else {
            let mut st = self.lock();
            if ready(&mut st)?.is_none() {
                return Ok(false);
            }
            st
        };
        let s = st.streams.get_mut(&id).ok_or_else(closed_stream)?;
        s.send_window -= cost as i64;
        if end_stream {
            s.local_done = true;
        }
        st.conn_send_window -= cost as i64;
        let flags = if end_stream { FLAG_END_STREAM } else { 0 };
        let before = Self::pending_output(&st);
        frame::put_header(&mut st.out, id, Kind::Data, flags, body_len);
        emit(&mut st);
        assert_eq!(
            Self::pending_output(&st) - before,
            LENGTH_PREFIX_LEN + cost as usize,
            "encoded length"
        );
        st.out_data += LENGTH_PREFIX_LEN + cost as usize;
        self.flush(&mut st);
        if self.side == Side::Client && block {
            drop(self.flush_blocking(st, deadline)?);
        }
        Ok(true)
    }

    /// Sends END (half-close without a message; on a server: success) on a stream.
    pub fn send_end(&self, st: &mut State, id: u32) {
        if let Some(s) = st.streams.get_mut(&id) {
            if !s.local_done {
                s.local_done = true;
                self.control(st, |out| frame::put_frame(out, id, Kind::End, 0, &[]));
            }
        }
    }

    /// Sends ERROR on a stream (server: the call failed).
    pub fn send_error(&self, st: &mut State, id: u32, status: &Status) {
        if let Some(s) = st.streams.get_mut(&id) {
            if !s.local_done {
                s.local_done = true;
                self.control(st, |out| {
                    frame::put_error(out, id, status.code, &status.message)
                });
            }
        }
    }

    /// Client: cancels a stream and forgets it; server: forgets a finished stream.
    /// Queued messages are dropped and their connection credit returned.
    pub fn release_stream(&self, st: &mut State, id: u32, send_cancel: bool) {
        let Some(mut s) = st.streams.remove(&id) else {
            return;
        };
        if let Some(w) = s.wake.take() {
            st.parked -= 1;
            w();
        }
        let dropped: u32 = s.queue.iter().map(|m| m.cost).sum();
        let peer_finished = s.error.is_some() || (self.side == Side::Client && s.peer_done);
        if send_cancel && !peer_finished && st.dead.is_none() {
            self.control(st, |out| frame::put_frame(out, id, Kind::Cancel, 0, &[]));
        }
        if dropped > 0 {
            self.credit_conn(st, dropped, true);
        }
    }

    fn credit_conn(&self, st: &mut State, n: u32, force: bool) {
        st.conn_credit_pending = st.conn_credit_pending.saturating_add(n);
        let pending = st.conn_credit_pending;
        if pending > 0 && (force || pending >= self.limits.recv_conn_window / 4) {
            st.conn_credit_pending = 0;
            self.control(st, |out| frame::put_window(out, 0, pending));
        }
    }

    /// Pops the next message of a stream, crediting its cost back. `Ok(None)` means the
    /// peer finished cleanly and the queue is empty; `Err` is the peer's or the
    /// connection's error.
    pub fn take_message(&self, st: &mut State, id: u32) -> Result<Option<Option<Bytes>>, Status> {
        let dead = st.dead.clone();
        let Some(s) = st.streams.get_mut(&id) else {
            return Err(dead.unwrap_or_else(closed_stream));
        };
        if let Some(m) = s.queue.pop_front() {
            s.credit_pending += m.cost;
            let pending = s.credit_pending;
            // Credit back in quarters of the window: few WINDOW frames, and no deadlock as
            // long as a frame costs at most three quarters of the window (see limits.rs):
            // a blocked sender has nothing in flight, so the receiver, having consumed
            // everything, holds more than a quarter of pending credit.
            let send_stream_credit =
                !s.peer_done && s.error.is_none() && pending >= self.limits.recv_stream_window / 4;
            if send_stream_credit {
                s.credit_pending = 0;
                self.control(st, |out| frame::put_window(out, id, pending));
            }
            self.credit_conn(st, m.cost, false);
            return Ok(Some(Some(m.bytes)));
        }
        if let Some(e) = &s.error {
            return Err(e.clone());
        }
        if s.cancelled {
            return Err(Status::cancelled("the peer cancelled the call"));
        }
        if s.peer_done {
            return Ok(Some(None));
        }
        if let Some(d) = dead {
            return Err(d);
        }
        Ok(None)
    }

    pub fn is_cancelled(st: &State, id: u32) -> bool {
        st.dead.is_some()
            || st
                .streams
                .get(&id)
                .is_none_or(|s| s.cancelled || s.error.is_some())
    }

    pub fn stream_count(st: &State) -> usize {
        st.streams.len()
    }

    /// Server: fails calls whose deadline passed. Returns how many expired.
    pub fn expire_deadlines(&self, st: &mut State, now: Instant) -> usize {
        let expired: Vec<u32> = st
            .streams
            .iter()
            .filter(|(_, s)| s.deadline.is_some_and(|d| d <= now) && s.error.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            let status = Status::deadline_exceeded("the call's deadline passed");
            self.send_error(st, *id, &status);
            if let Some(s) = st.streams.get_mut(id) {
                s.error = Some(status);
                s.deadline = None;
            }
            Self::fire(st, *id);
        }
        if !expired.is_empty() {
            self.wake_waiters(st);
        }
        expired.len()
    }

    // ---- reading -------------------------------------------------------------------

    /// Processes every complete frame in `rbuf`. Stops at the first connection error,
    /// which it reports by killing the connection.
    pub fn process(&self, st: &mut State, rbuf: &mut RecvBuf, ev: &mut Events) {
        st.last_rx = Instant::now();
        st.ping_sent = None;
        loop {
            if st.dead.is_some() {
                return;
            }
            let decoded = match frame::decode(rbuf.pending(), self.limits.recv_frame_len_max) {
                Ok(d) => d,
                Err(e) => {
                    self.fail_connection(st, super::server::frame_error_status(&e));
                    return;
                }
            };
            match decoded {
                Decoded::Incomplete { .. } => return,
                Decoded::Skip(n) => drop(rbuf.take(n)),
                Decoded::Frame(f, n) => {
                    let (stream, kind, flags) = (f.stream, f.kind, f.flags);
                    let whole = rbuf.take(n);
                    let body_at = LENGTH_PREFIX_LEN + FRAME_HEADER_LEN;
                    let f = frame::Frame {
                        stream,
                        kind,
                        flags,
                        body: &whole[body_at..],
                    };
                    if let Err(status) = self.on_frame(st, &f, &whole, ev) {
                        self.fail_connection(st, status);
                        return;
                    }
                }
            }
        }
    }

    fn on_frame(
        &self,
        st: &mut State,
        f: &frame::Frame<'_>,
        whole: &Bytes,
        ev: &mut Events,
    ) -> Result<(), Status> {
        let cost = (FRAME_HEADER_LEN + f.body.len()) as u32;
        let body_at = LENGTH_PREFIX_LEN + FRAME_HEADER_LEN;
        match f.kind {
            Kind::Hello => {
                if self.side != Side::Server || ev.hello.is_some() {
                    return Err(proto_err("unexpected HELLO"));
                }
                ev.hello = Some(whole.slice(body_at..));
            }
            Kind::HelloAck => {
                if self.side != Side::Client || ev.hello_ack.is_some() {
                    return Err(proto_err("unexpected HELLO_ACK"));
                }
                ev.hello_ack = Some(whole.slice(body_at..));
            }
            Kind::Ping => {
                let body = f.body.to_vec();
                self.control(st, |out| frame::put_frame(out, 0, Kind::Pong, 0, &body));
            }
            Kind::Pong => {}
            Kind::GoAway => {
                let (_, code, msg) = frame::parse_goaway(f.body);
                st.goaway = true;
                if st.streams.is_empty() && self.side == Side::Client {
                    self.kill(
                        st,
                        Status::new(Code::Unavailable, format!("peer went away: {code}: {msg}")),
                    );
                }
            }
            Kind::Window => {
                let inc = frame::window_increment(f.body) as i64;
                if f.stream == 0 {
                    st.conn_send_window += inc;
                    if st.conn_send_window > u32::MAX as i64 * 2 {
                        return Err(proto_err("connection window overflow"));
                    }
                } else if let Some(s) = st.streams.get_mut(&f.stream) {
                    s.send_window += inc;
                    if s.send_window > u32::MAX as i64 * 2 {
                        return Err(proto_err("stream window overflow"));
                    }
                }
                self.wake_waiters(st);
            }
            Kind::Request => {
                if self.side != Side::Server {
                    return Err(proto_err("REQUEST sent to a client"));
                }
                if f.stream <= st.last_stream {
                    return Err(proto_err(format!(
                        "stream id {} reused or decreasing",
                        f.stream
                    )));
                }
                st.last_stream = f.stream;
                self.take_conn_credit(st, cost)?;
                let req = frame::parse_request(f.body).map_err(proto_err)?;
                if st.goaway {
                    self.credit_conn(st, cost, false);
                    let status = Status::unavailable("server is shutting down");
                    self.control(st, |out| {
                        frame::put_error(out, f.stream, status.code, &status.message)
                    });
                    return Ok(());
                }
                if st.streams.len() >= self.limits.max_streams as usize {
                    self.credit_conn(st, cost, false);
                    let status = Status::resource_exhausted(format!(
                        "too many concurrent streams (limit {})",
                        self.limits.max_streams
                    ));
                    self.control(st, |out| {
                        frame::put_error(out, f.stream, status.code, &status.message)
                    });
                    return Ok(());
                }
                let end = f.flags & FLAG_END_STREAM != 0;
                self.accept_stream(st, f.stream, end, req.timeout_ms);
                // The request message is handed to the call at once: credit it now.
                self.credit_conn(st, cost, false);
                ev.calls.push(NewCall {
                    stream: f.stream,
                    method: req.method.to_owned(),
                    message: whole.slice(whole.len() - req.message.len()..),
                });
            }
            Kind::Data => {
                self.take_conn_credit(st, cost)?;
                let known = self.check_stream_id(st, f.stream)?;
                let dead_stream = !known
                    || st
                        .streams
                        .get(&f.stream)
                        .is_some_and(|s| s.cancelled || s.error.is_some());
                if dead_stream {
                    // A stream we already finished: discard, return the connection credit.
                    self.credit_conn(st, cost, false);
                    return Ok(());
                }
                let Some(s) = st.streams.get_mut(&f.stream) else {
                    return Ok(());
                };
                if s.peer_done {
                    return Err(proto_err(format!("DATA after end of stream {}", f.stream)));
                }
                let window_used: u32 =
                    s.queue.iter().map(|m| m.cost).sum::<u32>() + s.credit_pending;
                if window_used + cost > self.limits.recv_stream_window {
                    return Err(Status::resource_exhausted(format!(
                        "protocol error: stream {} exceeded its flow-control window",
                        f.stream
                    )));
                }
                s.queue.push_back(Msg {
                    bytes: whole.slice(body_at..),
                    cost,
                });
                if f.flags & FLAG_END_STREAM != 0 {
                    s.peer_done = true;
                }
                self.wake_waiters(st);
                Self::fire(st, f.stream);
            }
            Kind::End => {
                if self.check_stream_id(st, f.stream)? {
                    if let Some(s) = st.streams.get_mut(&f.stream) {
                        s.peer_done = true;
                    }
                    self.wake_waiters(st);
                    Self::fire(st, f.stream);
                }
            }
            Kind::Error => {
                let (code, msg) = frame::parse_error(f.body).map_err(proto_err)?;
                if f.stream == 0 {
                    self.kill(st, Status::new(code, msg));
                    return Ok(());
                }
                if self.check_stream_id(st, f.stream)? {
                    if let Some(s) = st.streams.get_mut(&f.stream) {
                        s.error = Some(Status::new(code, msg));
                        s.local_done = true;
                    }
                    self.wake_waiters(st);
                    Self::fire(st, f.stream);
                }
            }
            Kind::Cancel => {
                if self.check_stream_id(st, f.stream)? {
                    if let Some(s) = st.streams.get_mut(&f.stream) {
                        s.cancelled = true;
                        let dropped: u32 = s.queue.drain(..).map(|m| m.cost).sum();
                        self.credit_conn(st, dropped, false);
                    }
                    self.wake_waiters(st);
                    Self::fire(st, f.stream);
                }
            }
        }
        Ok(())
    }

    fn take_conn_credit(&self, st: &mut State, cost: u32) -> Result<(), Status> {
        // Bytes the peer may have in flight: our window minus what it has been credited
        // back is tracked implicitly: queued + pending credit across streams must fit.
        let queued: u64 = st
            .streams
            .values()
            .map(|s| s.queue.iter().map(|m| m.cost as u64).sum::<u64>())
            .sum::<u64>()
            + st.conn_credit_pending as u64;
        if queued + cost as u64 > self.limits.recv_conn_window as u64 {
            return Err(Status::resource_exhausted(
                "protocol error: connection flow-control window exceeded",
            ));
        }
        Ok(())
    }

    /// Whether a frame's stream is one we know; ids never opened are a protocol error,
    /// ids of finished streams are ignored.
    fn check_stream_id(&self, st: &State, id: u32) -> Result<bool, Status> {
        if st.streams.contains_key(&id) {
            return Ok(true);
        }
        if id <= st.last_stream {
            return Ok(false);
        }
        Err(proto_err(format!(
            "frame for stream {id} that was never opened"
        )))
    }

    // ---- waiting -------------------------------------------------------------------

    /// Waits until `ready` returns `Ok(Some(_))`, driving the socket when this is a client
    /// connection and no other thread is reading. Returns the guard with the result.
    pub fn wait<R>(
        &self,
        deadline: Option<Instant>,
        mut ready: impl FnMut(&mut State) -> Result<Option<R>, Status>,
    ) -> Result<(MutexGuard<'_, State>, R), Status> {
        let mut st = self.lock();
        loop {
            if let Some(r) = ready(&mut st)? {
                return Ok((st, r));
            }
            if let Some(d) = &st.dead {
                return Err(d.clone());
            }
            let mut tick = KEEPALIVE_INTERVAL;
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    return Err(Status::deadline_exceeded("deadline exceeded"));
                }
                tick = tick.min(d - now);
            }
            if self.side == Side::Client && !st.reader_busy {
                st = self.read_turn(st, tick);
            } else {
                st.waiters += 1;
                st = self
                    .cv
                    .wait_timeout(st, tick)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                st.waiters -= 1;
            }
        }
    }

    /// Client: one turn as the reader (the caller saw nobody else reading): waits up to
    /// `timeout` for bytes, reads them, processes the frames, wakes the waiters.
    fn read_turn<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        st.reader_busy = true;
        let want_write = Self::has_pending_output(&st);
        drop(st);
        let io = self.poll_once(want_write, timeout);
        let mut st = self.lock();
        st.reader_busy = false;
        self.after_poll(&mut st, io);
        self.wake_waiters(&st);
        st
    }

    /// Client reader: waits for bytes (inside recv, or in poll when output is pending),
    /// then reads what is there.
    fn poll_once(&self, want_write: bool, timeout: Duration) -> PollResult {
        let mut res = PollResult::default();
        let mut block = true;
        if want_write || timeout.is_zero() {
            let (readable, writable) = match self.io.poll(want_write, timeout.min(READER_TICK)) {
                Ok(r) => r,
                Err(e) => {
                    return PollResult {
                        error: Some(e),
                        ..Default::default()
                    }
                }
            };
            res.writable = writable;
            if !readable {
                return res;
            }
            block = false;
        }
        let mut rbuf = self.rbuf.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match rbuf.read_from(self.io.as_ref(), block) {
                Ok((0, _)) => {
                    res.eof = true;
                    break;
                }
                Ok((_, filled)) => {
                    res.got = true;
                    block = false;
                    // A short read drained the socket; a full one may have left more,
                    // but stop at one frame's worth so the lock is not starved.
                    let max = self.limits.recv_frame_len_max as usize;
                    if !filled || rbuf.pending().len() >= max {
                        break;
                    }
                }
                // The receive timeout (or nothing there on a non-blocking read).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    res.error = Some(e);
                    break;
                }
            }
        }
        res
    }

    fn after_poll(&self, st: &mut State, io: PollResult) {
        {
            let mut rbuf = self.rbuf.lock().unwrap_or_else(|e| e.into_inner());
            let mut ev = Events::default();
            self.process(st, &mut rbuf, &mut ev);
            if ev.hello_ack.is_some() {
                self.fail_connection(st, proto_err("second HELLO_ACK"));
            }
        }
        if io.writable || Self::has_pending_output(st) {
            self.flush(st);
        }
        if let Some(e) = io.error {
            self.kill(st, Status::unavailable(format!("connection failed: {e}")));
        } else if io.eof {
            self.kill(st, Status::unavailable("connection closed by peer"));
        }
        self.keepalive(st, Instant::now());
    }

    /// Sends a PING after a quiet interval and declares the peer dead after a long silence
    /// while streams are open.
    pub fn keepalive(&self, st: &mut State, now: Instant) {
        if st.dead.is_some() {
            return;
        }
        let quiet = now.saturating_duration_since(st.last_rx);
        if quiet >= KEEPALIVE_TIMEOUT && !st.streams.is_empty() {
            self.kill(
                st,
                Status::unavailable("peer stopped answering (keepalive timeout)"),
            );
        } else if quiet >= KEEPALIVE_INTERVAL && st.ping_sent.is_none() {
            self.send_ping(st);
        }
    }

    /// Client: reads the hello answer synchronously during connect.
    pub fn read_hello_ack(&self, deadline: Instant) -> Result<Bytes, Status> {
        let mut rbuf = self.rbuf.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Ok(Decoded::Frame(f, n)) =
                frame::decode(rbuf.pending(), self.limits.recv_frame_len_max)
            {
                let kind = f.kind;
                let stream = f.stream;
                let body = rbuf.take(n).slice(LENGTH_PREFIX_LEN + FRAME_HEADER_LEN..);
                return match kind {
                    Kind::HelloAck => Ok(body),
                    Kind::Error if stream == 0 => {
                        let (code, msg) = frame::parse_error(&body).map_err(proto_err)?;
                        Err(Status::new(code, msg))
                    }
                    k => Err(proto_err(format!("expected HELLO_ACK, got {k:?}"))),
                };
            }
            // A TLS alert or handshake record (content type 21 or 22, version 3.x): the
            // length prefix of a frame never starts with these bytes within its limits.
            if let [0x15 | 0x16, 0x03, ..] = rbuf.pending() {
                return Err(Status::unavailable(
                    "server speaks TLS: connect with TLS (ALPN wrenn/1, PROTOCOL.md §0)",
                ));
            }
            if let Err(e) = frame::decode(rbuf.pending(), self.limits.recv_frame_len_max) {
                return Err(proto_err(format!("bad hello answer: {e}")));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Status::deadline_exceeded("no hello answer from the server"));
            }
            // Blocks up to the receive timeout, then the deadline is checked again.
            match rbuf.read_from(self.io.as_ref(), true) {
                Ok((0, _)) => return Err(Status::unavailable("connection closed during hello")),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Status::unavailable(format!("read during hello: {e}"))),
            }
        }
    }

    /// Runs `wake` once stream `id` has something to receive (a message, its end, an error,
    /// a cancellation, its deadline, the connection's death), so its receiver can give up
    /// its thread meanwhile. A server's event loop reads anyway; on a client, while streams
    /// are parked and no call waits on the connection, a pump thread of the connection's
    /// own does the reading (keepalives answered, bytes for every stream taken in); it
    /// exits when none is parked. `Err(wake)`: the stream has something now (receive it),
    /// or no pump could start.
    pub fn park(self: &Arc<Self>, id: u32, wake: Wake) -> Result<(), Wake> {
        let mut st = self.lock();
        if st.dead.is_some() {
            return Err(wake);
        }
        let Some(s) = st.streams.get_mut(&id) else {
            return Err(wake);
        };
        if !s.queue.is_empty() || s.peer_done || s.error.is_some() || s.cancelled {
            return Err(wake);
        }
        if s.wake.is_some() {
            return Err(wake);
        }
        if self.side == Side::Client && !st.pump {
            // It takes the lock only after this returns, and then finds the stream parked.
            let conn = self.clone();
            let spawned = std::thread::Builder::new()
                .name("rpc-pump".into())
                .spawn(move || conn.pump());
            if spawned.is_err() {
                return Err(wake);
            }
            st.pump = true;
        }
        if let Some(s) = st.streams.get_mut(&id) {
            s.wake = Some(wake);
        }
        st.parked += 1;
        Ok(())
    }

    /// Takes back a stream's [`Wake`] that has not run (the stream is resumed by other
    /// means); whether one was there.
    pub fn unpark(&self, id: u32) -> bool {
        let mut st = self.lock();
        let w = st.streams.get_mut(&id).and_then(|s| s.wake.take());
        if w.is_some() {
            st.parked -= 1;
        }
        w.is_some()
    }

    fn fire(st: &mut State, id: u32) {
        if let Some(w) = st.streams.get_mut(&id).and_then(|s| s.wake.take()) {
            st.parked -= 1;
            w();
        }
    }

    /// The reader of last resort for parked streams: reads while nobody else does.
    fn pump(self: Arc<Self>) {
        let mut st = self.lock();
        loop {
            if st.dead.is_some() || st.parked == 0 {
                st.pump = false;
                return;
            }
            if !st.reader_busy && st.waiters == 0 {
                st = self.read_turn(st, KEEPALIVE_INTERVAL);
            } else {
                // A call is reading, or about to: it takes the parked streams' bytes in too.
                st = self
                    .cv
                    .wait_timeout(st, READER_TICK)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }

    /// Client: a cheap check, before opening a stream, that the server has not closed an
    /// idle connection meanwhile (reads whatever is already there, never blocks).
    pub fn poll_idle(&self) {
        let st = self.lock();
        // One clock read: the connection was in use recently if it received lately.
        let quiet = st.last_rx.elapsed() < crate::limits::IDLE_CHECK;
        if st.reader_busy || st.dead.is_some() || quiet {
            return;
        }
        drop(self.read_turn(st, Duration::ZERO));
    }
}

#[derive(Default)]
struct PollResult {
    got: bool,
    eof: bool,
    writable: bool,
    error: Option<io::Error>,
}

/// Hashes stream ids: small integers chosen by the peer, but a stream table holds at most
/// `max_streams` entries, so collision attacks have nothing to grow; SipHash's cost buys
/// nothing here.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ *b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (v as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Payloads at least this large are queued as segments instead of copied.
const ZERO_COPY_MIN: usize = 16 * 1024;
/// Segments per writev.
const IOV_MAX: usize = 64;

fn closed_stream() -> Status {
    Status::cancelled("the stream is closed")
}

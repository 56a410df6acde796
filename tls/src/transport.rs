//! One TLS connection as a [`Transport`]: rustls' unbuffered (sans-I/O) connection behind a
//! mutex, the socket beside it.
//!
//! Reading (one reader at a time, per the trait): received bytes go straight from the
//! socket into our own buffer (`State::inbuf`, a non-blocking receive under the state
//! lock; a blocking reader waits for readiness with `poll` outside the lock, so writers
//! never wait for it). rustls decrypts each record in place there and hands out its
//! plaintext, which is copied into the frame layer's buffer (what does not fit waits in
//! `State::plain`). Handshake messages that processing produced go out at once. A read
//! returns fewer bytes than the buffer's room only after the socket said `WouldBlock` (or
//! end of stream) in that same call, so an edge-triggered event loop that stops at a short
//! read never strands bytes in the kernel or in rustls.
//!
//! Why our own buffer and not rustls' buffered `Connection`: its `read_tls` copies records
//! into rustls' deframer buffer and each decrypted record is then copied into a fresh
//! 16 KiB `Vec` that glibc's heap places right behind that buffer, so every such copy ran at
//! destination − source ≡ 11 (mod 4096). On AMD Zen hosts glibc's `rep movsb` (bug 30994)
//! is ~20x slower in exactly that window, which held TLS streams to ~0.3x of plaintext.
//! Here the record lies in our buffer wherever the stream put it (consecutive full records
//! are 16,406 bytes apart, so the distance moves by 22 per record), and our own copy of
//! plaintext goes in pieces below glibc's `rep movsb` threshold when it would land in the
//! slow window ([`extend_plain`]). One copy fewer, too (no `read_tls`).
//!
//! Writing: plaintext is encrypted into records in `State::out` (at most
//! [`SEND_BUFFERED_MAX`] held), then sent until the socket would block; a full queue answers
//! `WouldBlock` so the frame layer keeps the bytes in its own bounded queue.
//! [`Transport::flush`] moves held records on writable readiness. Plaintext written before
//! the handshake allows application data waits in `State::early` (same bound).
//!
//! A peer that does not speak TLS is told so rather than left waiting: a server answers a
//! first byte that cannot open a ClientHello with `plaintext_reply` (a wrenn ERROR frame on
//! the protobuf ports), a client that gets a non-TLS answer reports "server does not speak
//! TLS" with whatever plaintext error the server sent.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::rpc::{Bytes, BytesMut, ReadMode, SocketTransport, Source, Transport};
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedStatus, WriteTraffic,
};

use crate::limits::{
    PLAINTEXT_COPY_PIECE, RAW_READ_CHUNK, SEND_BUFFERED_MAX, SLOW_COPY_WINDOW_MAX,
};

/// Which end of the handshake this is.
enum Role {
    /// `plaintext_reply` is sent to a peer whose first byte cannot open a TLS ClientHello.
    Server {
        plaintext_reply: Option<Arc<[u8]>>,
    },
    Client,
}

enum Conn {
    Client(UnbufferedClientConnection),
    Server(UnbufferedServerConnection),
}

impl Conn {
    fn common(&self) -> &rustls::CommonState {
        match self {
            Conn::Client(c) => c,
            Conn::Server(c) => c,
        }
    }
}

struct State {
    conn: Conn,
    /// TLS bytes received and not yet processed: after a pass, at most one partial record
    /// (or complete ones a reader had no room for), plus at most one receive.
    inbuf: BytesMut,
    /// Decrypted bytes a read had no room for (at most one record from a reader; a writer
    /// that must process records first keeps what `inbuf` held).
    plain: BytesMut,
    /// TLS bytes to send; the first `sent` of them are sent.
    out: Vec<u8>,
    sent: usize,
    /// Plaintext written before application data may be sent.
    early: BytesMut,
    /// Nothing received from the peer yet (the first bytes are checked for TLS).
    first: bool,
    /// The peer sent close_notify.
    closed: bool,
    /// The peer closed (close_notify or end of stream) and no more plaintext is held.
    eof: bool,
    /// Why the connection is unusable; every later read and write returns it.
    failed: Option<String>,
}

impl State {
    fn out_pending(&self) -> usize {
        self.out.len() - self.sent
    }
}

/// What one pass over rustls' states does besides processing records.
struct Drive<'a, 'b> {
    /// The reader's buffer and the room left in it; plaintext beyond goes to `State::plain`.
    dst: Option<(&'a mut BytesMut, usize)>,
    /// Plaintext to encrypt once application data may be sent, and how much of it was.
    send: &'a [IoSlice<'b>],
    sent: usize,
    close_notify: bool,
    /// rustls allowed application data to be written in this pass.
    writable: bool,
}

impl Drive<'_, '_> {
    fn idle() -> Drive<'static, 'static> {
        Drive {
            dst: None,
            send: &[],
            sent: 0,
            close_notify: false,
            writable: false,
        }
    }
}

enum Step {
    /// Call rustls again.
    More,
    /// Nothing more to do without more bytes from the peer.
    Stop,
}

/// Appends `src` to `dst`. glibc (before 2.39) copies this much with `rep movsb`, which on
/// AMD Zen runs ~20x slower when the destination is a few bytes past the source modulo
/// 4 KiB (glibc bug 30994); in that window the copy goes in pieces below glibc's
/// `rep movsb` threshold, which it copies with vector moves. Returns whether it did.
fn extend_plain(dst: &mut BytesMut, src: &[u8]) -> bool {
    dst.reserve(src.len());
    let to = dst.as_ptr() as usize + dst.len();
    let distance = to.wrapping_sub(src.as_ptr() as usize) % 4096;
    if src.len() > PLAINTEXT_COPY_PIECE && (1..=SLOW_COPY_WINDOW_MAX).contains(&distance) {
        for piece in src.chunks(PLAINTEXT_COPY_PIECE) {
            dst.extend_from_slice(piece);
        }
        true
    } else {
        dst.extend_from_slice(src);
        false
    }
}

/// Whether `b` starts with a whole TLS record.
fn has_record(b: &[u8]) -> bool {
    b.len() >= 5 && b.len() >= 5 + usize::from(u16::from_be_bytes([b[3], b[4]]))
}

/// Encrypts `data` onto `out`.
fn encrypt<Data>(
    w: &mut WriteTraffic<'_, Data>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let start = out.len();
    // Record overhead is at most a few dozen bytes per 16 KiB record; rustls says what it
    // needs when that guess is short.
    let mut need = data.len() + (data.len() / (16 * 1024) + 1) * 64;
    loop {
        out.resize(start + need, 0);
        match w.encrypt(data, &mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(s)) if s.required_size > need => {
                need = s.required_size;
            }
            Err(e) => {
                out.truncate(start);
                return Err(format!("TLS: {e}"));
            }
        }
    }
}

/// Handles one state rustls reached; returns the bytes to discard from the front of
/// `inbuf` and what to do next.
fn step<Data>(
    status: UnbufferedStatus<'_, '_, Data>,
    st: &mut Parts<'_>,
    d: &mut Drive<'_, '_>,
) -> (usize, Result<Step, String>) {
    let mut discard = status.discard;
    let state = match status.state {
        Ok(s) => s,
        Err(e) => return (discard, Err(format!("TLS: {e}"))),
    };
    let r = match state {
        ConnectionState::ReadTraffic(mut r) => {
            while let Some(rec) = r.next_record() {
                match rec {
                    Ok(rec) => {
                        discard += rec.discard;
                        let mut p = rec.payload;
                        if let Some((buf, room)) = &mut d.dst {
                            let k = p.len().min(*room);
                            let _ = extend_plain(buf, &p[..k]);
                            *room -= k;
                            p = &p[k..];
                        }
                        if !p.is_empty() {
                            let _ = extend_plain(st.plain, p);
                        }
                    }
                    Err(e) => return (discard, Err(format!("TLS: {e}"))),
                }
            }
            Ok(Step::More)
        }
        ConnectionState::EncodeTlsData(mut e) => {
            let start = st.out.len();
            let mut need = 4096;
            loop {
                st.out.resize(start + need, 0);
                match e.encode(&mut st.out[start..]) {
                    Ok(n) => {
                        st.out.truncate(start + n);
                        break Ok(Step::More);
                    }
                    Err(EncodeError::InsufficientSize(s)) if s.required_size > need => {
                        need = s.required_size;
                    }
                    Err(err) => {
                        st.out.truncate(start);
                        break Err(format!("TLS: {err}"));
                    }
                }
            }
        }
        // The encoded messages are in `out`, sent in order after this pass.
        ConnectionState::TransmitTlsData(t) => {
            t.done();
            Ok(Step::More)
        }
        ConnectionState::BlockedHandshake => Ok(Step::Stop),
        ConnectionState::WriteTraffic(mut w) => (|| {
            d.writable = true;
            if !st.early.is_empty() {
                encrypt(&mut w, st.early, st.out)?;
                st.early.clear();
            }
            for b in d.send {
                let room = SEND_BUFFERED_MAX.saturating_sub(st.out.len() - *st.sent);
                let take = b.len().min(room);
                if take > 0 {
                    encrypt(&mut w, &b[..take], st.out)?;
                    d.sent += take;
                }
                if take < b.len() {
                    break;
                }
            }
            d.send = &[];
            if d.close_notify {
                d.close_notify = false;
                let start = st.out.len();
                st.out.resize(start + 64, 0);
                match w.queue_close_notify(&mut st.out[start..]) {
                    Ok(n) => st.out.truncate(start + n),
                    Err(e) => {
                        st.out.truncate(start);
                        return Err(format!("TLS: {e}"));
                    }
                }
            }
            Ok(Step::Stop)
        })(),
        ConnectionState::PeerClosed => {
            *st.closed = true;
            Ok(Step::More)
        }
        ConnectionState::Closed => {
            *st.closed = true;
            Ok(Step::Stop)
        }
        // Our configurations accept no early data, so rustls yields none.
        ConnectionState::ReadEarlyData(_) => Err("TLS: unexpected early data".to_owned()),
        other => Err(format!("TLS: unexpected connection state {other:?}")),
    };
    (discard, r)
}

/// The parts of [`State`] a step writes to (the connection and `inbuf` are borrowed by
/// rustls' status meanwhile).
struct Parts<'a> {
    plain: &'a mut BytesMut,
    out: &'a mut Vec<u8>,
    sent: &'a usize,
    early: &'a mut BytesMut,
    closed: &'a mut bool,
}

/// Runs rustls over `inbuf` until it needs more bytes (or the reader's room is full).
fn drive(st: &mut State, d: &mut Drive<'_, '_>) -> Result<(), String> {
    loop {
        if let Some((_, 0)) = d.dst {
            return Ok(());
        }
        match step_once(st, d)? {
            Step::More => {}
            Step::Stop => return Ok(()),
        }
    }
}

/// One call of rustls' `process_tls_records` over `inbuf`, and its discard.
fn step_once(st: &mut State, d: &mut Drive<'_, '_>) -> Result<Step, String> {
    let State {
        conn,
        inbuf,
        plain,
        out,
        sent,
        early,
        closed,
        ..
    } = st;
    let mut parts = Parts {
        plain,
        out,
        sent,
        early,
        closed,
    };
    let (discard, r) = match conn {
        Conn::Client(c) => step(c.process_tls_records(&mut inbuf[..]), &mut parts, d),
        Conn::Server(c) => step(c.process_tls_records(&mut inbuf[..]), &mut parts, d),
    };
    let _ = inbuf.split_to(discard.min(inbuf.len()));
    r
}

/// A TLS connection over a [`SocketTransport`] (TCP).
pub struct TlsTransport {
    sock: SocketTransport,
    role: Role,
    st: Mutex<State>,
    /// The blocking reader's wait in nanoseconds ([`ReadMode::Blocking`]'s tick); 0 when
    /// the socket is non-blocking.
    tick_ns: AtomicU64,
}

impl std::fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTransport")
            .field("server", &matches!(self.role, Role::Server { .. }))
            .finish()
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl TlsTransport {
    pub(crate) fn new_server(
        sock: SocketTransport,
        conn: UnbufferedServerConnection,
        plaintext_reply: Option<Arc<[u8]>>,
    ) -> TlsTransport {
        TlsTransport::new(sock, Role::Server { plaintext_reply }, Conn::Server(conn))
    }

    pub(crate) fn new_client(
        sock: SocketTransport,
        conn: UnbufferedClientConnection,
    ) -> TlsTransport {
        let t = TlsTransport::new(sock, Role::Client, Conn::Client(conn));
        // The ClientHello goes out now; the socket is fresh, so it fits.
        let mut st = t.lock();
        if let Err(msg) = drive(&mut st, &mut Drive::idle()) {
            let _ = t.fail(&mut st, msg);
        }
        let _ = t.send_pending(&mut st);
        drop(st);
        t
    }

    fn new(sock: SocketTransport, role: Role, conn: Conn) -> TlsTransport {
        TlsTransport {
            sock,
            role,
            st: Mutex::new(State {
                conn,
                inbuf: BytesMut::new(),
                plain: BytesMut::new(),
                out: Vec::new(),
                sent: 0,
                early: BytesMut::new(),
                first: true,
                closed: false,
                eof: false,
                failed: None,
            }),
            tick_ns: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer's certificate chain, end entity first, once the handshake checked it.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.lock()
            .conn
            .common()
            .peer_certificates()
            .map(<[_]>::to_vec)
    }

    /// The ALPN protocol both sides agreed on.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.lock()
            .conn
            .common()
            .alpn_protocol()
            .map(<[u8]>::to_vec)
    }

    pub fn is_handshaking(&self) -> bool {
        self.lock().conn.common().is_handshaking()
    }

    /// Sends held records until the socket would block.
    fn send_pending(&self, st: &mut State) -> io::Result<()> {
        while st.sent < st.out.len() {
            match self.sock.write(&st.out[st.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => st.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if st.sent == st.out.len() {
            st.out.clear();
            st.sent = 0;
        } else if st.sent >= st.out.len() / 2 {
            st.out.drain(..st.sent);
            st.sent = 0;
        }
        Ok(())
    }

    fn fail(&self, st: &mut State, msg: String) -> io::Error {
        log::debug!("tls connection failed error={msg}");
        st.failed = Some(msg.clone());
        invalid(msg)
    }

    /// rustls failed: the alert it queued tells the peer why. rustls hands out queued
    /// messages before it looks at received bytes again, so this processes nothing more.
    fn fail_with_alert(&self, st: &mut State, msg: String) -> io::Error {
        for _ in 0..8 {
            if !st.conn.common().wants_write() {
                break;
            }
            if step_once(st, &mut Drive::idle()).is_err() {
                break;
            }
        }
        let _ = self.send_pending(st);
        self.fail(st, msg)
    }

    /// The first bytes the peer sent: are they TLS?
    fn check_first(&self, st: &mut State) -> io::Result<()> {
        st.first = false;
        let raw = &st.inbuf[..];
        match &self.role {
            Role::Server { plaintext_reply } if raw[0] != crate::RECORD_HANDSHAKE => {
                if let Some(reply) = plaintext_reply {
                    let _ = self.sock.write(reply);
                }
                Err(self.fail(
                    st,
                    "client does not speak TLS (it sent plaintext to a TLS port)".into(),
                ))
            }
            Role::Client if !crate::looks_like_tls(raw) => {
                let msg = describe_plaintext_answer(raw);
                Err(self.fail(st, msg))
            }
            _ => Ok(()),
        }
    }

    /// Queues close_notify (once the handshake allows it) and sends what it can.
    fn send_close_notify(&self) {
        let mut st = self.lock();
        if st.failed.is_none() && !st.conn.common().is_handshaking() {
            let mut d = Drive {
                close_notify: true,
                ..Drive::idle()
            };
            let _ = drive(&mut st, &mut d);
            let _ = self.send_pending(&mut st);
        }
    }

    /// Moves held plaintext into `buf`, at most `max` bytes.
    fn take_plain(st: &mut State, buf: &mut BytesMut, max: usize) -> usize {
        let k = st.plain.len().min(max);
        if k > 0 {
            let chunk = st.plain.split_to(k);
            let _ = extend_plain(buf, &chunk);
        }
        if st.plain.is_empty() && st.closed {
            st.eof = true;
        }
        k
    }
}

/// What to tell the user when a server answered a ClientHello with something else.
pub(crate) fn describe_plaintext_answer(raw: &[u8]) -> String {
    let base = "server does not speak TLS (a plaintext port? use TLS only where the server \
                has a certificate)";
    if let Ok(proto::frame::Decoded::Frame(f, n)) =
        proto::frame::decode(raw, proto::limits::FRAME_LEN_MAX_FLOOR)
    {
        if f.kind == proto::frame::Kind::Error {
            let body = &raw[proto::limits::LENGTH_PREFIX_LEN + proto::limits::FRAME_HEADER_LEN..n];
            if let Ok((_, msg)) = proto::frame::parse_error(body) {
                return format!("{base}; it answered: {msg}");
            }
        }
    }
    if raw.starts_with(b"HTTP/") {
        return format!("{base}; it answered in plain HTTP");
    }
    base.to_owned()
}

impl Transport for TlsTransport {
    fn read_into(&self, buf: &mut BytesMut, block: bool) -> io::Result<usize> {
        if buf.capacity() == buf.len() {
            buf.reserve(RAW_READ_CHUNK);
        }
        let room = buf.capacity() - buf.len();
        let mut got = 0;
        let mut waited = false;
        loop {
            let mut st = self.lock();
            if let Some(why) = &st.failed {
                return Err(invalid(why.clone()));
            }
            got += TlsTransport::take_plain(&mut st, buf, room - got);
            if got == room {
                return Ok(got);
            }
            if !st.inbuf.is_empty() && !st.closed {
                let mut d = Drive {
                    dst: Some((&mut *buf, room - got)),
                    ..Drive::idle()
                };
                let r = drive(&mut st, &mut d);
                let left = d.dst.map_or(0, |(_, left)| left);
                got = room - left;
                if let Err(msg) = r {
                    return Err(self.fail_with_alert(&mut st, msg));
                }
                self.send_pending(&mut st)?;
                if got == room {
                    return Ok(got);
                }
            }
            if st.closed {
                // Whatever follows close_notify is not read.
                st.inbuf.clear();
                st.eof = st.plain.is_empty();
            }
            if st.eof {
                return Ok(got);
            }
            if st.inbuf.capacity() - st.inbuf.len() < RAW_READ_CHUNK / 2 {
                st.inbuf.reserve(RAW_READ_CHUNK);
            }
            // Non-blocking under the lock: a blocking reader waits below without it.
            match self.sock.read_into(&mut st.inbuf, false) {
                Ok(0) => {
                    if st.first {
                        return Err(
                            self.fail(&mut st, "connection closed before the TLS handshake".into())
                        );
                    }
                    if st.conn.common().is_handshaking() {
                        // A server closes a connection mid-handshake when its budget of
                        // connections before their hello is full (or at its deadline).
                        return Err(self.fail(
                            &mut st,
                            "connection closed during the TLS handshake (the server may be \
                             over its budget of new connections; retry)"
                                .into(),
                        ));
                    }
                    st.eof = st.plain.is_empty();
                    return Ok(got);
                }
                Ok(_) => {
                    if st.first {
                        self.check_first(&mut st)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got > 0 {
                        return Ok(got);
                    }
                    let tick = self.tick_ns.load(Ordering::Relaxed);
                    if !block || waited || tick == 0 {
                        return Err(e);
                    }
                    drop(st);
                    // At most one wait (the reader's tick), as a blocking receive would.
                    waited = true;
                    if !self.sock.poll(false, Duration::from_nanos(tick))?.0 {
                        return Err(e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn write(&self, data: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(data)])
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(invalid(why.clone()));
        }
        self.send_pending(&mut st)?;
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        if st.out_pending() >= SEND_BUFFERED_MAX {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut d = Drive {
            send: bufs,
            ..Drive::idle()
        };
        if let Err(msg) = drive(&mut st, &mut d) {
            return Err(self.fail_with_alert(&mut st, msg));
        }
        let mut n = d.sent;
        let handshaking = st.conn.common().is_handshaking();
        if !d.writable && !handshaking {
            // Both sides sent close_notify: nothing more goes out.
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS connection closed (close_notify sent)",
            ));
        }
        if n == 0 && handshaking {
            // Application data may not go yet: it waits for the handshake, bounded.
            for b in bufs {
                let take = b
                    .len()
                    .min(SEND_BUFFERED_MAX.saturating_sub(st.early.len()));
                st.early.extend_from_slice(&b[..take]);
                n += take;
                if take < b.len() {
                    break;
                }
            }
        }
        self.send_pending(&mut st)?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&self) -> io::Result<bool> {
        let mut st = self.lock();
        self.send_pending(&mut st)?;
        Ok(st.out_pending() > 0)
    }

    fn poll(&self, want_write: bool, timeout: Duration) -> io::Result<(bool, bool)> {
        let want_write = {
            let st = self.lock();
            if !st.plain.is_empty()
                || st.eof
                || st.failed.is_some()
                || (!st.closed && has_record(&st.inbuf))
            {
                return Ok((true, st.out_pending() == 0));
            }
            want_write || st.out_pending() > 0
        };
        self.sock.poll(want_write, timeout)
    }

    fn set_read_mode(&self, mode: ReadMode) -> io::Result<()> {
        let tick = match mode {
            ReadMode::NonBlocking => 0,
            // A zero tick would mean "never wait"; a blocking reader waits at least 1 ns.
            ReadMode::Blocking { tick } => {
                u64::try_from(tick.as_nanos()).unwrap_or(u64::MAX).max(1)
            }
        };
        self.sock.set_read_mode(mode)?;
        self.tick_ns.store(tick, Ordering::Relaxed);
        Ok(())
    }

    fn shutdown(&self) {
        self.send_close_notify();
        self.sock.shutdown();
    }

    fn shutdown_write(&self) {
        self.send_close_notify();
        self.sock.shutdown_write();
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.sock.fd()
    }

    fn source(&self) -> Source {
        self.sock.source()
    }

    /// The client's end-entity certificate on a server whose configuration verified it
    /// (mutual TLS); the server's on a client.
    fn peer_certificate(&self) -> Option<Bytes> {
        let chain = self
            .lock()
            .conn
            .common()
            .peer_certificates()?
            .first()?
            .to_vec();
        Some(chain.into())
    }
}

/// A TLS client connection as a blocking `Read + Write`, each call waiting at most
/// `timeout` (HTTP clients: `wrenn up`'s health checks, tests). Writes return once the
/// records are on the socket.
pub struct BlockingStream {
    t: TlsTransport,
    timeout: Duration,
    /// Plaintext read beyond what the caller had room for.
    leftover: BytesMut,
}

impl std::fmt::Debug for BlockingStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockingStream")
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "TLS I/O timed out")
}

impl BlockingStream {
    pub fn new(t: TlsTransport, timeout: Duration) -> io::Result<BlockingStream> {
        t.set_read_mode(ReadMode::Blocking {
            tick: timeout.min(Duration::from_millis(100)),
        })?;
        Ok(BlockingStream {
            t,
            timeout,
            leftover: BytesMut::new(),
        })
    }

    pub fn transport(&self) -> &TlsTransport {
        &self.t
    }

    fn drain(&self, end: std::time::Instant) -> io::Result<()> {
        while self.t.flush()? {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            self.t.poll(true, left)?;
        }
        Ok(())
    }
}

impl Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if !self.leftover.is_empty() {
            let n = self.leftover.len().min(buf.len());
            buf[..n].copy_from_slice(&self.leftover.split_to(n));
            return Ok(n);
        }
        let end = std::time::Instant::now() + self.timeout;
        let mut b = BytesMut::with_capacity(buf.len());
        loop {
            match self.t.read_into(&mut b, true) {
                Ok(_) => {
                    let n = b.len().min(buf.len());
                    buf[..n].copy_from_slice(&b[..n]);
                    if b.len() > n {
                        self.leftover = b.split_off(n);
                    }
                    return Ok(n);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < end => {
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(timed_out()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for BlockingStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let end = std::time::Instant::now() + self.timeout;
        loop {
            match self.t.write(data) {
                Ok(n) => {
                    self.drain(end)?;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = end.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(timed_out());
                    }
                    self.t.poll(true, left)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain(std::time::Instant::now() + self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy whose destination lies `distance` bytes past its source modulo 4 KiB.
    fn copy_at(distance: usize, len: usize, dst_used: usize) -> (bool, BytesMut, Vec<u8>) {
        let mut dst = BytesMut::with_capacity(dst_used + len);
        dst.extend_from_slice(&vec![0xaa; dst_used]);
        let to = dst.as_ptr() as usize + dst.len();
        let backing: Vec<u8> = (0..len + 8192).map(|i| (i % 253) as u8).collect();
        // The offset into `backing` where the source must start: to − src ≡ distance.
        let base = backing.as_ptr() as usize;
        let off = (to.wrapping_sub(distance).wrapping_sub(base)) % 4096;
        let src = &backing[off..off + len];
        assert_eq!(
            to.wrapping_sub(src.as_ptr() as usize) % 4096,
            distance % 4096
        );
        let pieced = extend_plain(&mut dst, src);
        (pieced, dst, src.to_vec())
    }

    /// The copy of plaintext: in the slow window in pieces, elsewhere whole; always the
    /// same bytes, appended after what the buffer held.
    #[test]
    fn plaintext_copies_in_the_slow_window_go_in_pieces_and_stay_exact() {
        for (distance, len, pieced) in [
            (11, 16 * 1024, true),
            (1, 16 * 1024 + 7, true),
            (SLOW_COPY_WINDOW_MAX, 5000, true),
            (0, 16 * 1024, false),
            (SLOW_COPY_WINDOW_MAX + 1, 16 * 1024, false),
            (4095, 16 * 1024, false),
            // Small copies are never `rep movsb`: whole.
            (11, PLAINTEXT_COPY_PIECE, false),
        ] {
            for used in [0, 3, 100] {
                let (p, dst, src) = copy_at(distance, len, used);
                assert_eq!(p, pieced, "distance {distance} len {len}");
                assert!(dst[..used].iter().all(|&b| b == 0xaa));
                assert!(
                    dst[used..] == src[..],
                    "distance {distance} len {len} used {used}"
                );
            }
        }
    }

    #[test]
    fn a_whole_record_is_recognised_only_when_all_of_it_is_there() {
        assert!(!has_record(&[]));
        assert!(!has_record(&[0x17, 3, 3, 0]));
        assert!(has_record(&[0x17, 3, 3, 0, 0]));
        assert!(!has_record(&[0x17, 3, 3, 0, 2, 1]));
        assert!(has_record(&[0x17, 3, 3, 0, 2, 1, 2]));
        assert!(has_record(&[0x17, 3, 3, 0, 2, 1, 2, 0x17]));
    }
}

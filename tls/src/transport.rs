//! One TLS connection as a [`Transport`]: rustls' sans-I/O state behind a mutex, the socket
//! beside it.
//!
//! Reading (one reader at a time, per the trait): bytes are received from the socket
//! *outside* the state lock (a client's reader blocks in `recv` with its tick, and writers
//! must not wait for it), then fed to rustls under the lock with `read_tls` and
//! `process_new_packets`, and decrypted plaintext is copied into the frame layer's buffer.
//! Handshake messages that processing produced are sent at once with `write_tls`. A read
//! returns fewer bytes than the buffer's room only after the socket said `WouldBlock` (or
//! end of stream) in that same call, so an edge-triggered event loop that stops at a short
//! read never strands bytes in the kernel or in rustls.
//!
//! Writing: plaintext goes to rustls (which encrypts it into records, at most
//! [`SEND_BUFFERED_MAX`] held), then `write_tls` until the socket would block; a full rustls
//! buffer answers `WouldBlock` so the frame layer keeps the bytes in its own bounded queue.
//! [`Transport::flush`] moves held records on writable readiness.
//!
//! A peer that does not speak TLS is told so rather than left waiting: a server answers a
//! first byte that cannot open a ClientHello with `plaintext_reply` (a wrenn ERROR frame on
//! the protobuf ports), a client that gets a non-TLS answer reports "server does not speak
//! TLS" with whatever plaintext error the server sent.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::rpc::{Bytes, BytesMut, ReadMode, SocketTransport, Source, Transport};
use rustls::pki_types::CertificateDer;

use crate::limits::{PLAINTEXT_BUFFERED_MAX, RAW_READ_CHUNK, SEND_BUFFERED_MAX};

/// Which end of the handshake this is.
enum Role {
    /// `plaintext_reply` is sent to a peer whose first byte cannot open a TLS ClientHello.
    Server {
        plaintext_reply: Option<Arc<[u8]>>,
    },
    Client,
}

struct State {
    conn: rustls::Connection,
    /// Decrypted bytes rustls holds.
    plain: usize,
    /// Nothing received from the peer yet (the first bytes are checked for TLS).
    first: bool,
    /// The peer sent close_notify.
    closed: bool,
    /// The peer closed (close_notify or end of stream) and rustls holds no more plaintext.
    eof: bool,
    /// Why the connection is unusable; every later read and write returns it.
    failed: Option<String>,
}

/// A TLS connection over a [`SocketTransport`] (TCP).
pub struct TlsTransport {
    sock: SocketTransport,
    role: Role,
    st: Mutex<State>,
    /// Bytes received from the socket that rustls has not taken yet (it stops at
    /// [`PLAINTEXT_BUFFERED_MAX`] of unread plaintext). Only the reader touches it.
    raw: Mutex<BytesMut>,
    raw_pending: AtomicBool,
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

/// `io::Write` onto the non-blocking socket, for `write_tls`.
struct SockWriter<'a>(&'a SocketTransport);

impl Write for SockWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.write(data)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsTransport {
    pub(crate) fn new_server(
        sock: SocketTransport,
        conn: rustls::ServerConnection,
        plaintext_reply: Option<Arc<[u8]>>,
    ) -> TlsTransport {
        TlsTransport::new(
            sock,
            Role::Server { plaintext_reply },
            rustls::Connection::Server(conn),
        )
    }

    pub(crate) fn new_client(
        sock: SocketTransport,
        conn: rustls::ClientConnection,
    ) -> TlsTransport {
        let t = TlsTransport::new(sock, Role::Client, rustls::Connection::Client(conn));
        // The ClientHello goes out now; the socket is fresh, so it fits.
        let mut st = t.lock();
        let _ = t.send_pending(&mut st);
        drop(st);
        t
    }

    fn new(sock: SocketTransport, role: Role, mut conn: rustls::Connection) -> TlsTransport {
        conn.set_buffer_limit(Some(SEND_BUFFERED_MAX));
        TlsTransport {
            sock,
            role,
            st: Mutex::new(State {
                conn,
                plain: 0,
                first: true,
                closed: false,
                eof: false,
                failed: None,
            }),
            raw: Mutex::new(BytesMut::new()),
            raw_pending: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer's certificate chain, end entity first, once the handshake checked it.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.lock().conn.peer_certificates().map(<[_]>::to_vec)
    }

    /// The ALPN protocol both sides agreed on.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.lock().conn.alpn_protocol().map(<[u8]>::to_vec)
    }

    pub fn is_handshaking(&self) -> bool {
        self.lock().conn.is_handshaking()
    }

    /// Sends held records until the socket would block.
    fn send_pending(&self, st: &mut State) -> io::Result<()> {
        while st.conn.wants_write() {
            match st.conn.write_tls(&mut SockWriter(&self.sock)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn fail(&self, st: &mut State, msg: String) -> io::Error {
        log::debug!("tls connection failed error={msg}");
        st.failed = Some(msg.clone());
        invalid(msg)
    }

    /// The first bytes the peer sent: are they TLS?
    fn check_first(&self, st: &mut State, raw: &[u8]) -> io::Result<()> {
        st.first = false;
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
                Err(self.fail(st, describe_plaintext_answer(raw)))
            }
            _ => Ok(()),
        }
    }

    /// Feeds received bytes to rustls while its plaintext buffer has room.
    fn feed(&self, st: &mut State, raw: &mut BytesMut) -> io::Result<()> {
        while !raw.is_empty() && st.plain < PLAINTEXT_BUFFERED_MAX && !st.eof {
            if st.first {
                self.check_first(st, raw)?;
            }
            let mut rd: &[u8] = raw;
            let n = match st.conn.read_tls(&mut rd) {
                Ok(n) => n,
                // rustls' own plaintext bound: take plaintext out first.
                Err(e) if e.kind() == io::ErrorKind::Other => break,
                Err(e) => return Err(self.fail(st, format!("TLS: {e}"))),
            };
            if n == 0 {
                // close_notify came: whatever follows is not read.
                raw.clear();
            } else {
                let _ = raw.split_to(n);
            }
            self.process(st)?;
        }
        Ok(())
    }

    fn process(&self, st: &mut State) -> io::Result<()> {
        match st.conn.process_new_packets() {
            Ok(io) => {
                st.plain = io.plaintext_bytes_to_read();
                st.closed |= io.peer_has_closed();
                st.eof = st.closed && st.plain == 0;
                Ok(())
            }
            Err(e) => {
                // The alert rustls queued tells the peer why.
                let _ = self.send_pending(st);
                Err(self.fail(st, format!("TLS: {e}")))
            }
        }
    }

    /// Moves up to `max` plaintext bytes into `buf`: straight from rustls' buffer, one copy.
    fn take_plain(st: &mut State, buf: &mut BytesMut, max: usize) -> usize {
        use std::io::BufRead;
        let mut taken = 0;
        while taken < max && st.plain > 0 {
            let mut reader = st.conn.reader();
            let chunk = match reader.fill_buf() {
                Ok(c) if !c.is_empty() => c,
                // `plain` bytes are there, so WouldBlock or end of stream cannot happen;
                // should they, stop taking.
                _ => break,
            };
            let k = chunk.len().min(max - taken);
            buf.extend_from_slice(&chunk[..k]);
            reader.consume(k);
            taken += k;
            st.plain -= k.min(st.plain);
        }
        if st.plain == 0 && st.closed {
            st.eof = true;
        }
        taken
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
        let mut raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        if buf.capacity() == buf.len() {
            buf.reserve(RAW_READ_CHUNK);
        }
        let room = buf.capacity() - buf.len();
        let mut got = 0;
        let mut may_block = block;
        let result = loop {
            {
                let mut st = self.lock();
                if let Some(why) = &st.failed {
                    break Err(invalid(why.clone()));
                }
                got += TlsTransport::take_plain(&mut st, buf, room - got);
                if got == room {
                    break Ok(got);
                }
                if !raw.is_empty() {
                    if let Err(e) = self.feed(&mut st, &mut raw) {
                        break Err(e);
                    }
                    if let Err(e) = self.send_pending(&mut st) {
                        break Err(e);
                    }
                    got += TlsTransport::take_plain(&mut st, buf, room - got);
                    if got == room {
                        break Ok(got);
                    }
                    // rustls stopped at its plaintext bound and the plaintext was taken:
                    // feed on before touching the socket again.
                    if !raw.is_empty() {
                        continue;
                    }
                }
                if st.eof {
                    break Ok(got);
                }
            }
            if raw.capacity() - raw.len() < RAW_READ_CHUNK / 2 {
                raw.reserve(RAW_READ_CHUNK);
            }
            // At most one receive blocks (with the reader's tick); later ones only take
            // what is already there.
            match self.sock.read_into(&mut raw, may_block && got == 0) {
                Ok(0) => {
                    let mut st = self.lock();
                    let mut empty: &[u8] = &[];
                    let _ = st.conn.read_tls(&mut empty);
                    if let Err(e) = self.process(&mut st) {
                        break Err(e);
                    }
                    got += TlsTransport::take_plain(&mut st, buf, room - got);
                    st.eof = st.plain == 0;
                    if st.first {
                        break Err(
                            self.fail(&mut st, "connection closed before the TLS handshake".into())
                        );
                    }
                    if st.conn.is_handshaking() {
                        // A server closes a connection mid-handshake when its budget of
                        // connections before their hello is full (or at its deadline).
                        break Err(self.fail(
                            &mut st,
                            "connection closed during the TLS handshake (the server may be \
                             over its budget of new connections; retry)"
                                .into(),
                        ));
                    }
                    break Ok(got);
                }
                Ok(_) => may_block = false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    break if got > 0 { Ok(got) } else { Err(e) };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.raw_pending.store(!raw.is_empty(), Ordering::Release);
        result
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
        let n = st.conn.writer().write_vectored(bufs)?;
        self.send_pending(&mut st)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&self) -> io::Result<bool> {
        let mut st = self.lock();
        self.send_pending(&mut st)?;
        Ok(st.conn.wants_write())
    }

    fn poll(&self, want_write: bool, timeout: Duration) -> io::Result<(bool, bool)> {
        let want_write = {
            let st = self.lock();
            if st.plain > 0 || st.eof || st.failed.is_some() {
                return Ok((true, !st.conn.wants_write()));
            }
            want_write || st.conn.wants_write()
        };
        if self.raw_pending.load(Ordering::Acquire) {
            return Ok((true, false));
        }
        self.sock.poll(want_write, timeout)
    }

    fn set_read_mode(&self, mode: ReadMode) -> io::Result<()> {
        self.sock.set_read_mode(mode)
    }

    fn shutdown(&self) {
        {
            let mut st = self.lock();
            if st.failed.is_none() && !st.conn.is_handshaking() {
                st.conn.send_close_notify();
                let _ = self.send_pending(&mut st);
            }
        }
        self.sock.shutdown();
    }

    fn shutdown_write(&self) {
        {
            let mut st = self.lock();
            if st.failed.is_none() {
                st.conn.send_close_notify();
                let _ = self.send_pending(&mut st);
            }
        }
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
        let chain = self.lock().conn.peer_certificates()?.first()?.to_vec();
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

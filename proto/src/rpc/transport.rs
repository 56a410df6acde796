//! The byte stream under a connection. Frame handling (`conn.rs`, `server.rs`) reads and
//! writes through [`Transport`] and never learns what carries the bytes.
//!
//! Implemented here: [`SocketTransport`] for TCP, Unix sockets, vsock (`AF_VSOCK`, the
//! guest side), and the host side of Firecracker's hybrid vsock, which is a Unix socket
//! after its `CONNECT <port>` handshake ([`SocketTransport::hybrid_vsock`]).

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use prost::bytes::BytesMut;

use super::admission::Source;

/// How the connection's reader waits for bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Never block: a server's event loop waits in epoll instead.
    NonBlocking,
    /// A blocking read that gives up after `tick` (a client's reader sleeps inside the read
    /// itself, one system call fewer per reply than poll + read).
    Blocking { tick: Duration },
}

/// A reliable, ordered, full-duplex byte stream, as the frame layer needs it.
///
/// Semantics every implementation keeps:
/// - `read_into` appends to the spare capacity of `buf` and returns how many bytes it
///   appended; `Ok(0)` is end of stream; `Err(WouldBlock)` means "nothing now" (in
///   [`ReadMode::NonBlocking`], or when a [`ReadMode::Blocking`] read's tick passed). With
///   `block == false` it never blocks, whatever the mode.
/// - `write`/`write_vectored` never block: they take what fits now and return how many
///   bytes they took, or `Err(WouldBlock)` when nothing fits. They never raise SIGPIPE.
/// - One thread reads at a time; writers are serialized by the connection's lock; a read
///   and a write may run at once on two threads (`&self` methods, `Sync`).
/// - `fd` is what the readiness of the stream is polled on (mio registration on a server,
///   `poll(2)` on a client): readable means `read_into` may make progress, writable means
///   `write` may (or that [`Transport::flush`] may move buffered bytes).
///
/// A TLS transport fits as one more implementation, with no change to frame handling:
/// rustls' `ServerConnection`/`ClientConnection` is sans-I/O, so the transport owns the
/// socket and the rustls state behind a mutex, and
/// - `read_into` calls `read_tls` on the socket (non-blocking) and `process_new_packets`,
///   then copies decrypted plaintext from rustls' reader into `buf`; when no plaintext is
///   available it returns `WouldBlock` (a handshake in progress produces none), and it
///   sends handshake records that processing produced with `write_tls`;
/// - `write` hands plaintext to rustls' writer only up to a bounded amount of pending
///   records (else `WouldBlock`, so the frame layer's own bounded buffer keeps the bytes),
///   then calls `write_tls` until the socket would block;
/// - `flush` drives `write_tls` on writable readiness and reports whether records remain,
///   which the frame layer counts as pending output;
/// - the handshake happens inside the first reads and writes, so it falls in the server's
///   pre-hello phase (its budget and deadline start at accept), and `source` is the
///   socket's peer address as for plain TCP.
pub trait Transport: Send + Sync + 'static {
    fn read_into(&self, buf: &mut BytesMut, block: bool) -> io::Result<usize>;
    fn write(&self, data: &[u8]) -> io::Result<usize>;
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Moves bytes the transport itself buffered (TLS records) to the socket. Returns
    /// whether any remain. Plain sockets buffer nothing.
    fn flush(&self) -> io::Result<bool> {
        Ok(false)
    }
    /// Waits up to `timeout` until the stream is readable (or hung up) or, with
    /// `want_write`, writable. Returns (readable, writable).
    fn poll(&self, want_write: bool, timeout: Duration) -> io::Result<(bool, bool)>;
    fn set_read_mode(&self, mode: ReadMode) -> io::Result<()>;
    /// Closes both directions now; blocked readers and writers on other threads return.
    fn shutdown(&self);
    /// Ends the sending direction only (an HTTP server lingering to read what a client
    /// still sends after the last answer). TLS sends close_notify first.
    fn shutdown_write(&self) {
        self.shutdown()
    }
    /// The descriptor readiness is polled on.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Where the peer is, for per-source budgets.
    fn source(&self) -> Source;
    /// The end-entity certificate (DER) the peer presented and the handshake verified; the
    /// server copies it into every call's [`CallCtx`](super::CallCtx). Plain sockets have
    /// none.
    fn peer_certificate(&self) -> Option<prost::bytes::Bytes> {
        None
    }
}

/// Which kind of stream socket a [`SocketTransport`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    Tcp,
    Unix,
    /// `AF_VSOCK` (the guest side).
    Vsock,
    /// Firecracker's hybrid vsock: a Unix socket on which `CONNECT <port>` was answered.
    HybridVsock {
        port: u32,
    },
}

/// A connected stream socket: TCP, Unix, vsock, or hybrid vsock.
#[derive(Debug)]
pub struct SocketTransport {
    fd: OwnedFd,
    kind: SocketKind,
    source: Source,
}

impl SocketTransport {
    /// Wraps a connected socket, finding its kind from its address family (TCP gets
    /// TCP_NODELAY: frames are written whole, and Nagle would hold back small replies).
    pub fn new(fd: OwnedFd) -> SocketTransport {
        let peer = super::sys::peer_of(fd.as_fd()).unwrap_or(super::sys::Peer::Unix);
        SocketTransport::accepted(fd, peer)
    }

    /// A Unix socket connected to Firecracker's vsock device on which `CONNECT <port>` has
    /// been answered `OK` (vmm-glue does the handshake): from here on, the guest's stream.
    pub fn hybrid_vsock(fd: OwnedFd, port: u32) -> SocketTransport {
        SocketTransport {
            fd,
            kind: SocketKind::HybridVsock { port },
            source: Source::Local,
        }
    }

    /// A socket whose peer is known (a server's accept told it).
    pub(crate) fn accepted(fd: OwnedFd, peer: super::sys::Peer) -> SocketTransport {
        let kind = match peer {
            super::sys::Peer::Ip(_) => {
                super::sys::set_nodelay(fd.as_fd());
                SocketKind::Tcp
            }
            super::sys::Peer::Unix => SocketKind::Unix,
            super::sys::Peer::Vsock => SocketKind::Vsock,
        };
        SocketTransport {
            fd,
            kind,
            source: peer.source(),
        }
    }

    pub fn kind(&self) -> SocketKind {
        self.kind
    }
}

impl Transport for SocketTransport {
    fn read_into(&self, buf: &mut BytesMut, block: bool) -> io::Result<usize> {
        super::sys::read_into(self.fd.as_fd(), buf, block)
    }

    fn write(&self, data: &[u8]) -> io::Result<usize> {
        super::sys::send_nb(self.fd.as_fd(), data)
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        super::sys::send_vectored_nb(self.fd.as_fd(), bufs)
    }

    fn poll(&self, want_write: bool, timeout: Duration) -> io::Result<(bool, bool)> {
        super::sys::poll1(self.fd.as_fd(), want_write, timeout)
    }

    fn set_read_mode(&self, mode: ReadMode) -> io::Result<()> {
        match mode {
            ReadMode::NonBlocking => super::sys::set_nonblocking(self.fd.as_fd(), true),
            ReadMode::Blocking { tick } => {
                super::sys::set_nonblocking(self.fd.as_fd(), false)?;
                super::sys::set_recv_timeout(self.fd.as_fd(), tick)
            }
        }
    }

    fn shutdown(&self) {
        super::sys::shutdown(self.fd.as_fd());
    }

    fn shutdown_write(&self) {
        super::sys::shutdown_write(self.fd.as_fd());
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn source(&self) -> Source {
        self.source
    }
}

impl AsRawFd for SocketTransport {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn kinds_and_sources_come_from_the_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let t = SocketTransport::new(a.into());
        assert_eq!((t.kind(), t.source()), (SocketKind::Unix, Source::Local));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let t = SocketTransport::new(c.into());
        assert_eq!(t.kind(), SocketKind::Tcp);
        assert_eq!(t.source(), Source::from_ip("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn reads_and_writes_keep_their_would_block_semantics() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = SocketTransport::new(a.into());
        t.set_read_mode(ReadMode::NonBlocking).unwrap();
        let mut buf = BytesMut::with_capacity(16);
        assert_eq!(
            t.read_into(&mut buf, false).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        b.write_all(b"xy").unwrap();
        assert_eq!(
            t.poll(true, Duration::from_millis(10)).unwrap(),
            (true, true)
        );
        assert_eq!(t.read_into(&mut buf, false).unwrap(), 2);
        assert_eq!(&buf[..], b"xy");
        assert_eq!(
            t.write_vectored(&[IoSlice::new(b"a"), IoSlice::new(b"bc")])
                .unwrap(),
            3
        );
        // A blocking read gives up after its tick.
        t.set_read_mode(ReadMode::Blocking {
            tick: Duration::from_millis(20),
        })
        .unwrap();
        assert_eq!(
            t.read_into(&mut buf, true).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        t.shutdown();
        assert_eq!(t.read_into(&mut buf, true).unwrap(), 0);
    }
}

//! A gateway connection's byte stream: plain TCP or TLS (ALPN `http/1.1`), both as a
//! [`proto::rpc::Transport`]. On the event loop it never blocks; a worker turns it
//! blocking with a timeout per read and per write, as the gateway's workers expect of a
//! socket (`IO_TIMEOUT`). A blocking write returns only once TLS records are on the
//! socket too, so a connection handed back to the loop holds no bytes of a worker's.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use proto::rpc::{BytesMut, ReadMode, SocketTransport, Transport};

pub struct HttpStream {
    io: Box<dyn Transport>,
    /// Bytes a read took from the transport beyond what its caller had room for.
    leftover: BytesMut,
    /// Worker mode: how long one read or write may wait.
    timeout: Option<Duration>,
}

impl std::fmt::Debug for HttpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStream")
            .field("blocking", &self.timeout.is_some())
            .finish()
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::WouldBlock, "I/O timeout")
}

impl HttpStream {
    /// An accepted, non-blocking socket; with `tls`, a TLS server connection over it.
    pub fn accepted(sock: std::net::TcpStream, tls: Option<&tls::ServerTls>) -> io::Result<Self> {
        let sock = SocketTransport::new(sock.into());
        let io: Box<dyn Transport> = match tls {
            Some(t) => Box::new(t.accept(sock).map_err(io::Error::other)?),
            None => Box::new(sock),
        };
        io.set_read_mode(ReadMode::NonBlocking)?;
        Ok(HttpStream {
            io,
            leftover: BytesMut::new(),
            timeout: None,
        })
    }

    /// Worker mode: reads and writes wait at most `timeout` each.
    pub fn set_blocking(&mut self, timeout: Duration) -> io::Result<()> {
        self.io
            .set_read_mode(ReadMode::Blocking { tick: timeout })?;
        self.timeout = Some(timeout);
        Ok(())
    }

    /// Event-loop mode.
    pub fn set_nonblocking(&mut self) -> io::Result<()> {
        self.io.set_read_mode(ReadMode::NonBlocking)?;
        self.timeout = None;
        Ok(())
    }

    /// Moves bytes the transport holds (TLS records) to the socket; whether any remain.
    pub fn flush_pending(&self) -> io::Result<bool> {
        self.io.flush()
    }

    /// Half-close after a last answer (TLS: close_notify first).
    pub fn shutdown_write(&self) {
        self.io.shutdown_write();
    }

    /// The transport and any bytes a read took from it beyond what its caller used (the
    /// traffic proxy relays on the transport itself, reading and writing on two threads).
    pub fn into_parts(self) -> (Box<dyn Transport>, BytesMut) {
        (self.io, self.leftover)
    }

    /// Waits until the transport moved all its bytes, within the worker's timeout.
    fn drain(&self, deadline: Instant) -> io::Result<()> {
        while self.io.flush()? {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            self.io.poll(true, left)?;
        }
        Ok(())
    }
}

impl AsRawFd for HttpStream {
    fn as_raw_fd(&self) -> RawFd {
        self.io.fd().as_raw_fd()
    }
}

impl Read for HttpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if !self.leftover.is_empty() {
            let n = self.leftover.len().min(buf.len());
            buf[..n].copy_from_slice(&self.leftover.split_to(n));
            return Ok(n);
        }
        let mut b = BytesMut::with_capacity(buf.len());
        let deadline = self.timeout.map(|t| Instant::now() + t);
        loop {
            match self.io.read_into(&mut b, deadline.is_some()) {
                Ok(_) => {
                    let n = b.len().min(buf.len());
                    buf[..n].copy_from_slice(&b[..n]);
                    if b.len() > n {
                        self.leftover = b.split_off(n);
                    }
                    return Ok(n);
                }
                // A TLS read that only completed a handshake message or part of a record:
                // a worker waits on until its deadline.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match deadline {
                    Some(d) if Instant::now() < d => {}
                    Some(_) => return Err(timed_out()),
                    None => return Err(e),
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for HttpStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let Some(timeout) = self.timeout else {
            return self.io.write(data);
        };
        let deadline = Instant::now() + timeout;
        loop {
            match self.io.write(data) {
                Ok(n) => {
                    self.drain(deadline)?;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(timed_out());
                    }
                    self.io.poll(true, left)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.timeout {
            Some(t) => self.drain(Instant::now() + t),
            None => self.io.flush().map(|_| ()),
        }
    }
}

//! The socket system calls the runtime makes by hand, on borrowed descriptors of any stream
//! socket family (TCP, Unix, vsock); `transport.rs` builds on them.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Polls `sock` for reading (and writing when `want_write`).
/// Returns (readable or hung up, writable).
pub(crate) fn poll1(
    sock: BorrowedFd<'_>,
    want_write: bool,
    timeout: Duration,
) -> io::Result<(bool, bool)> {
    let mut events = libc::POLLIN;
    if want_write {
        events |= libc::POLLOUT;
    }
    let mut fds = [libc::pollfd {
        fd: sock.as_raw_fd(),
        events,
        revents: 0,
    }];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of one initialised pollfd that outlives the call, and
    // its length is passed exactly; the fd is borrowed and open.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(e);
    }
    let r = fds[0].revents;
    Ok((
        r & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0,
        r & libc::POLLOUT != 0,
    ))
}

/// Sends without blocking (and without SIGPIPE), whatever the socket's mode.
pub(crate) fn send_nb(sock: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a valid readable slice for the duration of the call; the fd is
    // borrowed and open.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends several buffers in one call without blocking (and without SIGPIPE).
pub(crate) fn send_vectored_nb(
    sock: BorrowedFd<'_>,
    bufs: &[io::IoSlice<'_>],
) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is a valid "no address, no control data" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is guaranteed ABI-compatible with `struct iovec` on Unix.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `msg` points at `bufs`, valid readable iovecs for the duration of the call;
    // the fd is borrowed and open.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sets the receive timeout of a blocking socket (SO_RCVTIMEO).
pub(crate) fn set_recv_timeout(sock: BorrowedFd<'_>, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` outlives the call and its size is passed; the fd is borrowed and open.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Switches O_NONBLOCK on or off.
pub(crate) fn set_nonblocking(sock: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL on a borrowed open fd; no pointers.
    let flags = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let want = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if want != flags {
        // SAFETY: F_SETFL on a borrowed open fd; no pointers.
        let r = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, want) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Shuts both directions of a socket down; errors (not connected) do not matter here.
pub(crate) fn shutdown(sock: BorrowedFd<'_>) {
    // SAFETY: shutdown(2) on a borrowed open fd; no pointers.
    let _ = unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
}

/// Shuts the sending direction down (the peer reads end of stream; we may still read).
pub(crate) fn shutdown_write(sock: BorrowedFd<'_>) {
    // SAFETY: shutdown(2) on a borrowed open fd; no pointers.
    let _ = unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) };
}

/// Reads from `sock` into the spare capacity of `buf` without zero-filling it first.
/// With `block`, waits up to the socket's receive timeout (a blocking socket).
pub(crate) fn read_into(
    sock: BorrowedFd<'_>,
    buf: &mut prost::bytes::BytesMut,
    block: bool,
) -> io::Result<usize> {
    let flags = if block { 0 } else { libc::MSG_DONTWAIT };
    let len = buf.len();
    let spare = buf.spare_capacity_mut();
    // SAFETY: `spare` is valid writable memory of `spare.len()` bytes owned by `buf`;
    // recv writes at most that many bytes and reports how many it wrote; the fd is borrowed.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            flags,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: recv initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(len + n) };
    Ok(n)
}

/// Accepts one connection from a listening socket (non-blocking, close-on-exec), with its
/// source for the accept budgets. `Ok(None)` when no connection is pending.
pub(crate) fn accept(listener: BorrowedFd<'_>) -> io::Result<Option<(std::os::fd::OwnedFd, Peer)>> {
    use std::os::fd::FromRawFd;
    loop {
        // SAFETY: an all-zero sockaddr_storage is a valid empty address buffer.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `addr` and `len` are valid for writes and `len` holds the buffer's size,
        // so accept4 writes at most that many bytes; the listener fd is borrowed and open.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 returned a new fd that nothing else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            return Ok(Some((fd, peer_from(&addr))));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            // The peer gave up before we accepted: try the next one.
            io::ErrorKind::ConnectionAborted => continue,
            _ => return Err(e),
        }
    }
}

/// What a socket's peer address says, as far as budgets and transports care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    Ip(IpAddr),
    Unix,
    Vsock,
}

impl Peer {
    pub fn source(self) -> super::admission::Source {
        match self {
            Peer::Ip(ip) => super::admission::Source::from_ip(ip),
            Peer::Unix | Peer::Vsock => super::admission::Source::Local,
        }
    }
}

/// The peer of a connected socket (getpeername); None when it has none.
pub(crate) fn peer_of(sock: BorrowedFd<'_>) -> Option<Peer> {
    // SAFETY: an all-zero sockaddr_storage is a valid empty address buffer.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes and `len` holds the buffer's size; the
    // fd is borrowed and open.
    let r = unsafe {
        libc::getpeername(
            sock.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    (r == 0).then(|| peer_from(&addr))
}

fn peer_from(addr: &libc::sockaddr_storage) -> Peer {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match addr.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large
            // and aligned enough for.
            let sin =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Peer::Ip(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Peer::Ip(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        libc::AF_VSOCK => Peer::Vsock,
        _ => Peer::Unix,
    }
}

/// Turns Nagle off on a TCP socket; other socket kinds refuse it, which is fine.
pub(crate) fn set_nodelay(fd: BorrowedFd<'_>) {
    let one: libc::c_int = 1;
    // SAFETY: `one` outlives the call and its size is passed; the fd is borrowed and open.
    // The result is ignored on purpose: non-TCP sockets answer EOPNOTSUPP/ENOPROTOOPT.
    let _ = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Connects a TCP socket to `to` from the local IPv4 address `from` (any of 127.0.0.0/8
/// on loopback), giving up after `timeout`. The flood tests use it to play many sources.
#[cfg(feature = "flood")]
pub(crate) fn connect_tcp_from(
    from: std::net::Ipv4Addr,
    to: std::net::SocketAddrV4,
    timeout: Duration,
) -> io::Result<std::net::TcpStream> {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let local = sin(from, 0);
    // SAFETY: `local` is a valid sockaddr_in of `len` bytes; the fd is open.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&local as *const libc::sockaddr_in).cast(),
            len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let remote = sin(*to.ip(), to.port());
    // SAFETY: `remote` is a valid sockaddr_in of `len` bytes; the fd is open.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            len,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let (_, writable) = poll1(fd.as_fd(), true, timeout)?;
        if !writable {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        let mut err: libc::c_int = 0;
        let mut elen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `err` and `elen` are valid for writes and `elen` holds err's size.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut elen,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    set_nonblocking(fd.as_fd(), false)?;
    Ok(std::net::TcpStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn poll_reports_readable_and_writable() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let fd = a.as_fd();
        assert_eq!(
            poll1(fd, false, Duration::from_millis(10)).unwrap(),
            (false, false)
        );
        b.write_all(b"x").unwrap();
        assert_eq!(
            poll1(fd, true, Duration::from_millis(10)).unwrap(),
            (true, true)
        );
        let mut buf = prost::bytes::BytesMut::with_capacity(16);
        assert_eq!(read_into(fd, &mut buf, false).unwrap(), 1);
        assert_eq!(&buf[..], b"x");
        assert_eq!(
            read_into(fd, &mut buf, false).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(send_nb(fd, b"yz").unwrap(), 2);
        assert_eq!(peer_of(fd), Some(Peer::Unix));
    }
}

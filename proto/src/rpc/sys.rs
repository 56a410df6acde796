//! The one system call the runtime makes by hand: `poll(2)` on a socket and a wake pipe.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Polls `sock` for reading (and writing when `want_write`).
/// Returns (readable or hung up, writable).
pub(crate) fn poll1(
    sock: &UnixStream,
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
    // its length is passed exactly; the fd is owned by a live `UnixStream`.
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
pub(crate) fn send_nb(sock: &UnixStream, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a valid readable slice for the duration of the call; the fd is
    // owned by a live `UnixStream`.
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
pub(crate) fn send_vectored_nb(sock: &UnixStream, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is a valid "no address, no control data" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is guaranteed ABI-compatible with `struct iovec` on Unix.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `msg` points at `bufs`, valid readable iovecs for the duration of the call;
    // the fd is owned by a live `UnixStream`.
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

/// Sets the receive timeout of a blocking socket.
pub(crate) fn set_recv_timeout(sock: &UnixStream, d: Duration) -> io::Result<()> {
    sock.set_read_timeout(Some(d))
}

/// Reads from `sock` into the spare capacity of `buf` without zero-filling it first.
/// With `block`, waits up to the socket's receive timeout (a blocking socket).
pub(crate) fn read_into(
    sock: &UnixStream,
    buf: &mut prost::bytes::BytesMut,
    block: bool,
) -> io::Result<usize> {
    let flags = if block { 0 } else { libc::MSG_DONTWAIT };
    let len = buf.len();
    let spare = buf.spare_capacity_mut();
    // SAFETY: `spare` is valid writable memory of `spare.len()` bytes owned by `buf`;
    // recv writes at most that many bytes and reports how many it wrote.
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
pub(crate) fn accept(
    listener: std::os::fd::BorrowedFd<'_>,
) -> io::Result<Option<(std::os::fd::OwnedFd, super::admission::Source)>> {
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
            return Ok(Some((fd, source_of(&addr))));
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

/// The budget source of a peer address: its IP, or the one local source (Unix, vsock).
fn source_of(addr: &libc::sockaddr_storage) -> super::admission::Source {
    use super::admission::Source;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match addr.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large
            // and aligned enough for.
            let sin =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Source::from_ip(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Source::from_ip(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => Source::Local,
    }
}

/// Turns Nagle off on a TCP socket; other socket kinds refuse it, which is fine.
pub(crate) fn set_nodelay(fd: std::os::fd::BorrowedFd<'_>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn poll_reports_readable_and_writable() {
        let (a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(
            poll1(&a, false, Duration::from_millis(10)).unwrap(),
            (false, false)
        );
        b.write_all(b"x").unwrap();
        assert_eq!(
            poll1(&a, true, Duration::from_millis(10)).unwrap(),
            (true, true)
        );
        let mut buf = prost::bytes::BytesMut::with_capacity(16);
        assert_eq!(read_into(&a, &mut buf, false).unwrap(), 1);
        assert_eq!(&buf[..], b"x");
        assert_eq!(
            read_into(&a, &mut buf, false).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(send_nb(&a, b"yz").unwrap(), 2);
    }
}

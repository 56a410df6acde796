//! The one system call the runtime makes by hand: `poll(2)` on a socket and a wake pipe.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Polls `sock` for reading (and writing when `want_write`) and `wake` for reading.
/// Returns (sock readable or hung up, sock writable, wake readable).
pub(crate) fn poll2(
    sock: &UnixStream,
    want_write: bool,
    wake: &UnixStream,
    timeout: Duration,
) -> io::Result<(bool, bool, bool)> {
    let mut events = libc::POLLIN;
    if want_write {
        events |= libc::POLLOUT;
    }
    let mut fds = [
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of two initialised pollfd structs that outlives the
    // call, and its length is passed exactly; both fds are owned by live `UnixStream`s.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false, false));
        }
        return Err(e);
    }
    let r = fds[0].revents;
    let readable = r & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
    let writable = r & libc::POLLOUT != 0;
    let woke = fds[1].revents & libc::POLLIN != 0;
    Ok((readable, writable, woke))
}

/// Accepts one connection from a listening socket (non-blocking, close-on-exec).
/// `Ok(None)` when no connection is pending.
pub(crate) fn accept(
    listener: std::os::fd::BorrowedFd<'_>,
) -> io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    loop {
        // SAFETY: accept4 with null address pointers only writes the returned fd; the
        // listener fd is borrowed and open for the duration of the call.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 returned a new fd that nothing else owns.
            return Ok(Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }));
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
    fn poll_reports_readable_and_wake() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (w, mut wt) = UnixStream::pair().unwrap();
        let r = poll2(&a, false, &w, Duration::from_millis(10)).unwrap();
        assert_eq!(r, (false, false, false));
        b.write_all(b"x").unwrap();
        let r = poll2(&a, true, &w, Duration::from_millis(10)).unwrap();
        assert_eq!(r, (true, true, false));
        wt.write_all(b"x").unwrap();
        assert!(poll2(&a, false, &w, Duration::ZERO).unwrap().2);
    }
}

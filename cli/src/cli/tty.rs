//! The local terminal for `sandbox exec --tty`: its window size (TIOCGWINSZ) and raw mode
//! (termios), restored on drop. The only unsafe code of the API client, one syscall per
//! block.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Rows and columns of the terminal on `fd`; `None` when it is not a terminal.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointer, which points to a live,
    // properly aligned local; `fd` is a valid descriptor for the duration of the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    if ret != 0 || ws.ws_row == 0 || ws.ws_col == 0 {
        return None;
    }
    Some((ws.ws_row, ws.ws_col))
}

fn get_attr(fd: BorrowedFd<'_>) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; all-zero bytes are a valid value, overwritten below.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one `termios` into the pointer to a live local; `fd` is valid.
    let ret = unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

fn set_attr(fd: BorrowedFd<'_>, t: &libc::termios) -> io::Result<()> {
    // SAFETY: tcsetattr only reads the `termios` behind the pointer; `fd` is valid.
    let ret = unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSAFLUSH, t) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The terminal in raw mode (no echo, no line editing, no signals from keys: ^C goes to
/// the remote process); the previous mode comes back on drop.
pub struct RawMode<'a> {
    fd: BorrowedFd<'a>,
    saved: libc::termios,
}

impl<'a> RawMode<'a> {
    /// Fails (ENOTTY) when `fd` is not a terminal.
    pub fn enable(fd: BorrowedFd<'a>) -> io::Result<RawMode<'a>> {
        let saved = get_attr(fd)?;
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the `termios` it is given, a live local.
        unsafe { libc::cfmakeraw(&mut raw) };
        set_attr(fd, &raw)?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        let _ = set_attr(self.fd, &self.saved);
    }
}

fn sigwinch_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; all-zero bytes are valid and sigemptyset resets it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset writes the set behind a pointer to a live local.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: as above; SIGWINCH is a valid signal number.
    unsafe { libc::sigaddset(&mut set, libc::SIGWINCH) };
    set
}

/// Blocks SIGWINCH in the calling thread (and in threads it starts later), so that
/// [`wait_resize`] can take it synchronously. Call before starting other threads.
pub fn block_resize_signal() -> io::Result<()> {
    let set = sigwinch_set();
    // SAFETY: pthread_sigmask reads the set from a live local; the old mask is not asked for.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Waits for the next SIGWINCH (the terminal was resized); it must be blocked first.
pub fn wait_resize() -> io::Result<()> {
    let set = sigwinch_set();
    let mut sig = 0;
    // SAFETY: sigwait reads the set and writes the signal number into live locals.
    let ret = unsafe { libc::sigwait(&set, &mut sig) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// A pseudo-terminal pair (master, slave) for tests.
    fn pty() -> (OwnedFd, OwnedFd) {
        let (mut m, mut s) = (-1, -1);
        // SAFETY: openpty writes two descriptors into the pointers to live locals; the
        // name, termios and winsize pointers may be null.
        let ret = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(ret, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: `m` was just opened by openpty and is owned by nobody else.
        let m = unsafe { OwnedFd::from_raw_fd(m) };
        // SAFETY: as for `m`.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        (m, s)
    }

    #[test]
    fn resize_signal_is_taken_synchronously() {
        // On a thread of its own: the mask change must not leak into other tests.
        std::thread::spawn(|| {
            block_resize_signal().unwrap();
            // SAFETY: pthread_self has no preconditions.
            let me = unsafe { libc::pthread_self() };
            // SAFETY: signals this live thread with SIGWINCH, which it has blocked.
            assert_eq!(unsafe { libc::pthread_kill(me, libc::SIGWINCH) }, 0);
            wait_resize().unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn not_a_terminal() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(window_size(f.as_fd()), None);
        assert!(RawMode::enable(f.as_fd()).is_err());
    }

    #[test]
    fn raw_mode_round_trip_on_a_pty() {
        let (_m, s) = pty();
        let before = get_attr(s.as_fd()).unwrap();
        assert_ne!(before.c_lflag & libc::ECHO, 0, "a new pty echoes");
        {
            let _raw = RawMode::enable(s.as_fd()).unwrap();
            let now = get_attr(s.as_fd()).unwrap();
            assert_eq!(now.c_lflag & (libc::ECHO | libc::ICANON | libc::ISIG), 0);
        }
        let after = get_attr(s.as_fd()).unwrap();
        assert_eq!(after.c_lflag, before.c_lflag, "restored on drop");
        let ws = libc::winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a live local; the fd is valid.
        let ret = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(ret, 0);
        assert_eq!(window_size(s.as_fd()), Some((33, 101)));
    }
}

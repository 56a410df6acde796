//! Pseudo-terminals: open a pair, resize, and make the slave a child's controlling terminal.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Terminal size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

impl WinSize {
    fn to_libc(self) -> libc::winsize {
        libc::winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }
}

const _: () = assert!(std::mem::size_of::<libc::winsize>() == 8);

/// Both ends of a pseudo-terminal; both close-on-exec (the child gets the slave through dup2).
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a pty pair with the given size.
pub fn open(size: WinSize) -> io::Result<Pty> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = size.to_libc();
    // SAFETY: openpty writes two fds into the given ints; name and termios may be null;
    // `ws` is a valid winsize read by the call.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so `master` is a fresh fd owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: likewise for `slave`.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let pty = Pty { master, slave };
    set_cloexec(pty.master.as_raw_fd())?;
    set_cloexec(pty.slave.as_raw_fd())?;
    Ok(pty)
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on an fd we own; no memory is passed.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the terminal size (TIOCSWINSZ); the kernel sends SIGWINCH to the foreground group.
pub fn resize(master: BorrowedFd<'_>, size: WinSize) -> io::Result<()> {
    let ws = size.to_libc();
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the terminal size (TIOCGWINSZ).
pub fn size(fd: BorrowedFd<'_>) -> io::Result<WinSize> {
    // SAFETY: winsize is plain data.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize to the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(WinSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn open_resize_and_read_back() {
        let pty = open(WinSize { rows: 24, cols: 80 }).unwrap();
        assert_eq!(
            size(pty.slave.as_fd()).unwrap(),
            WinSize { rows: 24, cols: 80 }
        );
        resize(
            pty.master.as_fd(),
            WinSize {
                rows: 50,
                cols: 132,
            },
        )
        .unwrap();
        assert_eq!(
            size(pty.slave.as_fd()).unwrap(),
            WinSize {
                rows: 50,
                cols: 132
            }
        );
    }

    #[test]
    fn ioctl_on_a_non_tty_is_an_error() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(resize(f.as_fd(), WinSize { rows: 1, cols: 1 }).is_err());
    }
}

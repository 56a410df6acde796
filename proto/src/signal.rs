//! Waiting for SIGTERM/SIGINT without an async runtime: a handler writes the signal number
//! into a pipe, and [`Termination::wait`] reads it. Daemons use it to drain their RPC
//! servers (GOAWAY, let open calls finish) instead of dying mid-call.
//!
//! A handler rather than a blocked mask and a signalfd: a blocked mask is inherited by every
//! thread and child process, and children (Firecracker, wrenn-uffd) must see SIGTERM.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// Write end of the pipe the handler writes to; -1 until [`Termination::install`].
static PIPE_WR: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WR.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    let byte = sig as u8;
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    let errno_at = unsafe { libc::__errno_location() };
    // SAFETY: reads this thread's errno through the pointer just obtained.
    let errno = unsafe { *errno_at };
    // SAFETY: write(2) is async-signal-safe; `byte` outlives the call and its length is 1.
    // The pipe is non-blocking: a full pipe already holds a pending signal, so losing this
    // byte is harmless.
    let _ = unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    // SAFETY: restores errno, so the interrupted code sees its own value.
    unsafe { *errno_at = errno };
}

/// SIGTERM and SIGINT, caught. Install it once per process, early.
#[derive(Debug)]
pub struct Termination {
    rd: OwnedFd,
}

impl Termination {
    /// Installs the handlers. A second call in the same process fails with `AlreadyExists`.
    pub fn install() -> io::Result<Termination> {
        let mut fds = [-1; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned a new descriptor that nothing else owns.
        let rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above, the other end.
        let wr = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        // SAFETY: F_SETFL on a descriptor we own; no pointers involved.
        let r = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let wr_raw = wr.as_raw_fd();
        if PIPE_WR
            .compare_exchange(-1, wr_raw, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "termination handler already installed",
            ));
        }
        // The write end lives as long as the process: the handler may run at any time.
        std::mem::forget(wr);
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: an all-zero sigaction is a valid "no flags, empty mask" value.
            let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            // SAFETY: `sa` is initialised and outlives the call; the old action is not asked
            // for; `on_signal` only makes async-signal-safe calls.
            let r = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Termination { rd })
    }

    /// Blocks until SIGTERM or SIGINT arrives; returns the signal number.
    pub fn wait(&self) -> io::Result<i32> {
        loop {
            let mut b = 0u8;
            // SAFETY: reads at most one byte into `b`, which outlives the call; the fd is
            // owned by `self`.
            let n = unsafe { libc::read(self.rd.as_raw_fd(), (&mut b as *mut u8).cast(), 1) };
            if n == 1 {
                return Ok(b as i32);
            }
            let e = io::Error::last_os_error();
            if n < 0 && e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(if n == 0 {
                io::Error::new(io::ErrorKind::UnexpectedEof, "signal pipe closed")
            } else {
                e
            });
        }
    }
}

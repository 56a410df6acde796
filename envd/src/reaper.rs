//! The one place that collects exit statuses of child processes.
//!
//! Architecture invariant: nothing else in envd calls `wait*`. The process table registers
//! each child with the reaper *while holding the reaper's lock across the spawn*, so a child
//! that exits at once is never reaped before its waiter exists. The reaper wakes up on a pidfd
//! per registered child and, when envd is PID 1 (or a subreaper), on SIGCHLD through a
//! signalfd; then it reaps with `waitpid(-1)` and hands statuses of registered children to
//! their waiters and drops the rest (orphans re-parented to us). When envd is an ordinary
//! process (tests, development) it reaps only the pids it registered, so it never steals the
//! statuses of children that other code in the same process waits for.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::limits::UNCLAIMED_EXITS_MAX;

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// Killed by this signal, and a core dump was written.
    Dumped(i32),
}

impl ExitStatus {
    /// Decodes a `waitpid` status word.
    pub fn from_wait_status(status: libc::c_int) -> ExitStatus {
        if libc::WIFSIGNALED(status) && libc::WCOREDUMP(status) {
            ExitStatus::Dumped(libc::WTERMSIG(status))
        } else if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s}"),
            ExitStatus::Dumped(s) => write!(f, "signal {s} (core dumped)"),
        }
    }
}

/// Which children the reaper collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every child (PID 1 or subreaper): `waitpid(-1)` on SIGCHLD. The signalfd requires
    /// SIGCHLD to be blocked in every thread ([`crate::init::block_signals`] at start).
    All,
    /// Only registered children.
    Registered,
}

type Waiter = Box<dyn FnOnce(ExitStatus) + Send>;

struct State {
    waiters: HashMap<libc::pid_t, Waiter>,
    /// pidfds of newly registered children, handed to the reaper thread to poll.
    new_pidfds: Vec<(libc::pid_t, OwnedFd)>,
    /// Statuses of registered children whose waiter was gone (never in practice; bounded).
    unclaimed: VecDeque<(libc::pid_t, ExitStatus)>,
    shutdown: bool,
}

struct Inner {
    mode: Mode,
    state: Mutex<State>,
    waker: Waker,
}

/// Handle to the reaper thread. Cloning shares it.
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<Inner>,
}

const WAKER: Token = Token(0);
const SIGNAL: Token = Token(1);
const PID_BASE: usize = 2;

impl Reaper {
    /// Starts the reaper thread.
    pub fn start(mode: Mode) -> io::Result<Reaper> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let signal_fd = if mode == Mode::All {
            Some(sigchld_fd()?)
        } else {
            None
        };
        if let Some(fd) = &signal_fd {
            poll.registry()
                .register(&mut SourceFd(&fd.as_raw_fd()), SIGNAL, Interest::READABLE)?;
        }
        let inner = Arc::new(Inner {
            mode,
            state: Mutex::new(State {
                waiters: HashMap::new(),
                new_pidfds: Vec::new(),
                unclaimed: VecDeque::new(),
                shutdown: false,
            }),
            waker,
        });
        let thread_inner = inner.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || run(thread_inner, poll, signal_fd))?;
        Ok(Reaper { inner })
    }

    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// Runs `spawn` (which forks a child and returns its pid with whatever else it made)
    /// under the reaper's lock and registers `on_exit` for that pid before the lock is
    /// released. `on_exit` runs on the reaper thread: it must be short and not block.
    pub fn spawn<T>(
        &self,
        spawn: impl FnOnce() -> io::Result<(libc::pid_t, T)>,
        on_exit: impl FnOnce(ExitStatus) + Send + 'static,
    ) -> io::Result<(libc::pid_t, T)> {
        let mut st = self.lock();
        let (pid, value) = spawn()?;
        assert!(pid > 0);
        match pidfd_open(pid) {
            Ok(fd) => st.new_pidfds.push((pid, fd)),
            // Without a pidfd (kernel < 5.3) only SIGCHLD wakes us, which Mode::All has.
            Err(e) => warn!("pidfd_open failed pid={pid} error={e}"),
        }
        st.waiters.insert(pid, Box::new(on_exit));
        drop(st);
        if let Err(e) = self.inner.waker.wake() {
            warn!("reaper wake failed error={e}");
        }
        Ok((pid, value))
    }

    /// Reaps `pid` now if it has exited, handing the status to its waiter as the reaper
    /// thread would. A thread that polls the child's own pidfd calls this to skip waiting
    /// for the reaper thread to be scheduled; the lock keeps the two from racing.
    pub fn try_reap(&self, pid: libc::pid_t) -> bool {
        let mut st = self.lock();
        if !st.waiters.contains_key(&pid) {
            return false;
        }
        let Some(status) = wait_pid(pid) else {
            return false;
        };
        if let Some(w) = st.waiters.remove(&pid) {
            debug!("child exited pid={pid} status={status}");
            w(status);
        }
        drop(st);
        // The reaper thread drops its pidfd for this child on its next round.
        let _ = self.inner.waker.wake();
        true
    }

    /// Stops the reaper thread (children still running are not waited for).
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        let _ = self.inner.waker.wake();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.inner)
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, State> {
    // A waiter that panicked cannot leave the map inconsistent: recover the guard.
    inner.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(inner: Arc<Inner>, mut poll: Poll, signal_fd: Option<OwnedFd>) {
    let mut events = Events::with_capacity(64);
    let mut pidfds: HashMap<libc::pid_t, OwnedFd> = HashMap::new();
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("reaper poll failed error={e}");
            return;
        }
        let mut ready: Vec<libc::pid_t> = Vec::new();
        let mut sigchld = false;
        for ev in events.iter() {
            match ev.token() {
                WAKER => {}
                SIGNAL => sigchld = true,
                Token(t) => ready.push((t - PID_BASE) as libc::pid_t),
            }
        }
        if sigchld {
            if let Some(fd) = &signal_fd {
                drain_signalfd(fd);
            }
        }
        let mut st = lock(&inner);
        if st.shutdown {
            return;
        }
        for (pid, fd) in st.new_pidfds.drain(..) {
            let token = Token(pid as usize + PID_BASE);
            match poll.registry().register(
                &mut SourceFd(&fd.as_raw_fd()),
                token,
                Interest::READABLE,
            ) {
                Ok(()) => {
                    pidfds.insert(pid, fd);
                }
                Err(e) => warn!("reaper register pidfd failed pid={pid} error={e}"),
            }
        }
        let mut exited: Vec<(libc::pid_t, ExitStatus)> = Vec::new();
        if inner.mode == Mode::All {
            // Collect everything; also catches children whose pidfd event is still queued.
            while let Some(e) = wait_any() {
                exited.push(e);
            }
        } else {
            // A registered child that exited shows up as a readable pidfd; check those and,
            // cheaply, every registered one (a lost wake-up must not strand a child).
            let pids: Vec<libc::pid_t> = st.waiters.keys().copied().collect();
            for pid in pids.into_iter().chain(ready) {
                if let Some(status) = wait_pid(pid) {
                    exited.push((pid, status));
                }
            }
        }
        // pidfds of children reaped elsewhere (try_reap) or below.
        pidfds.retain(|pid, fd| {
            let keep = st.waiters.contains_key(pid) && !exited.iter().any(|(p, _)| p == pid);
            if !keep {
                let _ = poll.registry().deregister(&mut SourceFd(&fd.as_raw_fd()));
            }
            keep
        });
        for (pid, status) in exited {
            match st.waiters.remove(&pid) {
                Some(w) => {
                    debug!("child exited pid={pid} status={status}");
                    w(status);
                }
                None if inner.mode == Mode::All => {
                    debug!("orphan reaped pid={pid} status={status}")
                }
                None => {
                    if st.unclaimed.len() == UNCLAIMED_EXITS_MAX {
                        st.unclaimed.pop_front();
                    }
                    st.unclaimed.push_back((pid, status));
                }
            }
        }
    }
}

/// `waitpid(-1, WNOHANG)`: one exited child, or None when none is left to collect now.
fn wait_any() -> Option<(libc::pid_t, ExitStatus)> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes only to `status`, a valid c_int.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid <= 0 {
        return None;
    }
    Some((pid, ExitStatus::from_wait_status(status)))
}

/// `waitpid(pid, WNOHANG)`.
fn wait_pid(pid: libc::pid_t) -> Option<ExitStatus> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes only to `status`, a valid c_int.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r != pid {
        return None;
    }
    Some(ExitStatus::from_wait_status(status))
}

pub use proto::process::pidfd_open;

/// A non-blocking signalfd for SIGCHLD (the caller blocked SIGCHLD in every thread).
fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
    }
    // SAFETY: `set` is a valid, initialized sigset_t.
    unsafe {
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    // SAFETY: `set` is valid; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn drain_signalfd(fd: &OwnedFd) {
    let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>() * 16];
    loop {
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::mpsc;
    use std::time::Duration;

    fn spawn(r: &Reaper, script: &str) -> (libc::pid_t, mpsc::Receiver<ExitStatus>) {
        let (tx, rx) = mpsc::channel();
        let (pid, child) = r
            .spawn(
                || {
                    let c = std::process::Command::new("/bin/sh")
                        .args(["-c", script])
                        .spawn()?;
                    Ok((c.id() as libc::pid_t, c))
                },
                move |s| {
                    let _ = tx.send(s);
                },
            )
            .unwrap();
        // Dropping a std Child does not wait for it.
        drop(child);
        (pid, rx)
    }

    #[test]
    fn delivers_codes_and_signals() {
        let r = Reaper::start(Mode::Registered).unwrap();
        let (_, a) = spawn(&r, "exit 7");
        let (_, b) = spawn(&r, "kill -TERM $$");
        let (_, c) = spawn(&r, "true");
        let t = Duration::from_secs(10);
        assert_eq!(a.recv_timeout(t).unwrap(), ExitStatus::Code(7));
        assert_eq!(
            b.recv_timeout(t).unwrap(),
            ExitStatus::Signal(libc::SIGTERM)
        );
        assert_eq!(c.recv_timeout(t).unwrap(), ExitStatus::Code(0));
        r.shutdown();
    }

    #[test]
    fn does_not_steal_unregistered_children() {
        let r = Reaper::start(Mode::Registered).unwrap();
        let (_, a) = spawn(&r, "exit 3");
        let other = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 5"])
            .status()
            .unwrap();
        assert_eq!(other.into_raw() >> 8, 5);
        assert_eq!(
            a.recv_timeout(Duration::from_secs(10)).unwrap(),
            ExitStatus::Code(3)
        );
    }

    #[test]
    fn many_short_children() {
        let r = Reaper::start(Mode::Registered).unwrap();
        let rx: Vec<_> = (0..50).map(|i| spawn(&r, &format!("exit {i}")).1).collect();
        for (i, rx) in rx.into_iter().enumerate() {
            let s = rx.recv_timeout(Duration::from_secs(20)).unwrap();
            assert_eq!(s, ExitStatus::Code(i as i32));
        }
    }
}

//! Child processes started through the API: spawn as a user (optionally on a pty, in a new
//! session and process group, in envd's cgroup subtree), pump their output into a bounded
//! ring, deliver it to attached clients with flow control, enforce timeouts.
//!
//! Output path: one pump thread per process polls the child's pipes (or pty master) and
//! appends chunks of at most [`OUTPUT_CHUNK_LEN`] to the process's ring. The ring keeps the
//! most recent [`OUTPUT_RING_LEN`] bytes for replay to a client that reconnects. Flow control:
//! the pump drops the oldest chunk only when no attached client still needs it; otherwise it
//! stops reading the pipe, so the child blocks in `write` and envd's memory stays bounded.
//! With no client attached the ring simply keeps the tail of the output.
//!
//! Exit statuses come from the [`Reaper`], never from a `wait` here.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use log::{info, warn};
use prost::bytes::Bytes;

use crate::limits::{
    OUTPUT_CHUNK_LEN, OUTPUT_DRAIN_AFTER_EXIT, OUTPUT_RING_LEN, PROCESSES_MAX, PROCESS_ARGS_MAX,
    RECENT_EXITED_MAX, RECENT_EXITED_TTL, SUBSCRIBERS_PER_PROCESS_MAX, TAG_LEN_MAX,
};
use crate::passwd::User;
use crate::pty::{self, WinSize};
use crate::reaper::{ExitStatus, Reaper};
use crate::spawn;

/// Which output a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
    Pty,
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Spec {
    pub cmd: OsString,
    pub args: Vec<OsString>,
    /// The complete environment of the child.
    pub env: Vec<(OsString, OsString)>,
    pub cwd: Option<PathBuf>,
    pub user: User,
    pub stdin: bool,
    pub pty: Option<WinSize>,
    pub tag: Option<String>,
    pub timeout: Option<Duration>,
    /// The variables the caller set (shown in listings; `env` is what the child gets).
    pub caller_env: Vec<(OsString, OsString)>,
}

#[derive(Debug)]
pub enum Error {
    InvalidArgument(String),
    TooManyProcesses,
    TagInUse(String),
    Spawn {
        cmd: String,
        source: io::Error,
    },
    NotFound,
    NoStdin,
    NotAPty,
    TooManySubscribers,
    Io {
        action: &'static str,
        source: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::TooManyProcesses => write!(f, "more than {PROCESSES_MAX} processes"),
            Error::TagInUse(t) => write!(f, "tag {t:?} is used by a running process"),
            Error::Spawn { cmd, source } => write!(f, "start {cmd:?}: {source}"),
            Error::NotFound => write!(f, "no such process"),
            Error::NoStdin => write!(
                f,
                "the process has no stdin (started without it, or closed)"
            ),
            Error::NotAPty => write!(f, "the process has no pty"),
            Error::TooManySubscribers => write!(
                f,
                "more than {SUBSCRIBERS_PER_PROCESS_MAX} clients attached to the process"
            ),
            Error::Io { action, .. } => write!(f, "{action}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Spawn { source, .. } | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// How a process ended, as clients see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finished {
    pub status: ExitStatus,
    /// The timeout fired and envd killed the process group.
    pub timed_out: bool,
    pub exited_unix_ns: i64,
}

/// A process as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub pid: i32,
    pub tag: Option<String>,
    pub cmd: OsString,
    pub args: Vec<OsString>,
    pub cwd: Option<PathBuf>,
    pub pty: bool,
    pub pty_size: Option<WinSize>,
    pub user: String,
    pub stdin: bool,
    pub timeout: Option<Duration>,
    pub caller_env: Vec<(OsString, OsString)>,
    pub started_unix_ns: i64,
}

/// A chunk of output as a client receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputChunk {
    pub kind: StreamKind,
    /// Position of data[0] in this kind's stream since the process started.
    pub offset: u64,
    pub data: Bytes,
}

fn kind_index(k: StreamKind) -> usize {
    match k {
        StreamKind::Stdout => 0,
        StreamKind::Stderr => 1,
        StreamKind::Pty => 2,
    }
}

struct Chunk {
    seq: u64,
    chunk: OutputChunk,
}

struct Output {
    ring: VecDeque<Chunk>,
    ring_len: usize,
    next_seq: u64,
    /// Next sequence number each attached client wants; `None` = free slot.
    cursors: Vec<Option<u64>>,
    exit: Option<ExitStatus>,
    exited_unix_ns: i64,
    /// Bytes appended so far per stream kind (the next chunk's offset).
    offsets: [u64; 3],
    timed_out: bool,
    /// The pump has closed every output fd: nothing more will be appended.
    eof: bool,
}

/// State shared between the process handle, its pump thread and the reaper's callback.
struct Shared {
    out: Mutex<Output>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Output> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running (or just finished) process.
pub struct Process {
    info: Info,
    shared: Arc<Shared>,
    input: Mutex<Option<Arc<File>>>,
    master: Option<OwnedFd>,
}

impl Process {
    pub fn pid(&self) -> i32 {
        self.info.pid
    }

    pub fn info(&self) -> &Info {
        &self.info
    }

    /// Attaches a client; it first receives what the ring still holds (replay).
    pub fn subscribe(self: &Arc<Self>) -> Result<Subscription, Error> {
        self.attach(true)
    }

    /// Attaches a client that receives only output produced from now on.
    pub fn subscribe_live(self: &Arc<Self>) -> Result<Subscription, Error> {
        self.attach(false)
    }

    fn attach(self: &Arc<Self>, replay: bool) -> Result<Subscription, Error> {
        let mut out = self.shared.lock();
        let start = if replay {
            out.ring.front().map_or(out.next_seq, |c| c.seq)
        } else {
            out.next_seq
        };
        let slot = match out.cursors.iter().position(Option::is_none) {
            Some(i) => i,
            None if out.cursors.len() < SUBSCRIBERS_PER_PROCESS_MAX => {
                out.cursors.push(None);
                out.cursors.len() - 1
            }
            None => return Err(Error::TooManySubscribers),
        };
        out.cursors[slot] = Some(start);
        Ok(Subscription {
            process: self.clone(),
            slot,
        })
    }

    /// Writes to stdin (or the pty). Blocks while the child does not read.
    pub fn write_input(&self, data: &[u8]) -> Result<(), Error> {
        let input = self.input_handle()?;
        (&*input).write_all(data).map_err(|source| Error::Io {
            action: "write to the process's stdin",
            source,
        })
    }

    /// Closes stdin. On a pty, sends end-of-file (^D) instead: the slave stays open.
    pub fn close_input(&self) -> Result<(), Error> {
        if self.master.is_some() {
            return self.write_input(&[0x04]);
        }
        match self.input.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(_) => Ok(()),
            None => Err(Error::NoStdin),
        }
    }

    fn input_handle(&self) -> Result<Arc<File>, Error> {
        self.input
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::NoStdin)
    }

    /// Whether stdin is still open for input (always, with a pty).
    pub fn stdin_open(&self) -> bool {
        self.input
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Sends a signal to the process, or with `group` to its whole process group.
    pub fn signal_to(&self, sig: i32, group: bool) -> Result<(), Error> {
        if group {
            self.signal_impl(sig, -self.info.pid)
        } else {
            self.signal_impl(sig, self.info.pid)
        }
    }

    /// Sends a signal to the process (not its group).
    pub fn signal(&self, sig: i32) -> Result<(), Error> {
        self.signal_impl(sig, self.info.pid)
    }

    fn signal_impl(&self, sig: i32, target: i32) -> Result<(), Error> {
        if !(1..=64).contains(&sig) {
            return Err(Error::InvalidArgument(format!("signal {sig}")));
        }
        if self.shared.lock().exit.is_some() {
            return Err(Error::NotFound);
        }
        // SAFETY: kill takes plain integers. The pid is still our unreaped child (exit is
        // unset under the lock the reaper callback takes), so it cannot have been reused.
        let r = unsafe { libc::kill(target, sig) };
        if r < 0 {
            return Err(Error::Io {
                action: "signal the process",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Resizes the pty.
    pub fn resize(&self, size: WinSize) -> Result<(), Error> {
        let master = self.master.as_ref().ok_or(Error::NotAPty)?;
        check_size(size)?;
        pty::resize(master.as_fd(), size).map_err(|source| Error::Io {
            action: "resize the pty",
            source,
        })
    }

    /// The exit, once the process has ended.
    pub fn finished(&self) -> Option<Finished> {
        let out = self.shared.lock();
        out.exit.map(|status| Finished {
            status,
            timed_out: out.timed_out,
            exited_unix_ns: out.exited_unix_ns,
        })
    }
}

/// What [`Subscription::next`] yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Output(OutputChunk),
    /// Output is complete and the process has ended; nothing follows.
    Finished(Finished),
    /// Nothing within the wait; check for cancellation and call again.
    Pending,
}

/// A client's position in a process's output. Dropping it detaches (the pump may then
/// discard output this client did not read).
pub struct Subscription {
    process: Arc<Process>,
    slot: usize,
}

impl Subscription {
    pub fn process(&self) -> &Arc<Process> {
        &self.process
    }

    /// Waits up to `wait` for the next chunk or the end.
    pub fn next(&mut self, wait: Duration) -> Next {
        let shared = &self.process.shared;
        let deadline = Instant::now() + wait;
        let mut out = shared.lock();
        loop {
            // The slot is ours until drop: it is Some.
            let cursor = out.cursors[self.slot].unwrap_or(0);
            let front = out.ring.front().map_or(out.next_seq, |c| c.seq);
            let want = cursor.max(front);
            if want < out.next_seq {
                let idx = (want - front) as usize;
                let item = Next::Output(out.ring[idx].chunk.clone());
                out.cursors[self.slot] = Some(want + 1);
                shared.cv.notify_all();
                return item;
            }
            if out.eof {
                if let Some(status) = out.exit {
                    return Next::Finished(Finished {
                        status,
                        timed_out: out.timed_out,
                        exited_unix_ns: out.exited_unix_ns,
                    });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Next::Pending;
            }
            out = shared
                .cv
                .wait_timeout(out, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut out = self.process.shared.lock();
        out.cursors[self.slot] = None;
        self.process.shared.cv.notify_all();
    }
}

/// A cgroup v2 directory the children are moved into.
pub struct Cgroup {
    dir: PathBuf,
    procs: OwnedFd,
}

impl Cgroup {
    /// Creates (or reuses) `<envd's own cgroup>/<name>` on the cgroup2 hierarchy. Errors when
    /// no writable cgroup2 is mounted (cgroup v1-only or hybrid hosts without a v2 mount).
    pub fn create(name: &str) -> io::Result<Cgroup> {
        let mount = cgroup2_mount()?;
        let own = own_cgroup2_path()?;
        let dir = mount.join(own.trim_start_matches('/')).join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        Ok(Cgroup {
            dir,
            procs: procs.into(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pids in the cgroup (the children and everything they left behind).
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILLs everything in the cgroup: `cgroup.kill` (Linux 5.14+), else each pid.
    pub fn kill_all(&self) {
        if std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.pids() {
            // SAFETY: kill takes plain integers. A pid listed in our cgroup is one of our
            // processes or their descendants.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Succeeds only once empty; a cgroup with live processes stays.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn cgroup2_mount() -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in text.lines() {
        // `... mountpoint ... - fstype source options`
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split(' ').next() == Some("cgroup2") {
            if let Some(mp) = left.split(' ').nth(4) {
                return Ok(PathBuf::from(mp));
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount"))
}

fn own_cgroup2_path() -> io::Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not in a cgroup2 hierarchy"))
}

struct TableInner {
    reaper: Reaper,
    procs: Mutex<HashMap<i32, Arc<Process>>>,
    /// Processes that ended recently, newest last: a client whose stream broke can still
    /// reconnect and learn how the process ended (and get the ring's replay).
    recent: Mutex<VecDeque<(Instant, Arc<Process>)>>,
    /// Tags of processes being started.
    reserved: Mutex<std::collections::HashSet<String>>,
    cgroup: Option<Cgroup>,
    /// The children's stack between clone and exec, made at the first start.
    stack: Mutex<Option<spawn::Stack>>,
}

struct TagReservation<'a> {
    table: &'a TableInner,
    tag: String,
}

impl Drop for TagReservation<'_> {
    fn drop(&mut self) {
        self.table.reserved_tags().remove(&self.tag);
    }
}

impl TableInner {
    fn reserved_tags(&self) -> MutexGuard<'_, std::collections::HashSet<String>> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stack(&self) -> MutexGuard<'_, Option<spawn::Stack>> {
        self.stack.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recent(&self) -> MutexGuard<'_, VecDeque<(Instant, Arc<Process>)>> {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while r
            .front()
            .is_some_and(|(t, _)| t.elapsed() > RECENT_EXITED_TTL)
        {
            r.pop_front();
        }
        r
    }
}

/// Every process started through the API, by pid (and tag).
#[derive(Clone)]
pub struct Table {
    inner: Arc<TableInner>,
}

impl Table {
    pub fn new(reaper: Reaper, cgroup: Option<Cgroup>) -> Table {
        Table {
            inner: Arc::new(TableInner {
                reaper,
                procs: Mutex::new(HashMap::new()),
                recent: Mutex::new(VecDeque::new()),
                reserved: Mutex::new(std::collections::HashSet::new()),
                cgroup,
                stack: Mutex::new(None),
            }),
        }
    }

    fn procs(&self) -> MutexGuard<'_, HashMap<i32, Arc<Process>>> {
        self.inner.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.inner.cgroup.as_ref()
    }

    /// A running process, or one that ended within [`RECENT_EXITED_TTL`].
    pub fn get(&self, pid: i32) -> Option<Arc<Process>> {
        if let Some(p) = self.procs().get(&pid) {
            return Some(p.clone());
        }
        let recent = self.inner.recent();
        recent
            .iter()
            .rev()
            .find(|(_, p)| p.info.pid == pid)
            .map(|(_, p)| p.clone())
    }

    /// Like [`Table::get`], by tag (a running process first, then the newest ended one).
    pub fn by_tag(&self, tag: &str) -> Option<Arc<Process>> {
        let running = self
            .procs()
            .values()
            .find(|p| p.info.tag.as_deref() == Some(tag))
            .cloned();
        running.or_else(|| {
            let recent = self.inner.recent();
            recent
                .iter()
                .rev()
                .find(|(_, p)| p.info.tag.as_deref() == Some(tag))
                .map(|(_, p)| p.clone())
        })
    }

    /// Running processes (and those whose output is still being drained).
    pub fn list(&self) -> Vec<Info> {
        let mut v: Vec<Info> = self.procs().values().map(|p| p.info.clone()).collect();
        v.sort_by_key(|i| i.pid);
        v
    }

    pub fn len(&self) -> usize {
        self.procs().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends `sig` to every process group (shutdown).
    pub fn signal_all(&self, sig: i32) {
        for p in self.procs().values() {
            if p.shared.lock().exit.is_none() {
                // SAFETY: kill takes plain integers; the group leader is still unreaped.
                unsafe {
                    libc::kill(-p.info.pid, sig);
                }
            }
        }
    }

    /// Starts a process and attaches the caller to its output from the first byte.
    pub fn start(&self, spec: Spec) -> Result<(Arc<Process>, Subscription), Error> {
        validate(&spec)?;
        // Held until the process is in the table, so two concurrent starts cannot both
        // take a tag.
        let _tag = {
            let procs = self.procs();
            if procs.len() >= PROCESSES_MAX {
                return Err(Error::TooManyProcesses);
            }
            match &spec.tag {
                Some(tag) => {
                    let mut reserved = self.inner.reserved_tags();
                    if reserved.contains(tag)
                        || procs.values().any(|p| p.info.tag.as_ref() == Some(tag))
                    {
                        return Err(Error::TagInUse(tag.clone()));
                    }
                    reserved.insert(tag.clone());
                    Some(TagReservation {
                        table: &self.inner,
                        tag: tag.clone(),
                    })
                }
                None => None,
            }
        };
        let exit_event = eventfd().map_err(|source| Error::Io {
            action: "create an eventfd",
            source,
        })?;
        let shared = Arc::new(Shared {
            out: Mutex::new(Output {
                ring: VecDeque::new(),
                ring_len: 0,
                next_seq: 0,
                cursors: Vec::new(),
                exit: None,
                exited_unix_ns: 0,
                offsets: [0; 3],
                timed_out: false,
                eof: false,
            }),
            cv: Condvar::new(),
        });
        let io_err = |action| move |source| Error::Io { action, source };
        // The child's fds 0, 1, 2 and the parent's other ends.
        let io = match spec.pty {
            Some(size) => {
                check_size(size)?;
                ChildIo::Pty(pty::open(size).map_err(io_err("open a pty"))?)
            }
            None => ChildIo::Pipes(Pipes::new(spec.stdin).map_err(io_err("create pipes"))?),
        };
        let mut cmd = spawn::Command::new(&spec.cmd, &spec.args, &spec.env)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // A new session, hence a new process group led by the child: a timeout or shutdown
        // kills the whole group with kill(-pid). With a pty, the slave becomes the
        // session's controlling terminal.
        match &io {
            ChildIo::Pty(p) => cmd
                .stdio(p.slave.as_fd(), p.slave.as_fd(), p.slave.as_fd())
                .new_session(true),
            ChildIo::Pipes(p) => cmd
                .stdio(p.stdin.as_fd(), p.stdout.as_fd(), p.stderr.as_fd())
                .new_session(false),
        };
        if let Some(c) = &self.inner.cgroup {
            cmd.cgroup(c.procs.as_fd());
        }
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        // As root always switch (also to root: that sets its groups). As anyone else only
        // the own user is possible; asking for another fails in setuid (EPERM).
        if euid == 0 || spec.user.uid != euid {
            cmd.user(spec.user.uid, spec.user.gid, &spec.user.groups);
        }
        if let Some(cwd) = &spec.cwd {
            cmd.cwd(cwd)
                .map_err(|_| Error::InvalidArgument("NUL byte in the working directory".into()))?;
        }

        // Written by the reaper callback to wake the pump. Owned by the two of them only, so
        // it closes once both are done (an ended process kept for reconnects holds no fd).
        let exit_event = Arc::new(exit_event);
        let on_exit_event = exit_event.clone();
        let on_exit_shared = shared.clone();
        let on_exit = move |status: ExitStatus| {
            let mut out = on_exit_shared.lock();
            out.exit = Some(status);
            out.exited_unix_ns = crate::clock::now_unix_ns();
            on_exit_shared.cv.notify_all();
            drop(out);
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a u64 to our eventfd.
            unsafe {
                libc::write(on_exit_event.as_raw_fd(), (&one as *const u64).cast(), 8);
            }
        };
        let cmd_name = spec.cmd.to_string_lossy().into_owned();
        // A child that failed before exec has exited (status 127) and is registered all the
        // same: the reaper collects it like any other; nothing here waits.
        let (pid, failure) = self
            .inner
            .reaper
            .spawn(
                || {
                    let mut stack = self.inner.stack();
                    let stack = match &mut *stack {
                        Some(s) => s,
                        None => stack.insert(spawn::Stack::new()?),
                    };
                    let child = spawn::spawn(&cmd, stack)?;
                    Ok((child.pid, child.failure))
                },
                on_exit,
            )
            .map_err(|source| Error::Spawn {
                cmd: cmd_name.clone(),
                source,
            })?;
        drop(cmd);
        if let Some(f) = failure {
            warn!(
                "process start failed pid={pid} cmd={cmd_name:?} step={:?} error={}",
                f.step, f.source
            );
            return Err(Error::Spawn {
                cmd: cmd_name,
                source: f.source,
            });
        }
        // The child has its own copies of its ends (it exec'd); ours must close so that
        // reading the pipes or the pty master ends once the child and its descendants are
        // gone.
        let (fds, input, master) = match io {
            ChildIo::Pty(p) => {
                drop(p.slave);
                let reader = p.master.try_clone().map_err(io_err("dup the pty master"))?;
                let writer = p.master.try_clone().map_err(io_err("dup the pty master"))?;
                (
                    vec![(StreamKind::Pty, reader)],
                    Some(Arc::new(File::from(writer))),
                    Some(p.master),
                )
            }
            ChildIo::Pipes(p) => {
                drop((p.stdin, p.stdout, p.stderr));
                (
                    vec![(StreamKind::Stdout, p.out), (StreamKind::Stderr, p.err)],
                    p.input.map(|w| Arc::new(File::from(w))),
                    None,
                )
            }
        };
        let process = Arc::new(Process {
            info: Info {
                pid,
                tag: spec.tag.clone(),
                cmd: spec.cmd.clone(),
                args: spec.args.clone(),
                cwd: spec.cwd.clone(),
                pty: master.is_some(),
                pty_size: spec.pty,
                user: spec.user.name.clone(),
                stdin: spec.stdin,
                timeout: spec.timeout,
                caller_env: spec.caller_env.clone(),
                started_unix_ns: crate::clock::now_unix_ns(),
            },
            shared,
            input: Mutex::new(input),
            master,
        });
        let sub = process.subscribe()?;
        self.procs().insert(pid, process.clone());
        info!(
            "process started pid={pid} cmd={cmd_name:?} user={} pty={}",
            spec.user.name, process.info.pty
        );
        let deadline = spec.timeout.map(|t| Instant::now() + t);
        // The pump polls the child's own pidfd too and reaps through the reaper itself: one
        // thread wake-up less between the exit and the client hearing of it. Without one
        // (the child is already gone) the reaper thread's eventfd still wakes the pump.
        let watch = crate::reaper::pidfd_open(pid)
            .ok()
            .map(|fd| (fd, self.inner.reaper.clone()));
        let table = Arc::downgrade(&self.inner);
        let pump_process = process.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("pump-{pid}"))
            .stack_size(256 * 1024)
            .spawn(move || pump(pump_process, fds, exit_event, watch, deadline, table));
        if let Err(source) = spawned {
            // Without a pump nobody would drain the child: kill it.
            // SAFETY: kill takes plain integers; the child is unreaped.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            self.procs().remove(&pid);
            return Err(Error::Io {
                action: "start the output thread",
                source,
            });
        }
        Ok((process, sub))
    }
}

fn check_size(size: WinSize) -> Result<(), Error> {
    if size.rows == 0 || size.cols == 0 {
        return Err(Error::InvalidArgument(format!(
            "pty size {}x{} (rows and cols must be positive)",
            size.rows, size.cols
        )));
    }
    Ok(())
}

fn validate(spec: &Spec) -> Result<(), Error> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if spec.cmd.is_empty() {
        return bad("empty command".into());
    }
    if spec.args.len() + spec.env.len() > PROCESS_ARGS_MAX {
        return bad(format!(
            "more than {PROCESS_ARGS_MAX} arguments and variables"
        ));
    }
    let has_nul = |s: &OsString| s.as_bytes().contains(&0);
    if has_nul(&spec.cmd) || spec.args.iter().any(has_nul) {
        return bad("NUL byte in the command or an argument".into());
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.as_bytes().contains(&b'=') || has_nul(k) || has_nul(v) {
            return bad(format!("environment variable {:?}", k.to_string_lossy()));
        }
    }
    if let Some(cwd) = &spec.cwd {
        if !cwd.is_absolute() || cwd.as_os_str().as_bytes().contains(&0) {
            return bad(format!("working directory {:?} must be absolute", cwd));
        }
    }
    if let Some(tag) = &spec.tag {
        if tag.is_empty() || tag.len() > TAG_LEN_MAX {
            return bad(format!("tag must have 1 to {TAG_LEN_MAX} bytes"));
        }
    }
    if spec.timeout == Some(Duration::ZERO) {
        return bad("timeout must be positive".into());
    }
    Ok(())
}

/// A child's stdio: a pty (the slave is its fds 0, 1 and 2) or pipes.
enum ChildIo {
    Pty(pty::Pty),
    Pipes(Pipes),
}

/// Pipes for a child without a pty, every end close-on-exec (the child gets its ends
/// through dup3, which clears the flag on the copy).
struct Pipes {
    /// The child's ends: stdin is /dev/null when it has no input.
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    /// The parent's ends.
    input: Option<OwnedFd>,
    out: OwnedFd,
    err: OwnedFd,
}

impl Pipes {
    fn new(with_stdin: bool) -> io::Result<Pipes> {
        let (stdin, input) = if with_stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            (File::open("/dev/null")?.into(), None)
        };
        let (out, stdout) = pipe()?;
        let (err, stderr) = pipe()?;
        Ok(Pipes {
            stdin,
            stdout,
            stderr,
            input,
            out,
            err,
        })
    }
}

/// A pipe, both ends close-on-exec: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [libc::c_int; 2] = [-1; 2];
    // SAFETY: pipe2 writes two fds into the array, which is valid for the call.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: a fresh fd nobody else owns.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: likewise.
    let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((read, write))
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes plain integers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The pump thread of one process: reads output until every fd is closed and the child
/// has exited (plus a short drain for pipes held open by descendants), enforces the
/// timeout, then removes the process from the table.
fn pump(
    process: Arc<Process>,
    fds: Vec<(StreamKind, OwnedFd)>,
    exit_event: Arc<OwnedFd>,
    mut watch: Option<(OwnedFd, Reaper)>,
    deadline: Option<Instant>,
    table: Weak<TableInner>,
) {
    let pid = process.info.pid;
    let shared = &process.shared;
    let mut files: Vec<(StreamKind, File)> =
        fds.into_iter().map(|(k, fd)| (k, File::from(fd))).collect();
    let mut killed = false;
    let mut exited_at: Option<Instant> = None;
    let mut read_buf = vec![0u8; OUTPUT_CHUNK_LEN];
    loop {
        let now = Instant::now();
        if let Some(d) = deadline {
            if now >= d && !killed {
                kill_group(shared, pid);
                killed = true;
            }
        }
        if exited_at.is_none() && shared.lock().exit.is_some() {
            exited_at = Some(now);
        }
        if let Some(t) = exited_at {
            if files.is_empty() || now >= t + OUTPUT_DRAIN_AFTER_EXIT {
                break;
            }
        }
        let mut wake = exited_at.map(|t| t + OUTPUT_DRAIN_AFTER_EXIT);
        if let (Some(d), false) = (deadline, killed) {
            wake = Some(wake.map_or(d, |w| w.min(d)));
        }
        // +1 ms so a wake-up never comes just before the instant it waits for.
        let timeout_ms = wake.map_or(-1, |w| {
            w.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1
        });
        let mut pfds: Vec<libc::pollfd> = files
            .iter()
            .map(|(_, f)| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        pfds.push(libc::pollfd {
            fd: exit_event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        if let Some((fd, _)) = &watch {
            pfds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: the pointer and length describe `pfds`, valid for the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("process output poll failed pid={pid} error={e}");
            break;
        }
        if let Some((_, reaper)) = &watch {
            if pfds[files.len() + 1].revents != 0 {
                // Exited (or already reaped by the reaper thread): either way this pidfd
                // has done its job.
                reaper.try_reap(pid);
                watch = None;
            }
        }
        let ev_revents = pfds[files.len()].revents;
        if ev_revents != 0 {
            let mut v = [0u8; 8];
            // SAFETY: reading 8 bytes into a stack buffer from our non-blocking eventfd.
            unsafe {
                libc::read(exit_event.as_raw_fd(), v.as_mut_ptr().cast(), 8);
            }
        }
        let mut closed = Vec::new();
        for (i, p) in pfds[..files.len()].iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            if !wait_for_room(shared, pid, deadline, &mut killed) {
                continue;
            }
            match files[i].1.read(&mut read_buf) {
                Ok(0) => closed.push(i),
                // An exact-size copy: a chunk must not keep the whole read buffer alive
                // (the ring bounds the bytes it holds, not the allocations behind them).
                Ok(n) => append(shared, files[i].0, read_buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EIO: the pty's slave side is closed everywhere.
                Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            files.remove(i);
        }
    }
    drop(files);
    {
        let mut out = shared.lock();
        out.eof = true;
        out.timed_out = killed;
        shared.cv.notify_all();
    }
    if let Some(t) = table.upgrade() {
        let removed = t
            .procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
        if let Some(p) = removed {
            let mut recent = t.recent();
            if recent.len() >= RECENT_EXITED_MAX {
                recent.pop_front();
            }
            recent.push_back((Instant::now(), p));
        }
    }
    info!("process ended pid={pid} finished={:?}", process.finished());
}

fn kill_group(shared: &Shared, pid: i32) {
    if shared.lock().exit.is_none() {
        warn!("process timed out, killing its group pid={pid}");
        // SAFETY: kill takes plain integers; the leader is unreaped so the group id is ours.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// Flow control: returns once the ring can take another chunk without discarding output
/// an attached client has not read. Enforces the timeout meanwhile.
fn wait_for_room(shared: &Shared, pid: i32, deadline: Option<Instant>, killed: &mut bool) -> bool {
    let mut out = shared.lock();
    loop {
        if out.ring_len + OUTPUT_CHUNK_LEN <= OUTPUT_RING_LEN {
            return true;
        }
        // The ring is non-empty here (ring_len > 0), so front exists.
        let front_seq = out.ring.front().map_or(0, |c| c.seq);
        let needed = out.cursors.iter().flatten().any(|&c| c <= front_seq);
        if !needed {
            if let Some(c) = out.ring.pop_front() {
                out.ring_len -= c.chunk.data.len();
            }
            continue;
        }
        let wait = match deadline {
            Some(d) if !*killed => {
                let now = Instant::now();
                if now >= d {
                    drop(out);
                    kill_group(shared, pid);
                    *killed = true;
                    out = shared.lock();
                    continue;
                }
                d - now
            }
            _ => Duration::from_secs(3600),
        };
        out = shared
            .cv
            .wait_timeout(out, wait)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn append(shared: &Shared, kind: StreamKind, data: Vec<u8>) {
    let mut out = shared.lock();
    let seq = out.next_seq;
    out.next_seq += 1;
    out.ring_len += data.len();
    let offset = out.offsets[kind_index(kind)];
    out.offsets[kind_index(kind)] += data.len() as u64;
    out.ring.push_back(Chunk {
        seq,
        chunk: OutputChunk {
            kind,
            offset,
            data: Bytes::from(data),
        },
    });
    shared.cv.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passwd::Db;
    use crate::reaper::Mode;

    fn table() -> Table {
        Table::new(Reaper::start(Mode::Registered).unwrap(), None)
    }

    fn root() -> User {
        Db::load(Path::new("/")).unwrap().user("root").unwrap()
    }

    fn sh(script: &str) -> Spec {
        Spec {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: None,
            user: root(),
            stdin: false,
            pty: None,
            tag: None,
            timeout: None,
            caller_env: Vec::new(),
        }
    }

    /// Collects all output until the end: (stdout, stderr, pty, finished).
    fn collect(sub: &mut Subscription) -> (Vec<u8>, Vec<u8>, Vec<u8>, Finished) {
        let (mut o, mut e, mut p) = (Vec::new(), Vec::new(), Vec::new());
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < Duration::from_secs(60), "process hung");
            match sub.next(Duration::from_millis(200)) {
                Next::Output(c) if c.kind == StreamKind::Stdout => o.extend_from_slice(&c.data),
                Next::Output(c) if c.kind == StreamKind::Stderr => e.extend_from_slice(&c.data),
                Next::Output(c) => p.extend_from_slice(&c.data),
                Next::Finished(f) => return (o, e, p, f),
                Next::Pending => {}
            }
        }
    }

    #[test]
    fn stdout_stderr_and_exit_code() {
        let t = table();
        let (_, mut sub) = t.start(sh("echo out; echo err >&2; exit 3")).unwrap();
        let (o, e, _, f) = collect(&mut sub);
        assert_eq!(o, b"out\n");
        assert_eq!(e, b"err\n");
        assert_eq!(f.status, ExitStatus::Code(3));
        assert!(!f.timed_out);
    }

    #[test]
    fn large_output_is_complete_and_ordered_with_a_slow_reader() {
        let t = table();
        // 8 MiB: far more than the ring, so flow control must hold the child back.
        let (_, mut sub) = t
            .start(sh("head -c 8388608 /dev/zero | tr '\\0' 'a'; echo end"))
            .unwrap();
        let mut total = 0usize;
        let mut last = Vec::new();
        loop {
            match sub.next(Duration::from_secs(10)) {
                Next::Output(c) => {
                    assert_eq!(c.offset as usize, total);
                    total += c.data.len();
                    last.extend_from_slice(&c.data);
                    let cut = last.len().saturating_sub(8);
                    last.drain(..cut);
                    if total < 1 << 20 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    let out = sub.process.shared.lock();
                    assert!(out.ring_len <= OUTPUT_RING_LEN);
                }
                Next::Finished(f) => {
                    assert_eq!(f.status, ExitStatus::Code(0));
                    break;
                }
                Next::Pending => panic!("stalled"),
            }
        }
        assert_eq!(total, 8 * 1024 * 1024 + 4);
        assert!(last.ends_with(b"aend\n"));
    }

    #[test]
    fn stdin_round_trip_and_close() {
        let t = table();
        let mut spec = sh("cat; echo done");
        spec.stdin = true;
        let (p, mut sub) = t.start(spec).unwrap();
        p.write_input(b"hello\n").unwrap();
        p.close_input().unwrap();
        assert!(matches!(p.close_input(), Err(Error::NoStdin)));
        let (o, _, _, f) = collect(&mut sub);
        assert_eq!(o, b"hello\ndone\n");
        assert_eq!(f.status, ExitStatus::Code(0));
    }

    #[test]
    fn no_stdin_reads_eof() {
        let t = table();
        let (p, mut sub) = t.start(sh("cat; echo rc=$?")).unwrap();
        assert!(matches!(p.write_input(b"x"), Err(Error::NoStdin)));
        assert_eq!(collect(&mut sub).0, b"rc=0\n");
    }

    #[test]
    fn pty_has_a_terminal_and_resizes() {
        let t = table();
        let mut spec = sh("tty; stty size; read x; stty size");
        spec.pty = Some(WinSize {
            rows: 30,
            cols: 100,
        });
        let (p, mut sub) = t.start(spec).unwrap();
        // Wait for the first size before resizing.
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("30 100") {
            match sub.next(Duration::from_secs(10)) {
                Next::Output(c) if c.kind == StreamKind::Pty => seen.extend_from_slice(&c.data),
                other => panic!("unexpected {other:?}"),
            }
        }
        p.resize(WinSize {
            rows: 40,
            cols: 120,
        })
        .unwrap();
        p.write_input(b"\n").unwrap();
        let (_, _, rest, f) = collect(&mut sub);
        seen.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&seen);
        assert!(text.contains("/dev/pts/"), "{text}");
        assert!(text.contains("40 120"), "{text}");
        assert_eq!(f.status, ExitStatus::Code(0));
        assert!(matches!(
            p.resize(WinSize { rows: 0, cols: 1 }),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let t = table();
        let mut spec = sh("sleep 100 & echo $!; wait");
        spec.timeout = Some(Duration::from_millis(300));
        let (_, mut sub) = t.start(spec).unwrap();
        let started = Instant::now();
        let (o, _, _, f) = collect(&mut sub);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(f.timed_out);
        assert_eq!(f.status, ExitStatus::Signal(libc::SIGKILL));
        let grandchild: i32 = String::from_utf8(o).unwrap().trim().parse().unwrap();
        // The background sleep got SIGKILL too (it is a zombie or gone, never running).
        std::thread::sleep(Duration::from_millis(200));
        let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z"), "{stat}");
    }

    #[test]
    fn signals_tags_list_and_reconnect_replay() {
        let t = table();
        let mut spec = sh("echo ready; exec sleep 100");
        spec.tag = Some("svc".into());
        let (p, mut sub) = t.start(spec.clone()).unwrap();
        assert!(
            matches!(sub.next(Duration::from_secs(10)), Next::Output(c) if c.data[..] == b"ready\n"[..])
        );
        assert!(matches!(t.start(spec), Err(Error::TagInUse(_))));
        assert_eq!(t.by_tag("svc").unwrap().pid(), p.pid());
        assert!(t.list().iter().any(|i| i.pid == p.pid()));
        drop(sub);
        // A new client gets the replay.
        let mut again = t.get(p.pid()).unwrap().subscribe().unwrap();
        assert!(
            matches!(again.next(Duration::from_secs(10)), Next::Output(c) if c.data[..] == b"ready\n"[..])
        );
        assert!(matches!(p.signal(0), Err(Error::InvalidArgument(_))));
        p.signal(libc::SIGTERM).unwrap();
        let (_, _, _, f) = collect(&mut again);
        assert_eq!(f.status, ExitStatus::Signal(libc::SIGTERM));
        let start = Instant::now();
        while !t.is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        // Still reachable for a while after it ended, with its replay and exit.
        let late = t.by_tag("svc").unwrap();
        let (o, _, _, f) = collect(&mut late.subscribe().unwrap());
        assert_eq!(o, b"ready\n");
        assert_eq!(f.status, ExitStatus::Signal(libc::SIGTERM));
        assert!(t.list().is_empty());
    }

    #[test]
    fn runs_as_another_user_in_its_cwd() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::testing::skip("not root, cannot switch users");
            return;
        }
        let t = table();
        let mut spec = sh("id -u; id -g; pwd");
        spec.user = Db::load(Path::new("/")).unwrap().user("nobody").unwrap();
        spec.cwd = Some("/tmp".into());
        let (_, mut sub) = t.start(spec).unwrap();
        let (o, _, _, _) = collect(&mut sub);
        assert_eq!(String::from_utf8(o).unwrap(), "65534\n65534\n/tmp\n");
    }

    #[test]
    fn concurrent_starts_cannot_share_a_tag() {
        let t = table();
        let results: Vec<_> = (0..8)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    let mut spec = sh("exec sleep 2");
                    spec.tag = Some("one".into());
                    t.start(spec).map(|(p, _)| p)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let started: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(started.len(), 1);
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, Error::TagInUse(_))));
        started[0].signal(libc::SIGKILL).unwrap();
    }

    #[test]
    fn bad_specs_are_typed_errors() {
        let t = table();
        let mut s = sh("true");
        s.cmd = "/no/such/binary".into();
        assert!(
            matches!(t.start(s), Err(Error::Spawn { ref source, .. }) if source.kind() == io::ErrorKind::NotFound)
        );
        let mut s = sh("true");
        s.env.push(("A=B".into(), "x".into()));
        assert!(matches!(t.start(s), Err(Error::InvalidArgument(_))));
        let mut s = sh("true");
        s.cwd = Some("relative".into());
        assert!(matches!(t.start(s), Err(Error::InvalidArgument(_))));
        let mut s = sh("true");
        s.cwd = Some("/no/such/dir".into());
        assert!(matches!(t.start(s), Err(Error::Spawn { .. })));
        let mut s = sh("true");
        s.args.push("a\0b".into());
        assert!(matches!(t.start(s), Err(Error::InvalidArgument(_))));
        assert!(t.is_empty());
    }

    #[test]
    fn children_join_the_cgroup_when_cgroup2_is_writable() {
        let name = format!("envd-test-{}", std::process::id());
        let cg = match Cgroup::create(&name) {
            Ok(c) => c,
            Err(e) => {
                crate::testing::skip(&format!("cgroup2 not writable: {e}"));
                return;
            }
        };
        let rel = cg.dir().to_string_lossy().into_owned();
        let t = Table::new(Reaper::start(Mode::Registered).unwrap(), Some(cg));
        let (_, mut sub) = t.start(sh("grep '^0::' /proc/self/cgroup")).unwrap();
        let (o, _, _, _) = collect(&mut sub);
        let line = String::from_utf8(o).unwrap();
        assert!(
            rel.ends_with(line.trim().trim_start_matches("0::")),
            "{line} vs {rel}"
        );
    }
}

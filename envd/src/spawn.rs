//! Starting a child process: `clone(CLONE_VM | CLONE_VFORK)` on a stack of our own, the
//! child's set-up as raw system calls, then `execve`.
//!
//! Why not `std::process::Command`: the set-up envd needs (a new session, a controlling
//! terminal, the cgroup, user switching) takes a `pre_exec` hook, and with one std must
//! `fork()`: copy envd's page tables, write-protect its memory while its other threads run,
//! and take the copy-on-write faults afterwards. On the nested, software-assisted KVM of the
//! test machines that cost about 250 µs of a 1.2 ms exec round trip of `/bin/true` through
//! the RPC (p50 1.17 ms with the hook, 0.91 ms without it, same envd, same run). With
//! `CLONE_VM` the child borrows envd's memory until it execs, as `posix_spawn` does, and
//! `CLONE_VFORK` suspends the spawning thread until then.
//!
//! Architecture invariant: the child shares memory with every envd thread until it execs.
//! It therefore allocates nothing, takes no lock, and calls no glibc function that keeps
//! process state: only raw `syscall`s (glibc's `setuid`/`setgid`/`setgroups` would try to
//! make envd's other threads change their ids too, believing the child is one of them). It
//! reads the prepared [`Command`] and writes only its failure slot and the script argv slot,
//! both atomics. Integer arguments of `syscall` are passed as `c_long` (it is variadic: a
//! narrower integer would leave the register's upper half unspecified). Every signal is
//! blocked from before the clone until the child has reset the dispositions, so no envd
//! signal handler can run on the child's stack.
//!
//! A failure before the program runs (setting up, or exec itself) is written to the slot
//! and the child exits with status 127; the parent reads the slot when `clone` returns,
//! which is after the child's exec or exit. The child is reaped like any other (by the
//! [`crate::reaper`]): this module never waits.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, Ordering};

use libc::{c_char, c_int, c_long, c_void};

use crate::limits::{CHILD_STACK_GUARD_LEN, CHILD_STACK_LEN, PATH_SEARCH_DIRS_MAX};

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("spawn.rs: the kernel sigaction layout is only checked for x86_64 and aarch64");

/// glibc's search path when the environment has no PATH (`confstr(_CS_PATH)`), as execvp.
const DEFAULT_SEARCH_PATH: &[u8] = b"/bin:/usr/bin";
/// The interpreter for an executable file without a `#!` line (ENOEXEC), as execvp.
const SHELL: &CStr = c"/bin/sh";

/// The child's set-up step that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    Stdio = 1,
    Session,
    Terminal,
    Cgroup,
    Groups,
    Gid,
    Uid,
    Cwd,
    Exec,
}

impl Step {
    const ALL: [Step; 9] = [
        Step::Stdio,
        Step::Session,
        Step::Terminal,
        Step::Cgroup,
        Step::Groups,
        Step::Gid,
        Step::Uid,
        Step::Cwd,
        Step::Exec,
    ];

    fn from_u32(v: u32) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u32 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Step::Stdio => "connect stdin, stdout and stderr",
            Step::Session => "start a session",
            Step::Terminal => "take the controlling terminal",
            Step::Cgroup => "join the cgroup",
            Step::Groups => "set the supplementary groups",
            Step::Gid => "set the group id",
            Step::Uid => "set the user id",
            Step::Cwd => "change to the working directory",
            Step::Exec => "execute the program",
        }
    }
}

/// Why a child ended before its program ran.
#[derive(Debug)]
pub struct ChildError {
    pub step: Step,
    /// Always an OS error (`raw_os_error` is set).
    pub source: io::Error,
}

impl fmt::Display for ChildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.step.name())
    }
}

impl std::error::Error for ChildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A process `clone` created. Either it runs the program now, or it failed before and has
/// exited with status 127 (`failure`). Either way the caller must reap `pid`.
#[derive(Debug)]
pub struct Child {
    pub pid: libc::pid_t,
    pub failure: Option<ChildError>,
}

struct Ids {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

/// Everything the child does, prepared in the parent (the child may not allocate).
pub struct Command<'a> {
    /// Paths to exec in turn (execvp's search): the program itself when it has a slash,
    /// else one per PATH entry.
    candidates: Vec<CString>,
    _argv: Vec<CString>,
    /// NULL-terminated pointers into `_argv`.
    argv: Vec<*const c_char>,
    _envp: Vec<CString>,
    envp: Vec<*const c_char>,
    /// `/bin/sh <candidate> <args...> NULL` for a file without `#!`: the child stores the
    /// candidate in slot 1. `AtomicPtr<c_char>` has the layout of `*mut c_char`.
    script_argv: Vec<AtomicPtr<c_char>>,
    stdio: Option<[BorrowedFd<'a>; 3]>,
    new_session: bool,
    controlling_terminal: bool,
    cgroup_procs: Option<BorrowedFd<'a>>,
    ids: Option<Ids>,
    cwd: Option<CString>,
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "NUL byte in a program, argument or variable",
        )
    })
}

impl<'a> Command<'a> {
    /// `program` with `args` (argv[0] is `program`) and exactly the environment `env` (a
    /// later entry replaces an earlier one of the same name). A program without a slash is
    /// searched in the PATH of `env`, as execvp does.
    pub fn new(
        program: &OsStr,
        args: &[OsString],
        env: &[(OsString, OsString)],
    ) -> io::Result<Command<'a>> {
        let prog = program.as_bytes();
        if prog.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty program name",
            ));
        }
        let mut vars: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
        for (k, v) in env {
            vars.insert(k.as_bytes(), v.as_bytes());
        }
        let candidates = if prog.contains(&b'/') {
            vec![cstring(prog)?]
        } else {
            let path = vars
                .get(&b"PATH"[..])
                .copied()
                .unwrap_or(DEFAULT_SEARCH_PATH);
            let dirs: Vec<&[u8]> = path.split(|&b| b == b':').collect();
            if dirs.len() > PATH_SEARCH_DIRS_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("PATH has more than {PATH_SEARCH_DIRS_MAX} entries"),
                ));
            }
            let mut c = Vec::with_capacity(dirs.len());
            for dir in dirs {
                // An empty entry is the working directory.
                let mut full = Vec::with_capacity(dir.len() + 1 + prog.len());
                if !dir.is_empty() {
                    full.extend_from_slice(dir);
                    if !dir.ends_with(b"/") {
                        full.push(b'/');
                    }
                }
                full.extend_from_slice(prog);
                c.push(cstring(&full)?);
            }
            c
        };
        let mut argv_s = Vec::with_capacity(args.len() + 1);
        argv_s.push(cstring(prog)?);
        for a in args {
            argv_s.push(cstring(a.as_bytes())?);
        }
        let mut envp_s = Vec::with_capacity(vars.len());
        for (k, v) in &vars {
            if k.is_empty() || k.contains(&b'=') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "environment variable name is empty or has '='",
                ));
            }
            let mut kv = Vec::with_capacity(k.len() + 1 + v.len());
            kv.extend_from_slice(k);
            kv.push(b'=');
            kv.extend_from_slice(v);
            envp_s.push(cstring(&kv)?);
        }
        let argv = nul_terminated(&argv_s);
        let envp = nul_terminated(&envp_s);
        let mut script_argv = Vec::with_capacity(argv_s.len() + 2);
        script_argv.push(AtomicPtr::new(SHELL.as_ptr().cast_mut()));
        script_argv.push(AtomicPtr::new(std::ptr::null_mut()));
        for a in &argv_s[1..] {
            script_argv.push(AtomicPtr::new(a.as_ptr().cast_mut()));
        }
        script_argv.push(AtomicPtr::new(std::ptr::null_mut()));
        Ok(Command {
            candidates,
            _argv: argv_s,
            argv,
            _envp: envp_s,
            envp,
            script_argv,
            stdio: None,
            new_session: false,
            controlling_terminal: false,
            cgroup_procs: None,
            ids: None,
            cwd: None,
        })
    }

    /// The child's fds 0, 1 and 2 (otherwise it shares the parent's).
    pub fn stdio(
        &mut self,
        stdin: BorrowedFd<'a>,
        stdout: BorrowedFd<'a>,
        stderr: BorrowedFd<'a>,
    ) -> &mut Self {
        self.stdio = Some([stdin, stdout, stderr]);
        self
    }

    /// Runs the child in a new session, hence a new process group led by it. With
    /// `controlling_terminal` its stdin (a terminal) becomes the session's terminal.
    pub fn new_session(&mut self, controlling_terminal: bool) -> &mut Self {
        self.new_session = true;
        self.controlling_terminal = controlling_terminal;
        self
    }

    /// Moves the child into the cgroup whose `cgroup.procs` is open for writing as `procs`.
    pub fn cgroup(&mut self, procs: BorrowedFd<'a>) -> &mut Self {
        self.cgroup_procs = Some(procs);
        self
    }

    /// Switches the child to these ids (needs CAP_SETUID/CAP_SETGID unless they are ours).
    pub fn user(
        &mut self,
        uid: libc::uid_t,
        gid: libc::gid_t,
        groups: &[libc::gid_t],
    ) -> &mut Self {
        self.ids = Some(Ids {
            uid,
            gid,
            groups: groups.to_vec(),
        });
        self
    }

    /// The child's working directory, entered after the user switch (so the user's own
    /// permissions decide).
    pub fn cwd(&mut self, dir: &Path) -> io::Result<&mut Self> {
        self.cwd = Some(cstring(dir.as_os_str().as_bytes())?);
        Ok(self)
    }
}

fn nul_terminated(strings: &[CString]) -> Vec<*const c_char> {
    let mut v: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
    v.push(std::ptr::null());
    v
}

/// The child's stack: an anonymous mapping with a guard page below it, reused for every
/// spawn (allocated once; `&mut` keeps two spawns from sharing it).
pub struct Stack {
    base: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone; which thread holds it does not matter.
unsafe impl Send for Stack {}

impl Stack {
    pub fn new() -> io::Result<Stack> {
        let len = CHILD_STACK_GUARD_LEN + CHILD_STACK_LEN;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        let stack = Stack { base, len };
        // The stack grows down: an overflow hits the guard and faults instead of writing
        // over whatever is mapped below.
        // SAFETY: the first CHILD_STACK_GUARD_LEN bytes are part of our own mapping.
        let r = unsafe { libc::mprotect(p, CHILD_STACK_GUARD_LEN, libc::PROT_NONE) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// One past the highest byte: where the child's stack pointer starts. Page-aligned,
    /// so aligned as the ABI wants (16 bytes).
    fn top(&mut self) -> *mut c_void {
        self.base
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(self.len)
            .cast()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no child runs on it (spawn
        // returns only after the child exec'd or exited, and it borrows `self` mutably).
        unsafe {
            libc::munmap(self.base.as_ptr(), self.len);
        }
    }
}

/// Where the child reports a failure: 0 = none, else a [`Step`] and the errno.
#[derive(Default)]
struct Failure {
    step: AtomicU32,
    errno: AtomicI32,
}

/// What `child_main` receives through clone's argument.
struct ChildArgs<'c, 'a> {
    cmd: &'c Command<'a>,
    /// Raw fds for 0, 1, 2, each >= 3 (see `spawn`).
    stdio: Option<[RawFd; 3]>,
    failure: &'c Failure,
}

/// Starts `cmd` on `stack`. `Err` means no child exists (clone failed); otherwise the
/// returned pid must be reaped, also when `failure` is set. Returns after the child has
/// exec'd or exited.
///
/// The caller must make sure the pid is registered with whoever reaps before the child's
/// exit can be collected (the reaper runs this under its lock).
pub fn spawn(cmd: &Command<'_>, stack: &mut Stack) -> io::Result<Child> {
    // A source fd below 3 could be overwritten by an earlier dup onto 0..2 (or be dup'd
    // onto itself, which keeps close-on-exec): move such fds up first.
    // `try_clone_to_owned` asks for the lowest free fd >= 3, close-on-exec.
    let mut moved: Vec<OwnedFd> = Vec::new();
    let stdio = match &cmd.stdio {
        Some(fds) => {
            let mut raw = [0; 3];
            for (slot, fd) in raw.iter_mut().zip(fds) {
                *slot = if fd.as_raw_fd() < 3 {
                    let up = fd.try_clone_to_owned()?;
                    let r = up.as_raw_fd();
                    moved.push(up);
                    r
                } else {
                    fd.as_raw_fd()
                };
            }
            Some(raw)
        }
        None => None,
    };
    let failure = Failure::default();
    let args = ChildArgs {
        cmd,
        stdio,
        failure: &failure,
    };
    let old_mask = block_all_signals()?;
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    let arg: *const ChildArgs<'_, '_> = &args;
    // `child_main` runs on `stack` (ours alone for this call: `&mut`) with `arg` pointing at
    // `args`, which lives on this frame. CLONE_VFORK suspends this thread until the child
    // has exec'd or exited, so `args`, `cmd` and the stack outlive every use by the child.
    // The child shares memory with the whole process; `child_main` keeps to the rules in
    // this module's doc (raw system calls, no allocation, writes only atomics).
    // SAFETY: as argued just above; and all signals are blocked (inherited by the child)
    // until it resets their dispositions, so no handler of ours runs on the child's stack.
    let pid = unsafe { libc::clone(child_main, stack.top(), flags, arg.cast_mut().cast()) };
    let clone_error = io::Error::last_os_error();
    restore_signal_mask(&old_mask);
    drop(moved);
    if pid < 0 {
        return Err(clone_error);
    }
    let failure = Step::from_u32(failure.step.load(Ordering::Acquire)).map(|step| ChildError {
        step,
        source: io::Error::from_raw_os_error(failure.errno.load(Ordering::Relaxed)),
    });
    Ok(Child { pid, failure })
}

/// Blocks every signal in the calling thread; returns the previous mask.
fn block_all_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigfillset initializes it next.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a valid sigset_t.
    unsafe {
        libc::sigfillset(&mut all);
    }
    // SAFETY: sigset_t is plain data, written by pthread_sigmask below.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid sigset_t for the call.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(old)
}

fn restore_signal_mask(old: &libc::sigset_t) {
    // SAFETY: `old` is the mask pthread_sigmask returned; the output may be NULL. It
    // cannot fail with a valid `how` and set.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
    }
}

// ---- the child -------------------------------------------------------------------------
// Everything below runs in the child, on its own stack, sharing memory with envd.

/// The kernel's `struct sigaction` (not glibc's): handler, flags, restorer, mask.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

const _: () = assert!(std::mem::size_of::<KernelSigaction>() == 32);
/// The kernel's sigset size (64 signals), as rt_sigaction and rt_sigprocmask expect it.
const KERNEL_SIGSET_LEN: c_long = 8;
/// Signals are 1..=64 on Linux.
const SIGNAL_MAX: c_int = 64;

extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&ChildArgs` that `spawn` passed to clone. `spawn` is suspended
    // in clone (CLONE_VFORK) until this child execs or exits, so it is alive, and nothing
    // writes to it meanwhile (its atomics are only read by `spawn` afterwards).
    let args = unsafe { &*arg.cast_const().cast::<ChildArgs<'_, '_>>() };
    let (step, errno) = child_run(args);
    args.failure.errno.store(errno, Ordering::Relaxed);
    args.failure.step.store(step as u32, Ordering::Release);
    child_exit(127)
}

fn child_exit(code: c_int) -> c_int {
    // SAFETY: exit_group takes an integer and does not return; it ends only this child
    // (a thread group of its own: no CLONE_THREAD).
    unsafe {
        libc::syscall(libc::SYS_exit_group, code as c_long);
    }
    code
}

/// The errno of the last failed raw system call in this child. Its thread pointer is the
/// suspended spawning thread's, so this is that thread's errno slot, which nothing else
/// uses while it is suspended.
fn errno() -> c_int {
    // SAFETY: __errno_location has no preconditions.
    let slot = unsafe { libc::__errno_location() };
    // SAFETY: it returns a valid, aligned pointer to the current thread's errno.
    unsafe { *slot }
}

fn check(r: c_long) -> Result<c_long, c_int> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// The set-up and exec; returns only on failure.
fn child_run(a: &ChildArgs<'_, '_>) -> (Step, c_int) {
    let cmd = a.cmd;
    reset_signal_dispositions();
    if let Some(fds) = a.stdio {
        for (target, src) in fds.into_iter().enumerate() {
            // SAFETY: dup3 takes two fds and flags; `src` is open (the parent holds it
            // across the clone) and >= 3, so never equal to `target`.
            let r = unsafe {
                libc::syscall(libc::SYS_dup3, src as c_long, target as c_long, 0 as c_long)
            };
            if let Err(e) = check(r) {
                return (Step::Stdio, e);
            }
        }
    }
    if cmd.new_session {
        // SAFETY: setsid takes no arguments.
        if let Err(e) = check(unsafe { libc::syscall(libc::SYS_setsid) }) {
            return (Step::Session, e);
        }
        if cmd.controlling_terminal {
            // SAFETY: TIOCSCTTY takes an int argument (0: do not steal it from another
            // session); fd 0 is the terminal.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_ioctl,
                    0 as c_long,
                    libc::TIOCSCTTY as c_long,
                    0 as c_long,
                )
            };
            if let Err(e) = check(r) {
                return (Step::Terminal, e);
            }
        }
    }
    if let Some(procs) = cmd.cgroup_procs {
        // Writing "0" to cgroup.procs moves the writing process.
        // SAFETY: a 1-byte write from a static buffer to an fd the parent holds open.
        let r = unsafe {
            libc::syscall(
                libc::SYS_write,
                procs.as_raw_fd() as c_long,
                c"0".as_ptr(),
                1 as c_long,
            )
        };
        if let Err(e) = check(r) {
            return (Step::Cgroup, e);
        }
    }
    if let Some(ids) = &cmd.ids {
        let groups = ids.groups.as_ptr();
        // SAFETY: the pointer and length describe `ids.groups`, alive (see child_main).
        let r = unsafe { libc::syscall(libc::SYS_setgroups, ids.groups.len() as c_long, groups) };
        if let Err(e) = check(r) {
            return (Step::Groups, e);
        }
        // SAFETY: plain integer argument.
        if let Err(e) = check(unsafe { libc::syscall(libc::SYS_setgid, ids.gid as c_long) }) {
            return (Step::Gid, e);
        }
        // SAFETY: plain integer argument.
        if let Err(e) = check(unsafe { libc::syscall(libc::SYS_setuid, ids.uid as c_long) }) {
            return (Step::Uid, e);
        }
    }
    if let Some(cwd) = &cmd.cwd {
        // SAFETY: a NUL-terminated string owned by `cmd`, alive (see child_main).
        if let Err(e) = check(unsafe { libc::syscall(libc::SYS_chdir, cwd.as_ptr()) }) {
            return (Step::Cwd, e);
        }
    }
    // envd opens every fd close-on-exec; this makes sure of it for any fd another thread
    // opened without (openpty). Best effort: ENOSYS/EINVAL before Linux 5.11.
    // SAFETY: plain integer arguments; affects only this child's copy of the fd table
    // (no CLONE_FILES).
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as c_long,
            c_long::from(u32::MAX),
            libc::CLOSE_RANGE_CLOEXEC as c_long,
        );
    }
    let empty: u64 = 0;
    // SAFETY: sets the mask from a valid kernel sigset; the old mask is not wanted.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as c_long,
            &empty,
            std::ptr::null_mut::<u64>(),
            KERNEL_SIGSET_LEN,
        )
    };
    if let Err(e) = check(r) {
        // Cannot happen with these arguments; exec with signals blocked would be worse.
        return (Step::Exec, e);
    }
    (Step::Exec, exec(cmd))
}

/// Sets every signal that has a handler (envd's or std's) to SIG_DFL, and SIGPIPE, which
/// std ignores, too; an ignored signal stays ignored (as posix_spawn and std do). Runs
/// with all signals blocked. The child has its own copy of the disposition table (no
/// CLONE_SIGHAND): envd's handlers stay as they are.
fn reset_signal_dispositions() {
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=SIGNAL_MAX {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut old = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SAFETY: rt_sigaction with no new action writes the current one into `old`, a
        // valid kernel sigaction.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig as c_long,
                std::ptr::null::<KernelSigaction>(),
                &mut old,
                KERNEL_SIGSET_LEN,
            )
        };
        if r < 0 || old.handler == libc::SIG_DFL {
            continue;
        }
        if old.handler == libc::SIG_IGN && sig != libc::SIGPIPE {
            continue;
        }
        // SAFETY: installs SIG_DFL from a valid kernel sigaction; the old one is not wanted.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig as c_long,
                &default,
                std::ptr::null_mut::<KernelSigaction>(),
                KERNEL_SIGSET_LEN,
            );
        }
    }
}

/// execvp's search over the candidates; returns the errno to report.
fn exec(cmd: &Command<'_>) -> c_int {
    let mut saw_eacces = false;
    let mut last = libc::ENOENT;
    for cand in &cmd.candidates {
        let e = execve(cand, cmd.argv.as_ptr(), cmd.envp.as_ptr());
        match e {
            libc::ENOEXEC => {
                // An executable without `#!`: run it with the shell, as execvp does.
                cmd.script_argv[1].store(cand.as_ptr().cast_mut(), Ordering::Relaxed);
                // AtomicPtr<c_char> has the same size and bit validity as *mut c_char.
                let argv = cmd.script_argv.as_ptr().cast::<*const c_char>();
                execve(SHELL, argv, cmd.envp.as_ptr());
                return libc::ENOEXEC;
            }
            libc::EACCES => {
                saw_eacces = true;
                last = e;
            }
            libc::ENOENT | libc::ESTALE | libc::ENOTDIR | libc::ENODEV | libc::ETIMEDOUT => {
                last = e
            }
            _ => return e,
        }
    }
    if saw_eacces {
        libc::EACCES
    } else {
        last
    }
}

/// execve; returns only on failure, with the errno.
fn execve(path: &CStr, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: `path` is NUL-terminated; `argv` and `envp` are NULL-terminated arrays of
    // NUL-terminated strings owned by the Command, alive (see child_main).
    unsafe {
        libc::syscall(libc::SYS_execve, path.as_ptr(), argv, envp);
    }
    errno()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsFd, FromRawFd};
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(r, 0);
        // SAFETY: fresh fds owned by nobody else.
        let r = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: likewise.
        let w = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        (r, w)
    }

    fn wait(pid: libc::pid_t) -> i32 {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`. The test owns this child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        status
    }

    fn env() -> Vec<(OsString, OsString)> {
        vec![("PATH".into(), "/usr/bin:/bin".into())]
    }

    /// Runs the command with stdout and stderr to one pipe; returns (output, wait status).
    fn run(cmd: Command<'static>) -> (String, i32) {
        let (r, w) = pipe();
        let null = std::fs::File::open("/dev/null").unwrap();
        // Command is covariant in its fd lifetime: borrow local fds for the spawn.
        let mut c: Command<'_> = cmd;
        c.stdio(null.as_fd(), w.as_fd(), w.as_fd());
        let mut stack = Stack::new().unwrap();
        let child = spawn(&c, &mut stack).unwrap();
        drop(c);
        drop(w);
        assert!(child.failure.is_none(), "{:?}", child.failure);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        (out, wait(child.pid))
    }

    fn cmd(program: &str, args: &[&str]) -> Command<'static> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        Command::new(OsStr::new(program), &args, &env()).unwrap()
    }

    #[test]
    fn runs_a_program_with_args_env_and_exit_code() {
        let mut env = env();
        env.push(("A".into(), "first".into()));
        env.push(("A".into(), "second".into()));
        let c = Command::new(
            OsStr::new("sh"),
            &[
                "-c".into(),
                "echo $0 $1 $A; exit 3".into(),
                "zero".into(),
                "one".into(),
            ],
            &env,
        )
        .unwrap();
        let (out, status) = run(c);
        assert_eq!(out, "zero one second\n");
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 3);
    }

    #[test]
    fn exec_failures_are_reported_at_once_with_their_errno() {
        let dir = std::env::temp_dir().join(format!("envd-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain");
        std::fs::write(&plain, "echo hi\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cases: Vec<(String, i32)> = vec![
            ("/no/such/program".into(), libc::ENOENT),
            ("no-such-program-in-path".into(), libc::ENOENT),
            (plain.to_string_lossy().into_owned(), libc::EACCES),
            (dir.to_string_lossy().into_owned(), libc::EACCES),
            (format!("{}/x", plain.display()), libc::ENOTDIR),
        ];
        let mut stack = Stack::new().unwrap();
        for (program, errno) in cases {
            let t = Instant::now();
            let child = spawn(&cmd(&program, &[]), &mut stack).unwrap();
            assert!(t.elapsed() < Duration::from_secs(2));
            let f = child.failure.expect(&program);
            assert_eq!(f.step, Step::Exec, "{program}");
            assert_eq!(f.source.raw_os_error(), Some(errno), "{program}");
            let status = wait(child.pid);
            assert_eq!(libc::WEXITSTATUS(status), 127);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn searches_path_past_unusable_entries_and_runs_scripts_without_shebang() {
        let dir = std::env::temp_dir().join(format!("envd-spawn-path-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        // Not executable in a, a script without `#!` in b: execvp skips the first (EACCES)
        // and runs the second with /bin/sh (ENOEXEC).
        std::fs::write(a.join("tool"), "exit 9\n").unwrap();
        std::fs::write(b.join("tool"), "echo script \"$@\"\n").unwrap();
        std::fs::set_permissions(b.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("/no/such/dir:{}:{}", a.display(), b.display());
        let c = Command::new(
            OsStr::new("tool"),
            &["x".into(), "y".into()],
            &[("PATH".into(), path.into())],
        )
        .unwrap();
        let (out, status) = run(c);
        assert_eq!(out, "script x y\n");
        assert_eq!(libc::WEXITSTATUS(status), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn setup_failures_name_their_step() {
        let mut c = cmd("/bin/true", &[]);
        c.cwd(Path::new("/no/such/dir")).unwrap();
        let mut stack = Stack::new().unwrap();
        let child = spawn(&c, &mut stack).unwrap();
        let f = child.failure.unwrap();
        assert_eq!(f.step, Step::Cwd);
        assert_eq!(f.source.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(libc::WEXITSTATUS(wait(child.pid)), 127);
        // A controlling terminal on a non-terminal stdin.
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut c = cmd("/bin/true", &[]);
        c.stdio(null.as_fd(), null.as_fd(), null.as_fd())
            .new_session(true);
        let child = spawn(&c, &mut stack).unwrap();
        assert_eq!(child.failure.unwrap().step, Step::Terminal);
        wait(child.pid);
    }

    #[test]
    fn bad_input_is_an_error_not_a_child() {
        let nul = |s: &str| {
            Command::new(OsStr::new(s), &[], &env())
                .err()
                .unwrap()
                .kind()
        };
        assert_eq!(nul("a\0b"), io::ErrorKind::InvalidInput);
        assert_eq!(nul(""), io::ErrorKind::InvalidInput);
        let e = Command::new(OsStr::new("true"), &[], &[("A=B".into(), "x".into())]);
        assert!(e.is_err());
        let many = vec!["/x"; PATH_SEARCH_DIRS_MAX + 1].join(":");
        let e = Command::new(OsStr::new("true"), &[], &[("PATH".into(), many.into())]);
        assert!(e.is_err());
    }

    #[test]
    fn new_session_resets_signals_and_closes_inherited_fds() {
        // An fd without close-on-exec (dup does not set it) must still not reach the child.
        let (leak_r, _leak_w) = pipe();
        // SAFETY: dup of an fd we own; the result is owned below.
        let leaked = unsafe { libc::dup(leak_r.as_raw_fd()) };
        assert!(leaked >= 3);
        // SAFETY: a fresh fd owned by nobody else.
        let leaked = unsafe { OwnedFd::from_raw_fd(leaked) };
        let mut c = cmd(
            "/bin/sh",
            &[
                "-c",
                "read s < /proc/self/stat; set -- ${s#*) }; echo pgrp=$(($3 == $$)) sid=$(($4 == $$)); \
                 grep -E '^Sig(Blk|Ign)' /proc/self/status; ls /proc/self/fd | tr '\\n' ' '",
            ],
        );
        c.new_session(false);
        let (out, status) = run(c);
        drop(leaked);
        // The reset happened in the child's copy of the dispositions, not in ours.
        // SAFETY: sigaction is plain data; querying writes it.
        let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a query (no new action) into a valid sigaction.
        let r = unsafe { libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut ours) };
        assert_eq!(r, 0);
        assert_eq!(ours.sa_sigaction, libc::SIG_IGN);
        assert_eq!(libc::WEXITSTATUS(status), 0, "{out}");
        assert!(out.contains("pgrp=1 sid=1"), "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        // SIGPIPE (13) is ignored by the test harness; the child has it back at default.
        let ign = out
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .unwrap();
        let ign = u64::from_str_radix(ign.trim(), 16).unwrap();
        assert_eq!(ign & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
        // ls sees 0, 1, 2 and its own directory fd (3) only.
        let fds = out.lines().last().unwrap();
        assert_eq!(fds.trim(), "0 1 2 3", "{out}");
    }

    #[test]
    fn switches_user_when_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::testing::skip("not root, cannot switch users");
            return;
        }
        let mut c = cmd("/bin/sh", &["-c", "id -u; id -g; id -G; pwd"]);
        c.user(65534, 65534, &[65534, 100]);
        c.cwd(Path::new("/tmp")).unwrap();
        let (out, _) = run(c);
        assert_eq!(out, "65534\n65534\n65534 100\n/tmp\n");
    }

    #[test]
    fn many_spawns_on_one_stack_from_many_threads() {
        let stack = std::sync::Arc::new(std::sync::Mutex::new(Stack::new().unwrap()));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let stack = stack.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        let child = {
                            let mut s = stack.lock().unwrap();
                            spawn(&cmd("/bin/true", &[]), &mut s).unwrap()
                        };
                        assert!(child.failure.is_none());
                        assert_eq!(wait(child.pid), 0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}

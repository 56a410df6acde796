//! One Firecracker process per sandbox.
//!
//! [`VmProcess::spawn`] starts `firecracker --api-sock <dir>/api.sock --id <id>` with:
//! - its own session (`setsid`): it is not in the agent's process group or session, so it
//!   outlives the agent (the agent's systemd unit uses `KillMode=process`);
//! - the sandbox's cgroup, joined in the child before exec (charged from its first page);
//! - the sandbox's network namespace (`setns` on `/run/netns/NAME` in the child);
//! - its own mount namespace in which a tmpfs at [`STABLE_DIR`] holds [`STABLE_DISK_PATH`],
//!   bind-mounted onto this sandbox's disk. Drives are configured with the stable path, so a
//!   snapshot (which records the drive path) taken in one sandbox restores onto another
//!   sandbox's disk copy: `snapshot/load` has overrides for taps and vsock, none for drives;
//! - stdout and stderr appended to `<dir>/firecracker.log`;
//! - a pidfd held from the moment it runs, and a state file (`<dir>/firecracker.state`) with
//!   its pid and start time, so a restarted agent can [`VmProcess::adopt`] it and be sure the
//!   pid still names the same process.
//!
//! Dropping a [`VmProcess`] leaves Firecracker running; [`VmProcess::kill`] ends it and removes
//! everything spawn made (cgroup, sockets, state file; the mount namespace dies with it).

use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::ApiClient;
use crate::cgroup::{Cgroup, CgroupError, CgroupLimits, CgroupMode};
use crate::limits::{
    API_SOCKET_POLL_INTERVAL, JAILER_EXIT_WAIT, KILL_WAIT, PID_FILE_LEN_MAX, PROC_CMDLINE_LEN_MAX,
    STABLE_TMPFS_SIZE, STATE_FILE_LEN_MAX, STATE_FILE_LINES_MAX, UNIX_SOCKET_PATH_LEN_MAX,
};
use crate::sys;

/// Directory that exists only inside each Firecracker's mount namespace (a tmpfs there; an
/// empty directory on the host, created once as the mount point).
pub const STABLE_DIR: &str = "/run/wrenn-vm";
/// The path every Firecracker sees its own sandbox's root disk at.
pub const STABLE_DISK_PATH: &str = "/run/wrenn-vm/rootfs.ext4";
/// File names inside the sandbox directory.
pub const API_SOCKET_NAME: &str = "api.sock";
pub const LOG_NAME: &str = "firecracker.log";
pub const STATE_NAME: &str = "firecracker.state";

/// The cgroup a Firecracker goes into.
#[derive(Clone, Debug)]
pub struct CgroupSpec {
    pub mode: CgroupMode,
    /// Directory under each hierarchy root holding all sandboxes (e.g. `wrenn`).
    pub parent: String,
    /// This sandbox's cgroup name.
    pub name: String,
    pub limits: CgroupLimits,
}

/// How to start one Firecracker.
#[derive(Clone, Debug)]
pub struct SpawnConfig {
    /// The `firecracker` binary (`WRENN_FIRECRACKER`).
    pub firecracker: PathBuf,
    /// `--id` (1–64 of `[A-Za-z0-9-]`).
    pub id: String,
    /// The sandbox directory: API socket, log, state file. Must exist.
    pub dir: PathBuf,
    /// Named network namespace to run in (`/run/netns/NAME`); `None` keeps the host's.
    pub netns: Option<String>,
    pub cgroup: Option<CgroupSpec>,
    /// This sandbox's disk, seen by Firecracker at [`STABLE_DISK_PATH`]. `None`: no mount
    /// namespace of its own.
    pub disk: Option<PathBuf>,
    /// More files to remove when the process is killed (the vsock socket and its listeners).
    pub cleanup: Vec<PathBuf>,
    /// More command-line arguments (e.g. `--level Info`).
    pub extra_args: Vec<String>,
}

/// The Firecracker binary: `configured` (a flag or config file) if given, else
/// `WRENN_FIRECRACKER`. It must be an existing file.
pub fn firecracker_binary(configured: Option<&Path>) -> Result<PathBuf, ProcessError> {
    let p = match configured {
        Some(p) => p.to_owned(),
        None => std::env::var_os("WRENN_FIRECRACKER")
            .map(PathBuf::from)
            .ok_or_else(|| {
                ProcessError::InvalidConfig(
                    "no firecracker binary configured and WRENN_FIRECRACKER not set".to_owned(),
                )
            })?,
    };
    if !p.is_file() {
        return Err(ProcessError::InvalidConfig(format!(
            "firecracker binary {} is not a file",
            p.display()
        )));
    }
    Ok(p)
}

impl SpawnConfig {
    pub fn new(firecracker: impl Into<PathBuf>, id: &str, dir: impl Into<PathBuf>) -> SpawnConfig {
        SpawnConfig {
            firecracker: firecracker.into(),
            id: id.to_owned(),
            dir: dir.into(),
            netns: None,
            cgroup: None,
            disk: None,
            cleanup: Vec::new(),
            extra_args: Vec::new(),
        }
    }
}

#[derive(Debug)]
pub enum ProcessError {
    InvalidConfig(String),
    Cgroup(CgroupError),
    Netns(crate::net::Error),
    /// Preparing a file or directory (log, stable dir, stale socket) failed.
    Prepare {
        path: PathBuf,
        source: io::Error,
    },
    Spawn {
        path: PathBuf,
        source: io::Error,
    },
    Pidfd(io::Error),
    /// Reading /proc for the process failed.
    Proc {
        pid: u32,
        source: io::Error,
    },
    /// Writing or reading the state file failed.
    State {
        path: PathBuf,
        source: io::Error,
    },
    /// The state file does not parse.
    BadState {
        path: PathBuf,
        reason: String,
    },
    /// The recorded pid is gone or is now another process.
    Gone {
        pid: u32,
    },
    /// The program (Firecracker, or the `wrenn-uffd` page server) exited while we waited
    /// for its socket.
    Exited {
        program: &'static str,
        status: String,
        log_tail: String,
    },
    /// The API socket did not accept connections in time.
    ApiSocketTimeout {
        path: PathBuf,
        timeout: Duration,
    },
    Signal(io::Error),
    Wait(io::Error),
    /// Firecracker did not die within [`KILL_WAIT`] of SIGKILL.
    KillTimeout {
        pid: u32,
    },
    Cleanup {
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessError::InvalidConfig(s) => write!(f, "invalid firecracker spawn config: {s}"),
            ProcessError::Cgroup(_) => write!(f, "set up the sandbox cgroup"),
            ProcessError::Netns(_) => write!(f, "open the sandbox network namespace"),
            ProcessError::Prepare { path, .. } => write!(f, "prepare {}", path.display()),
            ProcessError::Spawn { path, .. } => write!(f, "spawn {}", path.display()),
            ProcessError::Pidfd(_) => write!(f, "open a pidfd for firecracker"),
            ProcessError::Proc { pid, .. } => write!(f, "read /proc/{pid}"),
            ProcessError::State { path, .. } => write!(f, "state file {}", path.display()),
            ProcessError::BadState { path, reason } => {
                write!(f, "state file {}: {reason}", path.display())
            }
            ProcessError::Gone { pid } => {
                write!(f, "firecracker pid {pid} is gone or is another process now")
            }
            ProcessError::Exited {
                program,
                status,
                log_tail,
            } => {
                write!(f, "{program} exited ({status}); log ends: {log_tail}")
            }
            ProcessError::ApiSocketTimeout { path, timeout } => write!(
                f,
                "api socket {} not ready within {timeout:?}",
                path.display()
            ),
            ProcessError::Signal(_) => write!(f, "signal firecracker"),
            ProcessError::Wait(_) => write!(f, "wait for firecracker"),
            ProcessError::KillTimeout { pid } => {
                write!(f, "firecracker pid {pid} still alive after SIGKILL")
            }
            ProcessError::Cleanup { path, .. } => write!(f, "remove {}", path.display()),
        }
    }
}

impl std::error::Error for ProcessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProcessError::Cgroup(e) => Some(e),
            ProcessError::Netns(e) => Some(e),
            ProcessError::Prepare { source, .. }
            | ProcessError::Spawn { source, .. }
            | ProcessError::Proc { source, .. }
            | ProcessError::State { source, .. }
            | ProcessError::Cleanup { source, .. } => Some(source),
            ProcessError::Pidfd(e) | ProcessError::Signal(e) | ProcessError::Wait(e) => Some(e),
            _ => None,
        }
    }
}

/// How Firecracker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
    /// It was not our child (re-adopted): the exit status went to its real parent.
    Unknown,
}

fn cstring(p: &Path) -> Result<CString, ProcessError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| ProcessError::InvalidConfig(format!("path {} has a NUL", p.display())))
}

/// What was recorded about a running Firecracker.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    pid: u32,
    start_time: u64,
    exe: PathBuf,
    api_socket: PathBuf,
    cgroup_dirs: Vec<PathBuf>,
    cleanup: Vec<PathBuf>,
    /// Started by the jailer: its instance directory (`<chroot base>/<exec>/<id>`, removed
    /// on kill). `exe` and the `--api-sock` argument are then paths inside `<chroot>/root`.
    chroot: Option<PathBuf>,
}

/// First line of `firecracker.state` ([`proto::kv`] format).
const STATE_MAGIC: &str = "wrenn-firecracker-state 1";

impl State {
    fn encode(&self) -> String {
        let mut w = proto::kv::Writer::new(STATE_MAGIC);
        w.put_display("pid", self.pid);
        w.put_display("start_time", self.start_time);
        w.put_display("exe", self.exe.display());
        w.put_display("api_socket", self.api_socket.display());
        w.list("cgroup", self.cgroup_dirs.iter().map(|d| d.display()));
        w.list("cleanup", self.cleanup.iter().map(|d| d.display()));
        if let Some(c) = &self.chroot {
            w.put_display("chroot", c.display());
        }
        w.finish()
    }

    fn decode(text: &str) -> Result<State, String> {
        let text = legacy_state(text, STATE_MAGIC, &["cgroup", "cleanup"]);
        let (mut r, _) = proto::kv::Reader::parse(&text, &[STATE_MAGIC], STATE_FILE_LINES_MAX)
            .map_err(|e| e.to_string())?;
        let mut read = || -> Result<State, proto::kv::KvError> {
            let state = State {
                pid: r.num("pid")?,
                start_time: r.num("start_time")?,
                exe: r.string("exe")?.into(),
                api_socket: r.string("api_socket")?.into(),
                cgroup_dirs: r.list("cgroup")?.into_iter().map(PathBuf::from).collect(),
                cleanup: r.list("cleanup")?.into_iter().map(PathBuf::from).collect(),
                chroot: r.take("chroot").map(PathBuf::from),
            };
            Ok(state)
        };
        let state = read().map_err(|e| e.to_string())?;
        r.done().map_err(|e| e.to_string())?;
        if state.pid <= 1 {
            return Err("no pid".into());
        }
        Ok(state)
    }
}

/// A state file written before the [`proto::kv`] format (plain `key=value` lines, no first
/// line, repeated keys for lists), rewritten in that format so one reader reads both: a
/// Firecracker started by an older agent is still adopted by a newer one. Keys the old
/// writers never wrote are dropped here and so refused by no one; text that already starts
/// with `magic` is returned as it is.
pub(crate) fn legacy_state<'a>(
    text: &'a str,
    magic: &str,
    lists: &[&str],
) -> std::borrow::Cow<'a, str> {
    if text.starts_with(magic) || text.starts_with("wrenn-") {
        return text.into();
    }
    let mut w = proto::kv::Writer::new(magic);
    let mut counts = vec![0usize; lists.len()];
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            // Left for the reader to refuse.
            return text.into();
        };
        match lists.iter().position(|l| *l == k) {
            Some(i) => {
                w.put(&format!("{k}.{}", counts[i]), v);
                counts[i] += 1;
            }
            None => w.put(k, v),
        }
    }
    w.finish().into()
}

/// Start time (clock ticks since boot, field 22 of /proc/PID/stat).
pub(crate) fn proc_start_time(pid: u32) -> io::Result<u64> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    proto::process::start_ticks(pid)
}

pub(crate) fn proc_cmdline(pid: u32) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = Vec::new();
    File::open(format!("/proc/{pid}/cmdline"))?
        .take(PROC_CMDLINE_LEN_MAX as u64)
        .read_to_end(&mut buf)?;
    Ok(buf
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

fn log_tail(path: &Path) -> String {
    let text = fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(600);
    String::from_utf8_lossy(&text[start..]).trim().to_owned()
}

/// True if `pid`'s command line is the recorded Firecracker's: its program and its
/// `--api-sock` (for a jailed one, the socket's path inside the chroot).
fn same_command(pid: u32, state: &State) -> bool {
    let api_arg = match &state.chroot {
        Some(c) => match state.api_socket.strip_prefix(c.join("root")) {
            Ok(rel) => Path::new("/").join(rel),
            Err(_) => return false,
        },
        None => state.api_socket.clone(),
    };
    proc_cmdline(pid).ok().is_some_and(|argv| {
        argv.first().map(Vec::as_slice) == Some(state.exe.as_os_str().as_bytes())
            && argv
                .windows(2)
                .any(|w| w[0] == b"--api-sock" && w[1] == api_arg.as_os_str().as_bytes())
    })
}

/// True if the root directory of `pid` is `dir` (the same inode on the same device): a jailed
/// Firecracker's root is its chroot. Compared by inode, not by name: after the jailer's
/// `pivot_root` in its own mount namespace, `/proc/PID/root` reads as `/`.
pub fn root_is(pid: u32, dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(format!("/proc/{pid}/root")), fs::metadata(dir)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// A running (or exited, not yet reaped) Firecracker.
#[derive(Debug)]
pub struct VmProcess {
    pid: u32,
    pidfd: OwnedFd,
    /// Spawned by this process (so `waitid` can reap it and read its status).
    is_child: bool,
    state: State,
    state_path: PathBuf,
    log_path: PathBuf,
    cgroup: Option<Cgroup>,
    exit: Option<ExitKind>,
}

fn check_id(id: &str) -> Result<(), ProcessError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ProcessError::InvalidConfig(format!("instance id {id:?}")))
    }
}

fn prepare(path: &Path) -> impl FnOnce(io::Error) -> ProcessError + '_ {
    move |source| ProcessError::Prepare {
        path: path.to_owned(),
        source,
    }
}

impl VmProcess {
    /// Starts Firecracker as configured. Does not wait for its API socket: see
    /// [`VmProcess::wait_api_socket`].
    pub fn spawn(cfg: &SpawnConfig) -> Result<VmProcess, ProcessError> {
        check_id(&cfg.id)?;
        let api_socket = cfg.dir.join(API_SOCKET_NAME);
        if api_socket.as_os_str().len() > UNIX_SOCKET_PATH_LEN_MAX {
            return Err(ProcessError::InvalidConfig(format!(
                "api socket path {} is over {UNIX_SOCKET_PATH_LEN_MAX} bytes",
                api_socket.display()
            )));
        }
        let log_path = cfg.dir.join(LOG_NAME);
        let state_path = cfg.dir.join(STATE_NAME);

        // A socket left by an earlier Firecracker of this sandbox would make bind fail.
        match fs::remove_file(&api_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(prepare(&api_socket)(e)),
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(prepare(&log_path))?;
        let log2 = log.try_clone().map_err(prepare(&log_path))?;

        let netns: Option<OwnedFd> = match &cfg.netns {
            Some(name) => Some(crate::net::netns::open(name).map_err(ProcessError::Netns)?),
            None => None,
        };
        let mount = match &cfg.disk {
            Some(disk) => {
                fs::create_dir_all(STABLE_DIR).map_err(prepare(Path::new(STABLE_DIR)))?;
                // Resolve now: the child cannot report a missing disk legibly.
                let disk = fs::canonicalize(disk).map_err(prepare(disk))?;
                Some((
                    cstring(Path::new(STABLE_DIR))?,
                    cstring(Path::new(STABLE_DISK_PATH))?,
                    cstring(&disk)?,
                    // Compile-time constant without NUL.
                    CString::new(STABLE_TMPFS_SIZE)
                        .map_err(|_| ProcessError::InvalidConfig("tmpfs options".to_owned()))?,
                ))
            }
            None => None,
        };
        let cgroup = match &cfg.cgroup {
            Some(spec) => Some(
                Cgroup::create(&spec.mode, &spec.parent, &spec.name, &spec.limits)
                    .map_err(ProcessError::Cgroup)?,
            ),
            None => None,
        };
        let procs: Vec<File> = match &cgroup {
            Some(cg) => cg.open_procs().map_err(ProcessError::Cgroup)?,
            None => Vec::new(),
        };

        let mut cmd = Command::new(&cfg.firecracker);
        cmd.arg("--api-sock")
            .arg(&api_socket)
            .arg("--id")
            .arg(&cfg.id)
            .args(&cfg.extra_args)
            .current_dir(&cfg.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: the closure runs in the forked child before exec. It only makes system calls
        // through sys's one-call wrappers on descriptors and strings prepared above: no
        // allocation, no locks (io::Error::last_os_error does not allocate).
        unsafe {
            cmd.pre_exec(move || {
                sys::setsid()?;
                for f in &procs {
                    // "0" names the writing process itself.
                    sys::write_once(f.as_fd(), b"0")?;
                }
                if let Some(ns) = &netns {
                    sys::setns_net(ns.as_fd())?;
                }
                if let Some((dir, file, disk, opts)) = &mount {
                    sys::unshare_mount_ns()?;
                    sys::mount_tmpfs(dir, opts)?;
                    sys::create_empty_file(file)?;
                    sys::bind_mount(disk, file)?;
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                if let Some(cg) = &cgroup {
                    let _ = cg.remove(Duration::from_millis(100));
                }
                return Err(ProcessError::Spawn {
                    path: cfg.firecracker.clone(),
                    source,
                });
            }
        };
        let pid = child.id();
        let (pidfd, start_time) = match hold_child(&mut child) {
            Ok(h) => h,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = cg.remove(Duration::from_millis(100));
                }
                return Err(e);
            }
        };
        // `child` is dropped without waiting: from here on we reap through the pidfd.
        drop(child);
        let state = State {
            pid,
            start_time,
            exe: cfg.firecracker.clone(),
            api_socket,
            cgroup_dirs: cgroup
                .as_ref()
                .map(|c| c.dirs().to_vec())
                .unwrap_or_default(),
            cleanup: cfg.cleanup.clone(),
            chroot: None,
        };
        let vm = VmProcess {
            pid,
            pidfd,
            is_child: true,
            state,
            state_path,
            log_path,
            cgroup,
            exit: None,
        };
        if let Err(e) = vm.write_state() {
            let _ = vm.kill();
            return Err(e);
        }
        log::info!(
            "firecracker spawned pid={pid} id={} netns={} disk={}",
            cfg.id,
            cfg.netns.as_deref().unwrap_or("-"),
            cfg.disk
                .as_deref()
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into())
        );
        Ok(vm)
    }

    /// Starts Firecracker under the jailer as `spec` says, its chroot already filled by
    /// [`crate::jail::prepare_chroot`]. `dir` is the sandbox directory (log, state file).
    /// The jailer (our child, its own session, stdout and stderr on `firecracker.log`) clones
    /// Firecracker into a new PID namespace, writes its host pid to
    /// `<chroot>/<exec file name>.pid` and exits; we wait for that, read the pid, and hold the
    /// process by pidfd, checked to be a process whose root is the chroot. Firecracker is
    /// then not our child: its exit status goes to init. Does not wait for the API socket.
    pub fn spawn_jailed(
        spec: &crate::jail::JailSpec,
        dir: &Path,
        cleanup: Vec<PathBuf>,
    ) -> Result<VmProcess, ProcessError> {
        let jail_err = |e: crate::jail::JailError| ProcessError::InvalidConfig(e.to_string());
        let args = spec.args().map_err(jail_err)?;
        let instance = spec.instance_dir().map_err(jail_err)?;
        let chroot = instance.join("root");
        let exec_name = crate::jail::exec_file_name(&spec.firecracker).map_err(jail_err)?;
        let api_socket = crate::jail::host_path(&chroot, Path::new(crate::jail::JAIL_API_SOCKET));
        if api_socket.as_os_str().len() > UNIX_SOCKET_PATH_LEN_MAX {
            return Err(ProcessError::InvalidConfig(format!(
                "api socket path {} is over {UNIX_SOCKET_PATH_LEN_MAX} bytes",
                api_socket.display()
            )));
        }
        let pid_file = chroot.join(format!("{exec_name}{}", crate::jail::PID_FILE_SUFFIX));
        // The jailer creates the pid file with O_EXCL; the API socket must not exist.
        for stale in [&pid_file, &api_socket] {
            match fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(prepare(stale)(e)),
            }
        }
        let log_path = dir.join(LOG_NAME);
        let state_path = dir.join(STATE_NAME);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(prepare(&log_path))?;
        let log2 = log.try_clone().map_err(prepare(&log_path))?;
        let mut cmd = Command::new(&spec.jailer);
        cmd.args(&args)
            .current_dir(dir)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: runs in the forked child before exec; setsid is one system call, no
        // allocation, no locks. A session leader, the jailer moves Firecracker into a new
        // session of its own (so the jailer's exit sends it no SIGHUP).
        unsafe {
            cmd.pre_exec(sys::setsid);
        }
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            path: spec.jailer.clone(),
            source,
        })?;
        let (jailer_fd, _) = hold_child(&mut child)?;
        let cgroup_dirs = spec.cgroup_dirs();
        let fail = |e: ProcessError| {
            let _ = Cgroup::from_dirs(cgroup_dirs.clone()).remove(Duration::from_millis(100));
            e
        };
        if !sys::poll_readable(jailer_fd.as_fd(), JAILER_EXIT_WAIT).map_err(ProcessError::Wait)? {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(ProcessError::Exited {
                program: "jailer",
                status: format!("still running after {JAILER_EXIT_WAIT:?}"),
                log_tail: log_tail(&log_path),
            }));
        }
        let status = child.wait().map_err(ProcessError::Wait)?;
        if !status.success() {
            return Err(fail(ProcessError::Exited {
                program: "jailer",
                status: status.to_string(),
                log_tail: log_tail(&log_path),
            }));
        }
        let mut text = String::new();
        File::open(&pid_file)
            .and_then(|f| f.take(PID_FILE_LEN_MAX as u64).read_to_string(&mut text))
            .map_err(|source| {
                fail(ProcessError::State {
                    path: pid_file.clone(),
                    source,
                })
            })?;
        let pid: u32 = text.trim().parse().ok().filter(|p| *p > 1).ok_or_else(|| {
            fail(ProcessError::BadState {
                path: pid_file.clone(),
                reason: format!("not a pid: {text:?}"),
            })
        })?;
        let gone = |_| {
            fail(ProcessError::Exited {
                program: "firecracker",
                status: "gone right after the jailer started it".into(),
                log_tail: log_tail(&log_path),
            })
        };
        let pidfd = sys::pidfd_open(pid).map_err(gone)?;
        let start_time = proc_start_time(pid).map_err(gone)?;
        // The pidfd pins the process; its root must be our chroot, or the pid was reused.
        let root_ok = root_is(pid, &chroot);
        let alive =
            !sys::poll_readable(pidfd.as_fd(), Duration::ZERO).map_err(ProcessError::Pidfd)?;
        if !(root_ok && alive) {
            return Err(fail(ProcessError::Gone { pid }));
        }
        let state = State {
            pid,
            start_time,
            exe: Path::new("/").join(&exec_name),
            api_socket,
            cgroup_dirs: cgroup_dirs.clone(),
            cleanup,
            chroot: Some(instance),
        };
        let vm = VmProcess {
            pid,
            pidfd,
            is_child: false,
            state,
            state_path,
            log_path,
            cgroup: (!cgroup_dirs.is_empty()).then(|| Cgroup::from_dirs(cgroup_dirs)),
            exit: None,
        };
        if let Err(e) = vm.write_state() {
            let _ = vm.kill();
            return Err(e);
        }
        log::info!(
            "firecracker spawned jailed pid={pid} id={} uid={} netns={}",
            spec.id,
            spec.uid,
            spec.netns.as_deref().unwrap_or("-")
        );
        Ok(vm)
    }

    fn write_state(&self) -> Result<(), ProcessError> {
        let tmp = self.state_path.with_extension("state.tmp");
        let err = |source| ProcessError::State {
            path: self.state_path.clone(),
            source,
        };
        fs::write(&tmp, self.state.encode()).map_err(err)?;
        fs::rename(&tmp, &self.state_path).map_err(err)
    }

    /// Re-adopts the Firecracker recorded in `<dir>/firecracker.state` by an earlier agent.
    /// Fails with [`ProcessError::Gone`] if that process no longer exists or the pid now
    /// names another process (checked by start time and command line).
    pub fn adopt(dir: &Path) -> Result<VmProcess, ProcessError> {
        let state_path = dir.join(STATE_NAME);
        let mut text = String::new();
        File::open(&state_path)
            .and_then(|f| f.take(STATE_FILE_LEN_MAX as u64).read_to_string(&mut text))
            .map_err(|source| ProcessError::State {
                path: state_path.clone(),
                source,
            })?;
        let state = State::decode(&text).map_err(|reason| ProcessError::BadState {
            path: state_path.clone(),
            reason,
        })?;
        let pid = state.pid;
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                return Err(ProcessError::Gone { pid })
            }
            Err(e) => return Err(ProcessError::Pidfd(e)),
        };
        // The pidfd pins one process. Check that the process behind the pid is the recorded
        // one, then that the pidfd's process is still alive: if so, both name the same process.
        let same = proc_start_time(pid).ok() == Some(state.start_time)
            && same_command(pid, &state)
            && state
                .chroot
                .as_ref()
                .is_none_or(|c| root_is(pid, &c.join("root")));
        let alive =
            !sys::poll_readable(pidfd.as_fd(), Duration::ZERO).map_err(ProcessError::Pidfd)?;
        if !(same && alive) {
            return Err(ProcessError::Gone { pid });
        }
        let cgroup =
            (!state.cgroup_dirs.is_empty()).then(|| Cgroup::from_dirs(state.cgroup_dirs.clone()));
        log::info!("firecracker adopted pid={pid}");
        Ok(VmProcess {
            pid,
            pidfd,
            is_child: false,
            log_path: dir.join(LOG_NAME),
            state,
            state_path,
            cgroup,
            exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The chroot (`<instance>/root`) of a jailed Firecracker.
    pub fn chroot(&self) -> Option<PathBuf> {
        self.state.chroot.as_ref().map(|c| c.join("root"))
    }

    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    pub fn api_socket(&self) -> &Path {
        &self.state.api_socket
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// A new API client for this Firecracker.
    pub fn api_client(&self) -> ApiClient {
        ApiClient::new(&self.state.api_socket)
    }

    /// True until the process has exited.
    pub fn is_running(&self) -> bool {
        self.exit.is_none()
            && matches!(
                sys::poll_readable(self.pidfd.as_fd(), Duration::ZERO),
                Ok(false)
            )
    }

    /// The exit, if it has happened (reaps our child).
    pub fn try_wait(&mut self) -> Result<Option<ExitKind>, ProcessError> {
        poll_exit(self.pidfd.as_fd(), self.is_child, &mut self.exit)
    }

    /// Waits until the API socket accepts a connection, or fails early if Firecracker exits.
    pub fn wait_api_socket(&mut self, timeout: Duration) -> Result<(), ProcessError> {
        let socket = self.state.api_socket.clone();
        self.watched()
            .wait_ready(&socket, timeout, || UnixStream::connect(&socket).is_ok())
    }

    fn watched(&mut self) -> Watched<'_> {
        Watched {
            program: "firecracker",
            pid: self.pid,
            pidfd: self.pidfd.as_fd(),
            is_child: self.is_child,
            exit: &mut self.exit,
            log_path: &self.log_path,
        }
    }

    /// Kills Firecracker (SIGKILL), waits for it to exit, kills anything else left in its
    /// cgroup, and removes the cgroup, the API socket, the cleanup files and the state file.
    pub fn kill(mut self) -> Result<ExitKind, ProcessError> {
        let exit = match self.watched().kill_and_wait()? {
            Some(e) => e,
            None if self.is_child => {
                match sys::waitid_pidfd(self.pidfd.as_fd(), true).map_err(ProcessError::Wait)? {
                    Some(sys::Exit::Code(c)) => ExitKind::Code(c),
                    Some(sys::Exit::Signal(s)) => ExitKind::Signal(s),
                    None => ExitKind::Unknown,
                }
            }
            None => ExitKind::Unknown,
        };
        if let Some(cg) = &self.cgroup {
            // Firecracker does not fork, but whatever else joined its cgroup goes with it.
            for pid in cg.pids() {
                if let Ok(fd) = sys::pidfd_open(pid) {
                    let _ = sys::pidfd_send_signal(fd.as_fd(), libc::SIGKILL);
                    let _ = sys::poll_readable(fd.as_fd(), KILL_WAIT);
                }
            }
            cg.remove(KILL_WAIT).map_err(ProcessError::Cgroup)?;
        }
        if let Some(instance) = &self.state.chroot {
            crate::jail::remove_chroot(instance).map_err(|e| ProcessError::Cleanup {
                path: instance.clone(),
                source: io::Error::other(e.to_string()),
            })?;
        }
        let mut files = vec![self.state.api_socket.clone()];
        files.extend(self.state.cleanup.iter().cloned());
        files.push(self.state_path.clone());
        for f in files {
            match fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(ProcessError::Cleanup { path: f, source }),
            }
        }
        log::info!("firecracker killed pid={} exit={exit:?}", self.pid);
        Ok(exit)
    }
}

/// A pidfd and the start time of a child just spawned (Firecracker or `wrenn-uffd`), from
/// which on it is reaped through the pidfd. It is our unreaped child, so the pid cannot be
/// reused before we wait and the pidfd names it. On failure the child is killed and reaped:
/// without a pidfd we could not manage it.
pub(crate) fn hold_child(child: &mut std::process::Child) -> Result<(OwnedFd, u64), ProcessError> {
    let pid = child.id();
    let held = sys::pidfd_open(pid)
        .map_err(ProcessError::Pidfd)
        .and_then(|fd| {
            let t = proc_start_time(pid).map_err(|source| ProcessError::Proc { pid, source })?;
            Ok((fd, t))
        });
    if held.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    held
}

/// Polls a process held by `pidfd` for its exit without blocking, once: a child of ours is
/// reaped (its status kept), an adopted process only reports that it is gone.
pub(crate) fn poll_exit(
    pidfd: std::os::fd::BorrowedFd<'_>,
    is_child: bool,
    exit: &mut Option<ExitKind>,
) -> Result<Option<ExitKind>, ProcessError> {
    if exit.is_some() {
        return Ok(*exit);
    }
    if is_child {
        match sys::waitid_pidfd(pidfd, false).map_err(ProcessError::Wait)? {
            Some(sys::Exit::Code(c)) => *exit = Some(ExitKind::Code(c)),
            Some(sys::Exit::Signal(s)) => *exit = Some(ExitKind::Signal(s)),
            None => {}
        }
    } else if sys::poll_readable(pidfd, Duration::ZERO).map_err(ProcessError::Wait)? {
        *exit = Some(ExitKind::Unknown);
    }
    Ok(*exit)
}

/// A process of ours held by a pidfd (Firecracker or `wrenn-uffd`), for the waits both
/// launchers share.
pub(crate) struct Watched<'a> {
    pub program: &'static str,
    pub pid: u32,
    pub pidfd: std::os::fd::BorrowedFd<'a>,
    pub is_child: bool,
    pub exit: &'a mut Option<ExitKind>,
    pub log_path: &'a Path,
}

impl Watched<'_> {
    /// Waits until `ready()` holds, failing early (with the log's tail) if the process
    /// exits, or after `timeout` naming `socket`. Sleeps on the pidfd between checks, so a
    /// death wakes it at once.
    pub fn wait_ready(
        &mut self,
        socket: &Path,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(exit) = poll_exit(self.pidfd, self.is_child, self.exit)? {
                return Err(ProcessError::Exited {
                    program: self.program,
                    status: format!("{exit:?}"),
                    log_tail: log_tail(self.log_path),
                });
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::ApiSocketTimeout {
                    path: socket.to_owned(),
                    timeout,
                });
            }
            let _ = sys::poll_readable(self.pidfd, API_SOCKET_POLL_INTERVAL);
        }
    }

    /// SIGKILLs the process unless it already exited, and waits up to [`KILL_WAIT`] for it
    /// to die. Returns its exit if known (a child of ours is reaped).
    pub fn kill_and_wait(&mut self) -> Result<Option<ExitKind>, ProcessError> {
        if poll_exit(self.pidfd, self.is_child, self.exit)?.is_none() {
            match sys::pidfd_send_signal(self.pidfd, libc::SIGKILL) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(ProcessError::Signal(e)),
            }
            if !sys::poll_readable(self.pidfd, KILL_WAIT).map_err(ProcessError::Wait)? {
                return Err(ProcessError::KillTimeout { pid: self.pid });
            }
        }
        poll_exit(self.pidfd, self.is_child, self.exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        let s = State {
            pid: 42,
            start_time: 123456,
            exe: "/opt/fc".into(),
            api_socket: "/d/api.sock".into(),
            cgroup_dirs: vec!["/sys/fs/cgroup/memory/wrenn/x".into()],
            cleanup: vec!["/d/v.sock".into(), "/d/v.sock_49984".into()],
            chroot: None,
        };
        assert_eq!(State::decode(&s.encode()).unwrap(), s);
        // A file written before the shared format (repeated keys, no first line) still
        // reads, so an upgraded agent adopts a Firecracker started by the old one.
        let legacy = "pid=42\nstart_time=123456\nexe=/opt/fc\napi_socket=/d/api.sock\n\
                      cgroup=/sys/fs/cgroup/memory/wrenn/x\ncleanup=/d/v.sock\n\
                      cleanup=/d/v.sock_49984\n";
        assert_eq!(State::decode(legacy).unwrap(), s);
        // A path with a newline round-trips; an unknown key is refused.
        let odd = State {
            exe: "/opt/f\nc=1".into(),
            ..s.clone()
        };
        assert_eq!(State::decode(&odd.encode()).unwrap(), odd);
        let extra = format!("{}colour=blue\n", s.encode());
        assert!(State::decode(&extra).unwrap_err().contains("unknown key"));
        assert!(State::decode("pid=1\n").is_err());
        assert!(State::decode("garbage").is_err());
        assert!(State::decode("pid=x\nstart_time=1\nexe=/a\napi_socket=/b\n").is_err());
    }

    #[test]
    fn own_start_time_and_cmdline() {
        let me = std::process::id();
        assert!(proc_start_time(me).unwrap() > 0);
        assert!(!proc_cmdline(me).unwrap().is_empty());
    }

    #[test]
    fn binary_lookup() {
        assert!(firecracker_binary(Some(Path::new("/nonexistent/fc"))).is_err());
        assert_eq!(
            firecracker_binary(Some(Path::new("/proc/self/exe"))).unwrap(),
            PathBuf::from("/proc/self/exe")
        );
    }

    #[test]
    fn ids() {
        assert!(check_id("sb-0123").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err());
        }
    }

    #[test]
    fn adopt_refuses_other_process() {
        let dir = std::env::temp_dir().join(format!("vmm-glue-adopt-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // Our own pid, but a start time and exe that are not ours.
        let s = State {
            pid: std::process::id(),
            start_time: 1,
            exe: "/nonexistent/firecracker".into(),
            api_socket: dir.join("api.sock"),
            cgroup_dirs: vec![],
            cleanup: vec![],
            chroot: None,
        };
        fs::write(dir.join(STATE_NAME), s.encode()).unwrap();
        assert!(matches!(
            VmProcess::adopt(&dir),
            Err(ProcessError::Gone { .. })
        ));
        fs::write(dir.join(STATE_NAME), "nonsense").unwrap();
        assert!(matches!(
            VmProcess::adopt(&dir),
            Err(ProcessError::BadState { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! Launcher of `wrenn-uffd`, the page server of one restored VM (uffd/HEADER.md).
//!
//! It runs as its own process so that an agent restart or crash never freezes a VM; like
//! Firecracker it gets its own session (`setsid`), a log file and a pidfd, and a state file so
//! a restarted agent can re-adopt it. Start it before `snapshot/load` with the Uffd backend and
//! wait for [`PageServerProcess::wait_listening`]: `wrenn-uffd` creates its socket under a
//! temporary name and renames it into place, so the socket's existence means it accepts.
//! The launcher never connects to the socket: the first connection is Firecracker's handshake.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::limits::{STATE_FILE_LEN_MAX, STATE_FILE_LINES_MAX, UNIX_SOCKET_PATH_LEN_MAX};
use crate::process::{
    legacy_state, proc_cmdline, proc_start_time, ExitKind, ProcessError, Watched,
};
use crate::sys;

/// File names inside the sandbox directory.
pub const PAGE_SERVER_LOG_NAME: &str = "wrenn-uffd.log";
pub const PAGE_SERVER_STATE_NAME: &str = "wrenn-uffd.state";

/// How to start `wrenn-uffd` for one Firecracker.
#[derive(Clone, Debug)]
pub struct PageServerConfig {
    /// The `wrenn-uffd` binary.
    pub binary: PathBuf,
    /// The sandbox directory (log and state file go here).
    pub dir: PathBuf,
    /// The Unix socket Firecracker connects to (`mem_backend.backend_path`).
    pub socket: PathBuf,
    /// The Firecracker allowed to connect (checked with SO_PEERCRED).
    pub firecracker_pid: u32,
    /// The snapshot header and the directory of its layer files.
    pub header: PathBuf,
    pub layers: PathBuf,
    /// Working-set file to prefetch first.
    pub prefetch: Option<PathBuf>,
    /// Where `wrenn-uffd` writes its stats.
    pub stats: Option<PathBuf>,
    /// More flags (`--fault-around`, `--record`, ...).
    pub extra_args: Vec<String>,
}

/// A running (or exited, not yet reaped) `wrenn-uffd`.
#[derive(Debug)]
pub struct PageServerProcess {
    pid: u32,
    pidfd: OwnedFd,
    is_child: bool,
    socket: PathBuf,
    state_path: PathBuf,
    log_path: PathBuf,
    exit: Option<ExitKind>,
}

/// First line of `uffd.state` ([`proto::kv`] format).
const STATE_MAGIC: &str = "wrenn-uffd-state 1";

fn encode_state(pid: u32, start_time: u64, exe: &Path, socket: &Path) -> String {
    let mut w = proto::kv::Writer::new(STATE_MAGIC);
    w.put_display("pid", pid);
    w.put_display("start_time", start_time);
    w.put_display("exe", exe.display());
    w.put_display("socket", socket.display());
    w.finish()
}

fn decode_state(text: &str) -> Result<(u32, u64, PathBuf, PathBuf), String> {
    let text = legacy_state(text, STATE_MAGIC, &[]);
    let (mut r, _) = proto::kv::Reader::parse(&text, &[STATE_MAGIC], STATE_FILE_LINES_MAX)
        .map_err(|e| e.to_string())?;
    let mut read = || -> Result<_, proto::kv::KvError> {
        Ok((
            r.num::<u32>("pid")?,
            r.num::<u64>("start_time")?,
            PathBuf::from(r.string("exe")?),
            PathBuf::from(r.string("socket")?),
        ))
    };
    let state = read().map_err(|e| e.to_string())?;
    r.done().map_err(|e| e.to_string())?;
    if state.0 <= 1 {
        return Err("no pid".into());
    }
    Ok(state)
}

impl PageServerProcess {
    /// Starts `wrenn-uffd`. Does not wait for its socket: see [`Self::wait_listening`].
    pub fn spawn(cfg: &PageServerConfig) -> Result<PageServerProcess, ProcessError> {
        if cfg.socket.as_os_str().len() > UNIX_SOCKET_PATH_LEN_MAX {
            return Err(ProcessError::InvalidConfig(format!(
                "page server socket path {} is over {UNIX_SOCKET_PATH_LEN_MAX} bytes",
                cfg.socket.display()
            )));
        }
        let prepare = |path: &Path| {
            let path = path.to_owned();
            move |source| ProcessError::Prepare { path, source }
        };
        // A stale socket would make Firecracker connect to nobody.
        match fs::remove_file(&cfg.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(prepare(&cfg.socket)(e)),
        }
        let log_path = cfg.dir.join(PAGE_SERVER_LOG_NAME);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(prepare(&log_path))?;
        let log2 = log.try_clone().map_err(prepare(&log_path))?;
        let mut cmd = Command::new(&cfg.binary);
        cmd.arg("--socket")
            .arg(&cfg.socket)
            .arg("--firecracker-pid")
            .arg(cfg.firecracker_pid.to_string())
            .arg("--header")
            .arg(&cfg.header)
            .arg("--layers")
            .arg(&cfg.layers);
        if let Some(p) = &cfg.prefetch {
            cmd.arg("--prefetch").arg(p);
        }
        if let Some(p) = &cfg.stats {
            cmd.arg("--stats").arg(p);
        }
        cmd.args(&cfg.extra_args)
            .current_dir(&cfg.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: runs in the forked child before exec; setsid is one system call, no
        // allocation, no locks.
        unsafe {
            cmd.pre_exec(sys::setsid);
        }
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            path: cfg.binary.clone(),
            source,
        })?;
        let pid = child.id();
        let (pidfd, start_time) = crate::process::hold_child(&mut child)?;
        // Reaped through the pidfd from here on.
        drop(child);
        let p = PageServerProcess {
            pid,
            pidfd,
            is_child: true,
            socket: cfg.socket.clone(),
            state_path: cfg.dir.join(PAGE_SERVER_STATE_NAME),
            log_path,
            exit: None,
        };
        let tmp = p.state_path.with_extension("state.tmp");
        let written = fs::write(
            &tmp,
            encode_state(pid, start_time, &cfg.binary, &cfg.socket),
        )
        .and_then(|()| fs::rename(&tmp, &p.state_path));
        if let Err(source) = written {
            let path = p.state_path.clone();
            let _ = p.kill();
            return Err(ProcessError::State { path, source });
        }
        log::info!(
            "wrenn-uffd spawned pid={pid} firecracker_pid={}",
            cfg.firecracker_pid
        );
        Ok(p)
    }

    /// Re-adopts the `wrenn-uffd` recorded in `<dir>/wrenn-uffd.state` (same checks as
    /// [`crate::process::VmProcess::adopt`]: start time and command line).
    pub fn adopt(dir: &Path) -> Result<PageServerProcess, ProcessError> {
        let state_path = dir.join(PAGE_SERVER_STATE_NAME);
        let mut text = String::new();
        File::open(&state_path)
            .and_then(|f| f.take(STATE_FILE_LEN_MAX as u64).read_to_string(&mut text))
            .map_err(|source| ProcessError::State {
                path: state_path.clone(),
                source,
            })?;
        let (pid, start_time, exe, socket) =
            decode_state(&text).map_err(|reason| ProcessError::BadState {
                path: state_path.clone(),
                reason,
            })?;
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                return Err(ProcessError::Gone { pid })
            }
            Err(e) => return Err(ProcessError::Pidfd(e)),
        };
        let same = proc_start_time(pid).ok() == Some(start_time)
            && proc_cmdline(pid).ok().is_some_and(|argv| {
                argv.first().map(Vec::as_slice) == Some(exe.as_os_str().as_bytes())
                    && argv
                        .windows(2)
                        .any(|w| w[0] == b"--socket" && w[1] == socket.as_os_str().as_bytes())
            });
        let alive =
            !sys::poll_readable(pidfd.as_fd(), Duration::ZERO).map_err(ProcessError::Pidfd)?;
        if !(same && alive) {
            return Err(ProcessError::Gone { pid });
        }
        Ok(PageServerProcess {
            pid,
            pidfd,
            is_child: false,
            socket,
            state_path,
            log_path: dir.join(PAGE_SERVER_LOG_NAME),
            exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit, if it has happened (reaps our child). `wrenn-uffd` exits by itself once
    /// every page is resident.
    pub fn try_wait(&mut self) -> Result<Option<ExitKind>, ProcessError> {
        crate::process::poll_exit(self.pidfd.as_fd(), self.is_child, &mut self.exit)
    }

    /// Waits until the socket exists (it is renamed into place once it accepts), or fails
    /// early if `wrenn-uffd` exits.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<(), ProcessError> {
        let socket = self.socket.clone();
        self.watched().wait_ready(&socket, timeout, || {
            fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket())
        })
    }

    fn watched(&mut self) -> Watched<'_> {
        Watched {
            program: "wrenn-uffd",
            pid: self.pid,
            pidfd: self.pidfd.as_fd(),
            is_child: self.is_child,
            exit: &mut self.exit,
            log_path: &self.log_path,
        }
    }

    /// Kills `wrenn-uffd` if it still runs, reaps it, and removes its socket and state file.
    /// The log stays.
    pub fn kill(mut self) -> Result<ExitKind, ProcessError> {
        let exit = self.watched().kill_and_wait()?.unwrap_or(ExitKind::Unknown);
        for f in [self.socket.clone(), self.state_path.clone()] {
            match fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(ProcessError::Cleanup { path: f, source }),
            }
        }
        Ok(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        let s = encode_state(
            42,
            7,
            Path::new("/bin/wrenn-uffd"),
            Path::new("/d/uffd.sock"),
        );
        assert_eq!(
            decode_state(&s).unwrap(),
            (42, 7, "/bin/wrenn-uffd".into(), "/d/uffd.sock".into())
        );
        assert!(decode_state("pid=1\nstart_time=1\nexe=/a\nsocket=/b\n").is_err());
        // The format before proto::kv still reads (adoption across an agent upgrade).
        assert_eq!(
            decode_state("pid=42\nstart_time=7\nexe=/bin/wrenn-uffd\nsocket=/d/uffd.sock\n")
                .unwrap(),
            (42, 7, "/bin/wrenn-uffd".into(), "/d/uffd.sock".into())
        );
        assert!(decode_state("nonsense").is_err());
    }

    #[test]
    fn exits_early_with_log() {
        let dir = std::env::temp_dir().join(format!("vmm-glue-ps-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // `false` exits at once with status 1: wait_listening must say so, not time out.
        let cfg = PageServerConfig {
            binary: "/bin/false".into(),
            dir: dir.clone(),
            socket: dir.join("uffd.sock"),
            firecracker_pid: 1,
            header: dir.join("header"),
            layers: dir.clone(),
            prefetch: None,
            stats: None,
            extra_args: vec![],
        };
        let mut p = PageServerProcess::spawn(&cfg).unwrap();
        assert!(dir.join(PAGE_SERVER_STATE_NAME).exists());
        match p.wait_listening(Duration::from_secs(5)) {
            Err(e @ ProcessError::Exited { .. }) => {
                assert!(
                    e.to_string().starts_with("wrenn-uffd exited (Code(1))"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.kill().unwrap(), ExitKind::Code(1));
        assert!(!dir.join(PAGE_SERVER_STATE_NAME).exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! `wrenn up` / `wrenn down`: the whole system on one machine, on loopback, for local use.
//!
//! `up` starts, in order, each only if it is not already running:
//! 1. a throwaway PostgreSQL cluster with the system's `initdb`/`pg_ctl` (data under the state
//!    directory, reused on the next run; as root the server runs as the `postgres` user);
//!    Unix socket in a directory only its owner can enter (trust), loopback TCP with a
//!    generated password (scram-sha-256) for ctl;
//! 2. `wrenn-ctl`: `admin migrate`, `admin init` once (the keys are kept in the state
//!    directory, mode 0600), then `serve` on loopback;
//! 3. `wrenn-agent` with its own state root inside the state directory, registered with ctl
//!    by a one-time token (only on its first start), using the kernel and base rootfs that
//!    `wrenn image` put in the image root (`/var/lib/wrenn`).
//!
//! Every process is detached (its own session) with a pid file under `run/` and a log under
//! `log/`. When Firecracker, the kernel or the rootfs is missing everything still starts, the
//! agent reports itself unable to host sandboxes with the reason, and `up` says what to do.
//!
//! `down` destroys the local team's sandboxes through ctl (so the agent frees their network
//! slots and disks), stops the agent, then kills whatever the agent left running under its state root
//! (Firecracker, wrenn-uffd), unmounts anything mounted under the state directory, stops ctl
//! and PostgreSQL (`pg_ctl stop -m fast`), and checks that every port is free again.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::doctor::{self, sys};
use crate::image::args::{self, Flag};

pub const CTL_PORT_DEFAULT: u16 = 7700;
pub const HTTP_PORT_DEFAULT: u16 = 7701;
/// ctl's port for agents (wrenn.host.v1), apart from the clients' so they cannot starve it.
pub const HOST_PORT_DEFAULT: u16 = 7702;
pub const AGENT_PORT_DEFAULT: u16 = 7710;
/// PostgreSQL's loopback port for the local stack (not 5432, so a system cluster can run).
pub const PG_PORT_DEFAULT: u16 = 7720;
/// Network slot names of the local agent (`wrnup-N`): not the system agent's `wrenn`, so a
/// local stack never touches a real agent's slots on the same machine.
pub const NET_PREFIX_DEFAULT: &str = "wrnup";
/// The /16 the local agent's slots take addresses from (the system agent's is 10.200.0.0).
pub const NET_SUBNET_DEFAULT: &str = "10.201.0.0";
/// How long a component may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process gets after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes of an HTTP answer `http_get` reads (health and metrics pages are small).
const HTTP_RESPONSE_MAX: usize = 4 << 20;
/// Longest agent state root: its deepest Unix socket,
/// `<root>/sandboxes/<uuid>/vsock.sock_<port>` (the path Firecracker derives for
/// guest-initiated vsock connections), must fit in `sun_path` (107 bytes and a NUL).
pub const AGENT_ROOT_LEN_MAX: usize = 107 - "/sandboxes/".len() - 36 - "/vsock.sock_49984".len();
const _: () = assert!(AGENT_ROOT_LEN_MAX == 43);
/// How long a port may take to be released by a process that was just stopped.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(5);
/// Lines of a component's log shown when it fails to start.
const LOG_TAIL_LINES: usize = 30;

pub const USAGE: &str = "\
usage: wrenn up [--state-dir DIR] [--ctl-port 7700] [--http-port 7701] [--host-port 7702]
                [--agent-port 7710] [--pg-port 7720] [--image-root /var/lib/wrenn] [--firecracker PATH]
                [--kernel PATH] [--rootfs PATH] [--bin-dir DIR] [--net-prefix wrnup]
                [--net-subnet 10.201.0.0] [--agent-arg ARG]...
       wrenn down [--state-dir DIR]

up: starts PostgreSQL, wrenn-ctl and wrenn-agent on loopback (each only if not running),
    creates an admin team and API key on the first run, and prints how to use them.
    The agent's metrics/health port is --agent-port + 1. State directory default:
    /var/lib/wrenn/local as root, else ~/.local/state/wrenn. Binaries are found in --bin-dir,
    else next to this wrenn executable, else on PATH. --agent-arg passes one more argument to
    wrenn-agent (e.g. --agent-arg=--boot-args-extra=...).
down: stops everything `up` started in that state directory; nothing is left running or
    mounted, and the ports are free.
";

const UP_FLAGS: &[Flag] = &[
    Flag::switch("help"),
    Flag::value("state-dir"),
    Flag::value("ctl-port"),
    Flag::value("http-port"),
    Flag::value("host-port"),
    Flag::value("agent-port"),
    Flag::value("pg-port"),
    Flag::value("image-root"),
    Flag::value("firecracker"),
    Flag::value("kernel"),
    Flag::value("rootfs"),
    Flag::value("bin-dir"),
    Flag::value("net-prefix"),
    Flag::value("net-subnet"),
    Flag::repeated("agent-arg"),
];

const DOWN_FLAGS: &[Flag] = &[Flag::switch("help"), Flag::value("state-dir")];

/// Everything `wrenn up`/`down` can fail with.
#[derive(Debug)]
pub enum UpError {
    Args(args::ArgError),
    NoHome,
    Io {
        action: String,
        path: PathBuf,
        source: io::Error,
    },
    /// A binary we need is not installed.
    Missing {
        what: String,
        hint: String,
    },
    /// A command exited unsuccessfully.
    Command {
        what: String,
        status: String,
        output: String,
    },
    Spawn {
        program: PathBuf,
        source: io::Error,
    },
    /// A component started but did not become ready; the tail of its log is attached.
    NotReady {
        what: String,
        log_tail: String,
    },
    PortBusy {
        port: u16,
        what: String,
    },
    /// `admin init` ran before but its key file is gone.
    LostKey {
        path: PathBuf,
    },
    /// `down` found things still running, mounted or listening.
    Leftovers(Vec<String>),
    /// Another `wrenn up`/`down` works on the same state directory.
    Busy {
        dir: PathBuf,
    },
    /// The agent's sockets under this state directory would not fit in `sun_path`.
    PathTooLong {
        path: PathBuf,
        max: usize,
    },
}

impl fmt::Display for UpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpError::Args(_) => f.write_str("bad arguments (wrenn up --help)"),
            UpError::NoHome => f.write_str("HOME is not set: pass --state-dir"),
            UpError::Io { action, path, .. } => write!(f, "{action} {}", path.display()),
            UpError::Missing { what, hint } => write!(f, "{what} not found: {hint}"),
            UpError::Command {
                what,
                status,
                output,
            } => write!(f, "{what} failed ({status}): {}", output.trim()),
            UpError::Spawn { program, .. } => write!(f, "start {}", program.display()),
            UpError::NotReady { what, log_tail } => {
                write!(
                    f,
                    "{what} did not become ready; its log ends with:\n{log_tail}"
                )
            }
            UpError::PortBusy { port, what } => write!(
                f,
                "port {port} ({what}) is taken by another program: pick another with the flags"
            ),
            UpError::LostKey { path } => write!(
                f,
                "the database was initialized but {} is gone: `wrenn down`, remove the state \
                 directory and run `wrenn up` again",
                path.display()
            ),
            UpError::Leftovers(l) => write!(f, "left behind: {}", l.join("; ")),
            UpError::PathTooLong { path, max } => write!(
                f,
                "{} is longer than {max} bytes: the agent's Unix sockets under it would not fit \
                 in a socket address; pick a shorter --state-dir",
                path.display()
            ),
            UpError::Busy { dir } => write!(
                f,
                "another wrenn up or down is working on {}; wait for it",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for UpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpError::Args(e) => Some(e),
            UpError::Io { source, .. } | UpError::Spawn { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(action: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> UpError {
    let action = action.into();
    let path = path.to_path_buf();
    move |source| UpError::Io {
        action,
        path,
        source,
    }
}

/// The files of one local stack.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn pg(&self) -> PathBuf {
        self.dir.join("postgres")
    }
    pub fn pg_data(&self) -> PathBuf {
        self.pg().join("data")
    }
    /// PostgreSQL's Unix socket directory (mode 0700: only its owner and root connect).
    pub fn pg_socket_dir(&self) -> PathBuf {
        self.pg().join("run")
    }
    pub fn pg_password(&self) -> PathBuf {
        self.dir.join("pg-password")
    }
    pub fn api_key(&self) -> PathBuf {
        self.dir.join("api-key")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin-key")
    }
    pub fn pid(&self, name: &str) -> PathBuf {
        self.dir.join("run").join(format!("{name}.pid"))
    }
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join("log").join(format!("{name}.log"))
    }
    pub fn agent_root(&self) -> PathBuf {
        self.dir.join("agent")
    }
    /// Ports and paths of the running stack, for `down`.
    pub fn stack(&self) -> PathBuf {
        self.dir.join("stack.conf")
    }
    /// `export` lines for a shell.
    pub fn env_file(&self) -> PathBuf {
        self.dir.join("env")
    }
}

/// Settings of `wrenn up`.
#[derive(Clone, Debug)]
pub struct UpConfig {
    pub layout: Layout,
    pub ctl_port: u16,
    pub http_port: u16,
    /// ctl's port for agents (wrenn.host.v1).
    pub host_port: u16,
    pub agent_port: u16,
    pub pg_port: u16,
    pub image_root: PathBuf,
    pub firecracker: PathBuf,
    pub kernel: Option<PathBuf>,
    pub rootfs: PathBuf,
    pub bin_dir: Option<PathBuf>,
    /// The agent's `--net-prefix` and `--net-subnet` (checked by the agent).
    pub net_prefix: String,
    pub net_subnet: String,
    pub agent_args: Vec<String>,
}

impl UpConfig {
    pub fn agent_metrics_port(&self) -> u16 {
        self.agent_port.wrapping_add(1)
    }
}

/// The default state directory: /var/lib/wrenn/local as root, else ~/.local/state/wrenn.
pub fn default_state_dir() -> Result<PathBuf, UpError> {
    if sys::is_root() {
        return Ok(PathBuf::from("/var/lib/wrenn/local"));
    }
    if let Some(s) = std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(s).join("wrenn"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(UpError::NoHome)?;
    Ok(PathBuf::from(home).join(".local/state/wrenn"))
}

fn state_dir(parsed: &args::Parsed) -> Result<Layout, UpError> {
    let dir = match parsed.value("state-dir") {
        Some(d) => PathBuf::from(d),
        None => default_state_dir()?,
    };
    // Absolute, so pid files and the agent root never depend on the caller's directory.
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir()
            .map_err(io_err("read the current directory", Path::new(".")))?
            .join(dir)
    };
    Ok(Layout { dir })
}

fn port(parsed: &args::Parsed, name: &'static str, default: u16) -> Result<u16, UpError> {
    parsed
        .number(name, u64::from(default), 1, 65534)
        .map(|n| n as u16)
        .map_err(UpError::Args)
}

/// `wrenn up [flags]`.
pub fn run(argv: &[String]) -> Result<(), UpError> {
    let parsed = args::parse(argv, UP_FLAGS).map_err(UpError::Args)?;
    if parsed.switch("help") {
        print!("{USAGE}");
        return Ok(());
    }
    let layout = state_dir(&parsed)?;
    let image_root = PathBuf::from(
        parsed
            .value("image-root")
            .unwrap_or(doctor::DEFAULT_STATE_ROOT),
    );
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let firecracker = doctor::resolve_firecracker(
        parsed
            .value("firecracker")
            .map(PathBuf::from)
            .or_else(|| env("WRENN_FIRECRACKER"))
            .as_deref(),
    );
    let cfg = UpConfig {
        ctl_port: port(&parsed, "ctl-port", CTL_PORT_DEFAULT)?,
        http_port: port(&parsed, "http-port", HTTP_PORT_DEFAULT)?,
        host_port: port(&parsed, "host-port", HOST_PORT_DEFAULT)?,
        agent_port: port(&parsed, "agent-port", AGENT_PORT_DEFAULT)?,
        pg_port: port(&parsed, "pg-port", PG_PORT_DEFAULT)?,
        firecracker,
        kernel: parsed
            .value("kernel")
            .map(PathBuf::from)
            .or_else(|| env("WRENN_KERNEL"))
            .or_else(|| doctor::newest_kernel(&image_root)),
        rootfs: parsed
            .value("rootfs")
            .map(PathBuf::from)
            .or_else(|| env("WRENN_ROOTFS"))
            .unwrap_or_else(|| doctor::minimal_rootfs(&image_root)),
        image_root,
        bin_dir: parsed.value("bin-dir").map(PathBuf::from),
        net_prefix: parsed
            .value("net-prefix")
            .unwrap_or(NET_PREFIX_DEFAULT)
            .to_owned(),
        net_subnet: parsed
            .value("net-subnet")
            .unwrap_or(NET_SUBNET_DEFAULT)
            .to_owned(),
        agent_args: parsed
            .values("agent-arg")
            .into_iter()
            .map(str::to_owned)
            .collect(),
        layout,
    };
    let summary = up(&cfg)?;
    print!("{summary}");
    Ok(())
}

/// `wrenn down [--state-dir DIR]`.
pub fn down(argv: &[String]) -> Result<(), UpError> {
    let parsed = args::parse(argv, DOWN_FLAGS).map_err(UpError::Args)?;
    if parsed.switch("help") {
        print!("{USAGE}");
        return Ok(());
    }
    let layout = state_dir(&parsed)?;
    let report = stop(&layout)?;
    print!("{report}");
    Ok(())
}

// ---- binaries ----

/// `name` in `bin_dir`, else next to the running executable, else on PATH.
pub fn find_binary(name: &str, bin_dir: Option<&Path>) -> Result<PathBuf, UpError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = bin_dir {
        dirs.push(d.to_path_buf());
    }
    if let Some(d) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(d.clone());
        // An integration test runs from target/<profile>/deps; the binaries are one up.
        if d.ends_with("deps") {
            if let Some(up) = d.parent() {
                dirs.push(up.to_path_buf());
            }
        }
    }
    for d in dirs {
        let p = d.join(name);
        if fs::metadata(&p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0) {
            return Ok(p);
        }
    }
    doctor::find_on_path(name).ok_or_else(|| UpError::Missing {
        what: name.to_owned(),
        hint: format!(
            "build it (`cargo build --release -p {}`) or put it on PATH or in --bin-dir",
            if name == "wrenn-ctl" { "ctl" } else { "agent" }
        ),
    })
}

/// The directory holding `initdb` and `pg_ctl`: `WRENN_PG_BIN`, else the newest
/// /usr/lib/postgresql/<version>/bin, else PATH.
pub fn find_pg_bin() -> Result<PathBuf, UpError> {
    if let Some(d) = std::env::var_os("WRENN_PG_BIN").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(rd) = fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok();
            let bin = e.path().join("bin");
            if let Some(v) = v.filter(|_| bin.join("pg_ctl").is_file()) {
                if best.as_ref().is_none_or(|(bv, _)| v > *bv) {
                    best = Some((v, bin));
                }
            }
        }
    }
    if let Some((_, bin)) = best {
        return Ok(bin);
    }
    doctor::find_on_path("pg_ctl")
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| UpError::Missing {
            what: "PostgreSQL (initdb, pg_ctl)".into(),
            hint: "`apt-get install postgresql-15` (or set WRENN_PG_BIN to its bin directory)"
                .into(),
        })
}

// ---- small helpers ----

fn mkdir(path: &Path, mode: u32) -> Result<(), UpError> {
    fs::create_dir_all(path).map_err(io_err("create", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

/// Writes a secret file (0600) atomically.
fn write_secret(path: &Path, value: &str) -> Result<(), UpError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(value.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))
}

fn read_trim(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Uid and gid of `user` from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), UpError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err("chown", path))?;
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        for e in fs::read_dir(path).map_err(io_err("list", path))?.flatten() {
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Every directory from `/` to `dir` must let `uid` (the postgres user) pass.
fn check_traversable(dir: &Path, uid: u32) -> Result<(), UpError> {
    use std::os::unix::fs::MetadataExt;
    for d in dir.ancestors() {
        let m = fs::metadata(d).map_err(io_err("stat", d))?;
        let passes = if m.uid() == uid {
            m.mode() & 0o100 != 0
        } else {
            // Group membership is not looked up: other's x bit, as on a stock system.
            m.mode() & 0o001 != 0
        };
        if !passes {
            return Err(UpError::Missing {
                what: format!(
                    "a path the postgres user can reach ({} is closed to it)",
                    d.display()
                ),
                hint: "`chmod o+x` that directory or pick another --state-dir".into(),
            });
        }
    }
    Ok(())
}

/// Runs a PostgreSQL tool: as root through `runuser -u postgres --`, else directly.
fn pg_command(bin: &Path, tool: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

/// Runs `cmd` to completion; an error carries its output.
fn run_cmd(what: &str, cmd: &mut Command) -> Result<String, UpError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| UpError::Spawn {
            program: PathBuf::from(cmd.get_program()),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(UpError::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(stdout)
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut s = lines[from..].join("\n");
    if s.is_empty() {
        s = format!("({} is empty)", path.display());
    }
    s
}

/// The pid in `path` if that process is alive and its command line mentions `name` (a
/// recycled pid is not ours).
pub fn live_pid(path: &Path, name: &str) -> Option<i32> {
    let pid: i32 = read_trim(path)?.parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if !String::from_utf8_lossy(&cmdline).contains(name) {
        return None;
    }
    match sys::kill(pid, 0) {
        Ok(true) => {
            // A zombie or a recycled pid is not ours: check it is not a zombie.
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit(')').next()?.split_whitespace().next()?;
            (state != "Z").then_some(pid)
        }
        _ => None,
    }
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
}

/// Waits up to `limit` for `port` to become free.
fn wait_port_free(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !port_free(port) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A plain HTTP/1.1 GET on loopback: (status, body). Decodes chunked bodies.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<(u16, String)> {
    http_request(addr, "GET", path, headers, "", timeout)
}

/// One HTTP/1.1 request with a JSON body (empty: none) on a fresh connection.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let host = addr.to_string();
    let mut all = vec![("Host", host.as_str()), ("Connection", "close")];
    all.extend_from_slice(headers);
    let with_body = !body.is_empty() || method != "GET";
    if with_body {
        all.push(("Content-Type", "application/json"));
    }
    let mut req =
        proto::http::request_head(method, path, &all, with_body.then_some(body.len() as u64))
            .map_err(|e| bad(&e.to_string()))?;
    req.extend_from_slice(body.as_bytes());
    (&s).write_all(&req)?;
    read_http_response(&mut proto::http::Wire::new(s, Vec::new()))
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// (status, body) of one response (the shared codec: Content-Length, chunked, or to EOF).
fn read_http_response<S: Read>(wire: &mut proto::http::Wire<S>) -> io::Result<(u16, String)> {
    match proto::http::read_response(
        wire,
        proto::http::HTTP_HEAD_LEN_MAX,
        HTTP_RESPONSE_MAX as u64,
        false,
    ) {
        Ok(r) => Ok((r.head.status, String::from_utf8_lossy(&r.body).into_owned())),
        Err(proto::http::ResponseError::Io(e)) => Err(e),
        Err(e) => Err(bad(&e.to_string())),
    }
}

/// (status, body) of a complete HTTP/1.1 response read to EOF.
pub fn parse_http_response(raw: &[u8]) -> io::Result<(u16, String)> {
    read_http_response(&mut proto::http::Wire::new(raw, Vec::new()))
}

/// Starts `program args` detached (new session, stdin null, stdout/stderr appended to
/// `log`), writes its pid to `pid_file`, and returns the pid.
fn spawn_detached(
    program: &Path,
    args: &[String],
    envs: &[(&str, String)],
    log: &Path,
    pid_file: &Path,
) -> Result<i32, UpError> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err("open", log))?;
    let err = out.try_clone().map_err(io_err("open", log))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .current_dir("/");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    sys::detach(&mut cmd);
    let child = cmd.spawn().map_err(|source| UpError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    let pid = child.id() as i32;
    // The child is detached; nobody waits for it but init once we exit.
    drop(child);
    fs::write(pid_file, format!("{pid}\n")).map_err(io_err("write", pid_file))?;
    Ok(pid)
}

/// Polls `ready` until it returns true, the process `pid` dies, or the deadline passes.
fn wait_ready(
    what: &str,
    pid: i32,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<(), UpError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        let alive = sys::kill(pid, 0).unwrap_or(false)
            && fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    !s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(false);
        if !alive || Instant::now() > deadline {
            return Err(UpError::NotReady {
                what: format!(
                    "{what} (pid {pid}, {})",
                    if alive { "still running" } else { "exited" }
                ),
                log_tail: tail(log),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads `key=value` lines.
fn read_conf(path: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Holds `<state-dir>/lock` for the duration of one `up` or `down`.
fn lock(layout: &Layout) -> Result<fs::File, UpError> {
    let path = layout.dir.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err("open", &path))?;
    match sys::try_lock_exclusive(std::os::fd::AsFd::as_fd(&f)) {
        Ok(true) => Ok(f),
        Ok(false) => Err(UpError::Busy {
            dir: layout.dir.clone(),
        }),
        Err(e) => Err(io_err("lock", &path)(e)),
    }
}

// ---- up ----

/// Starts what is not running and returns the summary to print.
pub fn up(cfg: &UpConfig) -> Result<String, UpError> {
    let l = &cfg.layout;
    let root = sys::is_root();
    if l.agent_root().as_os_str().len() > AGENT_ROOT_LEN_MAX {
        return Err(UpError::PathTooLong {
            path: l.agent_root(),
            max: AGENT_ROOT_LEN_MAX,
        });
    }
    // The state directory must be traversable by the postgres user (as root).
    mkdir(&l.dir, 0o755)?;
    let _lock = lock(l)?;
    mkdir(&l.dir.join("run"), 0o755)?;
    mkdir(&l.dir.join("log"), 0o755)?;
    mkdir(&l.agent_root(), 0o700)?;

    let pg_bin = find_pg_bin()?;
    let ctl_bin = find_binary("wrenn-ctl", cfg.bin_dir.as_deref())?;
    let agent_bin = find_binary("wrenn-agent", cfg.bin_dir.as_deref())?;

    // Ports: ours may already be running; anything else on them is a conflict.
    let running_ctl = live_pid(&l.pid("ctl"), "wrenn-ctl");
    let running_agent = live_pid(&l.pid("agent"), "wrenn-agent");
    let mut busy = Vec::new();
    if running_ctl.is_none() {
        busy.push((cfg.ctl_port, "ctl"));
        busy.push((cfg.http_port, "ctl HTTP"));
        busy.push((cfg.host_port, "ctl host port"));
    }
    if running_agent.is_none() {
        busy.push((cfg.agent_port, "agent"));
        busy.push((cfg.agent_metrics_port(), "agent metrics"));
    }
    for (port, what) in busy {
        // A process of ours that was just stopped may still be closing its sockets (a
        // multi-threaded process shows as a zombie before its last thread is gone).
        if !wait_port_free(port, PORT_RELEASE_WAIT) {
            return Err(UpError::PortBusy {
                port,
                what: what.into(),
            });
        }
    }

    let stack = format!(
        "ctl_port={}\nhttp_port={}\nhost_port={}\nagent_port={}\nagent_metrics_port={}\npg_port={}\npg_bin={}\nagent_root={}\n",
        cfg.ctl_port,
        cfg.http_port,
        cfg.host_port,
        cfg.agent_port,
        cfg.agent_metrics_port(),
        cfg.pg_port,
        pg_bin.display(),
        l.agent_root().display()
    );
    fs::write(l.stack(), stack).map_err(io_err("write", &l.stack()))?;

    let db_url = start_postgres(cfg, &pg_bin, root)?;
    let keys = init_ctl(cfg, &ctl_bin, &db_url)?;
    start_ctl(cfg, &ctl_bin, &db_url, running_ctl)?;
    let health = start_agent(cfg, &ctl_bin, &agent_bin, &db_url, running_agent)?;

    let exports = format!(
        "export WRENN_URL=127.0.0.1:{}\nexport WRENN_API_KEY={}\n",
        cfg.ctl_port, keys.0
    );
    write_secret(&l.env_file(), exports.trim_end())?;
    Ok(summary(cfg, &health, &exports))
}

/// Starts the cluster (initializing it on the first run); returns ctl's database URL.
fn start_postgres(cfg: &UpConfig, bin: &Path, root: bool) -> Result<String, UpError> {
    let l = &cfg.layout;
    let ids = if root {
        Some(user_ids("postgres").ok_or_else(|| UpError::Missing {
            what: "the postgres user".into(),
            hint:
                "install PostgreSQL from the distribution (`apt-get install postgresql-15`)".into(),
        })?)
    } else {
        None
    };
    if let Some((uid, _)) = ids {
        check_traversable(&l.dir, uid)?;
    }
    mkdir(&l.pg(), 0o700)?;
    mkdir(&l.pg_socket_dir(), 0o700)?;
    let log = l.log("postgres");
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io_err("open", &log))?;
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(l.pg(), Some(uid), Some(gid)).map_err(io_err("chown", &l.pg()))?;
        std::os::unix::fs::chown(l.pg_socket_dir(), Some(uid), Some(gid))
            .map_err(io_err("chown", &l.pg_socket_dir()))?;
        std::os::unix::fs::chown(&log, Some(uid), Some(gid)).map_err(io_err("chown", &log))?;
    }

    let password = match read_trim(&l.pg_password()) {
        Some(p) => p,
        None => {
            let p =
                proto::random::hex(32).map_err(io_err("getrandom", Path::new("/dev/urandom")))?;
            write_secret(&l.pg_password(), &p)?;
            p
        }
    };
    if !l.pg_data().join("PG_VERSION").exists() {
        if l.pg_data().exists() {
            // A half-made cluster from an interrupted first run.
            fs::remove_dir_all(l.pg_data()).map_err(io_err("remove", &l.pg_data()))?;
        }
        // initdb reads the superuser's password from a file its user can read.
        let pwfile = l.pg().join("initdb-password");
        write_secret(&pwfile, &password)?;
        if let Some((uid, gid)) = ids {
            chown_tree(&pwfile, uid, gid)?;
        }
        let r = run_cmd(
            "initdb",
            pg_command(bin, "initdb", root)
                .arg("-D")
                .arg(l.pg_data())
                .args(["-U", "wrenn", "-E", "UTF8", "--no-instructions"])
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display())),
        );
        let _ = fs::remove_file(&pwfile);
        r?;
    }
    let status = pg_command(bin, "pg_ctl", root)
        .arg("status")
        .arg("-D")
        .arg(l.pg_data())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| UpError::Spawn {
            program: bin.join("pg_ctl"),
            source,
        })?;
    if !status.success() {
        if !port_free(cfg.pg_port) {
            return Err(UpError::PortBusy {
                port: cfg.pg_port,
                what: "PostgreSQL".into(),
            });
        }
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={}",
            cfg.pg_port,
            l.pg_socket_dir().display()
        );
        run_cmd(
            "pg_ctl start",
            pg_command(bin, "pg_ctl", root)
                .arg("start")
                .arg("-D")
                .arg(l.pg_data())
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o", &opts])
                // pg_ctl leaves the server running; it must not hold our output pipes.
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .map_err(|e| match e {
            UpError::Command { what, status, .. } => UpError::Command {
                what,
                status,
                output: tail(&log),
            },
            e => e,
        })?;
    }
    let psql = |sql: &str| -> Result<String, UpError> {
        run_cmd(
            "psql",
            pg_command(bin, "psql", root)
                .arg("-h")
                .arg(l.pg_socket_dir())
                .args([
                    "-p",
                    &cfg.pg_port.to_string(),
                    "-U",
                    "wrenn",
                    "-d",
                    "postgres",
                ])
                .args(["-XAtqc", sql]),
        )
    };
    if psql("SELECT 1 FROM pg_database WHERE datname = 'wrenn'")?.trim() != "1" {
        psql("CREATE DATABASE wrenn")?;
    }
    Ok(format!(
        "postgresql://wrenn:{password}@127.0.0.1:{}/wrenn",
        cfg.pg_port
    ))
}

/// Migrations, then `admin init` once; returns (team key, platform-admin key).
fn init_ctl(cfg: &UpConfig, ctl: &Path, db_url: &str) -> Result<(String, String), UpError> {
    let l = &cfg.layout;
    let env = [("WRENN_DATABASE_URL", db_url.to_owned())];
    let mut migrate = Command::new(ctl);
    migrate.args(["admin", "migrate"]);
    for (k, v) in &env {
        migrate.env(k, v);
    }
    run_cmd("wrenn-ctl admin migrate", &mut migrate)?;
    if let (Some(team), Some(admin)) = (read_trim(&l.api_key()), read_trim(&l.admin_key())) {
        return Ok((team, admin));
    }
    let mut init = Command::new(ctl);
    init.args([
        "admin",
        "init",
        "--team",
        "local",
        "--email",
        "admin@localhost",
    ])
    .args(["--name", "local admin"]);
    for (k, v) in &env {
        init.env(k, v);
    }
    let out = match run_cmd("wrenn-ctl admin init", &mut init) {
        Ok(out) => out,
        Err(UpError::Command { output, .. }) if output.contains("already initialized") => {
            return Err(UpError::LostKey { path: l.api_key() })
        }
        Err(e) => return Err(e),
    };
    let (team, admin) = parse_init_keys(&out).ok_or_else(|| UpError::Command {
        what: "wrenn-ctl admin init".into(),
        status: "no keys in its output".into(),
        output: String::new(),
    })?;
    write_secret(&l.api_key(), &team)?;
    write_secret(&l.admin_key(), &admin)?;
    Ok((team, admin))
}

/// (team key, platform-admin key) from `wrenn-ctl admin init`'s output.
pub fn parse_init_keys(out: &str) -> Option<(String, String)> {
    let key_on = |label: &str| -> Option<String> {
        let line = out.lines().find(|l| l.trim_start().starts_with(label))?;
        line.split_whitespace()
            .find(|w| w.starts_with("wrn_"))
            .map(str::to_owned)
    };
    Some((key_on("team api key")?, key_on("platform admin key")?))
}

fn start_ctl(
    cfg: &UpConfig,
    ctl: &Path,
    db_url: &str,
    running: Option<i32>,
) -> Result<(), UpError> {
    let l = &cfg.layout;
    let pid = match running {
        Some(pid) => pid,
        None => spawn_detached(
            ctl,
            &[
                "serve".into(),
                "--listen".into(),
                loopback(cfg.ctl_port).to_string(),
                "--http-listen".into(),
                loopback(cfg.http_port).to_string(),
                "--host-listen".into(),
                loopback(cfg.host_port).to_string(),
            ],
            &[("WRENN_DATABASE_URL", db_url.to_owned())],
            &l.log("ctl"),
            &l.pid("ctl"),
        )?,
    };
    let http = loopback(cfg.http_port);
    let rpc = loopback(cfg.ctl_port);
    wait_ready("wrenn-ctl", pid, &l.log("ctl"), || {
        TcpStream::connect_timeout(&rpc, Duration::from_secs(1)).is_ok()
            && matches!(
                http_get(http, "/health", &[], Duration::from_secs(2)),
                Ok((200, _))
            )
    })
}

/// Starts the agent (registering it on its first start); returns its /health answer.
fn start_agent(
    cfg: &UpConfig,
    ctl: &Path,
    agent: &Path,
    db_url: &str,
    running: Option<i32>,
) -> Result<String, UpError> {
    let l = &cfg.layout;
    let root = l.agent_root();
    let identity = root.join("agent").join("identity.conf");
    // The base template: a link to the image built by `wrenn image rootfs`, so this stack's
    // agent keeps its own state root (its identity belongs to this stack's database).
    let tdir = root.join("templates").join(doctor::MINIMAL_TEMPLATE);
    let link = tdir.join("rootfs.ext4");
    if cfg.rootfs.exists() && fs::symlink_metadata(&link).is_err() {
        mkdir(&tdir, 0o755)?;
        std::os::unix::fs::symlink(&cfg.rootfs, &link).map_err(io_err("link", &link))?;
    }
    let pid = match running {
        Some(pid) => pid,
        None => {
            let mut args = vec![
                "--listen".into(),
                loopback(cfg.agent_port).to_string(),
                "--metrics-listen".into(),
                loopback(cfg.agent_metrics_port()).to_string(),
                "--state-root".into(),
                root.display().to_string(),
                "--ctl".into(),
                loopback(cfg.host_port).to_string(),
                "--firecracker".into(),
                cfg.firecracker.display().to_string(),
                "--net-prefix".into(),
                cfg.net_prefix.clone(),
                "--net-subnet".into(),
                cfg.net_subnet.clone(),
            ];
            if let Some(k) = &cfg.kernel {
                args.extend(["--kernel".into(), k.display().to_string()]);
            }
            if !identity.exists() {
                let mut tok = Command::new(ctl);
                tok.args(["admin", "create-registration-token"])
                    .env("WRENN_DATABASE_URL", db_url);
                let out = run_cmd("wrenn-ctl admin create-registration-token", &mut tok)?;
                let token = out
                    .split_whitespace()
                    .find(|w| w.starts_with("wrr_"))
                    .ok_or_else(|| UpError::Command {
                        what: "wrenn-ctl admin create-registration-token".into(),
                        status: "no token in its output".into(),
                        output: out.clone(),
                    })?;
                args.extend(["--registration-token".into(), token.to_owned()]);
            }
            args.extend(cfg.agent_args.iter().cloned());
            spawn_detached(agent, &args, &[], &l.log("agent"), &l.pid("agent"))?
        }
    };
    let metrics = loopback(cfg.agent_metrics_port());
    let mut health = String::new();
    wait_ready("wrenn-agent", pid, &l.log("agent"), || {
        if !identity.exists() {
            return false;
        }
        match http_get(metrics, "/health", &[], Duration::from_secs(2)) {
            Ok((200, body)) => {
                health = body;
                true
            }
            _ => false,
        }
    })?;
    Ok(health)
}

fn summary(cfg: &UpConfig, health: &str, exports: &str) -> String {
    let l = &cfg.layout;
    let mut s = format!(
        "wrenn is up (state in {}):\n  PostgreSQL   127.0.0.1:{}   log {}\n  wrenn-ctl    127.0.0.1:{} (protobuf), http://127.0.0.1:{} (HTTP/JSON), 127.0.0.1:{} (agents)   log {}\n  wrenn-agent  127.0.0.1:{}, metrics http://127.0.0.1:{}/metrics   log {}\n",
        l.dir.display(),
        cfg.pg_port,
        l.log("postgres").display(),
        cfg.ctl_port,
        cfg.http_port,
        cfg.host_port,
        l.log("ctl").display(),
        cfg.agent_port,
        cfg.agent_metrics_port(),
        l.log("agent").display(),
    );
    s.push_str(&format!(
        "  keys         team {} ; platform admin {}\n",
        l.api_key().display(),
        l.admin_key().display()
    ));
    let flags = if l.dir == default_state_dir().unwrap_or_default() {
        String::new()
    } else {
        format!(" --state-dir {}", l.dir.display())
    };
    let mut todo = Vec::new();
    if !sys::is_root() {
        todo.push(format!(
            "wrenn-agent runs sandboxes only as root: `wrenn down{flags}`, then `sudo wrenn up`"
        ));
    }
    if !fs::metadata(&cfg.firecracker).is_ok_and(|m| m.is_file()) {
        todo.push(format!(
            "Firecracker is not at {}: install the release binary (github.com/firecracker-microvm/firecracker/releases) as {} or set WRENN_FIRECRACKER",
            cfg.firecracker.display(),
            doctor::DEFAULT_FIRECRACKER
        ));
    }
    match &cfg.kernel {
        Some(k) if k.exists() => {}
        _ => todo.push(format!(
            "no guest kernel in {}/kernels: `sudo wrenn image kernel` (or set WRENN_KERNEL)",
            cfg.image_root.display()
        )),
    }
    if !cfg.rootfs.exists() {
        todo.push(format!(
            "no base rootfs at {}: `sudo wrenn image rootfs --envd PATH` (or set WRENN_ROOTFS)",
            cfg.rootfs.display()
        ));
    }
    let health = health.trim();
    if health.contains("cannot host") {
        s.push_str(&format!("\nthe agent says: {health}\n"));
    }
    if !todo.is_empty() {
        s.push_str("\nsandboxes cannot start yet:\n");
        for t in &todo {
            s.push_str(&format!("  - {t}\n"));
        }
        s.push_str(&format!(
            "then restart the stack: wrenn down{flags} && wrenn up{flags}\n"
        ));
    }
    let one_line = exports
        .lines()
        .map(|l| l.trim_start_matches("export "))
        .collect::<Vec<_>>()
        .join(" ");
    s.push_str(&format!(
        "\nuse it:\n  export {one_line}; wrenn sandbox create\n(or `. {}` first)\nstop it: wrenn down{flags}\n",
        l.env_file().display(),
    ));
    s
}

// ---- down ----

/// Processes (other than ours) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if is_stack_process(&cmdline, needle) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push((pid, text.trim().to_owned()));
        }
    }
    found
}

/// Programs a local stack runs. A process counts as the stack's only when it is one of these
/// and its command line names the state directory: a `tail -f` of a log there is not ours
/// to kill.
const STACK_PROGRAMS: &[&str] = &[
    "postgres",
    "pg_ctl",
    "wrenn-ctl",
    "wrenn-agent",
    "firecracker",
    "wrenn-uffd",
];

/// Whether a NUL-separated command line is a stack program that mentions `needle`.
fn is_stack_process(cmdline: &[u8], needle: &str) -> bool {
    let mut args = cmdline.split(|b| *b == 0);
    let argv0 = String::from_utf8_lossy(args.next().unwrap_or_default());
    // postgres children rename themselves ("postgres: checkpointer"): take the first word.
    let program = argv0.split([' ', ':']).next().unwrap_or("");
    let name = program.rsplit('/').next().unwrap_or("");
    STACK_PROGRAMS.contains(&name) && String::from_utf8_lossy(cmdline).contains(needle)
}

/// Mount points at or under `dir` (deepest first).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; true when the process is gone.
fn terminate(pid: i32) -> bool {
    if !sys::kill(pid, libc::SIGTERM).unwrap_or(false) {
        return true;
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if !process_exists(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = sys::kill(pid, libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(200));
    !process_exists(pid)
}

/// Alive and not a zombie (a zombie child of someone else's shell is gone for us).
fn process_exists(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn stop_pidfile(layout: &Layout, name: &str, report: &mut String, left: &mut Vec<String>) {
    let path = layout.pid(name);
    match live_pid(&path, &format!("wrenn-{name}")) {
        Some(pid) => {
            if terminate(pid) {
                report.push_str(&format!("stopped {name} (pid {pid})\n"));
                let _ = fs::remove_file(&path);
            } else {
                left.push(format!("{name} pid {pid} did not exit"));
            }
        }
        None => {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Destroys the local team's sandboxes through ctl's protobuf API (the generated
/// `SandboxesClient`), so that the agent tears down their VMs, network slots and disks itself
/// (a stopped agent leaves them running on purpose).
fn destroy_sandboxes(
    layout: &Layout,
    ctl: SocketAddr,
    report: &mut String,
    left: &mut Vec<String>,
) {
    use proto::gen::wrenn::ctl::v1 as pb;
    let (Some(key), Some(_)) = (
        read_trim(&layout.api_key()),
        live_pid(&layout.pid("ctl"), "wrenn-ctl"),
    ) else {
        return;
    };
    let client = match proto::rpc::Client::connect_tcp(ctl, proto::rpc::Credential::api_key(key)) {
        Ok(c) => c,
        Err(e) => {
            report.push_str(&format!("could not reach ctl to list sandboxes: {e}\n"));
            return;
        }
    };
    let list_client = pb::SandboxesClient::new(&client).with_timeout(Duration::from_secs(10));
    let destroy_client = pb::SandboxesClient::new(&client).with_timeout(STOP_TIMEOUT * 8);
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = match list_client.list(&pb::ListSandboxesRequest {
            page_size: 1000,
            page_token: std::mem::take(&mut page_token),
            ..Default::default()
        }) {
            Ok(p) => p,
            Err(e) => {
                report.push_str(&format!("could not list sandboxes: {e}\n"));
                return;
            }
        };
        ids.extend(page.sandboxes.into_iter().map(|sb| sb.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    for id in ids {
        let req = pb::DestroySandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        };
        match destroy_client.destroy(&req) {
            Ok(_) => report.push_str(&format!("destroyed {id}\n")),
            Err(e) if e.code == proto::Code::NotFound => {
                report.push_str(&format!("destroyed {id}\n"))
            }
            Err(e) => left.push(format!("sandbox {id}: destroy failed: {e}")),
        }
    }
    client.close();
}

/// Stops the stack in `layout`; returns what was done, or what was left behind.
pub fn stop(layout: &Layout) -> Result<String, UpError> {
    let mut report = String::new();
    let mut left = Vec::new();
    if !layout.dir.exists() {
        return Ok(format!(
            "nothing to stop: {} does not exist\n",
            layout.dir.display()
        ));
    }
    let _lock = lock(layout)?;
    let conf = read_conf(&layout.stack());
    let root = sys::is_root();

    if let Some(port) = conf.get("ctl_port").and_then(|p| p.parse::<u16>().ok()) {
        destroy_sandboxes(layout, loopback(port), &mut report, &mut left);
    }
    stop_pidfile(layout, "agent", &mut report, &mut left);
    // The agent leaves Firecracker and wrenn-uffd running on purpose (a restarted agent
    // re-adopts them); `down` means nothing keeps running.
    let agent_root = layout.agent_root().display().to_string();
    for (pid, cmd) in processes_mentioning(&agent_root) {
        if terminate(pid) {
            report.push_str(&format!("stopped pid {pid}: {cmd}\n"));
        } else {
            left.push(format!("pid {pid} did not exit: {cmd}"));
        }
    }
    for m in mounts_under(&layout.dir) {
        let ok = sys::umount_detach(&m).is_ok();
        if ok {
            report.push_str(&format!("unmounted {}\n", m.display()));
        } else {
            left.push(format!("mount {}", m.display()));
        }
    }
    stop_pidfile(layout, "ctl", &mut report, &mut left);

    if layout.pg_data().join("PG_VERSION").exists() {
        let bin = conf
            .get("pg_bin")
            .map(PathBuf::from)
            .map_or_else(find_pg_bin, Ok)?;
        let running = pg_command(&bin, "pg_ctl", root)
            .arg("status")
            .arg("-D")
            .arg(layout.pg_data())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if running {
            match run_cmd(
                "pg_ctl stop",
                pg_command(&bin, "pg_ctl", root)
                    .arg("stop")
                    .arg("-D")
                    .arg(layout.pg_data())
                    .args(["-m", "fast", "-w", "-t", "60"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
            ) {
                Ok(_) => report.push_str("stopped PostgreSQL\n"),
                Err(e) => left.push(format!("PostgreSQL: {e}")),
            }
        }
    }

    for key in [
        "ctl_port",
        "http_port",
        "host_port",
        "agent_port",
        "agent_metrics_port",
        "pg_port",
    ] {
        if let Some(p) = conf.get(key).and_then(|v| v.parse::<u16>().ok()) {
            // TIME_WAIT does not block a bind with SO_REUSEADDR, which std sets.
            if !wait_port_free(p, PORT_RELEASE_WAIT) {
                left.push(format!("port {p} ({key}) still in use"));
            }
        }
    }
    // `pg_ctl stop -w` returns once the pid file is gone, a moment before the postmaster
    // has exited; anything else still running from the state directory is a leftover.
    let dir = layout.dir.display().to_string();
    let deadline = Instant::now() + PORT_RELEASE_WAIT;
    let mut still = processes_mentioning(&dir);
    while !still.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        still = processes_mentioning(&dir);
    }
    for (pid, cmd) in still {
        left.push(format!("pid {pid} still running: {cmd}"));
    }
    if !left.is_empty() {
        return Err(UpError::Leftovers(left));
    }
    if report.is_empty() {
        report.push_str("nothing was running\n");
    }
    report.push_str(&format!(
        "wrenn is down; data kept in {} (remove it for a fresh start)\n",
        layout.dir.display()
    ));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_output_yields_both_keys() {
        let k1 = format!("wrn_{}", "a".repeat(64));
        let k2 = format!("wrn_{}", "b".repeat(64));
        let out = format!(
            "team:               team-x\nuser:               usr-y\nteam api key:       {k1}  (key-1)\nplatform admin key: {k2}  (key-2)\nThese keys are shown once; store them now.\n"
        );
        assert_eq!(parse_init_keys(&out), Some((k1, k2)));
        assert_eq!(parse_init_keys("team api key: none\n"), None);
    }

    #[test]
    fn http_responses_plain_chunked_and_bad() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
        assert_eq!(parse_http_response(r).unwrap(), (200, "ok\n".into()));
        let r = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(r).unwrap(), (404, "abcde".into()));
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_http_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_http_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        .is_err());
        assert!(parse_http_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc"
        )
        .is_err());
    }

    #[test]
    fn only_stack_programs_count() {
        let d = "/var/lib/wrenn/local";
        assert!(is_stack_process(
            b"/usr/lib/postgresql/15/bin/postgres\0-D\0/var/lib/wrenn/local/postgres/data\0",
            d
        ));
        assert!(is_stack_process(
            b"/opt/fc/firecracker\0--api-sock\0/var/lib/wrenn/local/agent/sandboxes/x/api.sock\0",
            d
        ));
        assert!(is_stack_process(
            b"/x/target/debug/wrenn-agent\0--state-root\0/var/lib/wrenn/local/agent\0",
            d
        ));
        // Not ours: a user looking at a log, another stack's agent.
        assert!(!is_stack_process(
            b"tail\0-f\0/var/lib/wrenn/local/log/agent.log\0",
            d
        ));
        assert!(!is_stack_process(
            b"/x/wrenn-agent\0--state-root\0/srv/other\0",
            d
        ));
        assert!(!is_stack_process(b"", d));
    }

    #[test]
    fn closed_parents_are_found() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("wrenn-up-trav-{}", std::process::id()));
        let inner = d.join("a/b");
        fs::create_dir_all(&inner).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(d.join("a"), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_traversable(&inner, 4242).is_ok());
        fs::set_permissions(d.join("a"), fs::Permissions::from_mode(0o750)).unwrap();
        let e = check_traversable(&inner, 4242).unwrap_err();
        assert!(e.to_string().contains("/a is closed"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn conf_round_trip_and_user_lookup() {
        let d = std::env::temp_dir().join(format!("wrenn-up-unit-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let p = d.join("stack.conf");
        fs::write(&p, "ctl_port=7700\nbad line\npg_bin = /x/bin\n").unwrap();
        let c = read_conf(&p);
        assert_eq!(c.get("ctl_port").map(String::as_str), Some("7700"));
        assert_eq!(c.get("pg_bin").map(String::as_str), Some("/x/bin"));
        assert_eq!(c.len(), 2);
        assert_eq!(user_ids("root"), Some((0, 0)));
        assert_eq!(user_ids("no-such-user-wrenn"), None);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn live_pid_ignores_garbage_and_dead_pids() {
        let d = std::env::temp_dir().join(format!("wrenn-up-pid-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let p = d.join("x.pid");
        let me = std::env::current_exe().unwrap();
        let name = me.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(live_pid(&p, &name), None);
        fs::write(&p, "garbage").unwrap();
        assert_eq!(live_pid(&p, &name), None);
        fs::write(&p, "0").unwrap();
        assert_eq!(live_pid(&p, &name), None);
        fs::write(&p, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(live_pid(&p, &name), Some(std::process::id() as i32));
        // Alive, but not the program the pid file is for.
        assert_eq!(live_pid(&p, "wrenn-ctl-not-this"), None);
        fs::remove_dir_all(&d).unwrap();
    }
}

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

mod postgres;
mod supervise;
mod teardown;

pub use postgres::find_pg_bin;
use postgres::*;
use supervise::*;
pub use supervise::{
    find_binary, http_get, http_request, https_get, https_request, live_pid, parse_http_response,
    parse_init_keys,
};
pub use teardown::stop;

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

/// The local agent's first jail uid (`--uid-base`): its 4096 uids and its page servers' uid
/// (910000..=914096) stay apart from a system agent's default range (900000..=904096).
pub const UP_JAIL_UID_BASE: u32 = 910_000;
// Past the agent's default range and page-server uid (agent/src/limits.rs:
// JAIL_UID_BASE_DEFAULT 900000, JAIL_UID_COUNT_DEFAULT 4096; the CLI does not link the agent).
const _: () = assert!(UP_JAIL_UID_BASE > 900_000 + 4096);

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
    /// `wrenn-ctl admin tls init`'s files: the local CA and ctl's loopback certificate.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }
    /// The local CA certificate (`WRENN_CA` in the env file).
    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
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
    init_tls(cfg, &ctl_bin)?;
    start_ctl(cfg, &ctl_bin, &db_url, running_ctl)?;
    let health = start_agent(cfg, &ctl_bin, &agent_bin, &db_url, running_agent)?;

    let exports = format!(
        "export WRENN_URL=127.0.0.1:{}\nexport WRENN_API_KEY={}\nexport WRENN_CA={}\n",
        cfg.ctl_port,
        keys.0,
        l.ca_cert().display()
    );
    write_secret(&l.env_file(), exports.trim_end())?;
    Ok(summary(cfg, &health, &exports))
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

#[cfg(test)]
mod tests {
    use super::teardown::*;
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

//! Start-up and shutdown of the envd process: what `main` runs once flags are parsed.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use proto::rpc::{Server, ServerConfig};

use crate::clock::Clock;
use crate::limits::{CLOCK_SYNC_INTERVAL, RPC_WORKERS_MAX};
use crate::process::{Cgroup, Table};
use crate::reaper::{Mode, Reaper};
use crate::service::{AnnounceTarget, Config, Envd, EnvdService};
use crate::{init, mmds, vsock};

/// Where the API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
    Vsock(u32),
}

/// Parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub listen: Listen,
    /// Announce readiness (to the host over vsock by default).
    pub announce: bool,
    /// Announce to this Unix socket instead of the host (tests, development).
    pub announce_unix: Option<PathBuf>,
    /// Where etc/passwd and etc/group are read (None = `/`; tests give a fake one).
    pub accounts_root: Option<PathBuf>,
}

/// How long processes get between SIGTERM and SIGKILL at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runs envd until SIGTERM/SIGINT. As PID 1 it then powers the VM off and never returns.
pub fn run(opts: Options) -> Result<(), String> {
    // First, before any thread exists, so that every thread inherits the mask.
    init::block_signals().map_err(|e| format!("block signals: {e}"))?;
    proto::logger::init();
    let pid1 = init::is_pid1();
    info!(
        "envd starting version={} pid1={pid1}",
        crate::service::VERSION
    );
    if pid1 {
        init::mount_all();
        if let Err(e) = init::loopback_up() {
            warn!("bring up lo failed error={e}");
        }
        if let Err(e) = init::disable_ctrl_alt_del() {
            warn!("disable ctrl-alt-del failed error={e}");
        }
    }
    let reaper = Reaper::start(if pid1 { Mode::All } else { Mode::Registered })
        .map_err(|e| format!("start the reaper: {e}"))?;
    let cgroup_name = if pid1 {
        "processes".to_string()
    } else {
        format!("envd-{}", std::process::id())
    };
    let cgroup = match Cgroup::create(&cgroup_name) {
        Ok(c) => {
            info!("processes run in cgroup dir={}", c.dir().display());
            if pid1 {
                enable_controllers(c.dir().parent());
            }
            Some(c)
        }
        Err(e) => {
            info!("cgroup2 not writable, processes stay in envd's cgroup error={e}");
            None
        }
    };
    let cgroup_dir = cgroup.as_ref().map(|c| c.dir().to_path_buf());
    let table = Table::new(reaper, cgroup);

    let identity = if pid1 { mmds::identity() } else { None };
    if let Some(id) = &identity {
        info!(
            "mmds identity sandbox_id={} template_id={}",
            id.sandbox_id, id.template_id
        );
        if let Err(e) = init::set_hostname(&id.sandbox_id) {
            warn!("set hostname failed error={e}");
        }
    }
    let clock = Arc::new(Clock::new(Path::new("/dev/ptp0"), pid1));
    if pid1 {
        clock.sync(0);
        let c = clock.clone();
        let _ = std::thread::Builder::new()
            .name("clock".into())
            .spawn(move || loop {
                std::thread::sleep(CLOCK_SYNC_INTERVAL);
                c.sync(0);
            });
        crate::ports::start();
    }

    let announce = match (&opts.announce_unix, opts.announce, &opts.listen) {
        (Some(p), _, _) => Some(AnnounceTarget::Unix(p.clone())),
        (None, true, Listen::Vsock(_)) => Some(AnnounceTarget::Vsock {
            cid: vsock::CID_HOST,
            port: vsock::READY_PORT,
        }),
        _ => None,
    };
    let api_port = match opts.listen {
        Listen::Vsock(p) => p,
        _ => 0,
    };
    let cfg = Config {
        root: opts
            .accounts_root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/")),
        announce,
        api_port,
        initial_sandbox_id: identity
            .as_ref()
            .map(|i| i.sandbox_id.clone())
            .unwrap_or_default(),
        initial_template_id: identity.map(|i| i.template_id).unwrap_or_default(),
        set_hostname: pid1,
    };
    let envd = Envd::new(cfg, table.clone(), clock);
    let mut server_cfg = ServerConfig::new("envd");
    server_cfg.workers_max = RPC_WORKERS_MAX;
    server_cfg.hello_timeout = proto::limits::GUEST_HELLO_TIMEOUT;
    let mut server = Server::new(server_cfg, Arc::new(EnvdService(envd.clone())))
        .map_err(|e| format!("create the server: {e}"))?;
    match &opts.listen {
        Listen::Unix(p) => server
            .listen_unix(p)
            .map_err(|e| format!("listen on {}: {e}", p.display()))?,
        Listen::Tcp(a) => {
            let local = server
                .listen_tcp(*a)
                .map_err(|e| format!("listen on {a}: {e}"))?;
            info!("listening addr={local}");
        }
        Listen::Vsock(port) => {
            let fd =
                vsock::listen(*port).map_err(|e| format!("listen on vsock port {port}: {e}"))?;
            server
                .listen_fd(fd)
                .map_err(|e| format!("serve vsock port {port}: {e}"))?;
        }
    }
    envd.set_server_handle(server.handle());
    let (handle, _join) = server
        .spawn()
        .map_err(|e| format!("start the server: {e}"))?;
    info!("envd ready listen={:?}", opts.listen);
    envd.announce(false);

    let sigfd = init::shutdown_signal_fd().map_err(|e| format!("signalfd: {e}"))?;
    let sig = init::wait_shutdown_signal(&sigfd).map_err(|e| format!("wait for signals: {e}"))?;
    info!("shutting down signal={sig}");
    handle.shutdown();
    if pid1 {
        init::power_off(SHUTDOWN_GRACE);
    }
    table.signal_all(libc::SIGTERM);
    let start = Instant::now();
    while !table.is_empty() && start.elapsed() < SHUTDOWN_GRACE {
        std::thread::sleep(Duration::from_millis(20));
    }
    table.signal_all(libc::SIGKILL);
    let start = Instant::now();
    while !table.is_empty() && start.elapsed() < SHUTDOWN_GRACE {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Descendants the table does not know (background jobs of ended processes) are in the
    // cgroup: kill them too, so nothing outlives envd.
    if let Some(cg) = table.cgroup() {
        cg.kill_all();
        let start = Instant::now();
        while !cg.pids().is_empty() && start.elapsed() < SHUTDOWN_GRACE {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if let Listen::Unix(p) = &opts.listen {
        let _ = std::fs::remove_file(p);
    }
    if let Some(d) = cgroup_dir {
        if let Err(e) = std::fs::remove_dir(&d) {
            warn!("remove cgroup failed dir={} error={e}", d.display());
        }
    }
    info!("envd stopped");
    Ok(())
}

/// Lets the agent set limits on the processes' cgroup: enable the cpu, memory and pids
/// controllers in the parent's subtree (best effort: a guest kernel may lack some).
fn enable_controllers(parent: Option<&Path>) {
    let Some(parent) = parent else { return };
    for c in ["+cpu", "+memory", "+pids"] {
        if let Err(e) = std::fs::write(parent.join("cgroup.subtree_control"), c) {
            warn!("enable cgroup controller failed controller={c} error={e}");
        }
    }
}

//! Start-up and the agent's threads: the RPC server (the calling thread), the TTL reaper,
//! the VM monitor, the ctl link and the metrics/health listener.

use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};
use proto::rpc::{Server, ServerConfig};

use crate::ctl::{CtlConfig, CtlLink};
use crate::firecracker::{FcConfig, FirecrackerVmm};
use crate::flags::Flags;
use crate::host::{Host, IdentityCell};
use crate::http::HttpServer;
use crate::manager::{Config, Events, Manager, NoEvents};
use crate::rpc::AgentService;
use crate::statedir::{Identity, Layout};
use crate::ttl::{Clock, SystemClock};

/// How often the monitor looks for VMs that died.
const MONITOR_INTERVAL: Duration = Duration::from_secs(2);

/// Runs the agent until the RPC server stops. SIGTERM or SIGINT drains the server
/// (GOAWAY, open calls finish up to `DRAIN_TIMEOUT`) and returns; running VMs are left
/// alone, to be re-adopted by the next agent.
pub fn run(flags: Flags) -> Result<(), String> {
    let term =
        proto::signal::Termination::install().map_err(|e| format!("signal handlers: {e}"))?;
    let layout = Layout::new(&flags.state_root);
    layout
        .create()
        .map_err(|e| format!("create state root: {e}"))?;
    let identity = Identity::load(&layout.identity()).map_err(|e| e.to_string())?;
    let identity = Arc::new(IdentityCell::new(identity));
    if identity.get().is_none() && flags.ctl.is_none() {
        warn!("not registered and no --ctl given: every RPC connection will be refused");
    }
    let advertise = flags.advertise.clone().unwrap_or_else(|| {
        if flags.listen.ip().is_unspecified() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into());
            format!("{host}:{}", flags.listen.port())
        } else {
            flags.listen.to_string()
        }
    });
    let ctl_tls = match &flags.ctl_ca {
        Some(ca) => Some(
            tls::ClientTls::from_ca_file(
                ca,
                tls::ClientOptions {
                    alpn: vec![tls::ALPN_WRENN.to_vec()],
                    ..Default::default()
                },
            )
            .map_err(|e| format!("--ctl-ca: {e}"))?,
        ),
        None => None,
    };
    // The agent port: mutual TLS once the host has the certificate ctl issued.
    let rpc_tls = Arc::new(
        crate::rpc_tls::RpcTls::load(&layout.host_cert(), &layout.host_key(), &layout.ctl_ca())
            .map_err(|e| format!("host certificate: {e}"))?,
    );
    let link = flags.ctl.as_ref().map(|addr| {
        CtlLink::new(
            CtlConfig {
                addr: addr.clone(),
                registration_token: flags.registration_token.clone(),
                agent_address: advertise.clone(),
                identity_path: layout.identity(),
                host_key_path: layout.host_key(),
                host_cert_path: layout.host_cert(),
                ctl_ca_path: layout.ctl_ca(),
                ctl_ca_given: flags.ctl_ca.clone(),
                tls: ctl_tls.clone(),
                rpc_tls: rpc_tls.clone(),
            },
            identity.clone(),
        )
    });
    let events: Arc<dyn Events> = match &link {
        Some(l) => l.clone(),
        None => Arc::new(NoEvents),
    };
    let vmm = Arc::new(FirecrackerVmm::new(FcConfig::from_flags(&flags)));
    let mut cfg = Config::new(&flags.state_root);
    cfg.slot_capacity = flags.slots;
    if !flags.unjailed {
        cfg.jail_uids = Some(crate::uid_pool::UidRange {
            base: flags.uid_base,
            count: flags.uid_count,
        });
        cfg.jail_chroot_base = Some(flags.chroot_base.clone());
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let manager = Manager::new(cfg, vmm, clock.clone(), events).map_err(|e| e.to_string())?;
    let decisions = manager.recover();
    info!("recovered sandboxes count={}", decisions.len());
    let host = Arc::new(Host {
        manager: manager.clone(),
        identity: identity.clone(),
        extra_problems: Vec::new(),
        overcommit: flags.overcommit,
    });
    let problems = host.problems();
    if !problems.is_empty() {
        warn!("this host cannot run sandboxes: {}", problems.join("; "));
    }

    let m = manager.clone();
    let c = clock.clone();
    std::thread::Builder::new()
        .name("agent-reaper".into())
        .spawn(move || {
            let reaper = m.reaper().clone();
            reaper.run(c.as_ref(), &|id| m.expire(id));
        })
        .map_err(|e| format!("spawn reaper: {e}"))?;
    let m = manager.clone();
    std::thread::Builder::new()
        .name("agent-monitor".into())
        .spawn(move || loop {
            std::thread::sleep(MONITOR_INTERVAL);
            m.check_vms();
        })
        .map_err(|e| format!("spawn monitor: {e}"))?;
    if let Some(l) = &link {
        l.set_host(host.clone());
        let l = l.clone();
        std::thread::Builder::new()
            .name("agent-ctl".into())
            .spawn(move || l.run())
            .map_err(|e| format!("spawn ctl link: {e}"))?;
    }
    let _http = HttpServer::start(flags.metrics_listen, host.clone())
        .map_err(|e| format!("listen {}: {e}", flags.metrics_listen))?;

    let samples = Arc::new(crate::samples::Store::new());
    crate::sampler::spawn(manager.clone(), samples.clone())
        .map_err(|e| format!("spawn sampler: {e}"))?;
    let svc = AgentService::new(manager, host, identity)
        .map_err(|e| format!("port relays: {e}"))?
        .with_samples(samples);
    // ctl's connections (AGENT_TOKEN) keep reserved slots: no flood or other credential
    // can lock ctl out of this host (issue 18).
    let cfg = ServerConfig::new("wrenn-agent").reserve_for(proto::rpc::CredentialKind::AgentToken);
    let mut server = Server::new(cfg, Arc::new(svc)).map_err(|e| format!("rpc server: {e}"))?;
    let addr = server
        .listen_tcp_with(flags.listen, rpc_tls.wrap())
        .map_err(|e| format!("listen {}: {e}", flags.listen))?;
    info!(
        "wrenn-agent listening rpc={addr} tls={} metrics={} state_root={}",
        rpc_tls.is_tls(),
        _http.addr(),
        flags.state_root.display()
    );
    let handle = server.handle();
    std::thread::Builder::new()
        .name("agent-signals".into())
        .spawn(move || {
            if let Ok(sig) = term.wait() {
                info!("draining rpc server signal={sig}");
                handle.shutdown();
            }
        })
        .map_err(|e| format!("spawn signal thread: {e}"))?;
    server.run().map_err(|e| {
        error!("rpc server failed error={e}");
        e.to_string()
    })
}

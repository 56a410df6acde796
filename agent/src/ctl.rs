//! The agent's link to ctl (wrenn.host.v1): registration with a one-time token, heartbeats,
//! and reports of state changes the agent makes on its own.
//!
//! One thread owns the link. Reports wait in a bounded queue ([`REPORT_QUEUE_MAX`]; the
//! oldest are dropped beyond it, and ctl's reconciler catches up through Sandboxes.List),
//! so an unreachable ctl never grows the agent's memory nor blocks a lifecycle operation.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use log::{info, warn};
use proto::gen::wrenn::host::v1 as hpb;
use proto::id;
use proto::rpc::{Client, Credential};
use proto::Status;

use crate::host::{Host, IdentityCell, AGENT_VERSION};
use crate::limits::{
    CERT_RENEW_AT_DEN, CERT_RENEW_AT_NUM, CERT_RENEW_RETRY, CTL_CALL_TIMEOUT,
    HEARTBEAT_INTERVAL_DEFAULT, HEARTBEAT_INTERVAL_MAX, HEARTBEAT_INTERVAL_MIN, REPORT_QUEUE_MAX,
};
use crate::manager::Events;
use crate::statedir::Identity;

/// Settings of the link.
#[derive(Clone, Debug)]
pub struct CtlConfig {
    /// ctl's protobuf address, "host:port".
    pub addr: String,
    /// One-time registration token (used only when the host has no identity yet).
    pub registration_token: Option<String>,
    /// Where ctl reaches this agent, "host:port".
    pub agent_address: String,
    /// Where the identity is saved.
    pub identity_path: std::path::PathBuf,
    /// Where registration saves the host key (0600), the host certificate and ctl's CA.
    pub host_key_path: std::path::PathBuf,
    pub host_cert_path: std::path::PathBuf,
    pub ctl_ca_path: std::path::PathBuf,
    /// The `--ctl-ca` bundle: a pinned registration also finds the pinned CA there.
    pub ctl_ca_given: Option<std::path::PathBuf>,
    /// TLS to ctl's host port (trusting ctl's CA); `None` only with `--ctl-plaintext`.
    pub tls: Option<tls::ClientTls>,
    /// The agent port's TLS, installed when registration brings a certificate.
    pub rpc_tls: Arc<crate::rpc_tls::RpcTls>,
}

/// The link to ctl.
pub struct CtlLink {
    cfg: CtlConfig,
    identity: Arc<IdentityCell>,
    host: OnceLock<Arc<Host>>,
    queue: Mutex<VecDeque<hpb::ReportStateRequest>>,
    wake: Condvar,
    stop: AtomicBool,
    interval: Mutex<Duration>,
    /// No renewal attempt before this (set after a failed one).
    renew_not_before: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for CtlLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtlLink")
            .field("addr", &self.cfg.addr)
            .finish()
    }
}

impl Events for CtlLink {
    fn state_changed(&self, report: hpb::ReportStateRequest) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= REPORT_QUEUE_MAX {
            q.pop_front();
            crate::metrics::REPORTS_DROPPED.inc();
        }
        q.push_back(report);
        self.wake.notify_all();
    }
}

fn clamp_interval(ms: u32) -> Duration {
    if ms == 0 {
        return HEARTBEAT_INTERVAL_DEFAULT;
    }
    Duration::from_millis(u64::from(ms)).clamp(HEARTBEAT_INTERVAL_MIN, HEARTBEAT_INTERVAL_MAX)
}

impl CtlLink {
    /// Opens a connection to ctl's host port: TLS (ALPN wrenn/1) unless plaintext was asked,
    /// presenting the host certificate once registration saved one (ctl requires it from
    /// a host it issued one; registering connections never send one).
    fn connect(&self, cred: Credential) -> Result<Client, Status> {
        let cfg = proto::rpc::ClientConfig::default();
        match &self.cfg.tls {
            Some(t) => match self.identity_tls()? {
                Some(mine) => tls::connect(&self.cfg.addr, &mine, cred, &cfg),
                None => tls::connect(&self.cfg.addr, t, cred, &cfg),
            },
            None => Client::connect_tcp(self.cfg.addr.as_str(), cred),
        }
    }

    /// Client TLS with the saved host certificate and key, trusting ctl's CA (`--ctl-ca`,
    /// else the CA registration saved); `None` while the host has no certificate. Read at
    /// each (re)connect, so a renewed certificate is used from the next connection on.
    fn identity_tls(&self) -> Result<Option<tls::ClientTls>, Status> {
        if !self.cfg.host_cert_path.exists() {
            return Ok(None);
        }
        let bad = |e: tls::TlsError| Status::failed_precondition(format!("host certificate: {e}"));
        let cert = tls::read_pem_file(&self.cfg.host_cert_path).map_err(bad)?;
        let key = tls::read_pem_file(&self.cfg.host_key_path).map_err(bad)?;
        let ca_path = self
            .cfg
            .ctl_ca_given
            .as_ref()
            .unwrap_or(&self.cfg.ctl_ca_path);
        let ca = tls::read_pem_file(ca_path).map_err(bad)?;
        let t = tls::ClientTls::from_ca_pem(
            &ca,
            tls::ClientOptions {
                alpn: vec![tls::ALPN_WRENN.to_vec()],
                identity: Some((
                    tls::certs_from_pem(&cert, "host certificate").map_err(bad)?,
                    tls::key_from_pem(&key, "host key").map_err(bad)?,
                )),
                ..Default::default()
            },
        )
        .map_err(bad)?;
        Ok(Some(t))
    }

    pub fn new(cfg: CtlConfig, identity: Arc<IdentityCell>) -> Arc<CtlLink> {
        Arc::new(CtlLink {
            cfg,
            identity,
            host: OnceLock::new(),
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            interval: Mutex::new(HEARTBEAT_INTERVAL_DEFAULT),
            renew_not_before: Mutex::new(None),
        })
    }

    /// Completes the link once the host exists (the manager needs the link first).
    pub fn set_host(&self, host: Arc<Host>) {
        let _ = self.host.set(host);
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }

    /// Reports waiting to be sent.
    pub fn pending(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Registers with the one-time token and saves the identity.
    pub fn register(&self, host: &Host) -> Result<Identity, Status> {
        let token = self.cfg.registration_token.clone().ok_or_else(|| {
            Status::failed_precondition(
                "not registered: start with WRENN_REGISTRATION_TOKEN or --registration-token-file (a token from `wrenn hosts token`)",
            )
        })?;
        let (secret, pin) =
            tls::hostkey::split_pin(&token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let secret = secret.to_owned();
        // The host key is made here and saved (0600) before ctl hears of it; only its
        // public half and a signature over the token leave the host.
        let key = tls::HostKey::generate().map_err(|e| Status::internal(e.to_string()))?;
        crate::statedir::write_atomic(&self.cfg.host_key_path, key.to_pem().as_bytes())
            .map_err(|e| Status::internal(e.to_string()))?;
        let client = match (pin, &self.cfg.tls) {
            // The first connection trusts only the CA the token pins.
            (Some(pin), Some(_)) => {
                let given = match &self.cfg.ctl_ca_given {
                    Some(p) => tls::read_pem_file(p)
                        .map_err(|e| Status::invalid_argument(format!("--ctl-ca: {e}")))?,
                    None => Vec::new(),
                };
                let t = tls::hostkey::pinned_client(pin, &given, vec![tls::ALPN_WRENN.to_vec()])
                    .map_err(|e| Status::internal(e.to_string()))?;
                tls::connect(
                    &self.cfg.addr,
                    &t,
                    Credential::host_token(""),
                    &proto::rpc::ClientConfig::default(),
                )?
            }
            (Some(_), None) => {
                warn!("--ctl-plaintext: the registration token's CA pin is not checked");
                Client::connect_tcp(self.cfg.addr.as_str(), Credential::host_token(""))?
            }
            (None, Some(t)) => tls::connect(
                &self.cfg.addr,
                t,
                Credential::host_token(""),
                &proto::rpc::ClientConfig::default(),
            )?,
            (None, None) => {
                Client::connect_tcp(self.cfg.addr.as_str(), Credential::host_token(""))?
            }
        };
        let problems = host.problems();
        let resp: hpb::RegisterResponse = client.unary(
            hpb::host_methods::REGISTER,
            &hpb::RegisterRequest {
                token_signature: key.sign_token(&secret).into(),
                host_public_key: key.public_key().to_vec().into(),
                registration_token: secret,
                agent_address: self.cfg.agent_address.clone(),
                hostname: host.info().hostname,
                capacity: Some(host.capacity()),
                agent_version: AGENT_VERSION.to_owned(),
                firecracker_version: host.manager.vmm().firecracker_version(),
                can_host_sandboxes: problems.is_empty(),
                problems,
                physical: Some(host.physical()),
                vcpu_overcommit: host.overcommit.vcpu,
                memory_overcommit: host.overcommit.memory,
            },
            Some(CTL_CALL_TIMEOUT),
        )?;
        client.close();
        let host_id = id::parse_host(&resp.host_id)
            .map_err(|e| Status::internal(format!("ctl sent a bad host id: {e}")))?;
        if resp.host_token.is_empty() || resp.agent_token.is_empty() {
            return Err(Status::internal("ctl sent empty tokens"));
        }
        if !resp.host_certificate_pem.is_empty() {
            self.save_certificate(&resp, pin, &key)?;
        }
        let ident = Identity {
            host_id,
            host_token: resp.host_token,
            agent_token: resp.agent_token,
        };
        ident
            .save(&self.cfg.identity_path)
            .map_err(|e| Status::internal(e.to_string()))?;
        *self.interval.lock().unwrap_or_else(|e| e.into_inner()) =
            clamp_interval(resp.heartbeat_interval_ms);
        self.identity.set(ident.clone());
        info!("registered with ctl host_id={}", resp.host_id);
        Ok(ident)
    }

    /// Checks and saves what registration issued: ctl's CA (matching the pin, when the
    /// token had one) and a certificate for this host id that chains to it.
    fn save_certificate(
        &self,
        resp: &hpb::RegisterResponse,
        pin: Option<[u8; 32]>,
        key: &tls::HostKey,
    ) -> Result<(), Status> {
        let bad = |why: String| Status::internal(format!("ctl sent a bad certificate: {why}"));
        let ca = tls::certs_from_pem(resp.ca_certificate_pem.as_bytes(), "ctl's CA")
            .map_err(|e| bad(e.to_string()))?;
        if let Some(pin) = pin {
            if tls::hostkey::cert_sha256(ca[0].as_ref()) != pin {
                return Err(bad(
                    "its CA does not match the registration token's pin".into()
                ));
            }
        }
        let leaf = tls::certs_from_pem(resp.host_certificate_pem.as_bytes(), "host certificate")
            .map_err(|e| bad(e.to_string()))?;
        tls::verify_server_cert(&ca[0], &leaf[0], &resp.host_id).map_err(bad)?;
        let save = |p: &std::path::Path, s: &str| {
            crate::statedir::write_atomic(p, s.as_bytes())
                .map_err(|e| Status::internal(e.to_string()))
        };
        save(&self.cfg.ctl_ca_path, &resp.ca_certificate_pem)?;
        save(&self.cfg.host_cert_path, &resp.host_certificate_pem)?;
        // From now on ctl calls this host over mutual TLS.
        let t = crate::rpc_tls::server_tls(
            resp.host_certificate_pem.as_bytes(),
            key.to_pem().as_bytes(),
            resp.ca_certificate_pem.as_bytes(),
        )
        .map_err(|e| bad(e.to_string()))?;
        self.cfg.rpc_tls.set(t);
        Ok(())
    }

    /// Opens the host's authenticated connection to ctl (host token, and the host
    /// certificate once it has one), as the link's loop does.
    pub fn connect_host(&self) -> Result<Client, Status> {
        let ident = self
            .identity
            .get()
            .ok_or_else(|| Status::failed_precondition("not registered"))?;
        self.connect(Credential::host_token(ident.host_token))
    }

    /// Renews the host certificate on `client` (the open, authenticated connection, which
    /// stays open) once [`CERT_RENEW_AT_NUM`]/[`CERT_RENEW_AT_DEN`] of its lifetime has
    /// passed: the same key, a new certificate from ctl, checked against ctl's saved CA and
    /// the host id, saved over `host.pem` (one rename) and installed on the agent's port for
    /// its next accepts. Running sandboxes and open connections are not touched; the next
    /// connection to ctl presents the new certificate. Returns whether it renewed.
    pub fn renew_if_due(&self, client: &Client) -> Result<bool, Status> {
        let Ok(pem) = std::fs::read(&self.cfg.host_cert_path) else {
            return Ok(false); // no certificate (registered without one, or ctl issues none)
        };
        let bad = |why: String| Status::internal(format!("host certificate: {why}"));
        let leaf = tls::certs_from_pem(&pem, "host certificate").map_err(|e| bad(e.to_string()))?;
        let (from, to) = tls::peer::cert_validity(&leaf[0])
            .ok_or_else(|| bad("its validity cannot be read".into()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if !tls::peer::renewal_due(from, to, now, CERT_RENEW_AT_NUM, CERT_RENEW_AT_DEN) {
            return Ok(false);
        }
        let ident = self
            .identity
            .get()
            .ok_or_else(|| Status::failed_precondition("not registered"))?;
        let host_id = id::format(id::Kind::Host, ident.host_id);
        let key_pem = std::fs::read(&self.cfg.host_key_path).map_err(|e| bad(e.to_string()))?;
        let key = tls::HostKey::from_pem(&key_pem).map_err(|e| bad(e.to_string()))?;
        let resp: hpb::RenewCertificateResponse = client.unary(
            hpb::host_methods::RENEW_CERTIFICATE,
            &hpb::RenewCertificateRequest {
                host_public_key: key.public_key().to_vec().into(),
                key_signature: key.sign_renewal(&host_id).into(),
            },
            Some(CTL_CALL_TIMEOUT),
        )?;
        // The CA must be the one registration pinned and saved.
        let ca_pem = std::fs::read(&self.cfg.ctl_ca_path).map_err(|e| bad(e.to_string()))?;
        let ca = tls::certs_from_pem(&ca_pem, "ctl's CA").map_err(|e| bad(e.to_string()))?;
        let new = tls::certs_from_pem(resp.host_certificate_pem.as_bytes(), "renewed certificate")
            .map_err(|e| bad(e.to_string()))?;
        tls::verify_server_cert(&ca[0], &new[0], &host_id)
            .map_err(|why| bad(format!("ctl sent one that does not verify: {why}")))?;
        crate::statedir::write_atomic(
            &self.cfg.host_cert_path,
            resp.host_certificate_pem.as_bytes(),
        )
        .map_err(|e| Status::internal(e.to_string()))?;
        let t = crate::rpc_tls::server_tls(resp.host_certificate_pem.as_bytes(), &key_pem, &ca_pem)
            .map_err(|e| bad(e.to_string()))?;
        self.cfg.rpc_tls.set(t);
        info!(
            "host certificate renewed host_id={host_id} expires_unix_ns={}",
            resp.host_certificate_expires_unix_ns
        );
        Ok(true)
    }

    /// [`Self::renew_if_due`] from the loop: a failure is logged and retried after
    /// [`CERT_RENEW_RETRY`], never dropping the connection.
    fn renew_quietly(&self, client: &Client) {
        let mut not_before = self
            .renew_not_before
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if let Err(e) = self.renew_if_due(client) {
            warn!("host certificate renewal failed error={:?}", e.message);
            *not_before = Some(Instant::now() + CERT_RENEW_RETRY);
        }
    }

    fn heartbeat(&self, client: &Client, host: &Host) -> Result<(), Status> {
        let problems = host.problems();
        let m = &host.manager;
        let resp: hpb::HeartbeatResponse = client.unary(
            hpb::host_methods::HEARTBEAT,
            &hpb::HeartbeatRequest {
                now_unix_ns: m.clock().now_unix_ns(),
                capacity: Some(host.capacity()),
                physical: Some(host.physical()),
                vcpu_overcommit: host.overcommit.vcpu,
                memory_overcommit: host.overcommit.memory,
                usage: Some(host.usage()),
                can_host_sandboxes: problems.is_empty(),
                problems,
                agent_version: AGENT_VERSION.to_owned(),
                sandboxes: m
                    .summaries()
                    .into_iter()
                    .map(|(id, st, exp, upd)| hpb::SandboxSummary {
                        sandbox_id: id::format_sandbox(id),
                        state: st as i32,
                        expires_unix_ns: exp,
                        updated_unix_ns: upd,
                    })
                    .collect(),
                template_ids: m
                    .list_templates()
                    .into_iter()
                    .map(|t| t.template_id)
                    .collect(),
            },
            Some(CTL_CALL_TIMEOUT),
        )?;
        *self.interval.lock().unwrap_or_else(|e| e.into_inner()) =
            clamp_interval(resp.heartbeat_interval_ms);
        Ok(())
    }

    /// Sends queued reports; a report is removed only once ctl accepted it.
    fn flush(&self, client: &Client) -> Result<(), Status> {
        loop {
            let next = self
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .front()
                .cloned();
            let Some(r) = next else { return Ok(()) };
            let _: hpb::ReportStateResponse =
                client.unary(hpb::host_methods::REPORT_STATE, &r, Some(CTL_CALL_TIMEOUT))?;
            crate::metrics::REPORTS_SENT.inc();
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.front() == Some(&r) {
                q.pop_front();
            }
        }
    }

    /// Runs the link until [`CtlLink::stop`]: register if needed, then heartbeats and
    /// reports, reconnecting with back-off after failures.
    pub fn run(&self) {
        let mut backoff = Duration::from_millis(500);
        let mut client: Option<Client> = None;
        let mut next_beat = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            let Some(host) = self.host.get().cloned() else {
                self.sleep(Duration::from_millis(100));
                continue;
            };
            let ident = match self.identity.get() {
                Some(i) => i,
                None => match self.register(&host) {
                    Ok(i) => i,
                    Err(e) => {
                        warn!("registration failed error={:?}", e.message);
                        self.sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        continue;
                    }
                },
            };
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match self.connect(Credential::host_token(ident.host_token.clone())) {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        crate::metrics::HEARTBEATS_FAILED.inc();
                        warn!(
                            "connect to ctl failed addr={} error={:?}",
                            self.cfg.addr, e.message
                        );
                        self.sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        continue;
                    }
                }
            }
            let Some(c) = client.as_ref() else { continue };
            let mut r = self.flush(c);
            if r.is_ok() && Instant::now() >= next_beat {
                r = self.heartbeat(c, &host);
                if r.is_ok() {
                    self.renew_quietly(c);
                }
                let interval = *self.interval.lock().unwrap_or_else(|e| e.into_inner());
                next_beat = Instant::now() + interval;
            }
            match r {
                Ok(()) => {
                    backoff = Duration::from_millis(500);
                    let wait = next_beat.saturating_duration_since(Instant::now());
                    self.wait_for_work(wait);
                }
                Err(e) => {
                    crate::metrics::HEARTBEATS_FAILED.inc();
                    warn!("ctl call failed error={:?}", e.message);
                    if let Some(c) = client.take() {
                        c.close();
                    }
                    self.sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        if let Some(c) = client {
            c.close();
        }
    }

    fn sleep(&self, d: Duration) {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if self.stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = self.wake.wait_timeout(q, d);
    }

    /// Sleeps until a report is queued, `d` passes, or stop.
    fn wait_for_work(&self, d: Duration) {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if !q.is_empty() || self.stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = self.wake.wait_timeout(q, d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_queue_is_bounded_and_drops_the_oldest() {
        let link = CtlLink::new(
            CtlConfig {
                addr: "127.0.0.1:1".into(),
                registration_token: None,
                agent_address: String::new(),
                identity_path: "/nonexistent/identity.conf".into(),
                host_key_path: "/nonexistent/host.key".into(),
                host_cert_path: "/nonexistent/host.pem".into(),
                ctl_ca_path: "/nonexistent/ctl-ca.pem".into(),
                ctl_ca_given: None,
                tls: None,
                rpc_tls: Default::default(),
            },
            Arc::new(IdentityCell::new(None)),
        );
        for i in 0..REPORT_QUEUE_MAX + 10 {
            link.state_changed(hpb::ReportStateRequest {
                changed_unix_ns: i as i64,
                ..Default::default()
            });
        }
        assert_eq!(link.pending(), REPORT_QUEUE_MAX);
        let first = link.queue.lock().unwrap().front().unwrap().changed_unix_ns;
        assert_eq!(first, 10);
    }

    #[test]
    fn heartbeat_interval_is_clamped() {
        assert_eq!(clamp_interval(0), HEARTBEAT_INTERVAL_DEFAULT);
        assert_eq!(clamp_interval(1), HEARTBEAT_INTERVAL_MIN);
        assert_eq!(clamp_interval(u32::MAX), HEARTBEAT_INTERVAL_MAX);
        assert_eq!(clamp_interval(2000), Duration::from_secs(2));
    }
}

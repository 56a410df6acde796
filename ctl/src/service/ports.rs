//! `Ports.Connect`: raw TCP to a port of one of the team's running sandboxes, relayed to the
//! sandbox's agent (its own `Ports.Connect`) on the agent's port-traffic connection
//! ([`crate::agents::Agents::proxy_client`]), so port streams never share windows or budgets
//! with lifecycle calls. The call's worker moves the caller's messages up; a relay thread
//! moves the agent's down. Both block under flow control, so a slow reader slows the sandbox's
//! server, and ctl holds at most one message per direction per stream.
//!
//! Budgets on each replica: [`PORT_STREAMS_PER_TEAM_MAX`] streams per team and
//! [`PORT_STREAMS_PER_SANDBOX_MAX`] per sandbox (RESOURCE_EXHAUSTED beyond); the agent keeps
//! its own. Not audited: it changes nothing (like reading a file).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self as id, Kind, Uuid};
use proto::rpc::{CallOpts, ServerStream};
use proto::Status;

use super::{parse_id, Api, AuthCtx};
use crate::limits::{
    AUTO_RESUME_POLL, PORT_STREAMS_PER_SANDBOX_MAX, PORT_STREAMS_PER_TEAM_MAX, TRAFFIC_CACHE_MAX,
};

/// envd's port: never a target.
const ENVD_PORT: u32 = 49983;
/// The field number of `data` in the Ports.Connect messages of both services (ctl.proto
/// and agent.proto agree), written around a payload relayed without copying.
pub(crate) const PORT_DATA_TAG: u32 = 2;
/// How often the worker looks whether the relay ended or the caller cancelled while it waits
/// for the caller's next message.
const POLL: Duration = Duration::from_millis(200);

/// Open port streams on this replica, per team and per sandbox.
#[derive(Debug, Default)]
pub struct PortBudget {
    open: Mutex<(HashMap<Uuid, usize>, HashMap<Uuid, usize>)>,
}

/// A stream's place in the budget, given back when dropped.
pub struct PortPermit<'a> {
    budget: &'a PortBudget,
    team: Uuid,
    sandbox: Uuid,
}

impl PortBudget {
    pub fn take(&self, team: Uuid, sandbox: Uuid) -> Result<PortPermit<'_>, Status> {
        self.reserve(team, sandbox)?;
        Ok(PortPermit {
            budget: self,
            team,
            sandbox,
        })
    }

    /// Counts one more stream of `team` to `sandbox`, or says which bound is reached.
    fn reserve(&self, team: Uuid, sandbox: Uuid) -> Result<(), Status> {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (teams, sandboxes) = &mut *g;
        if teams.get(&team).copied().unwrap_or(0) >= PORT_STREAMS_PER_TEAM_MAX {
            return Err(Status::resource_exhausted(format!(
                "the team has {PORT_STREAMS_PER_TEAM_MAX} port streams open (port forwards and proxied \
                 connections together)"
            )));
        }
        if sandboxes.get(&sandbox).copied().unwrap_or(0) >= PORT_STREAMS_PER_SANDBOX_MAX {
            return Err(Status::resource_exhausted(format!(
                "the sandbox has {PORT_STREAMS_PER_SANDBOX_MAX} port streams open (port forwards \
                 and proxied connections together)"
            )));
        }
        *teams.entry(team).or_insert(0) += 1;
        *sandboxes.entry(sandbox).or_insert(0) += 1;
        Ok(())
    }
}

impl PortBudget {
    fn release(&self, team: Uuid, sandbox: Uuid) {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (teams, sandboxes) = &mut *g;
        for (map, key) in [(teams, team), (sandboxes, sandbox)] {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

impl Drop for PortPermit<'_> {
    fn drop(&mut self) {
        self.budget.release(self.team, self.sandbox);
    }
}

/// A place in the port budget that outlives the call that took it (a proxied HTTP
/// connection, relayed on threads of its own): given back when dropped.
pub struct OwnedPortPermit {
    api: Api,
    team: Uuid,
    sandbox: Uuid,
}

impl Drop for OwnedPortPermit {
    fn drop(&mut self) {
        self.api.inner.ports.release(self.team, self.sandbox);
    }
}

/// The credentials a request to a sandbox port carried (traffic proxy).
#[derive(Debug, Default, Clone, Copy)]
pub struct TrafficCreds<'a> {
    /// The `wrenn-traffic-access-token` header.
    pub token: Option<&'a str>,
    /// The `X-API-Key` header.
    pub api_key: Option<&'a str>,
}

/// What the traffic proxy checks a request against: one sandbox's row.
#[derive(Clone, Debug)]
pub(crate) struct TrafficRow {
    team: Uuid,
    state: String,
    host: Option<Uuid>,
    token: Option<String>,
    public: bool,
    auto_resume: bool,
}

/// This replica's copy of running sandboxes' traffic rows, so a proxied request does not
/// wait for the database: filled from reads of running sandboxes, emptied of a sandbox by
/// its trigger's NOTIFY (`crate::revocation::TRAFFIC_CHANNEL`, every replica) and by this
/// replica's own changes right after they commit (rotate, pause, destroy, failure), trusted
/// only at the LISTEN connection's generation it was read at (a reconnect may have missed
/// notifications). Bounded by [`TRAFFIC_CACHE_MAX`] rows (emptied when full).
#[derive(Default)]
pub(crate) struct TrafficCache {
    rows: Mutex<HashMap<Uuid, (u64, TrafficRow)>>,
    /// Bumped by every removal: a row read from the database goes in only if none happened
    /// while it was read (a change that committed meanwhile might be in it or not).
    invalidations: AtomicU64,
}

impl TrafficCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (u64, TrafficRow)>> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: Uuid, generation: u64) -> Option<TrafficRow> {
        match self.lock().get(&id) {
            Some((g, r)) if *g == generation => Some(r.clone()),
            _ => None,
        }
    }

    fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::Acquire)
    }

    fn put(&self, id: Uuid, generation: u64, seen: u64, row: TrafficRow) {
        let mut rows = self.lock();
        if self.invalidations.load(Ordering::Acquire) != seen {
            return;
        }
        if rows.len() >= TRAFFIC_CACHE_MAX {
            rows.clear();
        }
        rows.insert(id, (generation, row));
    }

    /// Drops a sandbox's row (its trigger's NOTIFY, or a change on this replica).
    pub(crate) fn forget(&self, id: Uuid) {
        let mut rows = self.lock();
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        rows.remove(&id);
    }
}

/// A port stream opened for the traffic proxy: bytes up, bytes down, and its budget place.
pub struct ProxyStream {
    pub up: proto::rpc::StreamSender,
    pub down: proto::rpc::StreamReceiver,
    pub permit: OwnedPortPermit,
}

impl Api {
    /// Opens a port stream for ctl's traffic proxy (`P-sb-<uuid>.<domain>` and the path
    /// form): the sandbox exists (NOT_FOUND), the request may reach it (a public sandbox; its
    /// traffic token, compared in constant time; or an API key of its team: UNAUTHENTICATED
    /// without any, PERMISSION_DENIED with a wrong one), it runs (FAILED_PRECONDITION naming
    /// its state), the team and sandbox budgets have room (RESOURCE_EXHAUSTED; shared with
    /// Ports.Connect: each is one agent stream). The stream is returned once the open is
    /// sent: what the agent refuses (UNAVAILABLE when nothing listens, its own budgets)
    /// arrives as the stream's error.
    pub fn proxy_open(
        &self,
        sandbox: Uuid,
        port: u16,
        creds: TrafficCreds<'_>,
    ) -> Result<ProxyStream, Status> {
        if u32::from(port) == ENVD_PORT || port == 0 {
            return Err(Status::invalid_argument(format!(
                "port {port} is never exposed"
            )));
        }
        let (team, host) = self.proxy_authorize(sandbox, creds)?;
        self.inner.ports.reserve(team, sandbox)?;
        let permit = OwnedPortPermit {
            api: self.clone(),
            team,
            sandbox,
        };
        let client = self.inner.agents.proxy_client(host)?;
        // Not waiting for the agent's `opened`: the request's bytes follow the open at once
        // (one ctl↔agent round trip less per proxied connection); the receiving side skips
        // `opened`, and a refusal arrives as the stream's error.
        let up = client.call(
            agent::ports_methods::CONNECT,
            &open_request(sandbox, u32::from(port)),
            AGENT_STREAM,
        )?;
        let (up, down) = up.split();
        Ok(ProxyStream { up, down, permit })
    }

    /// The checks of [`Api::proxy_open`] without opening anything: the sandbox exists, the
    /// credentials reach it, it runs. A sandbox created with `auto_resume` that is paused is
    /// resumed first ([`Api::auto_resume`]). Returns its team and host.
    pub fn proxy_authorize(
        &self,
        sandbox: Uuid,
        creds: TrafficCreds<'_>,
    ) -> Result<(Uuid, Uuid), Status> {
        let deadline = Instant::now() + self.inner.cfg.agent_lifecycle_timeout;
        let mut resumed = false;
        loop {
            let (team, state, host, auto_resume) = self.proxy_check(sandbox, &creds)?;
            match state.as_str() {
                "running" => {
                    let host =
                        host.ok_or_else(|| Status::internal("running sandbox has no host"))?;
                    return Ok((team, host));
                }
                // Only the first pass resumes: once resumed, a sandbox that is paused again
                // before this request got through is not resumed a second time by it.
                "paused" if auto_resume && !resumed => {
                    resumed = true;
                    self.auto_resume(team, sandbox)?;
                    continue;
                }
                // Another request's resume (or a pause that is finishing) is under way.
                "resuming" | "pausing" if auto_resume => {}
                _ => {
                    return Err(Status::failed_precondition(format!(
                        "sandbox is {state}, not running"
                    )))
                }
            }
            if Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "sandbox is still {state}: auto_resume did not finish within {:?}",
                    self.inner.cfg.agent_lifecycle_timeout
                )));
            }
            std::thread::sleep(AUTO_RESUME_POLL);
        }
    }

    /// Resumes a paused sandbox for its traffic (`auto_resume`), audited as `sandbox.resume`
    /// by the system (no API key made the call). Another request that resumed it first is
    /// not an error: the caller waits for RUNNING.
    fn auto_resume(&self, team: Uuid, sandbox: Uuid) -> Result<(), Status> {
        let ctx = AuthCtx {
            team_id: team,
            key_id: Uuid::nil(),
            key_name: String::new(),
            platform_admin: false,
        };
        let req = ctl::ResumeSandboxRequest {
            sandbox_id: id::format(Kind::Sandbox, sandbox),
            timeout_s: 0,
        };
        // Not through the audited wrapper: a request that lost the race to another one (the
        // state check refused it before anything changed, so no row of its own) did nothing
        // worth a failure row; every other failure is recorded as a resume's would be.
        let mut row = None;
        match self.resume_sandbox_inner(&ctx, &mut row, req) {
            Ok(_) => {
                log::info!("auto_resume sandbox={}", id::format(Kind::Sandbox, sandbox));
                Ok(())
            }
            Err(e) if e.code == proto::Code::FailedPrecondition && row.is_none() => Ok(()),
            Err(e) => {
                let rid = id::format(Kind::Sandbox, sandbox);
                self.record_failure(&ctx, "sandbox", rid, "sandbox.resume", row, &e);
                Err(e)
            }
        }
    }

    /// What the traffic proxy needs of a sandbox (its team, state, host and `auto_resume`),
    /// with the credential check. A running sandbox's row comes from this replica's
    /// [`TrafficCache`] while the LISTEN connection is up (its trigger's NOTIFY and this
    /// replica's own changes drop it), else from the database.
    fn proxy_check(
        &self,
        sandbox: Uuid,
        creds: &TrafficCreds<'_>,
    ) -> Result<(Uuid, String, Option<Uuid>, bool), Status> {
        let rev = &self.inner.revocations;
        let generation = rev.generation();
        let listening = rev.listening();
        let cached = listening
            .then(|| self.inner.traffic.get(sandbox, generation))
            .flatten();
        let row = match cached {
            Some(r) => {
                crate::metrics::TRAFFIC_CACHE_HITS.inc();
                r
            }
            None => {
                let seen = self.inner.traffic.invalidations();
                let r = self.inner.db.run(move |c| {
                    c.query_opt(
                        "SELECT team_id, state, host_id, traffic_token, allow_public_traffic, \
                         auto_resume FROM sandboxes WHERE id = $1",
                        &[&sandbox],
                    )
                    .map_err(crate::db::pg_err)
                })?;
                let r = r.ok_or_else(|| Status::not_found("sandbox not found"))?;
                let r = TrafficRow {
                    team: r.get(0),
                    state: r.get(1),
                    host: r.get(2),
                    token: r.get(3),
                    public: r.get(4),
                    auto_resume: r.get(5),
                };
                // Only a running sandbox's row, read while notifications were arriving and
                // none of them (nor a change here) came in meanwhile.
                if listening
                    && r.state == "running"
                    && rev.listening()
                    && rev.generation() == generation
                {
                    self.inner.traffic.put(sandbox, generation, seen, r.clone());
                }
                r
            }
        };
        let TrafficRow {
            team,
            state,
            host,
            token: stored,
            public,
            auto_resume,
        } = row;
        if !public {
            let token_ok = match (creds.token, stored.as_deref()) {
                (Some(t), Some(s)) => proto::sha256::constant_time_eq(t.as_bytes(), s.as_bytes()),
                _ => false,
            };
            if !token_ok {
                match (creds.api_key, creds.token) {
                    (Some(k), _) => {
                        let ctx = self.authenticate(k)?;
                        if ctx.team_id != team {
                            return Err(Status::permission_denied(
                                "this API key's team does not own the sandbox",
                            ));
                        }
                    }
                    (None, Some(_)) => {
                        crate::metrics::AUTH_FAILURES.inc();
                        return Err(Status::permission_denied("wrong traffic token"));
                    }
                    (None, None) => {
                        return Err(Status::unauthenticated(
                            "the sandbox's ports need its traffic token (header \
                             wrenn-traffic-access-token; on the sandbox's own host name also the \
                             wrenn_traffic_token query parameter or cookie) or an API key of its \
                             team (X-API-Key)",
                        ))
                    }
                }
            }
        }
        Ok((team, state, host, auto_resume))
    }

    /// Serves one `Ports.Connect` call after its first message (`open`): relays bytes both
    /// ways until either side ends.
    pub fn port_connect(
        &self,
        ctx: &AuthCtx,
        first: ctl::PortConnectRequest,
        s: &mut ServerStream,
    ) -> Result<(), Status> {
        use agent::port_connect_response::Kind as AgentDown;
        use ctl::port_connect_request::Kind as Up;
        use ctl::port_connect_response::Kind as Down;
        let Some(Up::Open(open)) = first.kind else {
            return Err(Status::invalid_argument(
                "Ports.Connect: the first message must be `open`",
            ));
        };
        if open.port == 0 || open.port > u32::from(u16::MAX) || open.port == ENVD_PORT {
            return Err(Status::invalid_argument(format!(
                "port {}: must be 1 to 65535 and not envd's {ENVD_PORT}",
                open.port
            )));
        }
        let sid = parse_id(Kind::Sandbox, &open.sandbox_id)?;
        let host = self.running_host(ctx, sid)?;
        let _permit = self.inner.ports.take(ctx.team_id, sid)?;
        let client = self.inner.agents.proxy_client(host)?;
        let up = open_on_agent(&client, sid, open.port)?;
        s.send(&ctl::PortConnectResponse {
            kind: Some(Down::Opened(true)),
        })?;
        let (up_tx, up_rx) = up.split();
        let down = s.sender();
        // Set, then the worker woken, when the relay ends; the channel's sender is dropped
        // then too (a worker waiting after the caller's END).
        let relay_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
        let done = relay_done.clone();
        let relay = std::thread::Builder::new()
            .name("wrenn-port-relay".to_owned())
            .spawn(move || -> Result<(), Status> {
                let r = (|| {
                    while let Some(m) = up_rx.recv::<agent::PortConnectResponse>()? {
                        if let Some(AgentDown::Data(d)) = m.kind {
                            // Relayed from the agent's frame as it is: no copy.
                            let empty = ctl::PortConnectResponse { kind: None };
                            down.send_payload(&empty, PORT_DATA_TAG, d)?;
                        }
                    }
                    Ok(())
                })();
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                down.wake();
                drop(ended_tx);
                r
            })
            .map_err(|e| Status::resource_exhausted(format!("start port relay: {e}")))?;
        let mut caller_open = true;
        let stop = || relay_done.load(std::sync::atomic::Ordering::SeqCst);
        let upward = loop {
            if stop() {
                break Ok(());
            }
            if s.is_cancelled() {
                break Err(Status::cancelled("Ports.Connect cancelled"));
            }
            if !caller_open {
                let _ = ended.recv_timeout(POLL);
                continue;
            }
            let msg = match s.recv_timeout_or(POLL, &stop) {
                Err(e) => break Err(e),
                Ok(Err(())) => continue,
                Ok(Ok(None)) => {
                    caller_open = false;
                    if let Err(e) = up_tx.close_send() {
                        break Err(e);
                    }
                    continue;
                }
                Ok(Ok(Some(b))) => b,
            };
            let msg: ctl::PortConnectRequest = match prost::Message::decode(msg) {
                Ok(m) => m,
                Err(e) => {
                    break Err(Status::invalid_argument(format!(
                        "Ports.Connect: malformed message: {e}"
                    )))
                }
            };
            match msg.kind {
                Some(Up::Data(d)) => {
                    let empty = agent::PortConnectRequest { kind: None };
                    if let Err(e) = up_tx.send_payload(&empty, PORT_DATA_TAG, d) {
                        break Err(e);
                    }
                }
                Some(Up::Open(_)) => {
                    break Err(Status::invalid_argument(
                        "Ports.Connect: `open` only in the first message",
                    ))
                }
                None => {}
            }
        };
        if upward.is_err() {
            up_tx.cancel();
        }
        let downward = relay
            .join()
            .unwrap_or_else(|_| Err(Status::internal("port relay panicked")));
        upward.and(downward)
    }
}

/// Opens `port` of `sandbox` on its agent: a Ports.Connect call the agent has answered
/// `opened` (the traffic proxy's and the protobuf Ports.Connect's upstream).
/// A port stream's call to the agent: no deadline (it lasts as long as its connection),
/// more messages to follow the open.
const AGENT_STREAM: CallOpts = CallOpts {
    timeout: None,
    end_stream: false,
};

/// The first message of a `Ports.Connect` call to an agent.
fn open_request(sandbox: Uuid, port: u32) -> agent::PortConnectRequest {
    agent::PortConnectRequest {
        kind: Some(agent::port_connect_request::Kind::Open(agent::PortOpen {
            sandbox_id: proto::id::format(Kind::Sandbox, sandbox),
            port,
        })),
    }
}

fn open_on_agent(
    client: &proto::rpc::Client,
    sandbox: Uuid,
    port: u32,
) -> Result<proto::rpc::ClientStream, Status> {
    use agent::port_connect_response::Kind as AgentDown;
    let mut up = client.call(
        agent::ports_methods::CONNECT,
        &open_request(sandbox, port),
        AGENT_STREAM,
    )?;
    match up
        .recv::<agent::PortConnectResponse>()?
        .and_then(|m| m.kind)
    {
        Some(AgentDown::Opened(true)) => Ok(up),
        _ => Err(Status::internal("the agent did not open the port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_tag_is_the_data_field_of_both_services() {
        let data = proto::rpc::Bytes::from_static(b"bytes");
        let framed = |prefix: Vec<u8>| [prefix, data.to_vec()].concat();
        let up = framed(proto::rpc::payload_prefix(
            &agent::PortConnectRequest { kind: None },
            PORT_DATA_TAG,
            data.len(),
        ));
        let m: agent::PortConnectRequest = prost::Message::decode(&up[..]).unwrap();
        assert_eq!(
            m.kind,
            Some(agent::port_connect_request::Kind::Data(data.clone()))
        );
        let down = framed(proto::rpc::payload_prefix(
            &ctl::PortConnectResponse { kind: None },
            PORT_DATA_TAG,
            data.len(),
        ));
        let m: ctl::PortConnectResponse = prost::Message::decode(&down[..]).unwrap();
        assert_eq!(
            m.kind,
            Some(ctl::port_connect_response::Kind::Data(data.clone()))
        );
    }

    #[test]
    fn budgets() {
        let b = PortBudget::default();
        let (t1, t2) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let sb = |n: u128| Uuid::from_u128(100 + n);
        let one: Vec<_> = (0..PORT_STREAMS_PER_SANDBOX_MAX)
            .map(|_| b.take(t1, sb(0)).unwrap())
            .collect();
        assert!(b.take(t1, sb(0)).is_err(), "per sandbox");
        let mut more = Vec::new();
        let mut n = 1;
        while more.len() + one.len() < PORT_STREAMS_PER_TEAM_MAX {
            match b.take(t1, sb(n)) {
                Ok(p) => more.push(p),
                Err(_) => n += 1,
            }
        }
        assert!(b.take(t1, sb(999)).is_err(), "per team");
        assert!(b.take(t2, sb(998)).is_ok(), "another team is not affected");
        drop(one);
        assert!(b.take(t1, sb(0)).is_ok());
        drop(more);
        assert!(b.open.lock().unwrap().0.is_empty());
    }
}

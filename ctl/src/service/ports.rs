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
use std::sync::Mutex;
use std::time::Duration;

use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{Kind, Uuid};
use proto::rpc::{CallOpts, ServerStream};
use proto::Status;

use super::{parse_id, Api, AuthCtx};
use crate::limits::{PORT_STREAMS_PER_SANDBOX_MAX, PORT_STREAMS_PER_TEAM_MAX};

/// envd's port: never a target.
const ENVD_PORT: u32 = 49983;
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
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (teams, sandboxes) = &mut *g;
        if teams.get(&team).copied().unwrap_or(0) >= PORT_STREAMS_PER_TEAM_MAX {
            return Err(Status::resource_exhausted(format!(
                "the team has {PORT_STREAMS_PER_TEAM_MAX} port streams open"
            )));
        }
        if sandboxes.get(&sandbox).copied().unwrap_or(0) >= PORT_STREAMS_PER_SANDBOX_MAX {
            return Err(Status::resource_exhausted(format!(
                "the sandbox has {PORT_STREAMS_PER_SANDBOX_MAX} port streams open"
            )));
        }
        *teams.entry(team).or_insert(0) += 1;
        *sandboxes.entry(sandbox).or_insert(0) += 1;
        Ok(PortPermit {
            budget: self,
            team,
            sandbox,
        })
    }
}

impl Drop for PortPermit<'_> {
    fn drop(&mut self) {
        let mut g = self.budget.open.lock().unwrap_or_else(|e| e.into_inner());
        let (teams, sandboxes) = &mut *g;
        for (map, key) in [(teams, self.team), (sandboxes, self.sandbox)] {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

impl Api {
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
        let req = agent::PortConnectRequest {
            kind: Some(agent::port_connect_request::Kind::Open(agent::PortOpen {
                sandbox_id: proto::id::format(Kind::Sandbox, sid),
                port: open.port,
            })),
        };
        let opts = CallOpts {
            timeout: None,
            end_stream: false,
        };
        let mut up = client.call(agent::ports_methods::CONNECT, &req, opts)?;
        match up
            .recv::<agent::PortConnectResponse>()?
            .and_then(|m| m.kind)
        {
            Some(AgentDown::Opened(true)) => {}
            _ => return Err(Status::internal("the agent did not open the port")),
        }
        s.send(&ctl::PortConnectResponse {
            kind: Some(Down::Opened(true)),
        })?;
        let (up_tx, up_rx) = up.split();
        let down = s.sender();
        let relay = std::thread::Builder::new()
            .name("wrenn-port-relay".to_owned())
            .spawn(move || -> Result<(), Status> {
                while let Some(m) = up_rx.recv::<agent::PortConnectResponse>()? {
                    if let Some(AgentDown::Data(d)) = m.kind {
                        down.send(&ctl::PortConnectResponse {
                            kind: Some(Down::Data(d)),
                        })?;
                    }
                }
                Ok(())
            })
            .map_err(|e| Status::resource_exhausted(format!("start port relay: {e}")))?;
        let mut caller_open = true;
        let upward = loop {
            if relay.is_finished() {
                break Ok(());
            }
            if s.is_cancelled() {
                break Err(Status::cancelled("Ports.Connect cancelled"));
            }
            if !caller_open {
                std::thread::sleep(POLL);
                continue;
            }
            let msg = match s.recv_timeout(POLL) {
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
                    let m = agent::PortConnectRequest {
                        kind: Some(agent::port_connect_request::Kind::Data(d)),
                    };
                    if let Err(e) = up_tx.send(&m) {
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

#[cfg(test)]
mod tests {
    use super::*;

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

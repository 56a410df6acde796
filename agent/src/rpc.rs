//! The wrenn.agent.v1 server: authentication of ctl, the generated service traits, and the
//! one forwarding path to each sandbox's envd (PROTOCOL.md §9).
//!
//! Every call moves to the RPC runtime's bounded worker pool at once (lifecycle calls block
//! for seconds to minutes; even Get takes a lock an operation may hold briefly).
//!
//! Forwarded calls keep flow control end to end: each message is received from one side and sent
//! to the other before the next is read, so the agent holds at most one message per
//! direction per call; when ctl reads slowly, `send` blocks, the agent stops reading from
//! envd, envd's window to the agent fills, envd stops reading the process's pipe, and the
//! process blocks on write. Every forwarded call uses its own envd connection, so a cancelled
//! call is cut off by closing it even while the forwarder waits for envd's next message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use proto::gen::wrenn::agent::v1 as pb;
use proto::gen::wrenn::envd::v1 as envd;
use proto::id::{self, Uuid};
use proto::rpc::forward::{self, Relay, Route};
use proto::rpc::{
    serve, Call, CallCtx, CallOpts, CallWatch, Client, CredentialKind, Hello, Peer, ServerStream,
    Service,
};
use proto::Status;

use crate::host::{Host, IdentityCell};
use crate::limits::{
    CANCEL_POLL, ENVD_CALL_TIMEOUT, EXEC_EXIT_GRACE, EXEC_OUTPUT_DEFAULT, EXEC_OUTPUT_MAX,
};
use crate::manager::{parse_id, Manager};
use crate::state::State;

/// What an authenticated connection carries: it is ctl.
#[derive(Debug)]
pub struct Ctl;

/// The agent's RPC service.
pub struct AgentService {
    handlers: Handlers,
    identity: Arc<IdentityCell>,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentService")
    }
}

impl AgentService {
    /// Fails only when the port relays' parking thread cannot start.
    pub fn new(
        manager: Arc<Manager>,
        host: Arc<Host>,
        identity: Arc<IdentityCell>,
    ) -> std::io::Result<Self> {
        Ok(AgentService {
            handlers: Handlers {
                manager,
                host,
                ports: Arc::new(crate::ports::PortRelays::new()?),
                samples: Arc::new(crate::samples::Store::new()),
            },
            identity,
        })
    }

    /// Port stream relay halves on a thread now, and parked (for tests).
    pub fn port_relays(&self) -> Arc<crate::ports::PortRelays> {
        self.handlers.ports.clone()
    }

    /// Serves `Sandboxes/Samples` from `store` (the sampler's; without it the store is empty).
    pub fn with_samples(mut self, store: Arc<crate::samples::Store>) -> Self {
        self.handlers.samples = store;
        self
    }
}

/// Checks a hello: only CREDENTIAL_KIND_AGENT_TOKEN with the token from registration.
pub fn check_hello(hello: &Hello, identity: &IdentityCell) -> Result<(), Status> {
    if hello.credential_kind != CredentialKind::AgentToken as i32 {
        return Err(Status::unauthenticated(
            "this agent accepts only ctl's agent token",
        ));
    }
    let Some(id) = identity.get() else {
        return Err(Status::unauthenticated(
            "this agent is not registered with ctl yet",
        ));
    };
    if id.agent_token.is_empty()
        || !crate::sys::constant_time_eq(hello.credential.as_bytes(), id.agent_token.as_bytes())
    {
        return Err(Status::unauthenticated("wrong agent token"));
    }
    Ok(())
}

impl Service for AgentService {
    fn hello(&self, hello: &Hello) -> Result<Peer, Status> {
        match check_hello(hello, &self.identity) {
            Ok(()) => Ok(Arc::new(Ctl)),
            Err(e) => {
                crate::metrics::RPC_REFUSED.inc();
                log::warn!(
                    "refused connection client={:?} reason={:?}",
                    hello.client,
                    e.message
                );
                Err(e)
            }
        }
    }

    fn call(&self, call: Call) {
        crate::metrics::RPC_CALLS.inc();
        let h = self.handlers.clone();
        call.spawn(move |s| h.serve(s));
    }
}

/// What the calls run on: the generated service traits are implemented here.
#[derive(Clone)]
struct Handlers {
    manager: Arc<Manager>,
    host: Arc<Host>,
    ports: Arc<crate::ports::PortRelays>,
    samples: Arc<crate::samples::Store>,
}

impl Handlers {
    /// One call, on a worker: a forwarded method through [`forward`], the others through
    /// the generated dispatch of the package (every agent.v1 service).
    fn serve(&self, s: ServerStream) {
        if let Some(route) = forward::route(s.method()) {
            forward(&self.manager, route, s);
            return;
        }
        // The call owns its stream (it outlives the worker while idle): not the generated
        // dispatch, which ends the call when the handler returns.
        if s.method() == pb::ports_methods::CONNECT {
            crate::ports::serve(&self.manager, &self.ports, s);
            return;
        }
        if let Err(s) = pb::dispatch_package(self, s) {
            serve::unknown(s);
        }
    }
}

fn sandbox_id(s: &str) -> Result<Uuid, Status> {
    parse_id(id::Kind::Sandbox, s)
}

impl pb::SandboxesServer for Handlers {
    fn update_network(
        &self,
        _: &CallCtx,
        r: pb::UpdateNetworkRequest,
    ) -> Result<pb::SandboxInfo, Status> {
        self.manager
            .update_network(sandbox_id(&r.sandbox_id)?, r.network)
    }
    fn create(
        &self,
        _: &CallCtx,
        r: proto::sandbox::SandboxSpec,
    ) -> Result<pb::SandboxInfo, Status> {
        self.manager.create(r)
    }

    fn get(&self, _: &CallCtx, r: pb::GetSandboxRequest) -> Result<pb::SandboxInfo, Status> {
        self.manager.get(sandbox_id(&r.sandbox_id)?)
    }

    fn list(
        &self,
        _: &CallCtx,
        r: pb::ListSandboxesRequest,
    ) -> Result<pb::ListSandboxesResponse, Status> {
        let mut states = Vec::new();
        for v in r.states {
            states.push(
                State::from_wire(v)
                    .ok_or_else(|| Status::invalid_argument("states: unknown state"))?,
            );
        }
        Ok(pb::ListSandboxesResponse {
            sandboxes: self.manager.list(&states),
        })
    }

    fn destroy(
        &self,
        _: &CallCtx,
        r: pb::DestroySandboxRequest,
    ) -> Result<pb::DestroySandboxResponse, Status> {
        self.manager
            .destroy(sandbox_id(&r.sandbox_id)?)
            .map(|()| pb::DestroySandboxResponse {})
    }

    fn pause(&self, _: &CallCtx, r: pb::PauseSandboxRequest) -> Result<pb::SandboxInfo, Status> {
        self.manager.pause(sandbox_id(&r.sandbox_id)?)
    }

    fn resume(&self, _: &CallCtx, r: pb::ResumeSandboxRequest) -> Result<pb::SandboxInfo, Status> {
        self.manager.resume(sandbox_id(&r.sandbox_id)?, r.timeout_s)
    }

    fn set_timeout(
        &self,
        _: &CallCtx,
        r: pb::SetTimeoutRequest,
    ) -> Result<pb::SandboxInfo, Status> {
        self.manager
            .set_timeout(sandbox_id(&r.sandbox_id)?, r.timeout_s, r.on_timeout)
    }

    fn ping(&self, _: &CallCtx, r: pb::PingSandboxRequest) -> Result<pb::SandboxInfo, Status> {
        self.manager.ping(sandbox_id(&r.sandbox_id)?)
    }

    fn samples(
        &self,
        _: &CallCtx,
        r: pb::SandboxSamplesRequest,
    ) -> Result<pb::SandboxSamplesResponse, Status> {
        let id = sandbox_id(&r.sandbox_id)?;
        // A VM that is gone (paused, destroyed, by ctl or the TTL) is frozen at once, so a
        // read right after a pause sees every second up to it, not only after the sampler's
        // next pass.
        let live = matches!(self.manager.get(id), Ok(i) if i.state == proto::sandbox::SandboxState::Running as i32);
        if !live {
            self.samples.freeze(id, self.manager.clock().now_unix_ns());
        }
        self.samples.samples(id, r.since_unix_ns, r.step_s)
    }
}

impl pb::PortsServer for Handlers {
    fn connect(
        &self,
        _: &CallCtx,
        _: pb::PortConnectRequest,
        _: &mut ServerStream,
    ) -> Result<(), Status> {
        // `serve` takes Ports.Connect before the generated dispatch ([`crate::ports::serve`]).
        Err(Status::internal(
            "Ports.Connect is served by the port relays",
        ))
    }
}

impl pb::ProcessesServer for Handlers {
    fn exec(&self, _: &CallCtx, r: pb::ExecRequest) -> Result<pb::ExecResponse, Status> {
        exec(&self.manager, r)
    }
}

impl pb::TemplatesServer for Handlers {
    fn create(
        &self,
        _: &CallCtx,
        r: pb::CreateTemplateRequest,
    ) -> Result<pb::TemplateInfo, Status> {
        let sb = sandbox_id(&r.sandbox_id)?;
        let tpl = parse_id(id::Kind::Template, &r.template_id)?;
        self.manager.create_template(sb, tpl)
    }

    fn delete(
        &self,
        _: &CallCtx,
        r: pb::DeleteTemplateRequest,
    ) -> Result<pb::DeleteTemplateResponse, Status> {
        self.manager
            .delete_template(parse_id(id::Kind::Template, &r.template_id)?)
            .map(|()| pb::DeleteTemplateResponse {})
    }

    fn list(
        &self,
        _: &CallCtx,
        _: pb::ListTemplatesRequest,
    ) -> Result<pb::ListTemplatesResponse, Status> {
        Ok(pb::ListTemplatesResponse {
            templates: self.manager.list_templates(),
        })
    }
}

impl pb::HostServer for Handlers {
    fn info(&self, _: &CallCtx, _: pb::HostInfoRequest) -> Result<pb::HostInfo, Status> {
        Ok(self.host.info())
    }

    fn metrics(&self, _: &CallCtx, _: pb::HostMetricsRequest) -> Result<pb::HostMetrics, Status> {
        Ok(self.host.metrics())
    }
}

/// Watches the agent-side call for cancellation while the forwarder waits on envd, and
/// cuts the envd connection when it happens.
struct CancelWatch<'a> {
    call: CallWatch,
    envd: &'a Client,
    done: Mutex<bool>,
    cv: Condvar,
    cancelled: AtomicBool,
}

impl CancelWatch<'_> {
    fn run(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            if self.call.is_cancelled() {
                self.cancelled.store(true, Ordering::SeqCst);
                self.envd.close();
                return;
            }
            done = self
                .cv
                .wait_timeout(done, CANCEL_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn finish(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// Every forwarded method (PROTOCOL.md §9): the sandbox id and envd's request are sliced
/// out of the first message, envd's method is opened on a connection of its own with those
/// bytes, and messages pass through as bytes, one at a time per direction, re-cut to each
/// receiver's frame limit. A cancelled call closes the envd connection, which ends a wait
/// on envd at once.
fn forward(m: &Manager, route: &Route, mut s: ServerStream) {
    let open = (|| {
        let first = s.first_bytes();
        let sb = sandbox_id(&route.sandbox_id(&first)?)?;
        let req = route.envd_request(&first)?;
        Ok::<_, Status>((m.envd(sb)?, req))
    })();
    let (client, req) = match open {
        Ok(x) => x,
        Err(e) => return s.finish(Err(e)),
    };
    let unary = !route.client_streaming && !route.server_streaming;
    let opts = CallOpts {
        timeout: unary.then_some(ENVD_CALL_TIMEOUT),
        end_stream: !route.client_streaming,
    };
    let watch = CancelWatch {
        call: s.watch(),
        envd: &client,
        done: Mutex::new(false),
        cv: Condvar::new(),
        cancelled: AtomicBool::new(false),
    };
    let result = std::thread::scope(|sc| {
        sc.spawn(|| watch.run());
        let r = client
            .call_bytes(route.envd, &req, opts)
            .and_then(|mut up| {
                if route.client_streaming {
                    forward::pump_up(&mut up, &mut s, route, Relay::Envd).map(Some)
                } else if route.server_streaming {
                    forward::pump_down(&mut up, &mut s, route).map(|()| None)
                } else {
                    forward::one(&mut up, route).map(Some)
                }
            });
        watch.finish();
        r
    });
    client.close();
    let result = if watch.cancelled.load(Ordering::SeqCst) {
        Err(Status::cancelled("cancelled by the caller"))
    } else {
        result
    };
    match result {
        Ok(Some(resp)) => {
            s.reply_bytes(resp);
        }
        Ok(None) => s.finish(Ok(())),
        Err(e) => s.finish(Err(e)),
    }
}

/// Processes.Exec: start, optionally feed stdin, collect bounded output until exit (or
/// return at once for a background process). Public for the bench's first-exec timing
/// (`bench/src/density.rs`), which drives the manager in-process.
pub fn exec(m: &Manager, r: pb::ExecRequest) -> Result<pb::ExecResponse, Status> {
    use envd::process_event::Event;
    let limit = match r.output_limit_bytes {
        0 => EXEC_OUTPUT_DEFAULT,
        n => n.min(EXEC_OUTPUT_MAX),
    } as usize;
    let process = r.process.unwrap_or_default();
    let feed_stdin = process.stdin;
    // Once started, a process with its own timeout ends (killed by envd) by then plus a grace;
    // one without runs as long as it likes.
    let run_limit = (process.timeout_ms > 0)
        .then(|| Duration::from_millis(process.timeout_ms) + EXEC_EXIT_GRACE);
    let start_limit = m.exec_start_timeout();
    let client = m.envd(sandbox_id(&r.sandbox_id)?)?;
    let started_at = Instant::now();
    let mut up = client.call(
        envd::process_methods::START,
        &envd::StartRequest {
            process: Some(process),
        },
        CallOpts {
            timeout: None,
            end_stream: true,
        },
    )?;
    up.set_deadline(Some(Instant::now() + start_limit));
    let first = up.recv::<envd::ProcessEvent>().map_err(|e| {
        if e.code == proto::Code::DeadlineExceeded {
            Status::unavailable(format!(
                "envd did not report the process started within {start_limit:?} (guest stalled?)"
            ))
        } else {
            e
        }
    });
    let started = match first {
        Ok(Some(envd::ProcessEvent {
            event: Some(Event::Started(st)),
        })) => st,
        Ok(_) => return Err(Status::internal("envd's Start did not begin with started")),
        Err(e) => {
            client.close();
            return Err(e);
        }
    };
    up.set_deadline(run_limit.map(|d| Instant::now() + d));
    let mut resp = pb::ExecResponse {
        pid: started.pid,
        tag: started.tag.clone(),
        ..Default::default()
    };
    if r.background && !feed_stdin {
        // Dropping the stream detaches; the process keeps running.
        drop(up);
        client.close();
        return Ok(resp);
    }
    let stdin = r.stdin;
    let pid = started.pid;
    let result = std::thread::scope(|sc| {
        // Stdin goes in on its own thread so a process that writes before it reads never
        // deadlocks against us.
        let feeder = feed_stdin.then(|| {
            let client = &client;
            sc.spawn(move || -> Result<(), Status> {
                let _: envd::SendInputResponse = client.unary(
                    envd::process_methods::SEND_INPUT,
                    &envd::SendInputRequest {
                        process: Some(envd::ProcessSelector {
                            selector: Some(envd::process_selector::Selector::Pid(pid)),
                        }),
                        data: stdin,
                        close: true,
                    },
                    Some(ENVD_CALL_TIMEOUT),
                )?;
                Ok(())
            })
        });
        if r.background {
            return feeder
                .map(|f| {
                    f.join()
                        .unwrap_or_else(|_| Err(Status::internal("stdin feeder panicked")))
                })
                .unwrap_or(Ok(()));
        }
        let mut exited = None;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(ev) = up.recv::<envd::ProcessEvent>()? {
            match ev.event {
                Some(Event::Output(o)) => {
                    let (buf, trunc) = if o.stream == envd::OutputStream::Stderr as i32 {
                        (&mut err, &mut resp.stderr_truncated)
                    } else {
                        (&mut out, &mut resp.stdout_truncated)
                    };
                    let room = limit.saturating_sub(buf.len());
                    if o.data.len() > room {
                        *trunc = true;
                    }
                    buf.extend_from_slice(&o.data[..o.data.len().min(room)]);
                }
                Some(Event::Exited(x)) => exited = Some(x),
                _ => {}
            }
        }
        if let Some(f) = feeder {
            // The process may exit without reading its stdin; that is not an exec error.
            let _ = f.join();
        }
        resp.exited = exited;
        resp.stdout = out.into();
        resp.stderr = err.into();
        Ok(())
    });
    client.close();
    result?;
    if !r.background {
        resp.duration_ns = started_at.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        if resp.exited.is_none() {
            return Err(Status::internal(
                "envd ended the process stream without exited",
            ));
        }
    }
    Ok(resp)
}

/// Method names this server answers (for tests that check coverage of the schema).
pub fn served_methods() -> Vec<&'static str> {
    let mut v = Vec::new();
    for all in [
        pb::sandboxes_methods::ALL,
        pb::processes_methods::ALL,
        pb::files_methods::ALL,
        pb::templates_methods::ALL,
        pb::host_methods::ALL,
        pb::ports_methods::ALL,
    ] {
        v.extend(all.iter().map(|d| d.name));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statedir::Identity;
    use proto::Code;

    fn hello(kind: CredentialKind, cred: &str) -> Hello {
        Hello {
            version: proto::PROTOCOL_VERSION,
            credential_kind: kind as i32,
            credential: cred.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_agent_token_is_accepted() {
        let unregistered = IdentityCell::new(None);
        assert_eq!(
            check_hello(&hello(CredentialKind::AgentToken, "t"), &unregistered)
                .unwrap_err()
                .code,
            Code::Unauthenticated
        );
        let cell = IdentityCell::new(Some(Identity {
            host_id: Uuid::from_u128(1),
            host_token: "host-secret".into(),
            agent_token: "agent-secret".into(),
        }));
        assert!(check_hello(&hello(CredentialKind::AgentToken, "agent-secret"), &cell).is_ok());
        for (kind, cred) in [
            (CredentialKind::AgentToken, "agent-secreT"),
            (CredentialKind::AgentToken, ""),
            (CredentialKind::HostToken, "agent-secret"),
            (CredentialKind::AccessToken, "agent-secret"),
            (CredentialKind::None, ""),
        ] {
            assert_eq!(
                check_hello(&hello(kind, cred), &cell).unwrap_err().code,
                Code::Unauthenticated,
                "{kind:?} {cred}"
            );
        }
    }
}

//! The wrenn.agent.v1 server: authentication of ctl, dispatch of every method, and the
//! proxies to each sandbox's envd.
//!
//! Every call moves to the RPC runtime's bounded worker pool at once (lifecycle calls block
//! for seconds to minutes; even Get takes a lock an operation may hold briefly).
//!
//! Proxies keep flow control end to end: each message is received from one side and sent
//! to the other before the next is read, so the agent holds at most one message per
//! direction per call; when ctl reads slowly, `send` blocks, the agent stops reading from
//! envd, envd's window to the agent fills, envd stops reading the process's pipe, and the
//! process blocks on write. Streaming calls use their own envd connection, so a cancelled
//! call is cut off by closing it even while the proxy waits for envd's next message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use proto::gen::wrenn::agent::v1 as pb;
use proto::gen::wrenn::envd::v1 as envd;
use proto::id::{self, Uuid};
use proto::rpc::{
    Call, CallOpts, Client, ClientStream, CredentialKind, Hello, Peer, ServerStream, Service,
};
use proto::Status;

use crate::host::{Host, IdentityCell};
use crate::limits::{ENVD_CALL_TIMEOUT, EXEC_OUTPUT_DEFAULT, EXEC_OUTPUT_MAX};
use crate::manager::{parse_id, CreateSpec, Manager};
use crate::state::State;

/// What an authenticated connection carries: it is ctl.
#[derive(Debug)]
pub struct Ctl;

/// The agent's RPC service.
pub struct AgentService {
    manager: Arc<Manager>,
    host: Arc<Host>,
    identity: Arc<IdentityCell>,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentService")
    }
}

impl AgentService {
    pub fn new(manager: Arc<Manager>, host: Arc<Host>, identity: Arc<IdentityCell>) -> Self {
        AgentService {
            manager,
            host,
            identity,
        }
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
        let manager = self.manager.clone();
        let host = self.host.clone();
        call.spawn(move |s| dispatch(&manager, &host, s));
    }
}

/// Answers a unary call from a worker.
fn unary<Req: Message + Default, Resp: Message>(
    mut s: ServerStream,
    f: impl FnOnce(Req) -> Result<Resp, Status>,
) {
    match s.first::<Req>().and_then(f) {
        Ok(resp) => {
            let r = s.send(&resp);
            s.finish(r);
        }
        Err(e) => s.finish(Err(e)),
    }
}

fn sandbox_id(s: &str) -> Result<Uuid, Status> {
    parse_id(id::Kind::Sandbox, s)
}

fn dispatch(m: &Arc<Manager>, host: &Arc<Host>, s: ServerStream) {
    use pb::{
        files_methods as fm, host_methods as hm, processes_methods as pm, sandboxes_methods as sm,
        templates_methods as tm,
    };
    let method = s.method().to_owned();
    match method.as_str() {
        sm::CREATE => unary(s, |r: pb::CreateSandboxRequest| {
            m.create(CreateSpec::from_request(&r)?)
        }),
        sm::GET => unary(s, |r: pb::GetSandboxRequest| {
            m.get(sandbox_id(&r.sandbox_id)?)
        }),
        sm::LIST => unary(s, |r: pb::ListSandboxesRequest| {
            let mut states = Vec::new();
            for v in r.states {
                states.push(
                    State::from_proto(v)
                        .ok_or_else(|| Status::invalid_argument("states: unknown state"))?,
                );
            }
            Ok(pb::ListSandboxesResponse {
                sandboxes: m.list(&states),
            })
        }),
        sm::DESTROY => unary(s, |r: pb::DestroySandboxRequest| {
            m.destroy(sandbox_id(&r.sandbox_id)?)
                .map(|()| pb::DestroySandboxResponse {})
        }),
        sm::PAUSE => unary(s, |r: pb::PauseSandboxRequest| {
            m.pause(sandbox_id(&r.sandbox_id)?)
        }),
        sm::RESUME => unary(s, |r: pb::ResumeSandboxRequest| {
            m.resume(sandbox_id(&r.sandbox_id)?, r.timeout_s)
        }),
        sm::SET_TIMEOUT => unary(s, |r: pb::SetTimeoutRequest| {
            m.set_timeout(sandbox_id(&r.sandbox_id)?, r.timeout_s, r.on_timeout)
        }),
        sm::PING => unary(s, |r: pb::PingSandboxRequest| {
            m.ping(sandbox_id(&r.sandbox_id)?)
        }),
        sm::METRICS => unary(s, |r: pb::SandboxMetricsRequest| {
            envd_unary::<_, envd::GetMetricsResponse>(
                m,
                &r.sandbox_id,
                envd::metrics_methods::GET,
                &envd::GetMetricsRequest {},
            )
        }),

        pm::EXEC => unary(s, |r: pb::ExecRequest| exec(m, r)),
        pm::EXEC_STREAM => {
            let r = s.first::<pb::ExecStreamRequest>();
            proxy_stream::<_, envd::ProcessEvent>(
                m,
                s,
                r.map(|r| {
                    (
                        r.sandbox_id,
                        envd::process_methods::START,
                        envd::StartRequest { process: r.process },
                    )
                }),
            )
        }
        pm::CONNECT => {
            let r = s.first::<pb::ConnectRequest>();
            proxy_stream::<_, envd::ProcessEvent>(
                m,
                s,
                r.map(|r| {
                    (
                        r.sandbox_id,
                        envd::process_methods::CONNECT,
                        r.connect.unwrap_or_default(),
                    )
                }),
            )
        }
        pm::SEND_INPUT => send_input(m, s),
        pm::CLOSE_STDIN => unary(s, |r: pb::CloseStdinRequest| {
            envd_unary::<_, envd::CloseStdinResponse>(
                m,
                &r.sandbox_id,
                envd::process_methods::CLOSE_STDIN,
                &r.close.unwrap_or_default(),
            )
        }),
        pm::SIGNAL => unary(s, |r: pb::SignalRequest| {
            envd_unary::<_, envd::SignalResponse>(
                m,
                &r.sandbox_id,
                envd::process_methods::SIGNAL,
                &r.signal.unwrap_or_default(),
            )
        }),
        pm::RESIZE_PTY => unary(s, |r: pb::ResizePtyRequest| {
            envd_unary::<_, envd::ResizePtyResponse>(
                m,
                &r.sandbox_id,
                envd::process_methods::RESIZE_PTY,
                &r.resize.unwrap_or_default(),
            )
        }),
        pm::LIST => unary(s, |r: pb::ListProcessesRequest| {
            envd_unary::<_, envd::ListProcessesResponse>(
                m,
                &r.sandbox_id,
                envd::process_methods::LIST,
                &envd::ListProcessesRequest {},
            )
        }),

        fm::STAT => unary(s, |r: pb::StatRequest| {
            envd_unary::<_, envd::StatResponse>(
                m,
                &r.sandbox_id,
                envd::filesystem_methods::STAT,
                &r.stat.unwrap_or_default(),
            )
        }),
        fm::MAKE_DIR => unary(s, |r: pb::MakeDirRequest| {
            envd_unary::<_, envd::MakeDirResponse>(
                m,
                &r.sandbox_id,
                envd::filesystem_methods::MAKE_DIR,
                &r.make_dir.unwrap_or_default(),
            )
        }),
        fm::MOVE => unary(s, |r: pb::MoveRequest| {
            envd_unary::<_, envd::MoveResponse>(
                m,
                &r.sandbox_id,
                envd::filesystem_methods::MOVE,
                &r.r#move.unwrap_or_default(),
            )
        }),
        fm::REMOVE => unary(s, |r: pb::RemoveRequest| {
            envd_unary::<_, envd::RemoveResponse>(
                m,
                &r.sandbox_id,
                envd::filesystem_methods::REMOVE,
                &r.remove.unwrap_or_default(),
            )
        }),
        fm::LIST => {
            let r = s.first::<pb::ListDirRequest>();
            proxy_stream::<_, envd::ListDirResponse>(
                m,
                s,
                r.map(|r| {
                    (
                        r.sandbox_id,
                        envd::filesystem_methods::LIST,
                        r.list.unwrap_or_default(),
                    )
                }),
            )
        }
        fm::READ => {
            let r = s.first::<pb::ReadRequest>();
            proxy_stream::<_, envd::ReadResponse>(
                m,
                s,
                r.map(|r| {
                    (
                        r.sandbox_id,
                        envd::filesystem_methods::READ,
                        r.read.unwrap_or_default(),
                    )
                }),
            )
        }
        fm::WATCH => {
            let r = s.first::<pb::WatchRequest>();
            proxy_stream::<_, envd::WatchResponse>(
                m,
                s,
                r.map(|r| {
                    (
                        r.sandbox_id,
                        envd::filesystem_methods::WATCH,
                        r.watch.unwrap_or_default(),
                    )
                }),
            )
        }
        fm::WRITE => write_file(m, s),

        tm::CREATE => unary(s, |r: pb::CreateTemplateRequest| {
            let sb = sandbox_id(&r.sandbox_id)?;
            let tpl = parse_id(id::Kind::Template, &r.template_id)?;
            m.create_template(sb, tpl)
        }),
        tm::DELETE => unary(s, |r: pb::DeleteTemplateRequest| {
            m.delete_template(parse_id(id::Kind::Template, &r.template_id)?)
                .map(|()| pb::DeleteTemplateResponse {})
        }),
        tm::LIST => unary(s, |_: pb::ListTemplatesRequest| {
            Ok(pb::ListTemplatesResponse {
                templates: m.list_templates(),
            })
        }),

        hm::INFO => unary(s, |_: pb::HostInfoRequest| Ok(host.info())),
        hm::METRICS => unary(s, |_: pb::HostMetricsRequest| Ok(host.metrics())),

        other => {
            let msg = format!("unknown method {other:?}");
            s.finish(Err(Status::unimplemented(msg)))
        }
    }
}

/// One unary call to a sandbox's envd.
fn envd_unary<Req: Message, Resp: Message + Default>(
    m: &Manager,
    sandbox: &str,
    method: &str,
    req: &Req,
) -> Result<Resp, Status> {
    let client = m.envd(sandbox_id(sandbox)?)?;
    let r = client.unary(method, req, Some(ENVD_CALL_TIMEOUT));
    client.close();
    r
}

/// Watches the agent-side call for cancellation while the proxy waits on envd, and cuts
/// the envd connection when it happens.
struct CancelWatch<'a> {
    s: &'a Mutex<Option<ServerStream>>,
    envd: &'a Client,
    done: Mutex<bool>,
    cv: Condvar,
    cancelled: AtomicBool,
}

impl CancelWatch<'_> {
    fn run(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            // A stream held by the proxy is in `send`, which notices cancellation itself.
            if let Ok(g) = self.s.try_lock() {
                if g.as_ref().is_some_and(|s| s.is_cancelled()) {
                    self.cancelled.store(true, Ordering::SeqCst);
                    self.envd.close();
                    return;
                }
            }
            done = self
                .cv
                .wait_timeout(done, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn finish(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// Forwards every message of `up` (an envd call) to `s` (the agent call), then finishes
/// `s` with envd's result.
fn forward<O: Message + Default>(s: ServerStream, envd: &Client, mut up: ClientStream) {
    let cell = Mutex::new(Some(s));
    let watch = CancelWatch {
        s: &cell,
        envd,
        done: Mutex::new(false),
        cv: Condvar::new(),
        cancelled: AtomicBool::new(false),
    };
    let result = std::thread::scope(|sc| {
        sc.spawn(|| watch.run());
        let r = loop {
            match up.recv::<O>() {
                Ok(Some(msg)) => {
                    let mut g = cell.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(s) = g.as_mut() else {
                        break Err(Status::internal("stream gone"));
                    };
                    if let Err(e) = s.send(&msg) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        watch.finish();
        r
    });
    drop(up);
    envd.close();
    let result = if watch.cancelled.load(Ordering::SeqCst) {
        Err(Status::cancelled("cancelled by the caller"))
    } else {
        result
    };
    if let Some(s) = cell.into_inner().unwrap_or_else(|e| e.into_inner()) {
        s.finish(result);
    }
}

/// A server-streaming proxy: opens `method` on envd with `req` and forwards its messages.
fn proxy_stream<E: Message, O: Message + Default>(
    m: &Manager,
    s: ServerStream,
    r: Result<(String, &'static str, E), Status>,
) {
    let open = r.and_then(|(sb, method, req)| {
        let client = m.envd(sandbox_id(&sb)?)?;
        let up = client.call(
            method,
            &req,
            CallOpts {
                timeout: None,
                end_stream: true,
            },
        )?;
        Ok((client, up))
    });
    match open {
        Ok((client, up)) => forward::<O>(s, &client, up),
        Err(e) => s.finish(Err(e)),
    }
}

/// Processes.SendInput: a client stream forwarded message by message.
fn send_input(m: &Manager, mut s: ServerStream) {
    let r = (|| -> Result<envd::SendInputResponse, Status> {
        let first: pb::SendInputRequest = s.first()?;
        let client = m.envd(sandbox_id(&first.sandbox_id)?)?;
        let mut up = client.call(
            envd::process_methods::SEND_INPUT,
            &first.input.unwrap_or_default(),
            CallOpts::default(),
        )?;
        while let Some(next) = s.recv::<pb::SendInputRequest>()? {
            up.send(&next.input.unwrap_or_default())?;
        }
        up.close_send()?;
        let resp = up
            .recv::<envd::SendInputResponse>()?
            .ok_or_else(|| Status::internal("envd sent no SendInput response"))?;
        client.close();
        Ok(resp)
    })();
    match r {
        Ok(resp) => {
            let r = s.send(&resp);
            s.finish(r)
        }
        Err(e) => s.finish(Err(e)),
    }
}

/// Files.Write: header first (with the sandbox), then data, forwarded as envd's Write.
fn write_file(m: &Manager, mut s: ServerStream) {
    use envd::write_request::Msg as E;
    use pb::write_request::Msg as A;
    let r = (|| -> Result<envd::WriteResponse, Status> {
        let first: pb::WriteRequest = s.first()?;
        let Some(A::Header(h)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first message of Write must be the header",
            ));
        };
        let client = m.envd(sandbox_id(&h.sandbox_id)?)?;
        let mut up = client.call(
            envd::filesystem_methods::WRITE,
            &envd::WriteRequest {
                msg: Some(E::Header(h.file.unwrap_or_default())),
            },
            CallOpts::default(),
        )?;
        while let Some(next) = s.recv::<pb::WriteRequest>()? {
            match next.msg {
                Some(A::Data(d)) => up.send(&envd::WriteRequest {
                    msg: Some(E::Data(d)),
                })?,
                // The end-to-end checksum goes on unchanged: envd, the receiver, checks it.
                Some(A::Crc32(c)) => up.send(&envd::WriteRequest {
                    msg: Some(E::Crc32(c)),
                })?,
                Some(A::Header(_)) => {
                    return Err(Status::invalid_argument("a second Write header"));
                }
                None => {}
            }
        }
        up.close_send()?;
        let resp = up
            .recv::<envd::WriteResponse>()?
            .ok_or_else(|| Status::internal("envd sent no Write response"))?;
        client.close();
        Ok(resp)
    })();
    match r {
        Ok(resp) => {
            let r = s.send(&resp);
            s.finish(r)
        }
        Err(e) => s.finish(Err(e)),
    }
}

/// Processes.Exec: start, optionally feed stdin, collect bounded output until exit (or
/// return at once for a background process).
fn exec(m: &Manager, r: pb::ExecRequest) -> Result<pb::ExecResponse, Status> {
    use envd::process_event::Event;
    let limit = match r.output_limit_bytes {
        0 => EXEC_OUTPUT_DEFAULT,
        n => n.min(EXEC_OUTPUT_MAX),
    } as usize;
    let process = r.process.unwrap_or_default();
    let feed_stdin = process.stdin;
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
    let started = match up.recv::<envd::ProcessEvent>()? {
        Some(envd::ProcessEvent {
            event: Some(Event::Started(st)),
        }) => st,
        _ => return Err(Status::internal("envd's Start did not begin with started")),
    };
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

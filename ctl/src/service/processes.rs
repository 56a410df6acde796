//! Processes and files in a sandbox: passed through the sandbox's host agent to its envd,
//! message by message, so flow control holds end to end (nothing is buffered whole here:
//! uploads and downloads of any size stream through). Every call but Exec (which the agent
//! composes) takes the one forwarding path, [`Api::forward`], driven by the generated
//! table; Exec is below it.

use std::time::Duration;

use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::gen::wrenn::envd::v1 as envd;
use proto::id::{Kind, Uuid};
use proto::rpc::forward::{self, Deadline, Downstream, Relay, Route};
use proto::rpc::{Bytes, CallOpts, ServerStream};
use proto::Status;

use super::{parse_id, Api, AuthCtx};
use crate::limits::EXEC_OUTPUT_MAX;
use crate::metrics;

impl Api {
    /// Audits a pass-through call that changes a sandbox's contents (exec, files, signals):
    /// one row with its outcome. It changes nothing in the database, so the row is its
    /// own transaction; a failure to write it is logged, not returned (the work is done).
    fn audit_call<T>(
        &self,
        ctx: &AuthCtx,
        sandbox_id: &str,
        action: &'static str,
        r: &Result<T, Status>,
    ) {
        let ctx2 = ctx.clone();
        // The canonical id, or "" for a malformed one (caller input that is not worth
        // keeping, and may not even be storable).
        let sid = parse_id(Kind::Sandbox, sandbox_id)
            .map(|u| proto::id::format(Kind::Sandbox, u))
            .unwrap_or_default();
        let (ok, meta) = match r {
            Ok(_) => (true, serde_json::json!({})),
            Err(e) => (false, super::audit::failure_meta(e)),
        };
        let w = self.inner.db.run(move |c| {
            super::audit::write(
                c,
                super::audit::Entry {
                    team: Some(ctx2.team_id),
                    actor: &super::Actor::key(&ctx2),
                    resource_type: "sandbox",
                    resource_id: sid,
                    action,
                    success: ok,
                    metadata: meta,
                },
            )
        });
        if let Err(e) = w {
            log::warn!("audit write failed action={action}: {}", e.message);
        }
    }

    /// [`Self::host_of`] for a call that records its outcome: a failure here (unknown
    /// sandbox, not running) is recorded too.
    fn host_audited(
        &self,
        ctx: &AuthCtx,
        sandbox_id: &str,
        action: &'static str,
    ) -> Result<Uuid, Status> {
        let r = self.host_of(ctx, sandbox_id);
        if r.is_err() {
            self.audit_call(ctx, sandbox_id, action, &r);
        }
        r
    }

    fn host_of(&self, ctx: &AuthCtx, sandbox_id: &str) -> Result<Uuid, Status> {
        let id = parse_id(Kind::Sandbox, sandbox_id)?;
        self.running_host(ctx, id)
    }

    /// Deadline of a pass-through call: an exec's own timeout plus slack, else none for
    /// streams (they last as long as the process) and the default for unary calls.
    fn exec_deadline(&self, p: Option<&envd::ProcessConfig>) -> Option<Duration> {
        match p.map(|p| p.timeout_ms) {
            Some(ms) if ms > 0 => {
                Some(Duration::from_millis(ms) + self.inner.cfg.agent_call_timeout)
            }
            _ => None,
        }
    }

    /// Runs a command to completion (or starts it in the background).
    pub fn exec(&self, ctx: &AuthCtx, req: ctl::ExecRequest) -> Result<ctl::ExecResponse, Status> {
        if req.process.is_none() {
            return Err(Status::invalid_argument("process is required"));
        }
        if req.output_limit_bytes > EXEC_OUTPUT_MAX {
            return Err(Status::invalid_argument(format!(
                "output_limit_bytes must be at most {EXEC_OUTPUT_MAX}"
            )));
        }
        let host = self.host_audited(ctx, &req.sandbox_id, "sandbox.exec")?;
        let deadline = if req.background {
            None
        } else {
            self.exec_deadline(req.process.as_ref())
        };
        let client = self.inner.agents.client(host)?;
        let areq = agent::ExecRequest {
            sandbox_id: req.sandbox_id,
            process: req.process,
            stdin: req.stdin,
            background: req.background,
            output_limit_bytes: req.output_limit_bytes,
        };
        let r: Result<agent::ExecResponse, Status> = client.unary(
            agent::processes_methods::EXEC,
            &areq,
            deadline.or(Some(Duration::from_secs(24 * 3600))),
        );
        self.audit_call(ctx, &areq.sandbox_id, "sandbox.exec", &r);
        let r = r?;
        Ok(ctl::ExecResponse {
            pid: r.pid,
            tag: r.tag,
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
            exited: r.exited,
            duration_ns: r.duration_ns,
        })
    }

    /// Every forwarded call (PROTOCOL.md §9, `proto::gen::forward::ROUTES`): the sandbox
    /// id is read from the first message, the sandbox's team and state are checked, and the
    /// message bytes go unchanged to the same call of the agent that runs the sandbox;
    /// responses come back as bytes, one message at a time, re-cut to the caller's frame
    /// limit. An audited method writes its row from the call's final status. Returns the
    /// response of a unary or client-streaming call.
    pub fn forward(
        &self,
        ctx: &AuthCtx,
        route: &Route,
        first: Bytes,
        down: &mut dyn Downstream,
    ) -> Result<Option<Bytes>, Status> {
        let sid = route.sandbox_id(&first)?;
        let envd_request = route.envd_request(&first)?;
        let r = self.forward_checked(ctx, route, &sid, &envd_request, first, down);
        if !route.audit.is_empty() {
            self.audit_call(ctx, &sid, route.audit, &r);
        }
        r
    }

    fn forward_checked(
        &self,
        ctx: &AuthCtx,
        route: &Route,
        sid: &str,
        envd_request: &Bytes,
        first: Bytes,
        down: &mut dyn Downstream,
    ) -> Result<Option<Bytes>, Status> {
        let host = self.host_of(ctx, sid)?;
        let call_timeout = self.inner.cfg.agent_call_timeout;
        let unary = !route.client_streaming && !route.server_streaming;
        let timeout = match route.timeout_ms(envd_request)? {
            0 if unary || route.deadline == Deadline::Call => Some(call_timeout),
            0 => None,
            ms => Some(Duration::from_millis(ms) + call_timeout),
        };
        metrics::AGENT_CALLS.inc();
        let r = (|| {
            let client = self.inner.agents.client(host)?;
            let opts = CallOpts {
                timeout,
                end_stream: !route.client_streaming,
            };
            let mut up = client.call_bytes(route.agent, &first, opts)?;
            if route.client_streaming {
                forward::pump_up(&mut up, down, route, Relay::AsIs).map(Some)
            } else if route.server_streaming {
                forward::pump_down(&mut up, down, route).map(|()| None)
            } else {
                forward::one(&mut up, route).map(Some)
            }
        })();
        if r.is_err() {
            metrics::AGENT_ERRORS.inc();
        }
        r
    }

    /// Serves a forwarded call received by the protobuf server. Returns whether it
    /// succeeded.
    pub fn serve_forwarded(&self, ctx: &AuthCtx, route: &Route, mut stream: ServerStream) -> bool {
        let first = stream.first_bytes();
        match self.forward(ctx, route, first, &mut stream) {
            Ok(Some(resp)) => stream.reply_bytes(resp),
            Ok(None) => {
                stream.finish(Ok(()));
                true
            }
            Err(e) => {
                stream.finish(Err(e));
                false
            }
        }
    }
}

//! Processes and files in a sandbox: passed through the sandbox's host agent to its envd,
//! message by message, so flow control holds end to end (nothing is buffered whole here:
//! uploads and downloads of any size stream through).

use std::time::Duration;

use prost::Message;
use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::gen::wrenn::envd::v1 as envd;
use proto::id::{Kind, Uuid};
use proto::rpc::{CallOpts, ClientStream};
use proto::{Code, Status};

use super::{parse_id, Api, AuthCtx, Sink, Source};
use crate::limits::EXEC_OUTPUT_MAX;

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
        let sid = sandbox_id.to_owned();
        let (ok, meta) = match r {
            Ok(_) => (true, serde_json::json!({})),
            Err(e) => (false, serde_json::json!({"code": e.code.name()})),
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

    fn forward<M: Message + Default>(
        &self,
        mut s: ClientStream,
        out: &mut dyn Sink<M>,
    ) -> Result<(), Status> {
        loop {
            if out.is_cancelled() {
                s.cancel();
                return Err(Status::new(Code::Cancelled, "client went away"));
            }
            match s.recv::<M>()? {
                Some(m) => out.send(&m)?,
                None => return Ok(()),
            }
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
        let host = self.host_of(ctx, &req.sandbox_id)?;
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

    /// Streams ProcessEvents (started, output, exited) into `out`.
    pub fn exec_stream(
        &self,
        ctx: &AuthCtx,
        req: ctl::ExecStreamRequest,
        out: &mut dyn Sink<envd::ProcessEvent>,
    ) -> Result<(), Status> {
        if req.process.is_none() {
            return Err(Status::invalid_argument("process is required"));
        }
        let sid = req.sandbox_id.clone();
        let host = self.host_of(ctx, &sid)?;
        let deadline = self.exec_deadline(req.process.as_ref());
        let r = self
            .inner
            .agents
            .stream(
                host,
                agent::processes_methods::EXEC_STREAM,
                &agent::ExecStreamRequest {
                    sandbox_id: req.sandbox_id,
                    process: req.process,
                },
                true,
                deadline,
            )
            .and_then(|s| self.forward(s, out));
        self.audit_call(ctx, &sid, "sandbox.exec_stream", &r);
        r
    }

    /// Reattaches to a process by pid or tag.
    pub fn connect_process(
        &self,
        ctx: &AuthCtx,
        req: ctl::ConnectRequest,
        out: &mut dyn Sink<envd::ProcessEvent>,
    ) -> Result<(), Status> {
        let host = self.host_of(ctx, &req.sandbox_id)?;
        let s = self.inner.agents.stream(
            host,
            agent::processes_methods::CONNECT,
            &agent::ConnectRequest {
                sandbox_id: req.sandbox_id,
                connect: req.connect,
            },
            true,
            None,
        )?;
        self.forward(s, out)
    }

    /// Client stream: the first message names the sandbox; later ones carry input.
    pub fn send_input(
        &self,
        ctx: &AuthCtx,
        input: &mut dyn Source<ctl::SendInputRequest>,
    ) -> Result<envd::SendInputResponse, Status> {
        let first = input
            .recv()?
            .ok_or_else(|| Status::invalid_argument("empty input stream"))?;
        let host = self.host_of(ctx, &first.sandbox_id)?;
        let client = self.inner.agents.client(host)?;
        let mut s = client.call(
            agent::processes_methods::SEND_INPUT,
            &agent::SendInputRequest {
                sandbox_id: first.sandbox_id.clone(),
                input: first.input,
            },
            CallOpts {
                timeout: None,
                end_stream: false,
            },
        )?;
        while let Some(m) = input.recv()? {
            s.send(&agent::SendInputRequest {
                sandbox_id: String::new(),
                input: m.input,
            })?;
        }
        s.close_send()?;
        s.recv::<envd::SendInputResponse>()?
            .ok_or_else(|| Status::internal("agent ended SendInput without an answer"))
    }

    pub fn close_stdin(
        &self,
        ctx: &AuthCtx,
        req: ctl::CloseStdinRequest,
    ) -> Result<envd::CloseStdinResponse, Status> {
        let host = self.host_of(ctx, &req.sandbox_id)?;
        self.inner.agents.unary(
            host,
            agent::processes_methods::CLOSE_STDIN,
            &agent::CloseStdinRequest {
                sandbox_id: req.sandbox_id,
                close: req.close,
            },
        )
    }

    pub fn signal_process(
        &self,
        ctx: &AuthCtx,
        req: ctl::SignalRequest,
    ) -> Result<envd::SignalResponse, Status> {
        let sid = req.sandbox_id.clone();
        let host = self.host_of(ctx, &sid)?;
        let r = self.inner.agents.unary(
            host,
            agent::processes_methods::SIGNAL,
            &agent::SignalRequest {
                sandbox_id: req.sandbox_id,
                signal: req.signal,
            },
        );
        self.audit_call(ctx, &sid, "sandbox.signal", &r);
        r
    }

    pub fn resize_pty(
        &self,
        ctx: &AuthCtx,
        req: ctl::ResizePtyRequest,
    ) -> Result<envd::ResizePtyResponse, Status> {
        let host = self.host_of(ctx, &req.sandbox_id)?;
        self.inner.agents.unary(
            host,
            agent::processes_methods::RESIZE_PTY,
            &agent::ResizePtyRequest {
                sandbox_id: req.sandbox_id,
                resize: req.resize,
            },
        )
    }

    pub fn list_processes(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListProcessesRequest,
    ) -> Result<envd::ListProcessesResponse, Status> {
        let host = self.host_of(ctx, &req.sandbox_id)?;
        self.inner.agents.unary(
            host,
            agent::processes_methods::LIST,
            &agent::ListProcessesRequest {
                sandbox_id: req.sandbox_id,
            },
        )
    }

    /// Client stream: UploadRequest.header first, then UploadRequest.data chunks.
    pub fn upload(
        &self,
        ctx: &AuthCtx,
        input: &mut dyn Source<ctl::UploadRequest>,
    ) -> Result<envd::WriteResponse, Status> {
        let mut sid = None;
        let r = self.upload_inner(ctx, input, &mut sid);
        if let Some(sid) = sid {
            self.audit_call(ctx, &sid, "sandbox.upload", &r);
        }
        r
    }

    fn upload_inner(
        &self,
        ctx: &AuthCtx,
        input: &mut dyn Source<ctl::UploadRequest>,
        sid: &mut Option<String>,
    ) -> Result<envd::WriteResponse, Status> {
        use ctl::upload_request::Msg;
        let first = input
            .recv()?
            .ok_or_else(|| Status::invalid_argument("empty upload stream"))?;
        let Some(Msg::Header(h)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first upload message must be the header",
            ));
        };
        if h.file.is_none() {
            return Err(Status::invalid_argument("header.file is required"));
        }
        let host = self.host_of(ctx, &h.sandbox_id)?;
        *sid = Some(h.sandbox_id.clone());
        let client = self.inner.agents.client(host)?;
        let mut s = client.call(
            agent::files_methods::WRITE,
            &agent::WriteRequest {
                msg: Some(agent::write_request::Msg::Header(agent::WriteHeader {
                    sandbox_id: h.sandbox_id,
                    file: h.file,
                })),
            },
            CallOpts {
                timeout: None,
                end_stream: false,
            },
        )?;
        while let Some(m) = input.recv()? {
            match m.msg {
                Some(Msg::Data(d)) => s.send(&agent::WriteRequest {
                    msg: Some(agent::write_request::Msg::Data(d)),
                })?,
                // Passed on unchanged: envd, the receiver, checks it.
                Some(Msg::Crc32(c)) => s.send(&agent::WriteRequest {
                    msg: Some(agent::write_request::Msg::Crc32(c)),
                })?,
                Some(Msg::Header(_)) => {
                    s.cancel();
                    return Err(Status::invalid_argument(
                        "only the first upload message may be a header",
                    ));
                }
                None => {}
            }
        }
        s.close_send()?;
        s.recv::<envd::WriteResponse>()?
            .ok_or_else(|| Status::internal("agent ended Write without an answer"))
    }

    /// Streams ReadResponses (metadata first, then chunks) into `out`.
    pub fn download(
        &self,
        ctx: &AuthCtx,
        req: ctl::DownloadRequest,
        out: &mut dyn Sink<envd::ReadResponse>,
    ) -> Result<(), Status> {
        if req.read.is_none() {
            return Err(Status::invalid_argument("read is required"));
        }
        let host = self.host_of(ctx, &req.sandbox_id)?;
        let s = self.inner.agents.stream(
            host,
            agent::files_methods::READ,
            &agent::ReadRequest {
                sandbox_id: req.sandbox_id,
                read: req.read,
            },
            true,
            None,
        )?;
        self.forward(s, out)
    }

    pub fn stat(&self, ctx: &AuthCtx, req: ctl::StatRequest) -> Result<envd::StatResponse, Status> {
        let host = self.host_of(ctx, &req.sandbox_id)?;
        self.inner.agents.unary(
            host,
            agent::files_methods::STAT,
            &agent::StatRequest {
                sandbox_id: req.sandbox_id,
                stat: req.stat,
            },
        )
    }

    pub fn list_dir(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListDirRequest,
        out: &mut dyn Sink<envd::ListDirResponse>,
    ) -> Result<(), Status> {
        let host = self.host_of(ctx, &req.sandbox_id)?;
        let s = self.inner.agents.stream(
            host,
            agent::files_methods::LIST,
            &agent::ListDirRequest {
                sandbox_id: req.sandbox_id,
                list: req.list,
            },
            true,
            Some(self.inner.cfg.agent_call_timeout),
        )?;
        self.forward(s, out)
    }

    pub fn make_dir(
        &self,
        ctx: &AuthCtx,
        req: ctl::MakeDirRequest,
    ) -> Result<envd::MakeDirResponse, Status> {
        let sid = req.sandbox_id.clone();
        let host = self.host_of(ctx, &sid)?;
        let r = self.inner.agents.unary(
            host,
            agent::files_methods::MAKE_DIR,
            &agent::MakeDirRequest {
                sandbox_id: req.sandbox_id,
                make_dir: req.make_dir,
            },
        );
        self.audit_call(ctx, &sid, "sandbox.make_dir", &r);
        r
    }

    pub fn move_path(
        &self,
        ctx: &AuthCtx,
        req: ctl::MoveRequest,
    ) -> Result<envd::MoveResponse, Status> {
        let sid = req.sandbox_id.clone();
        let host = self.host_of(ctx, &sid)?;
        let r = self.inner.agents.unary(
            host,
            agent::files_methods::MOVE,
            &agent::MoveRequest {
                sandbox_id: req.sandbox_id,
                r#move: req.r#move,
            },
        );
        self.audit_call(ctx, &sid, "sandbox.move", &r);
        r
    }

    pub fn remove_path(
        &self,
        ctx: &AuthCtx,
        req: ctl::RemoveRequest,
    ) -> Result<envd::RemoveResponse, Status> {
        let sid = req.sandbox_id.clone();
        let host = self.host_of(ctx, &sid)?;
        let r = self.inner.agents.unary(
            host,
            agent::files_methods::REMOVE,
            &agent::RemoveRequest {
                sandbox_id: req.sandbox_id,
                remove: req.remove,
            },
        );
        self.audit_call(ctx, &sid, "sandbox.remove", &r);
        r
    }
}

//! Processes and files in a sandbox: passed through the sandbox's host agent to its envd.

use proto::gen::wrenn::ctl::v1 as ctl;
use proto::gen::wrenn::envd::v1 as envd;
use proto::Status;

use super::{Api, AuthCtx, Sink, Source};

impl Api {
    pub fn exec(&self, ctx: &AuthCtx, req: ctl::ExecRequest) -> Result<ctl::ExecResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    /// Streams ProcessEvents (started, output, exited) into `out`.
    pub fn exec_stream(&self, ctx: &AuthCtx, req: ctl::ExecStreamRequest, out: &mut dyn Sink<envd::ProcessEvent>) -> Result<(), Status> { let _ = (ctx, req, out); Err(Status::unimplemented("not built yet")) }
    pub fn connect_process(&self, ctx: &AuthCtx, req: ctl::ConnectRequest, out: &mut dyn Sink<envd::ProcessEvent>) -> Result<(), Status> { let _ = (ctx, req, out); Err(Status::unimplemented("not built yet")) }
    /// Client stream: the first message names the sandbox; later ones carry input.
    pub fn send_input(&self, ctx: &AuthCtx, input: &mut dyn Source<ctl::SendInputRequest>) -> Result<envd::SendInputResponse, Status> { let _ = (ctx, input); Err(Status::unimplemented("not built yet")) }
    pub fn close_stdin(&self, ctx: &AuthCtx, req: ctl::CloseStdinRequest) -> Result<envd::CloseStdinResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn signal_process(&self, ctx: &AuthCtx, req: ctl::SignalRequest) -> Result<envd::SignalResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn resize_pty(&self, ctx: &AuthCtx, req: ctl::ResizePtyRequest) -> Result<envd::ResizePtyResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn list_processes(&self, ctx: &AuthCtx, req: ctl::ListProcessesRequest) -> Result<envd::ListProcessesResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }

    /// Client stream: UploadRequest.header first, then UploadRequest.data chunks.
    pub fn upload(&self, ctx: &AuthCtx, input: &mut dyn Source<ctl::UploadRequest>) -> Result<envd::WriteResponse, Status> { let _ = (ctx, input); Err(Status::unimplemented("not built yet")) }
    /// Streams ReadResponses (metadata first, then chunks) into `out`.
    pub fn download(&self, ctx: &AuthCtx, req: ctl::DownloadRequest, out: &mut dyn Sink<envd::ReadResponse>) -> Result<(), Status> { let _ = (ctx, req, out); Err(Status::unimplemented("not built yet")) }
    pub fn stat(&self, ctx: &AuthCtx, req: ctl::StatRequest) -> Result<envd::StatResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn list_dir(&self, ctx: &AuthCtx, req: ctl::ListDirRequest, out: &mut dyn Sink<envd::ListDirResponse>) -> Result<(), Status> { let _ = (ctx, req, out); Err(Status::unimplemented("not built yet")) }
    pub fn make_dir(&self, ctx: &AuthCtx, req: ctl::MakeDirRequest) -> Result<envd::MakeDirResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn move_path(&self, ctx: &AuthCtx, req: ctl::MoveRequest) -> Result<envd::MoveResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn remove_path(&self, ctx: &AuthCtx, req: ctl::RemoveRequest) -> Result<envd::RemoveResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
}

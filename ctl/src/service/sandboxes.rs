//! Sandboxes: create, list, get, destroy, ping, set timeout, pause, resume.

use proto::gen::wrenn::ctl::v1 as ctl;
use proto::Status;

use super::{Api, AuthCtx};

impl Api {
    /// Creates a sandbox. With `wait` (default) answers once it is RUNNING and envd answered;
    /// `wait = false` answers at once with STARTING and finishes in the background.
    pub fn create_sandbox(&self, ctx: &AuthCtx, req: ctl::CreateSandboxRequest) -> Result<ctl::Sandbox, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    /// The caller's team's sandboxes, newest first (keyset pages).
    pub fn list_sandboxes(&self, ctx: &AuthCtx, req: ctl::ListSandboxesRequest) -> Result<ctl::ListSandboxesResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn get_sandbox(&self, ctx: &AuthCtx, req: ctl::GetSandboxRequest) -> Result<ctl::Sandbox, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn destroy_sandbox(&self, ctx: &AuthCtx, req: ctl::DestroySandboxRequest) -> Result<ctl::DestroySandboxResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn ping_sandbox(&self, ctx: &AuthCtx, req: ctl::PingSandboxRequest) -> Result<ctl::Sandbox, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn set_sandbox_timeout(&self, ctx: &AuthCtx, req: ctl::SetTimeoutRequest) -> Result<ctl::Sandbox, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn pause_sandbox(&self, ctx: &AuthCtx, req: ctl::PauseSandboxRequest) -> Result<ctl::Sandbox, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn resume_sandbox(&self, ctx: &AuthCtx, req: ctl::ResumeSandboxRequest) -> Result<ctl::Sandbox, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
}

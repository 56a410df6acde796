//! Hosts (platform admin only).

use proto::gen::wrenn::ctl::v1 as ctl;
use proto::Status;

use super::{Api, AuthCtx};

impl Api {
    pub fn create_registration_token(&self, ctx: &AuthCtx, req: ctl::CreateRegistrationTokenRequest) -> Result<ctl::CreateRegistrationTokenResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn list_hosts(&self, ctx: &AuthCtx, req: ctl::ListHostsRequest) -> Result<ctl::ListHostsResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn get_host(&self, ctx: &AuthCtx, req: ctl::GetHostRequest) -> Result<ctl::Host, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn drain_host(&self, ctx: &AuthCtx, req: ctl::DrainHostRequest) -> Result<ctl::DrainHostResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn delete_host(&self, ctx: &AuthCtx, req: ctl::DeleteHostRequest) -> Result<ctl::DeleteHostResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
}

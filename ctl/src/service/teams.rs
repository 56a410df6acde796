//! Teams and members, users, API keys.

use proto::gen::wrenn::ctl::v1 as ctl;
use proto::Status;

use super::{Api, AuthCtx};

impl Api {
    pub fn get_team(&self, ctx: &AuthCtx, req: ctl::GetTeamRequest) -> Result<ctl::Team, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn add_member(&self, ctx: &AuthCtx, req: ctl::AddMemberRequest) -> Result<ctl::Member, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn remove_member(&self, ctx: &AuthCtx, req: ctl::RemoveMemberRequest) -> Result<ctl::RemoveMemberResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn list_members(&self, ctx: &AuthCtx, req: ctl::ListMembersRequest) -> Result<ctl::ListMembersResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }

    pub fn create_user(&self, ctx: &AuthCtx, req: ctl::CreateUserRequest) -> Result<ctl::User, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn get_user(&self, ctx: &AuthCtx, req: ctl::GetUserRequest) -> Result<ctl::User, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn list_users(&self, ctx: &AuthCtx, req: ctl::ListUsersRequest) -> Result<ctl::ListUsersResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }

    pub fn create_api_key(&self, ctx: &AuthCtx, req: ctl::CreateApiKeyRequest) -> Result<ctl::CreateApiKeyResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn list_api_keys(&self, ctx: &AuthCtx, req: ctl::ListApiKeysRequest) -> Result<ctl::ListApiKeysResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn revoke_api_key(&self, ctx: &AuthCtx, req: ctl::RevokeApiKeyRequest) -> Result<ctl::RevokeApiKeyResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
}

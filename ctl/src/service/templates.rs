//! Templates: snapshot templates made from sandboxes, plus the platform's base templates.

use proto::gen::wrenn::ctl::v1 as ctl;
use proto::Status;

use super::{Api, AuthCtx};

impl Api {
    pub fn create_template(&self, ctx: &AuthCtx, req: ctl::CreateTemplateRequest) -> Result<ctl::Template, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn list_templates(&self, ctx: &AuthCtx, req: ctl::ListTemplatesRequest) -> Result<ctl::ListTemplatesResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn get_template(&self, ctx: &AuthCtx, req: ctl::GetTemplateRequest) -> Result<ctl::Template, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
    pub fn delete_template(&self, ctx: &AuthCtx, req: ctl::DeleteTemplateRequest) -> Result<ctl::DeleteTemplateResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
}

//! The audit trail: one row per mutating call, written in the caller's transaction.

use proto::gen::wrenn::ctl::v1 as ctl;
use proto::Status;

use super::{Api, AuthCtx};

/// Who did something, as recorded in audit rows.
#[derive(Clone, Debug)]
pub enum Actor {
    ApiKey { id: proto::id::Uuid, name: String },
    Host { id: proto::id::Uuid, name: String },
    System,
}

impl Api {
    /// Entries of the caller's team (every team for a platform admin), newest first, keyset pages.
    pub fn list_audit_logs(&self, ctx: &AuthCtx, req: ctl::ListAuditLogsRequest) -> Result<ctl::ListAuditLogsResponse, Status> { let _ = (ctx, req); Err(Status::unimplemented("not built yet")) }
}

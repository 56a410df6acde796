//! Every mutating call records its outcome in the audit log, failures too.
//!
//! A call that succeeds writes its row in the same transaction as its change (each
//! `*_inner` method). A call that fails leaves no such row (its transaction rolled back),
//! so the wrappers here write a separate `failure` row after the failed attempt, with the
//! status code and message. Calls in two steps (the database first, then the agent:
//! create, destroy, pause, resume) commit their row with the first step and hand its id
//! back through `row`; when the agent step fails that same row is marked `failure`, so one
//! call is one row and its status is the outcome. Process and file calls record both
//! outcomes themselves (`Api::audit_call`).
//!
//! This file is the table of mutating calls: action, resource type and which request field
//! names the resource.

use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self, Kind, Uuid};
use proto::Status;

use super::audit::{self, Actor, Entry};
use super::{Api, AuthCtx};

/// The resource id a failure row names: the request's id when it is well formed, else ""
/// (a malformed id is caller input, not worth keeping).
fn rid(kind: Kind, s: &str) -> String {
    id::parse(kind, s)
        .map(|u| id::format(kind, u))
        .unwrap_or_default()
}

impl Api {
    /// Runs `f`; when it fails, records the failure (see the module comment).
    pub(crate) fn audited<T>(
        &self,
        ctx: &AuthCtx,
        resource_type: &'static str,
        resource_id: String,
        action: &'static str,
        f: impl FnOnce(&mut Option<Uuid>) -> Result<T, Status>,
    ) -> Result<T, Status> {
        let mut row = None;
        let r = f(&mut row);
        if let Err(e) = &r {
            self.record_failure(ctx, resource_type, resource_id, action, row, e);
        }
        r
    }

    /// Writes (or marks) the failure row of a call. A failure to write it is logged, not
    /// returned: the caller gets the call's own error.
    pub(crate) fn record_failure(
        &self,
        ctx: &AuthCtx,
        resource_type: &'static str,
        resource_id: String,
        action: &'static str,
        row: Option<Uuid>,
        e: &Status,
    ) {
        let ctx2 = ctx.clone();
        let status = e.clone();
        let w = self.inner.db.run(move |c| match row {
            Some(row) => audit::mark_failed(c, row, &status),
            None => audit::write(
                c,
                Entry {
                    team: Some(ctx2.team_id),
                    actor: &Actor::key(&ctx2),
                    resource_type,
                    resource_id,
                    action,
                    success: false,
                    metadata: audit::failure_meta(&status),
                },
            ),
        });
        if let Err(w) = w {
            log::warn!(
                "audit failure row not written action={action} code={} write_error={}",
                e.code,
                w.message
            );
        }
    }

    // ---- sandboxes ----

    /// Creates a sandbox. With `wait` (default) answers once it is RUNNING and envd answered;
    /// `wait = false` answers at once with STARTING and finishes in the background.
    pub fn create_sandbox(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateSandboxRequest,
    ) -> Result<ctl::Sandbox, Status> {
        self.audited(ctx, "sandbox", String::new(), "sandbox.create", |row| {
            self.create_sandbox_inner(ctx, row, req)
        })
    }

    /// Destroys a sandbox (idempotent for one already stopped).
    pub fn destroy_sandbox(
        &self,
        ctx: &AuthCtx,
        req: ctl::DestroySandboxRequest,
    ) -> Result<ctl::DestroySandboxResponse, Status> {
        let r = rid(Kind::Sandbox, &req.sandbox_id);
        self.audited(ctx, "sandbox", r, "sandbox.destroy", |row| {
            self.destroy_sandbox_inner(ctx, row, req)
        })
    }

    /// Keeps a running sandbox alive: expiry becomes now + its timeout.
    pub fn ping_sandbox(
        &self,
        ctx: &AuthCtx,
        req: ctl::PingSandboxRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let r = rid(Kind::Sandbox, &req.sandbox_id);
        self.audited(ctx, "sandbox", r, "sandbox.ping", |_| {
            self.ping_sandbox_inner(ctx, req)
        })
    }

    /// Changes the timeout (and optionally the policy).
    pub fn set_sandbox_timeout(
        &self,
        ctx: &AuthCtx,
        req: ctl::SetTimeoutRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let r = rid(Kind::Sandbox, &req.sandbox_id);
        self.audited(ctx, "sandbox", r, "sandbox.set_timeout", |_| {
            self.set_sandbox_timeout_inner(ctx, req)
        })
    }

    /// Replaces a running or paused sandbox's network policy.
    pub fn update_network(
        &self,
        ctx: &AuthCtx,
        req: ctl::UpdateNetworkRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let r = rid(Kind::Sandbox, &req.sandbox_id);
        self.audited(ctx, "sandbox", r, "sandbox.update_network", |_| {
            self.update_network_inner(ctx, req)
        })
    }

    /// Pauses a running sandbox; answers PAUSED.
    pub fn pause_sandbox(
        &self,
        ctx: &AuthCtx,
        req: ctl::PauseSandboxRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let r = rid(Kind::Sandbox, &req.sandbox_id);
        self.audited(ctx, "sandbox", r, "sandbox.pause", |row| {
            self.pause_sandbox_inner(ctx, row, req)
        })
    }

    /// Resumes a paused sandbox on its own host; answers RUNNING.
    pub fn resume_sandbox(
        &self,
        ctx: &AuthCtx,
        req: ctl::ResumeSandboxRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let r = rid(Kind::Sandbox, &req.sandbox_id);
        self.audited(ctx, "sandbox", r, "sandbox.resume", |row| {
            self.resume_sandbox_inner(ctx, row, req)
        })
    }

    // ---- templates ----

    /// Makes a snapshot template from a running or paused sandbox; the sandbox ends PAUSED.
    pub fn create_template(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateTemplateRequest,
    ) -> Result<ctl::Template, Status> {
        self.audited(ctx, "template", String::new(), "template.create", |_| {
            self.create_template_inner(ctx, req, None)
        })
    }

    /// The same for a build: the recipe's final USER, WORKDIR and ENV over the sandbox's
    /// defaults become the template's.
    pub(super) fn create_built_template(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateTemplateRequest,
        over: &super::templates::Overrides,
    ) -> Result<ctl::Template, Status> {
        self.audited(ctx, "template", String::new(), "template.create", |_| {
            self.create_template_inner(ctx, req, Some(over))
        })
    }

    /// Deletes a template and its files; platform ones need a platform-admin key.
    pub fn delete_template(
        &self,
        ctx: &AuthCtx,
        req: ctl::DeleteTemplateRequest,
    ) -> Result<ctl::DeleteTemplateResponse, Status> {
        let r = rid(Kind::Template, &req.template_id);
        self.audited(ctx, "template", r, "template.delete", |_| {
            self.delete_template_inner(ctx, req)
        })
    }

    // ---- teams, users, keys ----

    /// Creates a team with its owner and first key (platform admin only).
    pub fn create_team(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateTeamRequest,
    ) -> Result<ctl::CreateTeamResponse, Status> {
        self.audited(ctx, "team", String::new(), "team.create", |_| {
            self.create_team_inner(ctx, req)
        })
    }

    /// Adds a user the caller may see to a team with a role.
    pub fn add_member(
        &self,
        ctx: &AuthCtx,
        req: ctl::AddMemberRequest,
    ) -> Result<ctl::Member, Status> {
        let r = rid(Kind::User, &req.user_id);
        self.audited(ctx, "user", r, "team.add_member", |_| {
            self.add_member_inner(ctx, req)
        })
    }

    /// Removes a member; refused when it would leave the team without an owner.
    pub fn remove_member(
        &self,
        ctx: &AuthCtx,
        req: ctl::RemoveMemberRequest,
    ) -> Result<ctl::RemoveMemberResponse, Status> {
        let r = rid(Kind::User, &req.user_id);
        self.audited(ctx, "user", r, "team.remove_member", |_| {
            self.remove_member_inner(ctx, req)
        })
    }

    /// Creates a user in the caller's team's directory and makes it a member (platform
    /// admins: no membership, the platform team has none).
    pub fn create_user(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateUserRequest,
    ) -> Result<ctl::User, Status> {
        self.audited(ctx, "user", String::new(), "user.create", |_| {
            self.create_user_inner(ctx, req)
        })
    }

    /// Creates a key for the caller's team; the plaintext is shown only here.
    pub fn create_api_key(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateApiKeyRequest,
    ) -> Result<ctl::CreateApiKeyResponse, Status> {
        self.audited(ctx, "api_key", String::new(), "api_key.create", |_| {
            self.create_api_key_inner(ctx, req)
        })
    }

    /// Revokes a key of the caller's team at once.
    pub fn revoke_api_key(
        &self,
        ctx: &AuthCtx,
        req: ctl::RevokeApiKeyRequest,
    ) -> Result<ctl::RevokeApiKeyResponse, Status> {
        let r = rid(Kind::Key, &req.key_id);
        self.audited(ctx, "api_key", r, "api_key.revoke", |_| {
            self.revoke_api_key_inner(ctx, req)
        })
    }

    // ---- hosts ----

    /// A one-time token an agent exchanges for its identity.
    pub fn create_registration_token(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateRegistrationTokenRequest,
    ) -> Result<ctl::CreateRegistrationTokenResponse, Status> {
        self.audited(
            ctx,
            "host",
            String::new(),
            "host.create_registration_token",
            |_| self.create_registration_token_inner(ctx, req),
        )
    }

    /// Stops placing sandboxes on a host; lists those that remain.
    pub fn drain_host(
        &self,
        ctx: &AuthCtx,
        req: ctl::DrainHostRequest,
    ) -> Result<ctl::DrainHostResponse, Status> {
        let r = rid(Kind::Host, &req.host_id);
        self.audited(ctx, "host", r, "host.drain", |_| {
            self.drain_host_inner(ctx, req)
        })
    }

    /// Places sandboxes on a draining host again.
    pub fn undrain_host(
        &self,
        ctx: &AuthCtx,
        req: ctl::UndrainHostRequest,
    ) -> Result<ctl::Host, Status> {
        let r = rid(Kind::Host, &req.host_id);
        self.audited(ctx, "host", r, "host.undrain", |_| {
            self.undrain_host_inner(ctx, req)
        })
    }

    /// Forgets a host; refused while sandboxes or snapshot templates remain on it unless
    /// forced (then they are recorded stopped and deleted).
    pub fn delete_host(
        &self,
        ctx: &AuthCtx,
        req: ctl::DeleteHostRequest,
    ) -> Result<ctl::DeleteHostResponse, Status> {
        let r = rid(Kind::Host, &req.host_id);
        self.audited(ctx, "host", r, "host.delete", |_| {
            self.delete_host_inner(ctx, req)
        })
    }
}

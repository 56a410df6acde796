//! ctl's two packages served through the generated server traits: `wrenn.ctl.v1` on the
//! client port (and the HTTP gateway's unary calls, through the generated
//! `call_unary_package`) and `wrenn.host.v1` on the host port. Each trait method is one line onto the
//! service layer ([`crate::service::Api`]) or the host service ([`crate::host_service`]);
//! the generated `dispatch_package` routes a call by method name, so a new RPC in a
//! `.proto` file is one more method here, and the compiler names the place.
//!
//! Who is calling comes from the call's context ([`CallCtx`]): its peer is the
//! [`Caller`](crate::server::Caller) that the connection's hello decided, and
//! [`crate::server`] turns it into a [`ClientCall`] or [`HostCall`] once per call, before
//! any handler runs; handlers never look at the context again.
//!
//! Architecture invariant: no `wrenn.ctl.v1` method reaches `unimplemented` — forwarded
//! methods take the one forwarding path ([`Api::serve_forwarded`]), every other method a
//! trait method (a test over the descriptors checks both).

use proto::gen::wrenn::ctl::v1 as ctl;
use proto::gen::wrenn::host::v1 as host;
use proto::id::Uuid;
use proto::rpc::{forward, serve, CallCtx, ServerStream};
use proto::{Code, Status};

use crate::host_service;
use crate::service::{Api, AuthCtx};

/// One call of an authenticated client: the service layer and the caller's [`AuthCtx`].
pub struct ClientCall<'a> {
    pub api: &'a Api,
    pub auth: &'a AuthCtx,
}

impl ClientCall<'_> {
    /// Runs the call: a forwarded method through the forwarding path (PROTOCOL.md §9), any
    /// other through the generated dispatch of `wrenn.ctl.v1`. Returns whether it succeeded.
    pub fn serve(&self, stream: ServerStream) -> bool {
        if let Some(route) = forward::route(stream.method()) {
            return self.api.serve_forwarded(self.auth, route, stream);
        }
        let code = ctl::dispatch_package(self, stream).unwrap_or_else(serve::unknown);
        code == Code::Ok
    }
}

/// One call on the host port: the service layer and, once the agent registered, its host.
pub struct HostCall<'a> {
    pub api: &'a Api,
    /// The host's id and name; None on a connection with an empty host token (registering).
    pub host: Option<(Uuid, &'a str)>,
}

impl HostCall<'_> {
    /// Runs the call through the generated dispatch of `wrenn.host.v1`; returns its code.
    pub fn serve(&self, stream: ServerStream) -> Code {
        host::dispatch_package(self, stream).unwrap_or_else(serve::unknown)
    }

    fn host(&self) -> Result<(Uuid, &str), Status> {
        self.host.ok_or_else(host_service::registering_only)
    }
}

impl host::HostServer for HostCall<'_> {
    fn register(
        &self,
        _: &CallCtx,
        r: host::RegisterRequest,
    ) -> Result<host::RegisterResponse, Status> {
        if self.host.is_some() {
            return Err(Status::failed_precondition("already registered"));
        }
        host_service::register(self.api, r)
    }

    fn heartbeat(
        &self,
        _: &CallCtx,
        r: host::HeartbeatRequest,
    ) -> Result<host::HeartbeatResponse, Status> {
        let (id, name) = self.host()?;
        host_service::heartbeat(self.api, id, name, r)
    }

    fn report_state(
        &self,
        _: &CallCtx,
        r: host::ReportStateRequest,
    ) -> Result<host::ReportStateResponse, Status> {
        let (id, name) = self.host()?;
        host_service::report_state(self.api, id, name, r)
    }

    fn renew_certificate(
        &self,
        _: &CallCtx,
        r: host::RenewCertificateRequest,
    ) -> Result<host::RenewCertificateResponse, Status> {
        let (id, name) = self.host()?;
        host_service::renew_certificate(self.api, id, name, r)
    }
}

// ---- wrenn.ctl.v1: each method onto the service layer's, with the caller's AuthCtx ----

impl ctl::SandboxesServer for ClientCall<'_> {
    fn create(&self, _: &CallCtx, r: ctl::CreateSandboxRequest) -> Result<ctl::Sandbox, Status> {
        self.api.create_sandbox(self.auth, r)
    }
    fn list(
        &self,
        _: &CallCtx,
        r: ctl::ListSandboxesRequest,
    ) -> Result<ctl::ListSandboxesResponse, Status> {
        self.api.list_sandboxes(self.auth, r)
    }
    fn get(&self, _: &CallCtx, r: ctl::GetSandboxRequest) -> Result<ctl::Sandbox, Status> {
        self.api.get_sandbox(self.auth, r)
    }
    fn destroy(
        &self,
        _: &CallCtx,
        r: ctl::DestroySandboxRequest,
    ) -> Result<ctl::DestroySandboxResponse, Status> {
        self.api.destroy_sandbox(self.auth, r)
    }
    fn ping(&self, _: &CallCtx, r: ctl::PingSandboxRequest) -> Result<ctl::Sandbox, Status> {
        self.api.ping_sandbox(self.auth, r)
    }
    fn set_timeout(&self, _: &CallCtx, r: ctl::SetTimeoutRequest) -> Result<ctl::Sandbox, Status> {
        self.api.set_sandbox_timeout(self.auth, r)
    }
    fn pause(&self, _: &CallCtx, r: ctl::PauseSandboxRequest) -> Result<ctl::Sandbox, Status> {
        self.api.pause_sandbox(self.auth, r)
    }
    fn resume(&self, _: &CallCtx, r: ctl::ResumeSandboxRequest) -> Result<ctl::Sandbox, Status> {
        self.api.resume_sandbox(self.auth, r)
    }
    fn metrics(
        &self,
        _: &CallCtx,
        r: ctl::SandboxMetricsRequest,
    ) -> Result<ctl::SandboxMetricsResponse, Status> {
        self.api.sandbox_metrics(self.auth, r)
    }
    fn update_network(
        &self,
        _: &CallCtx,
        r: ctl::UpdateNetworkRequest,
    ) -> Result<ctl::Sandbox, Status> {
        self.api.update_network(self.auth, r)
    }
    fn rotate_traffic_token(
        &self,
        _: &CallCtx,
        r: ctl::RotateTrafficTokenRequest,
    ) -> Result<ctl::Sandbox, Status> {
        self.api.rotate_traffic_token(self.auth, r)
    }
}

impl ctl::ProcessesServer for ClientCall<'_> {
    fn exec(&self, _: &CallCtx, r: ctl::ExecRequest) -> Result<ctl::ExecResponse, Status> {
        self.api.exec(self.auth, r)
    }
}

impl ctl::TemplatesServer for ClientCall<'_> {
    fn create(&self, _: &CallCtx, r: ctl::CreateTemplateRequest) -> Result<ctl::Template, Status> {
        self.api.create_template(self.auth, r)
    }
    fn list(
        &self,
        _: &CallCtx,
        r: ctl::ListTemplatesRequest,
    ) -> Result<ctl::ListTemplatesResponse, Status> {
        self.api.list_templates(self.auth, r)
    }
    fn get(&self, _: &CallCtx, r: ctl::GetTemplateRequest) -> Result<ctl::Template, Status> {
        self.api.get_template(self.auth, r)
    }
    fn delete(
        &self,
        _: &CallCtx,
        r: ctl::DeleteTemplateRequest,
    ) -> Result<ctl::DeleteTemplateResponse, Status> {
        self.api.delete_template(self.auth, r)
    }
    fn build(&self, _: &CallCtx, r: ctl::BuildRequest, s: &mut ServerStream) -> Result<(), Status> {
        self.api.build_template(self.auth, r, s)
    }
    fn attach_build(
        &self,
        _: &CallCtx,
        r: ctl::AttachBuildRequest,
        s: &mut ServerStream,
    ) -> Result<(), Status> {
        let w = s.watch();
        self.api
            .attach_build(self.auth, r, &mut |e| s.send(&e), &|| w.is_cancelled())
    }
    fn get_build(&self, _: &CallCtx, r: ctl::GetBuildRequest) -> Result<ctl::Build, Status> {
        self.api.get_build(self.auth, r)
    }
    fn list_builds(
        &self,
        _: &CallCtx,
        r: ctl::ListBuildsRequest,
    ) -> Result<ctl::ListBuildsResponse, Status> {
        self.api.list_builds(self.auth, r)
    }
    fn cancel_build(&self, _: &CallCtx, r: ctl::CancelBuildRequest) -> Result<ctl::Build, Status> {
        self.api.cancel_build(self.auth, r)
    }
}

impl ctl::TeamsServer for ClientCall<'_> {
    fn get(&self, _: &CallCtx, r: ctl::GetTeamRequest) -> Result<ctl::Team, Status> {
        self.api.get_team(self.auth, r)
    }
    fn create(
        &self,
        _: &CallCtx,
        r: ctl::CreateTeamRequest,
    ) -> Result<ctl::CreateTeamResponse, Status> {
        self.api.create_team(self.auth, r)
    }
    fn add_member(&self, _: &CallCtx, r: ctl::AddMemberRequest) -> Result<ctl::Member, Status> {
        self.api.add_member(self.auth, r)
    }
    fn remove_member(
        &self,
        _: &CallCtx,
        r: ctl::RemoveMemberRequest,
    ) -> Result<ctl::RemoveMemberResponse, Status> {
        self.api.remove_member(self.auth, r)
    }
    fn list_members(
        &self,
        _: &CallCtx,
        r: ctl::ListMembersRequest,
    ) -> Result<ctl::ListMembersResponse, Status> {
        self.api.list_members(self.auth, r)
    }
    fn usage(
        &self,
        _: &CallCtx,
        r: ctl::TeamUsageRequest,
    ) -> Result<ctl::TeamUsageResponse, Status> {
        self.api.team_usage(self.auth, r)
    }
}

impl ctl::UsersServer for ClientCall<'_> {
    fn create(&self, _: &CallCtx, r: ctl::CreateUserRequest) -> Result<ctl::User, Status> {
        self.api.create_user(self.auth, r)
    }
    fn get(&self, _: &CallCtx, r: ctl::GetUserRequest) -> Result<ctl::User, Status> {
        self.api.get_user(self.auth, r)
    }
    fn list(
        &self,
        _: &CallCtx,
        r: ctl::ListUsersRequest,
    ) -> Result<ctl::ListUsersResponse, Status> {
        self.api.list_users(self.auth, r)
    }
}

impl ctl::ApiKeysServer for ClientCall<'_> {
    fn create(
        &self,
        _: &CallCtx,
        r: ctl::CreateApiKeyRequest,
    ) -> Result<ctl::CreateApiKeyResponse, Status> {
        self.api.create_api_key(self.auth, r)
    }
    fn list(
        &self,
        _: &CallCtx,
        r: ctl::ListApiKeysRequest,
    ) -> Result<ctl::ListApiKeysResponse, Status> {
        self.api.list_api_keys(self.auth, r)
    }
    fn revoke(
        &self,
        _: &CallCtx,
        r: ctl::RevokeApiKeyRequest,
    ) -> Result<ctl::RevokeApiKeyResponse, Status> {
        self.api.revoke_api_key(self.auth, r)
    }
}

impl ctl::HostsServer for ClientCall<'_> {
    fn create_registration_token(
        &self,
        _: &CallCtx,
        r: ctl::CreateRegistrationTokenRequest,
    ) -> Result<ctl::CreateRegistrationTokenResponse, Status> {
        self.api.create_registration_token(self.auth, r)
    }
    fn list(
        &self,
        _: &CallCtx,
        r: ctl::ListHostsRequest,
    ) -> Result<ctl::ListHostsResponse, Status> {
        self.api.list_hosts(self.auth, r)
    }
    fn get(&self, _: &CallCtx, r: ctl::GetHostRequest) -> Result<ctl::Host, Status> {
        self.api.get_host(self.auth, r)
    }
    fn drain(
        &self,
        _: &CallCtx,
        r: ctl::DrainHostRequest,
    ) -> Result<ctl::DrainHostResponse, Status> {
        self.api.drain_host(self.auth, r)
    }
    fn undrain(&self, _: &CallCtx, r: ctl::UndrainHostRequest) -> Result<ctl::Host, Status> {
        self.api.undrain_host(self.auth, r)
    }
    fn delete(
        &self,
        _: &CallCtx,
        r: ctl::DeleteHostRequest,
    ) -> Result<ctl::DeleteHostResponse, Status> {
        self.api.delete_host(self.auth, r)
    }
}

impl ctl::AuditLogsServer for ClientCall<'_> {
    fn list(
        &self,
        _: &CallCtx,
        r: ctl::ListAuditLogsRequest,
    ) -> Result<ctl::ListAuditLogsResponse, Status> {
        self.api.list_audit_logs(self.auth, r)
    }
}

impl ctl::WebhooksServer for ClientCall<'_> {
    fn create(
        &self,
        _: &CallCtx,
        r: ctl::CreateWebhookRequest,
    ) -> Result<ctl::CreateWebhookResponse, Status> {
        self.api.create_webhook(self.auth, r)
    }
    fn list(
        &self,
        _: &CallCtx,
        r: ctl::ListWebhooksRequest,
    ) -> Result<ctl::ListWebhooksResponse, Status> {
        self.api.list_webhooks(self.auth, r)
    }
    fn delete(
        &self,
        _: &CallCtx,
        r: ctl::DeleteWebhookRequest,
    ) -> Result<ctl::DeleteWebhookResponse, Status> {
        self.api.delete_webhook(self.auth, r)
    }
    fn deliveries(
        &self,
        _: &CallCtx,
        r: ctl::ListDeliveriesRequest,
    ) -> Result<ctl::ListDeliveriesResponse, Status> {
        self.api.list_deliveries(self.auth, r)
    }
}

impl ctl::PortsServer for ClientCall<'_> {
    fn connect(
        &self,
        _: &CallCtx,
        r: ctl::PortConnectRequest,
        s: &mut ServerStream,
    ) -> Result<(), Status> {
        self.api.port_connect(self.auth, r, s)
    }
}

//! The `/v1/...` route table: every public API call with its HTTP method, path, where its
//! request comes from (path, query, JSON body) and how its reply goes out. The router
//! ([`match_route`]) and the OpenAPI document (`openapi.rs`) are both read from this table;
//! the integration test still walks both independently and fails when they differ.

use std::sync::LazyLock;

use prost::Message;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::gen::wrenn::envd::v1 as envd;
use proto::Status;
use serde_json::Value;

use super::json::{Json, JsonError};

use ctl::{
    api_keys_methods as keys, audit_logs_methods as audit, files_methods as files,
    hosts_methods as hosts, processes_methods as procs, sandboxes_methods as sb,
    teams_methods as teams, templates_methods as tpl, users_methods as users,
    webhooks_methods as wh,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "GET" => Some(Method::Get),
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
    /// Lower-case, as OpenAPI path items spell it.
    pub fn lower(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
            Method::Delete => "delete",
        }
    }
}

/// Where a call's request message comes from, besides the path parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Path parameters only.
    None,
    /// A JSON body (required; `{}` for all defaults).
    Body,
    /// Query parameters, typed by the message's schema.
    Query,
}

pub type EncodeFn = fn(&Value) -> Result<Vec<u8>, JsonError>;
pub type DecodeFn = fn(&[u8]) -> Result<Value, Status>;

/// How a call runs and answers.
#[derive(Clone, Copy)]
pub enum Call {
    /// JSON in, one JSON object out.
    Unary { resp: DecodeFn },
    /// A stream of messages as chunked newline-delimited JSON, one object per line; a failure
    /// after the first line is a last line `{"error":{...}}`.
    Ndjson { item: DecodeFn },
    /// Files.List: every batch's entries merged into one streamed `{"entries":[...]}`.
    ListDir,
    /// Files.Download: the file's bytes as the body, streamed.
    Download,
    /// Files.Upload: raw body (`PUT`) or multipart/form-data (`POST`), streamed.
    Upload { multipart: bool },
    /// Processes.SendInput with the raw body as the bytes (any size, streamed).
    Stdin,
}

pub struct Route {
    pub method: Method,
    /// Path template, `{name}` for a parameter (a whole segment).
    pub path: &'static str,
    /// OpenAPI operationId.
    pub operation: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    /// The RPC it maps to.
    pub rpc: &'static str,
    pub input: Input,
    /// When set, the JSON input is the value of this field of the request message (an envd
    /// request wrapped with a sandbox id), else it is the request message itself.
    pub wrap: Option<&'static str>,
    /// Component schema of the request message (the RPC's).
    pub request_schema: &'static str,
    /// Component schema of what the client sends (the wrapped message, or the request).
    pub input_schema: &'static str,
    /// Component schema of the reply (for Ndjson: of each line).
    pub response_schema: &'static str,
    /// Builds the encoded request from the assembled JSON object.
    pub encode: EncodeFn,
    pub call: Call,
    /// HTTP status of success.
    pub status: u16,
    /// Path parameters whose request field has another name: (parameter, field).
    pub renames: &'static [(&'static str, &'static str)],
}

impl Route {
    /// Names of the path parameters, in order.
    /// The request field a path parameter fills.
    pub fn field_of(&self, param: &str) -> &'static str {
        for (p, f) in self.renames {
            if *p == param {
                return f;
            }
        }
        self.params()
            .into_iter()
            .find(|p| *p == param)
            .unwrap_or("")
    }

    pub fn params(&self) -> Vec<&'static str> {
        self.path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect()
    }
}

fn encode<M: Json + Message>(v: &Value) -> Result<Vec<u8>, JsonError> {
    M::from_json(v).map(|m| m.encode_to_vec())
}

fn decode<M: Json + Message>(b: &[u8]) -> Result<Value, Status> {
    M::decode(b)
        .map(|m| m.to_json())
        .map_err(|e| Status::internal(format!("decode reply: {e}")))
}

struct B {
    r: Route,
}

fn route<Req: Json + Message, Resp: Json + Message>(
    method: Method,
    path: &'static str,
    operation: &'static str,
    rpc: &'static str,
    input: Input,
    summary: &'static str,
) -> B {
    let tag = operation.split('.').next().unwrap_or("");
    B {
        r: Route {
            method,
            path,
            operation,
            tag,
            summary,
            rpc,
            input,
            wrap: None,
            request_schema: Req::SCHEMA,
            input_schema: Req::SCHEMA,
            response_schema: Resp::SCHEMA,
            encode: encode::<Req>,
            call: Call::Unary {
                resp: decode::<Resp>,
            },
            status: 200,
            renames: &[],
        },
    }
}

impl B {
    fn wrap<Inner: Json>(mut self, field: &'static str) -> B {
        self.r.wrap = Some(field);
        self.r.input_schema = Inner::SCHEMA;
        self
    }
    fn rename(mut self, param: &'static str, field: &'static str) -> B {
        // Only one route needs it; a static table keeps Route free of allocations.
        assert_eq!((param, field), ("template_id", "template"));
        self.r.renames = &[("template_id", "template")];
        self
    }
    fn input_schema(mut self, schema: &'static str) -> B {
        self.r.input_schema = schema;
        self
    }
    fn created(mut self) -> B {
        self.r.status = 201;
        self
    }
    fn call(mut self, c: Call) -> B {
        self.r.call = c;
        self
    }
    fn ndjson<Item: Json + Message>(mut self) -> B {
        self.r.call = Call::Ndjson {
            item: decode::<Item>,
        };
        self.r.response_schema = Item::SCHEMA;
        self
    }
}

/// Every `/v1` route.
pub static ROUTES: LazyLock<Vec<Route>> = LazyLock::new(build);

fn build() -> Vec<Route> {
    use Input::{Body, None as Path, Query};
    use Method::{Delete, Get, Post, Put};
    let v = vec![
        // Sandboxes
        route::<ctl::CreateSandboxRequest, ctl::Sandbox>(Post, "/v1/sandboxes", "sandboxes.create", sb::CREATE, Body,
            "Create a sandbox; with `wait` (default true) answers once it runs").created(),
        route::<ctl::ListSandboxesRequest, ctl::ListSandboxesResponse>(Get, "/v1/sandboxes", "sandboxes.list", sb::LIST, Query,
            "List the team's sandboxes, newest first"),
        route::<ctl::GetSandboxRequest, ctl::Sandbox>(Get, "/v1/sandboxes/{sandbox_id}", "sandboxes.get", sb::GET, Path,
            "Get one sandbox"),
        route::<ctl::DestroySandboxRequest, ctl::DestroySandboxResponse>(Delete, "/v1/sandboxes/{sandbox_id}", "sandboxes.destroy", sb::DESTROY, Query,
            "Destroy a sandbox; `force` records it stopped when its host cannot be reached"),
        route::<ctl::PingSandboxRequest, ctl::Sandbox>(Post, "/v1/sandboxes/{sandbox_id}/ping", "sandboxes.ping", sb::PING, Path,
            "Keep a sandbox alive: expiry becomes now + its timeout"),
        route::<ctl::SetTimeoutRequest, ctl::Sandbox>(Post, "/v1/sandboxes/{sandbox_id}/timeout", "sandboxes.set_timeout", sb::SET_TIMEOUT, Body,
            "Change a sandbox's timeout and policy"),
        route::<ctl::UpdateNetworkRequest, ctl::Sandbox>(Put, "/v1/sandboxes/{sandbox_id}/network", "sandboxes.update_network", sb::UPDATE_NETWORK, Body,
            "Replace a sandbox's network policy (egress): at once when running, at resume when paused"),
        route::<ctl::RotateTrafficTokenRequest, ctl::Sandbox>(Post, "/v1/sandboxes/{sandbox_id}/traffic-token/rotate", "sandboxes.rotate_traffic_token", sb::ROTATE_TRAFFIC_TOKEN, Path,
            "Replace a sandbox's traffic token (its ports' secret); the old one stops working"),
        route::<ctl::PauseSandboxRequest, ctl::Sandbox>(Post, "/v1/sandboxes/{sandbox_id}/pause", "sandboxes.pause", sb::PAUSE, Path,
            "Pause a running sandbox"),
        route::<ctl::ResumeSandboxRequest, ctl::Sandbox>(Post, "/v1/sandboxes/{sandbox_id}/resume", "sandboxes.resume", sb::RESUME, Body,
            "Resume a paused sandbox"),
        route::<ctl::SandboxMetricsRequest, ctl::SandboxMetricsResponse>(Get, "/v1/sandboxes/{sandbox_id}/metrics", "sandboxes.metrics", sb::METRICS, Query,
            "Host-side samples of a sandbox (CPU, memory, disk, network) over `range_s`"),
        // Processes
        route::<ctl::ExecRequest, ctl::ExecResponse>(Post, "/v1/sandboxes/{sandbox_id}/exec", "processes.exec", procs::EXEC, Body,
            "Run a command to completion (or in the background) and return its output"),
        route::<ctl::ExecStreamRequest, envd::ProcessEvent>(Post, "/v1/sandboxes/{sandbox_id}/exec/stream", "processes.exec_stream", procs::EXEC_STREAM, Body,
            "Run a command and stream its events as newline-delimited JSON").ndjson::<envd::ProcessEvent>(),
        route::<ctl::ListProcessesRequest, envd::ListProcessesResponse>(Get, "/v1/sandboxes/{sandbox_id}/processes", "processes.list", procs::LIST, Path,
            "List running processes started through the API"),
        route::<ctl::ConnectRequest, envd::ProcessEvent>(Post, "/v1/sandboxes/{sandbox_id}/processes/connect", "processes.connect", procs::CONNECT, Body,
            "Reattach to a process by pid or tag: replay, then live events as newline-delimited JSON")
            .wrap::<envd::ConnectRequest>("connect").ndjson::<envd::ProcessEvent>(),
        route::<ctl::SendInputRequest, envd::SendInputResponse>(Post, "/v1/sandboxes/{sandbox_id}/processes/input", "processes.send_input", procs::SEND_INPUT, Body,
            "Write bytes to a process's stdin (one message; `close` closes stdin after it)")
            .wrap::<envd::SendInputRequest>("input"),
        route::<ctl::SendInputRequest, envd::SendInputResponse>(Put, "/v1/sandboxes/{sandbox_id}/processes/stdin", "processes.stdin", procs::SEND_INPUT, Query,
            "Stream the raw request body (any size) to a process's stdin")
            .input_schema(super::handler::STDIN_PARAMS).call(Call::Stdin),
        route::<ctl::CloseStdinRequest, envd::CloseStdinResponse>(Post, "/v1/sandboxes/{sandbox_id}/processes/close-stdin", "processes.close_stdin", procs::CLOSE_STDIN, Body,
            "Close a process's stdin").wrap::<envd::CloseStdinRequest>("close"),
        route::<ctl::SignalRequest, envd::SignalResponse>(Post, "/v1/sandboxes/{sandbox_id}/processes/signal", "processes.signal", procs::SIGNAL, Body,
            "Send a signal to a process or its group").wrap::<envd::SignalRequest>("signal"),
        route::<ctl::ResizePtyRequest, envd::ResizePtyResponse>(Post, "/v1/sandboxes/{sandbox_id}/processes/resize", "processes.resize_pty", procs::RESIZE_PTY, Body,
            "Resize a process's PTY").wrap::<envd::ResizePtyRequest>("resize"),
        // Files
        route::<ctl::UploadRequest, envd::WriteResponse>(Put, "/v1/sandboxes/{sandbox_id}/files", "files.upload", files::UPLOAD, Query,
            "Upload a file: the raw request body is its content (any size, streamed)")
            .wrap::<envd::WriteHeader>("header").call(Call::Upload { multipart: false }),
        route::<ctl::UploadRequest, envd::WriteResponse>(Post, "/v1/sandboxes/{sandbox_id}/files", "files.upload_multipart", files::UPLOAD, Query,
            "Upload a file as multipart/form-data (part `file`; `path` as query parameter or a form field before it)")
            .wrap::<envd::WriteHeader>("header").call(Call::Upload { multipart: true }),
        route::<ctl::DownloadRequest, envd::ReadResponse>(Get, "/v1/sandboxes/{sandbox_id}/files", "files.download", files::DOWNLOAD, Query,
            "Download a byte range of a file (any size, streamed as application/octet-stream)")
            .wrap::<envd::ReadRequest>("read").call(Call::Download),
        route::<ctl::StatRequest, envd::StatResponse>(Get, "/v1/sandboxes/{sandbox_id}/files/stat", "files.stat", files::STAT, Query,
            "Metadata of a path").wrap::<envd::StatRequest>("stat"),
        route::<ctl::ListDirRequest, envd::ListDirResponse>(Get, "/v1/sandboxes/{sandbox_id}/files/list", "files.list", files::LIST, Query,
            "Directory entries down to a depth (streamed as one JSON object)")
            .wrap::<envd::ListDirRequest>("list").call(Call::ListDir),
        route::<ctl::MakeDirRequest, envd::MakeDirResponse>(Post, "/v1/sandboxes/{sandbox_id}/files/mkdir", "files.make_dir", files::MAKE_DIR, Body,
            "Create a directory and its parents (mkdir -p)").wrap::<envd::MakeDirRequest>("make_dir"),
        route::<ctl::MoveRequest, envd::MoveResponse>(Post, "/v1/sandboxes/{sandbox_id}/files/move", "files.move", files::MOVE, Body,
            "Rename a file or directory").wrap::<envd::MoveRequest>("move"),
        route::<ctl::RemoveRequest, envd::RemoveResponse>(Post, "/v1/sandboxes/{sandbox_id}/files/remove", "files.remove", files::REMOVE, Body,
            "Remove a file or (recursively) a directory").wrap::<envd::RemoveRequest>("remove"),
        // Templates
        route::<ctl::CreateTemplateRequest, ctl::Template>(Post, "/v1/templates", "templates.create", tpl::CREATE, Body,
            "Make a snapshot template from a sandbox").created(),
        route::<ctl::ListTemplatesRequest, ctl::ListTemplatesResponse>(Get, "/v1/templates", "templates.list", tpl::LIST, Query,
            "The team's templates and the platform templates"),
        route::<ctl::GetTemplateRequest, ctl::Template>(Get, "/v1/templates/{template_id}", "templates.get", tpl::GET, Path,
            "One template, by id (`tpl-...`) or by name").rename("template_id", "template"),
        route::<ctl::DeleteTemplateRequest, ctl::DeleteTemplateResponse>(Delete, "/v1/templates/{template_id}", "templates.delete", tpl::DELETE, Path,
            "Delete a template"),
        route::<ctl::ListBuildsRequest, ctl::ListBuildsResponse>(Get, "/v1/builds", "templates.list_builds", tpl::LIST_BUILDS, Query,
            "The team's template builds, newest first (Templates/Build itself is on the protobuf port only)"),
        route::<ctl::GetBuildRequest, ctl::Build>(Get, "/v1/builds/{build_id}", "templates.get_build", tpl::GET_BUILD, Path,
            "One build with its steps"),
        route::<ctl::AttachBuildRequest, ctl::BuildEvent>(Get, "/v1/builds/{build_id}/events", "templates.attach_build", tpl::ATTACH_BUILD, Path,
            "A build's kept output, then its live events until it ends, as newline-delimited JSON").ndjson::<ctl::BuildEvent>(),
        route::<ctl::CancelBuildRequest, ctl::Build>(Post, "/v1/builds/{build_id}/cancel", "templates.cancel_build", tpl::CANCEL_BUILD, Path,
            "Cancel a queued or running build"),
        // Teams
        route::<ctl::CreateTeamRequest, ctl::CreateTeamResponse>(Post, "/v1/teams", "teams.create", teams::CREATE, Body,
            "Create a team with its owner and first API key (platform admin)").created(),
        route::<ctl::GetTeamRequest, ctl::Team>(Get, "/v1/teams/{team_id}", "teams.get", teams::GET, Path,
            "A team (`current` = the caller's)"),
        route::<ctl::ListMembersRequest, ctl::ListMembersResponse>(Get, "/v1/teams/{team_id}/members", "teams.list_members", teams::LIST_MEMBERS, Query,
            "Members of a team (`current` = the caller's)"),
        route::<ctl::AddMemberRequest, ctl::Member>(Post, "/v1/teams/{team_id}/members", "teams.add_member", teams::ADD_MEMBER, Body,
            "Add an existing user to a team").created(),
        route::<ctl::RemoveMemberRequest, ctl::RemoveMemberResponse>(Delete, "/v1/teams/{team_id}/members/{user_id}", "teams.remove_member", teams::REMOVE_MEMBER, Path,
            "Remove a member from a team"),
        route::<ctl::TeamUsageRequest, ctl::TeamUsageResponse>(Get, "/v1/teams/{team_id}/usage", "teams.usage", teams::USAGE, Query,
            "Usage per UTC day (`current` = the caller's team)"),
        // Users
        route::<ctl::CreateUserRequest, ctl::User>(Post, "/v1/users", "users.create", users::CREATE, Body,
            "Create a user and add it to the caller's team").created(),
        route::<ctl::ListUsersRequest, ctl::ListUsersResponse>(Get, "/v1/users", "users.list", users::LIST, Query,
            "Members of the caller's team (every user for a platform admin)"),
        route::<ctl::GetUserRequest, ctl::User>(Get, "/v1/users/{user_id}", "users.get", users::GET, Path,
            "One user"),
        // API keys
        route::<ctl::CreateApiKeyRequest, ctl::CreateApiKeyResponse>(Post, "/v1/api-keys", "api_keys.create", keys::CREATE, Body,
            "Create an API key; the plaintext is in this reply only").created(),
        route::<ctl::ListApiKeysRequest, ctl::ListApiKeysResponse>(Get, "/v1/api-keys", "api_keys.list", keys::LIST, Query,
            "The team's API keys"),
        route::<ctl::RevokeApiKeyRequest, ctl::RevokeApiKeyResponse>(Delete, "/v1/api-keys/{key_id}", "api_keys.revoke", keys::REVOKE, Path,
            "Revoke an API key"),
        // Hosts
        route::<ctl::CreateRegistrationTokenRequest, ctl::CreateRegistrationTokenResponse>(Post, "/v1/hosts/registration-tokens", "hosts.create_registration_token", hosts::CREATE_REGISTRATION_TOKEN, Body,
            "Make a one-time host registration token (platform admin)").created(),
        route::<ctl::ListHostsRequest, ctl::ListHostsResponse>(Get, "/v1/hosts", "hosts.list", hosts::LIST, Query,
            "Every host (platform admin)"),
        route::<ctl::GetHostRequest, ctl::Host>(Get, "/v1/hosts/{host_id}", "hosts.get", hosts::GET, Path,
            "One host (platform admin)"),
        route::<ctl::DrainHostRequest, ctl::DrainHostResponse>(Post, "/v1/hosts/{host_id}/drain", "hosts.drain", hosts::DRAIN, Path,
            "Stop placing sandboxes on a host; lists what remains (platform admin)"),
        route::<ctl::UndrainHostRequest, ctl::Host>(Post, "/v1/hosts/{host_id}/undrain", "hosts.undrain", hosts::UNDRAIN, Path,
            "Place sandboxes on a draining host again (platform admin)"),
        route::<ctl::DeleteHostRequest, ctl::DeleteHostResponse>(Delete, "/v1/hosts/{host_id}", "hosts.delete", hosts::DELETE, Query,
            "Forget a host; `force` for one that is gone: its sandboxes are recorded stopped (platform admin)"),
        // Audit logs
        route::<ctl::ListAuditLogsRequest, ctl::ListAuditLogsResponse>(Get, "/v1/audit-logs", "audit_logs.list", audit::LIST, Query,
            "Audit entries, newest first, keyset-paged"),
        // Webhooks
        route::<ctl::CreateWebhookRequest, ctl::CreateWebhookResponse>(Post, "/v1/webhooks", "webhooks.create", wh::CREATE, Body,
            "Register a webhook endpoint; the signing secret is in this reply only").created(),
        route::<ctl::ListWebhooksRequest, ctl::ListWebhooksResponse>(Get, "/v1/webhooks", "webhooks.list", wh::LIST, Query,
            "The team's webhooks"),
        route::<ctl::DeleteWebhookRequest, ctl::DeleteWebhookResponse>(Delete, "/v1/webhooks/{webhook_id}", "webhooks.delete", wh::DELETE, Path,
            "Remove a webhook (its pending deliveries are dropped)"),
        route::<ctl::ListDeliveriesRequest, ctl::ListDeliveriesResponse>(Get, "/v1/webhooks/{webhook_id}/deliveries", "webhooks.deliveries", wh::DELIVERIES, Query,
            "Deliveries of a webhook with their outcome, newest first"),
    ];
    v.into_iter().map(|b| b.r).collect()
}

/// Result of routing a request path.
pub enum Match<'a> {
    Found {
        route: &'a Route,
        /// (name, raw segment value), in path order.
        params: Vec<(&'static str, String)>,
    },
    /// The path exists with other methods (405); holds them.
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

/// Finds the route for `method` and `path` (without the query string). Segments are
/// percent-decoded; an empty segment never matches a parameter.
pub fn match_route<'a>(routes: &'a [Route], method: Method, path: &str) -> Match<'a> {
    let segs: Vec<&str> = path.split('/').collect();
    let mut allowed = Vec::new();
    for r in routes {
        let tsegs: Vec<&str> = r.path.split('/').collect();
        if tsegs.len() != segs.len() {
            continue;
        }
        let mut params = Vec::new();
        let mut ok = true;
        for (t, s) in tsegs.iter().zip(&segs) {
            if let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                match super::request::percent_decode(s) {
                    Some(v) if !v.is_empty() => params.push((name, v)),
                    _ => {
                        ok = false;
                        break;
                    }
                }
            } else if t != s {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        if r.method == method {
            return Match::Found { route: r, params };
        }
        allowed.push(r.method);
    }
    if allowed.is_empty() {
        Match::NotFound
    } else {
        allowed.sort();
        allowed.dedup();
        Match::MethodNotAllowed(allowed)
    }
}

/// The wire-ID kind a path parameter must hold, checked before any call; `None` for
/// parameters that also take names (`templates.get`) or special values (`current`).
pub fn param_kind(route: &Route, param: &str, value: &str) -> Option<proto::id::Kind> {
    use proto::id::Kind;
    match param {
        "sandbox_id" => Some(Kind::Sandbox),
        "user_id" => Some(Kind::User),
        "key_id" => Some(Kind::Key),
        "host_id" => Some(Kind::Host),
        "webhook_id" => Some(Kind::Webhook),
        "build_id" => Some(Kind::Build),
        "team_id" if value != "current" => Some(Kind::Team),
        "template_id" if route.renames.is_empty() => Some(Kind::Template),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::rpc::MethodDesc;

    /// Methods of `wrenn.ctl.v1` the gateway leaves out, with the reason.
    const NOT_ROUTED: &[(&str, &str)] = &[
        (
            ctl::ports_methods::CONNECT,
            "a bidirectional byte stream; over HTTP a sandbox port is reached through the port \
             proxy (docs/operations.md, \"Sandbox ports\")",
        ),
        (
            tpl::BUILD,
            "bidirectional: the context streams up while events stream down; protobuf port only",
        ),
    ];

    /// The route table against the descriptors generated from the `.proto` files: every
    /// route names a method of `wrenn.ctl.v1` with that method's request and response
    /// messages and a call shape its streaming allows, and every method has a route.
    #[test]
    fn routes_agree_with_the_service_descriptors() {
        let all: Vec<&MethodDesc> = ctl::METHODS.iter().flat_map(|s| s.iter()).collect();
        for r in ROUTES.iter() {
            let what = format!("{} {} ({})", r.method.as_str(), r.path, r.operation);
            let d = all
                .iter()
                .find(|d| d.name == r.rpc)
                .unwrap_or_else(|| panic!("{what}: no method {} in wrenn.ctl.v1", r.rpc));
            assert_eq!(
                format!("wrenn.{}", r.request_schema),
                d.input,
                "{what}: request"
            );
            assert_eq!(
                format!("wrenn.{}", r.response_schema),
                d.output,
                "{what}: response"
            );
            let shape_ok = match r.call {
                Call::Unary { .. } => !d.client_streaming && !d.server_streaming,
                Call::Ndjson { .. } | Call::ListDir | Call::Download => {
                    !d.client_streaming && d.server_streaming
                }
                Call::Upload { .. } | Call::Stdin => d.client_streaming && !d.server_streaming,
            };
            // SendInput is client streaming; its one-message JSON route sends one message.
            let one_message = r.rpc == procs::SEND_INPUT && matches!(r.call, Call::Unary { .. });
            assert!(shape_ok || one_message, "{what}: call shape vs {d:?}");
        }
        for d in &all {
            let routed = ROUTES.iter().any(|r| r.rpc == d.name);
            let exempt = NOT_ROUTED.iter().any(|(m, _)| *m == d.name);
            assert!(routed || exempt, "{} has no HTTP route", d.name);
            assert!(
                !(routed && exempt),
                "{} is routed and listed as not",
                d.name
            );
        }
    }
}

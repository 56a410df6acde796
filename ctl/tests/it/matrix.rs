//! Two teams: nothing of team A is visible or changeable with team B's key.

use std::time::Duration;

use proto::gen::wrenn::ctl::v1 as c;
use proto::gen::wrenn::envd::v1 as envd;
use proto::rpc::{CallOpts, Client};
use proto::Code;

use crate::harness::{code, Ctl};

const T: Option<Duration> = Some(Duration::from_secs(30));

fn u<Req: prost::Message, Resp: prost::Message + Default>(
    cl: &Client,
    m: &str,
    r: &Req,
) -> Result<Resp, proto::Status> {
    cl.unary(m, r, T)
}

#[test]
fn team_b_sees_and_changes_nothing_of_team_a() {
    let Some(ctl) = Ctl::start() else { return };
    let (_fa, _host) = ctl.add_host(8, 8192, 100_000);
    let a = ctl.team();
    let (team_b, key_b) = ctl.other_team("team-b", "b-owner@example.com");
    let b = ctl.client(&key_b);

    // Team A's resources.
    let sb: c::Sandbox = u(
        &a,
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest::default(),
    )
    .unwrap();
    let sb2: c::Sandbox = u(
        &a,
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest::default(),
    )
    .unwrap();
    let tpl: c::Template = u(
        &a,
        c::templates_methods::CREATE,
        &c::CreateTemplateRequest {
            sandbox_id: sb2.id.clone(),
            name: "a-tpl".into(),
            platform: false,
        },
    )
    .unwrap();
    let user: c::User = u(
        &a,
        c::users_methods::CREATE,
        &c::CreateUserRequest {
            email: "a2@example.com".into(),
            name: "A2".into(),
            role: 0,
        },
    )
    .unwrap();
    let key: c::CreateApiKeyResponse = u(
        &a,
        c::api_keys_methods::CREATE,
        &c::CreateApiKeyRequest {
            name: "a-key".into(),
            platform_admin: false,
        },
    )
    .unwrap();
    let key_id = key.key.unwrap().id;
    let sid = sb.id.clone();

    // Lists: empty of A's things.
    let l: c::ListSandboxesResponse = u(
        &b,
        c::sandboxes_methods::LIST,
        &c::ListSandboxesRequest {
            states: (1..=9).collect(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(l.sandboxes.is_empty());
    let l: c::ListTemplatesResponse = u(
        &b,
        c::templates_methods::LIST,
        &c::ListTemplatesRequest::default(),
    )
    .unwrap();
    assert_eq!(
        l.templates
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        vec!["minimal"]
    );
    let l: c::ListUsersResponse =
        u(&b, c::users_methods::LIST, &c::ListUsersRequest::default()).unwrap();
    assert_eq!(l.users.len(), 1, "only B's owner");
    let l: c::ListApiKeysResponse = u(
        &b,
        c::api_keys_methods::LIST,
        &c::ListApiKeysRequest::default(),
    )
    .unwrap();
    assert!(l.keys.iter().all(|k| k.team_id == team_b));
    let l: c::ListAuditLogsResponse = u(
        &b,
        c::audit_logs_methods::LIST,
        &c::ListAuditLogsRequest::default(),
    )
    .unwrap();
    assert!(l.entries.iter().all(|e| e.team_id == team_b), "{l:?}");
    let l: c::ListMembersResponse = u(
        &b,
        c::teams_methods::LIST_MEMBERS,
        &c::ListMembersRequest::default(),
    )
    .unwrap();
    assert_eq!(l.members.len(), 1);

    // Every call naming A's resources: not_found.
    let nf =
        |r: Result<(), proto::Status>, what: &str| assert_eq!(code(r), Code::NotFound, "{what}");
    let ok = |_: ()| ();
    let s = sid.clone();
    nf(
        u::<_, c::Sandbox>(
            &b,
            c::sandboxes_methods::GET,
            &c::GetSandboxRequest {
                sandbox_id: s.clone(),
            },
        )
        .map(|_| ok(())),
        "get",
    );
    nf(
        u::<_, c::DestroySandboxResponse>(
            &b,
            c::sandboxes_methods::DESTROY,
            &c::DestroySandboxRequest {
                sandbox_id: s.clone(),
                force: false,
            },
        )
        .map(|_| ()),
        "destroy",
    );
    nf(
        u::<_, c::Sandbox>(
            &b,
            c::sandboxes_methods::PING,
            &c::PingSandboxRequest {
                sandbox_id: s.clone(),
            },
        )
        .map(|_| ()),
        "ping",
    );
    nf(
        u::<_, c::Sandbox>(
            &b,
            c::sandboxes_methods::SET_TIMEOUT,
            &c::SetTimeoutRequest {
                sandbox_id: s.clone(),
                timeout_s: 5,
                on_timeout: 0,
            },
        )
        .map(|_| ()),
        "set_timeout",
    );
    nf(
        u::<_, c::Sandbox>(
            &b,
            c::sandboxes_methods::PAUSE,
            &c::PauseSandboxRequest {
                sandbox_id: s.clone(),
            },
        )
        .map(|_| ()),
        "pause",
    );
    nf(
        u::<_, c::Sandbox>(
            &b,
            c::sandboxes_methods::RESUME,
            &c::ResumeSandboxRequest {
                sandbox_id: sb2.id.clone(),
                timeout_s: 0,
            },
        )
        .map(|_| ()),
        "resume",
    );
    let pc = Some(envd::ProcessConfig {
        cmd: "echo".into(),
        ..Default::default()
    });
    nf(
        u::<_, c::ExecResponse>(
            &b,
            c::processes_methods::EXEC,
            &c::ExecRequest {
                sandbox_id: s.clone(),
                process: pc.clone(),
                ..Default::default()
            },
        )
        .map(|_| ()),
        "exec",
    );
    nf(
        u::<_, envd::SignalResponse>(
            &b,
            c::processes_methods::SIGNAL,
            &c::SignalRequest {
                sandbox_id: s.clone(),
                signal: None,
            },
        )
        .map(|_| ()),
        "signal",
    );
    nf(
        u::<_, envd::CloseStdinResponse>(
            &b,
            c::processes_methods::CLOSE_STDIN,
            &c::CloseStdinRequest {
                sandbox_id: s.clone(),
                close: None,
            },
        )
        .map(|_| ()),
        "close_stdin",
    );
    nf(
        u::<_, envd::ResizePtyResponse>(
            &b,
            c::processes_methods::RESIZE_PTY,
            &c::ResizePtyRequest {
                sandbox_id: s.clone(),
                resize: None,
            },
        )
        .map(|_| ()),
        "resize",
    );
    nf(
        u::<_, envd::ListProcessesResponse>(
            &b,
            c::processes_methods::LIST,
            &c::ListProcessesRequest {
                sandbox_id: s.clone(),
            },
        )
        .map(|_| ()),
        "processes",
    );
    nf(
        u::<_, envd::StatResponse>(
            &b,
            c::files_methods::STAT,
            &c::StatRequest {
                sandbox_id: s.clone(),
                stat: None,
            },
        )
        .map(|_| ()),
        "stat",
    );
    nf(
        u::<_, envd::MakeDirResponse>(
            &b,
            c::files_methods::MAKE_DIR,
            &c::MakeDirRequest {
                sandbox_id: s.clone(),
                make_dir: None,
            },
        )
        .map(|_| ()),
        "mkdir",
    );
    nf(
        u::<_, envd::MoveResponse>(
            &b,
            c::files_methods::MOVE,
            &c::MoveRequest {
                sandbox_id: s.clone(),
                r#move: None,
            },
        )
        .map(|_| ()),
        "move",
    );
    nf(
        u::<_, envd::RemoveResponse>(
            &b,
            c::files_methods::REMOVE,
            &c::RemoveRequest {
                sandbox_id: s.clone(),
                remove: None,
            },
        )
        .map(|_| ()),
        "remove",
    );
    let stream_nf = |m: &str,
                     req: &dyn Fn(&Client) -> Result<proto::rpc::ClientStream, proto::Status>,
                     what: &str| {
        let _ = m;
        let r = req(&b).and_then(|mut st| st.recv::<envd::ProcessEvent>().map(|_| ()));
        assert_eq!(code(r), Code::NotFound, "{what}");
    };
    stream_nf(
        "",
        &|cl| {
            cl.call(
                c::processes_methods::EXEC_STREAM,
                &c::ExecStreamRequest {
                    sandbox_id: sid.clone(),
                    process: pc.clone(),
                },
                CallOpts {
                    timeout: T,
                    end_stream: true,
                },
            )
        },
        "exec_stream",
    );
    stream_nf(
        "",
        &|cl| {
            cl.call(
                c::files_methods::DOWNLOAD,
                &c::DownloadRequest {
                    sandbox_id: sid.clone(),
                    read: Some(Default::default()),
                },
                CallOpts {
                    timeout: T,
                    end_stream: true,
                },
            )
        },
        "download",
    );
    stream_nf(
        "",
        &|cl| {
            cl.call(
                c::files_methods::LIST,
                &c::ListDirRequest {
                    sandbox_id: sid.clone(),
                    list: None,
                },
                CallOpts {
                    timeout: T,
                    end_stream: true,
                },
            )
        },
        "list_dir",
    );
    let r = b
        .call(
            c::files_methods::UPLOAD,
            &c::UploadRequest {
                msg: Some(c::upload_request::Msg::Header(c::UploadHeader {
                    sandbox_id: sid.clone(),
                    file: Some(Default::default()),
                })),
            },
            CallOpts {
                timeout: T,
                end_stream: false,
            },
        )
        .and_then(|mut st| {
            st.close_send()?;
            st.recv::<envd::WriteResponse>().map(|_| ())
        });
    assert_eq!(code(r), Code::NotFound, "upload");
    nf(
        u::<_, c::Template>(
            &b,
            c::templates_methods::GET,
            &c::GetTemplateRequest {
                template: tpl.id.clone(),
            },
        )
        .map(|_| ()),
        "template get by id",
    );
    nf(
        u::<_, c::Template>(
            &b,
            c::templates_methods::GET,
            &c::GetTemplateRequest {
                template: "a-tpl".into(),
            },
        )
        .map(|_| ()),
        "template get by name",
    );
    nf(
        u::<_, c::Sandbox>(
            &b,
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                template: tpl.id.clone(),
                ..Default::default()
            },
        )
        .map(|_| ()),
        "create from A's template",
    );
    nf(
        u::<_, c::DeleteTemplateResponse>(
            &b,
            c::templates_methods::DELETE,
            &c::DeleteTemplateRequest {
                template_id: tpl.id.clone(),
            },
        )
        .map(|_| ()),
        "template delete",
    );
    nf(
        u::<_, c::Template>(
            &b,
            c::templates_methods::CREATE,
            &c::CreateTemplateRequest {
                sandbox_id: s.clone(),
                name: "steal".into(),
                platform: false,
            },
        )
        .map(|_| ()),
        "template from A's sandbox",
    );
    nf(
        u::<_, c::User>(
            &b,
            c::users_methods::GET,
            &c::GetUserRequest {
                user_id: user.id.clone(),
            },
        )
        .map(|_| ()),
        "user get",
    );
    nf(
        u::<_, c::RevokeApiKeyResponse>(
            &b,
            c::api_keys_methods::REVOKE,
            &c::RevokeApiKeyRequest {
                key_id: key_id.clone(),
            },
        )
        .map(|_| ()),
        "key revoke",
    );
    nf(
        u::<_, c::Team>(
            &b,
            c::teams_methods::GET,
            &c::GetTeamRequest {
                team_id: ctl.team_id.clone(),
            },
        )
        .map(|_| ()),
        "team get",
    );
    nf(
        u::<_, c::Member>(
            &b,
            c::teams_methods::ADD_MEMBER,
            &c::AddMemberRequest {
                team_id: ctl.team_id.clone(),
                user_id: user.id.clone(),
                role: 0,
            },
        )
        .map(|_| ()),
        "add member to A",
    );
    nf(
        u::<_, c::RemoveMemberResponse>(
            &b,
            c::teams_methods::REMOVE_MEMBER,
            &c::RemoveMemberRequest {
                team_id: ctl.team_id.clone(),
                user_id: ctl.user_id.clone(),
            },
        )
        .map(|_| ()),
        "remove member of A",
    );
    nf(
        u::<_, c::ListMembersResponse>(
            &b,
            c::teams_methods::LIST_MEMBERS,
            &c::ListMembersRequest {
                team_id: ctl.team_id.clone(),
                ..Default::default()
            },
        )
        .map(|_| ()),
        "list A's members",
    );
    // Hosts are platform-admin only.
    let r =
        u::<_, c::ListHostsResponse>(&b, c::hosts_methods::LIST, &c::ListHostsRequest::default());
    assert_eq!(code(r), Code::PermissionDenied);

    // Nothing of A changed.
    let g: c::Sandbox = u(
        &a,
        c::sandboxes_methods::GET,
        &c::GetSandboxRequest {
            sandbox_id: sid.clone(),
        },
    )
    .unwrap();
    assert_eq!(g.state, c::SandboxState::Running as i32);
    assert_eq!(g.timeout_s, sb.timeout_s);
    let _: c::Template = u(
        &a,
        c::templates_methods::GET,
        &c::GetTemplateRequest {
            template: tpl.id.clone(),
        },
    )
    .unwrap();
    let _: c::Team = ctl
        .client(&key.plaintext)
        .unary(c::teams_methods::GET, &c::GetTeamRequest::default(), T)
        .unwrap();
    let lm: c::ListMembersResponse = u(
        &a,
        c::teams_methods::LIST_MEMBERS,
        &c::ListMembersRequest::default(),
    )
    .unwrap();
    assert_eq!(lm.members.len(), 2);
    // And the platform admin does see team A.
    let t: c::Team = u(
        &ctl.admin(),
        c::teams_methods::GET,
        &c::GetTeamRequest {
            team_id: ctl.team_id.clone(),
        },
    )
    .unwrap();
    assert_eq!(t.name, "team-a");
}

//! Every wrenn.ctl.v1 endpoint over the protobuf transport: success and error paths.

use std::collections::HashMap;
use std::time::Duration;

use proto::gen::wrenn::ctl::v1 as c;
use proto::gen::wrenn::envd::v1 as envd;
use proto::rpc::{CallOpts, Client, Credential};
use proto::Code;

use crate::harness::{code, connect, Ctl};

const T: Option<Duration> = Some(Duration::from_secs(30));

fn create(cl: &Client, tpl: &str) -> Result<c::Sandbox, proto::Status> {
    cl.unary(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            template: tpl.into(),
            ..Default::default()
        },
        T,
    )
}

fn get(cl: &Client, id: &str) -> Result<c::Sandbox, proto::Status> {
    cl.unary(
        c::sandboxes_methods::GET,
        &c::GetSandboxRequest {
            sandbox_id: id.into(),
        },
        T,
    )
}

fn state(s: c::SandboxState) -> i32 {
    s as i32
}

#[test]
fn hello_and_auth() {
    let Some(ctl) = Ctl::start() else { return };
    // Unknown key, malformed key, other credential kinds: unauthenticated at hello.
    for cred in [
        Credential::api_key(format!("wrn_{}", "0".repeat(64))),
        Credential::api_key("nope"),
        Credential::none(),
        Credential::agent_token("x"),
        Credential::host_token("wrh_bad"),
    ] {
        let r = connect(ctl.addr(), cred).and_then(|cl| {
            cl.unary::<_, c::Team>(c::teams_methods::GET, &c::GetTeamRequest::default(), T)
        });
        assert_eq!(code(r), Code::Unauthenticated);
    }
    // A good key works; a host-facing method with an API key is refused.
    let cl = ctl.team();
    let team: c::Team = cl
        .unary(c::teams_methods::GET, &c::GetTeamRequest::default(), T)
        .unwrap();
    assert_eq!(team.id, ctl.team_id);
    assert!(!team.platform);
    let r = cl.unary::<_, c::Team>(
        "wrenn.host.v1.Host/Heartbeat",
        &c::GetTeamRequest::default(),
        T,
    );
    assert_eq!(code(r), Code::PermissionDenied);
    let r = cl.unary::<_, c::Team>("wrenn.ctl.v1.Teams/Nope", &c::GetTeamRequest::default(), T);
    assert_eq!(code(r), Code::Unimplemented);
    // A registering connection may only Register.
    let reg = connect(ctl.host_addr(), Credential::host_token("")).unwrap();
    let r = reg.unary::<_, proto::gen::wrenn::host::v1::HeartbeatResponse>(
        proto::gen::wrenn::host::v1::host_methods::HEARTBEAT,
        &proto::gen::wrenn::host::v1::HeartbeatRequest::default(),
        T,
    );
    assert_eq!(code(r), Code::PermissionDenied);
    // The pool's connections carry server-side statement and lock timeouts.
    let v: String = ctl
        .api()
        .db()
        .run(|c| {
            Ok(c.query_one("SHOW statement_timeout", &[])
                .map_err(ctl::db::pg_err)?
                .get(0))
        })
        .unwrap();
    assert_eq!(v, "25s");
    // last_used is written in batches off the request path.
    ctl.api().flush_last_used().unwrap();
    let keys: c::ListApiKeysResponse = cl
        .unary(
            c::api_keys_methods::LIST,
            &c::ListApiKeysRequest::default(),
            T,
        )
        .unwrap();
    assert!(
        keys.keys.iter().all(|k| k.last_used_unix_ns > 0),
        "{keys:?}"
    );
}

#[test]
fn create_names_why_no_host_can_run_sandboxes() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let missing = "firecracker not found at /nowhere/firecracker (set WRENN_FIRECRACKER)";
    let (_fa, host_id) = ctl.add_host_with(8, 8192, 100_000, vec![missing.into()]);
    let e = create(&cl, "").unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e}");
    assert!(
        e.message.contains(missing) && e.message.contains(&host_id),
        "{e}"
    );
}

/// A create waits for one WAL flush, the reservation's: the running mark relaxes
/// `synchronous_commit` for its own transaction (the reconciler re-derives `running` from the
/// agent after a PostgreSQL crash; `ctl::service::sandboxes::running_sql`), and for nothing
/// else on the connection.
#[test]
fn the_running_mark_alone_commits_without_waiting_for_its_flush() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let _host = ctl.add_host(8, 8192, 100_000);
    let sb = create(&cl, "").unwrap();
    let id = proto::id::parse(proto::id::Kind::Sandbox, &sb.id).unwrap();
    let mut pg = postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap();
    // The test cluster runs with synchronous_commit off; this session turns it on, as a
    // production cluster has it.
    pg.batch_execute("SET synchronous_commit = on").unwrap();
    pg.execute(
        "UPDATE sandboxes SET state = 'starting' WHERE id = $1",
        &[&id],
    )
    .unwrap();
    let setting = |c: &mut postgres::Transaction<'_>| -> String {
        c.query_one("SELECT current_setting('synchronous_commit')", &[])
            .unwrap()
            .get(0)
    };
    let mut tx = pg.transaction().unwrap();
    // The reservation statement leaves the session's durability alone.
    assert!(!ctl::service::sandboxes::create_sql(false).contains("synchronous_commit"));
    assert_eq!(setting(&mut tx), "on");
    let exp = std::time::SystemTime::now() + Duration::from_secs(60);
    let row = tx
        .query_opt(&*ctl::service::sandboxes::running_sql(), &[&id, &exp])
        .unwrap();
    assert!(row.is_some(), "the starting row was not marked running");
    assert_eq!(
        setting(&mut tx),
        "off",
        "the running mark did not relax its commit"
    );
    tx.commit().unwrap();
    let after: String = pg
        .query_one("SELECT current_setting('synchronous_commit')", &[])
        .unwrap()
        .get(0);
    assert_eq!(after, "on", "the relaxed commit leaked into the session");
    assert_eq!(
        get(&cl, &sb.id).unwrap().state,
        state(c::SandboxState::Running)
    );
}

#[test]
fn sandbox_lifecycle() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    // No host yet: said as such (not capacity).
    assert_eq!(code(create(&cl, "")), Code::FailedPrecondition);
    let (fa, host_id) = ctl.add_host(8, 8192, 100_000);

    let mut meta = HashMap::new();
    meta.insert("env".to_owned(), "test".to_owned());
    let sb: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                metadata: meta.clone(),
                timeout_s: 60,
                on_timeout: c::TimeoutPolicy::Pause as i32,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(sb.state, state(c::SandboxState::Running));
    assert_eq!(sb.host_id, host_id);
    assert_eq!(sb.template_id, "tpl-00000000-0000-0000-0000-000000000000");
    assert_eq!((sb.vcpus, sb.memory_mib, sb.disk_mib), (1, 512, 5120));
    assert_eq!(sb.timeout_s, 60);
    assert_eq!(sb.on_timeout, c::TimeoutPolicy::Pause as i32);
    assert_eq!(sb.metadata, meta);
    assert!(sb.expires_unix_ns > 0);
    assert_eq!(fa.sandbox_state(&sb.id), Some(3));

    // Get / List with filters and pages.
    assert_eq!(get(&cl, &sb.id).unwrap().id, sb.id);
    let sb2: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                template: "minimal".into(),
                vcpus: 2,
                memory_mib: 1024,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!((sb2.vcpus, sb2.memory_mib), (2, 1024));
    let l: c::ListSandboxesResponse = cl
        .unary(
            c::sandboxes_methods::LIST,
            &c::ListSandboxesRequest {
                page_size: 1,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(l.sandboxes.len(), 1);
    assert_eq!(l.sandboxes[0].id, sb2.id, "newest first");
    assert!(!l.next_page_token.is_empty());
    let l2: c::ListSandboxesResponse = cl
        .unary(
            c::sandboxes_methods::LIST,
            &c::ListSandboxesRequest {
                page_size: 1,
                page_token: l.next_page_token.clone(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(l2.sandboxes[0].id, sb.id);
    assert!(l2.next_page_token.is_empty());
    let lm: c::ListSandboxesResponse = cl
        .unary(
            c::sandboxes_methods::LIST,
            &c::ListSandboxesRequest {
                metadata: meta.clone(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(
        lm.sandboxes
            .iter()
            .map(|s| s.id.clone())
            .collect::<Vec<_>>(),
        vec![sb.id.clone()]
    );
    let r = cl.unary::<_, c::ListSandboxesResponse>(
        c::sandboxes_methods::LIST,
        &c::ListSandboxesRequest {
            page_token: "garbage".into(),
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
    let r = cl.unary::<_, c::ListSandboxesResponse>(
        c::sandboxes_methods::LIST,
        &c::ListSandboxesRequest {
            states: vec![42],
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);

    // Ping, set timeout.
    let p: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::PING,
            &c::PingSandboxRequest {
                sandbox_id: sb.id.clone(),
            },
            T,
        )
        .unwrap();
    assert!(p.expires_unix_ns >= sb.expires_unix_ns);
    let st: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::SET_TIMEOUT,
            &c::SetTimeoutRequest {
                sandbox_id: sb.id.clone(),
                timeout_s: 120,
                on_timeout: c::TimeoutPolicy::Destroy as i32,
            },
            T,
        )
        .unwrap();
    assert_eq!(
        (st.timeout_s, st.on_timeout),
        (120, c::TimeoutPolicy::Destroy as i32)
    );
    let r = cl.unary::<_, c::Sandbox>(
        c::sandboxes_methods::SET_TIMEOUT,
        &c::SetTimeoutRequest {
            sandbox_id: sb.id.clone(),
            timeout_s: 0,
            on_timeout: 0,
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);

    // Pause / resume, wrong-state errors.
    let paused: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::PAUSE,
            &c::PauseSandboxRequest {
                sandbox_id: sb.id.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(paused.state, state(c::SandboxState::Paused));
    assert_eq!(paused.expires_unix_ns, 0);
    let r = cl.unary::<_, c::Sandbox>(
        c::sandboxes_methods::PAUSE,
        &c::PauseSandboxRequest {
            sandbox_id: sb.id.clone(),
        },
        T,
    );
    assert_eq!(code(r), Code::FailedPrecondition);
    let r = cl.unary::<_, c::ExecResponse>(
        c::processes_methods::EXEC,
        &c::ExecRequest {
            sandbox_id: sb.id.clone(),
            process: Some(envd::ProcessConfig {
                cmd: "echo".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        T,
    );
    assert_eq!(
        code(r),
        Code::FailedPrecondition,
        "exec in a paused sandbox"
    );
    let resumed: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::RESUME,
            &c::ResumeSandboxRequest {
                sandbox_id: sb.id.clone(),
                timeout_s: 30,
            },
            T,
        )
        .unwrap();
    assert_eq!(resumed.state, state(c::SandboxState::Running));
    assert_eq!(resumed.timeout_s, 30);
    // A timeout set while paused reaches the agent at resume.
    let _: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::PAUSE,
            &c::PauseSandboxRequest {
                sandbox_id: sb.id.clone(),
            },
            T,
        )
        .unwrap();
    let p: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::SET_TIMEOUT,
            &c::SetTimeoutRequest {
                sandbox_id: sb.id.clone(),
                timeout_s: 77,
                on_timeout: 0,
            },
            T,
        )
        .unwrap();
    assert_eq!((p.state, p.timeout_s), (state(c::SandboxState::Paused), 77));
    let r: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::RESUME,
            &c::ResumeSandboxRequest {
                sandbox_id: sb.id.clone(),
                timeout_s: 0,
            },
            T,
        )
        .unwrap();
    assert_eq!(r.timeout_s, 77);
    assert_eq!(fa.state.lock().unwrap().sandboxes[&sb.id].timeout_s, 77);
    let r = cl.unary::<_, c::Sandbox>(
        c::sandboxes_methods::RESUME,
        &c::ResumeSandboxRequest {
            sandbox_id: sb.id.clone(),
            timeout_s: 0,
        },
        T,
    );
    assert_eq!(code(r), Code::FailedPrecondition);

    // Capacity is held while running, released on destroy.
    let h: c::Host = ctl
        .admin()
        .unary(
            c::hosts_methods::GET,
            &c::GetHostRequest {
                host_id: host_id.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(h.usage.as_ref().unwrap().vcpus, 3);
    assert_eq!(h.sandbox_count, 2);

    // Destroy (idempotent), then gone from the default listing.
    let _: c::DestroySandboxResponse = cl
        .unary(
            c::sandboxes_methods::DESTROY,
            &c::DestroySandboxRequest {
                sandbox_id: sb.id.clone(),
                force: false,
            },
            T,
        )
        .unwrap();
    let _: c::DestroySandboxResponse = cl
        .unary(
            c::sandboxes_methods::DESTROY,
            &c::DestroySandboxRequest {
                sandbox_id: sb.id.clone(),
                force: false,
            },
            T,
        )
        .unwrap();
    assert_eq!(
        get(&cl, &sb.id).unwrap().state,
        state(c::SandboxState::Stopped)
    );
    assert_eq!(fa.sandbox_state(&sb.id), None);
    let l: c::ListSandboxesResponse = cl
        .unary(
            c::sandboxes_methods::LIST,
            &c::ListSandboxesRequest::default(),
            T,
        )
        .unwrap();
    assert_eq!(l.sandboxes.len(), 1);
    let h: c::Host = ctl
        .admin()
        .unary(
            c::hosts_methods::GET,
            &c::GetHostRequest {
                host_id: host_id.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(h.usage.as_ref().unwrap().vcpus, 2);

    // Bad ids everywhere: invalid_argument; unknown: not_found.
    for bad in [
        "",
        "sb-",
        "sb-ABC",
        "tpl-00000000-0000-0000-0000-000000000000",
        "sb-00000000-0000-0000-0000-00000000000Z",
        &"x".repeat(5000),
    ] {
        assert_eq!(code(get(&cl, bad)), Code::InvalidArgument, "{bad:?}");
    }
    assert_eq!(
        code(get(&cl, "sb-00000000-0000-4000-8000-000000000000")),
        Code::NotFound
    );

    // Create errors: unknown template, out-of-range values, agent failure → error state.
    assert_eq!(code(create(&cl, "no-such-template")), Code::NotFound);
    assert_eq!(
        code(create(&cl, "tpl-00000000-0000-4000-8000-000000000009")),
        Code::NotFound
    );
    assert_eq!(code(create(&cl, "tpl-BAD")), Code::InvalidArgument);
    let r = cl.unary::<_, c::Sandbox>(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            vcpus: 10_000,
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
    let r = cl.unary::<_, c::Sandbox>(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            vcpus: 16,
            ..Default::default()
        },
        T,
    );
    assert_eq!(
        code(r),
        Code::ResourceExhausted,
        "more vcpus than the host has"
    );
    let r = cl.unary::<_, c::Sandbox>(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            on_timeout: 7,
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
    fa.state.lock().unwrap().fail_create = Some(proto::Status::unavailable("no kvm"));
    assert_eq!(code(create(&cl, "")), Code::Unavailable);
    let l: c::ListSandboxesResponse = cl
        .unary(
            c::sandboxes_methods::LIST,
            &c::ListSandboxesRequest {
                states: vec![state(c::SandboxState::Error)],
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(l.sandboxes.len(), 1);
    assert!(l.sandboxes[0].state_reason.contains("no kvm"));
    fa.state.lock().unwrap().fail_create = None;
    let h: c::Host = ctl
        .admin()
        .unary(
            c::hosts_methods::GET,
            &c::GetHostRequest {
                host_id: host_id.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(
        h.usage.as_ref().unwrap().vcpus,
        2,
        "a failed create holds nothing"
    );

    // wait = false answers STARTING at once; the create finishes in the background.
    fa.state.lock().unwrap().create_delay = Duration::from_millis(300);
    let s: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                wait: Some(false),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(s.state, state(c::SandboxState::Starting));
    let mut ok = false;
    for _ in 0..100 {
        if get(&cl, &s.id).unwrap().state == state(c::SandboxState::Running) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ok, "background create finished");
}

#[test]
fn processes_and_files() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (fa, _host) = ctl.add_host(4, 4096, 100_000);
    let sb = create(&cl, "").unwrap();
    let cfg = |cmd: &str, args: &[&str]| envd::ProcessConfig {
        cmd: cmd.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };

    let r: c::ExecResponse = cl
        .unary(
            c::processes_methods::EXEC,
            &c::ExecRequest {
                sandbox_id: sb.id.clone(),
                process: Some(cfg("echo", &["hi", "there"])),
                stdin: b"!".to_vec().into(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(&r.stdout[..], b"hi there!");
    assert_eq!(
        r.exited.unwrap().status,
        Some(envd::process_exited::Status::ExitCode(0))
    );
    let r: c::ExecResponse = cl
        .unary(
            c::processes_methods::EXEC,
            &c::ExecRequest {
                sandbox_id: sb.id.clone(),
                process: Some(cfg("fail", &[])),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(
        r.exited.unwrap().status,
        Some(envd::process_exited::Status::ExitCode(3))
    );
    let r: c::ExecResponse = cl
        .unary(
            c::processes_methods::EXEC,
            &c::ExecRequest {
                sandbox_id: sb.id.clone(),
                process: Some(envd::ProcessConfig {
                    tag: "bg".into(),
                    ..cfg("echo", &[])
                }),
                background: true,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(r.pid > 0 && r.tag == "bg" && r.exited.is_none());
    let e = cl.unary::<_, c::ExecResponse>(
        c::processes_methods::EXEC,
        &c::ExecRequest {
            sandbox_id: sb.id.clone(),
            process: None,
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(e), Code::InvalidArgument);
    let e = cl.unary::<_, c::ExecResponse>(
        c::processes_methods::EXEC,
        &c::ExecRequest {
            sandbox_id: sb.id.clone(),
            process: Some(cfg("nope", &[])),
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(e), Code::NotFound, "agent errors pass through");

    // Streamed exec: started, output in order, exited.
    let mut s = cl
        .call(
            c::processes_methods::EXEC_STREAM,
            &c::ExecStreamRequest {
                sandbox_id: sb.id.clone(),
                process: Some(cfg("echo", &["a", "b", "c"])),
            },
            CallOpts {
                timeout: T,
                end_stream: true,
            },
        )
        .unwrap();
    let mut events = Vec::new();
    while let Some(ev) = s.recv::<envd::ProcessEvent>().unwrap() {
        events.push(ev.event.unwrap());
    }
    assert!(matches!(events[0], envd::process_event::Event::Started(_)));
    let out: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            envd::process_event::Event::Output(o) => Some(o.data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(out, b"abc");
    assert!(matches!(
        events.last(),
        Some(envd::process_event::Event::Exited(_))
    ));

    // Connect to a missing process: the agent's not_found passes through the stream.
    let mut s = cl
        .call(
            c::processes_methods::CONNECT,
            &c::ConnectRequest {
                sandbox_id: sb.id.clone(),
                connect: None,
            },
            CallOpts {
                timeout: T,
                end_stream: true,
            },
        )
        .unwrap();
    assert_eq!(code(s.recv::<envd::ProcessEvent>()), Code::NotFound);

    // SendInput (client stream), CloseStdin, Signal, ResizePty, List.
    let mut s = cl
        .call(
            c::processes_methods::SEND_INPUT,
            &c::SendInputRequest {
                sandbox_id: sb.id.clone(),
                input: Some(envd::SendInputRequest {
                    data: b"abc".to_vec().into(),
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: T,
                end_stream: false,
            },
        )
        .unwrap();
    s.send(&c::SendInputRequest {
        sandbox_id: String::new(),
        input: Some(envd::SendInputRequest {
            data: b"de".to_vec().into(),
            ..Default::default()
        }),
    })
    .unwrap();
    s.close_send().unwrap();
    let r: envd::SendInputResponse = s.recv().unwrap().unwrap();
    assert_eq!(r.bytes_written, 5);
    let _: envd::CloseStdinResponse = cl
        .unary(
            c::processes_methods::CLOSE_STDIN,
            &c::CloseStdinRequest {
                sandbox_id: sb.id.clone(),
                close: None,
            },
            T,
        )
        .unwrap();
    let _: envd::SignalResponse = cl
        .unary(
            c::processes_methods::SIGNAL,
            &c::SignalRequest {
                sandbox_id: sb.id.clone(),
                signal: None,
            },
            T,
        )
        .unwrap();
    let _: envd::ResizePtyResponse = cl
        .unary(
            c::processes_methods::RESIZE_PTY,
            &c::ResizePtyRequest {
                sandbox_id: sb.id.clone(),
                resize: None,
            },
            T,
        )
        .unwrap();
    let _: envd::ListProcessesResponse = cl
        .unary(
            c::processes_methods::LIST,
            &c::ListProcessesRequest {
                sandbox_id: sb.id.clone(),
            },
            T,
        )
        .unwrap();

    // Files: upload 200 KiB in chunks, stat, list, download, move, remove, mkdir.
    let data: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    let mut up = cl
        .call(
            c::files_methods::UPLOAD,
            &c::UploadRequest {
                msg: Some(c::upload_request::Msg::Header(c::UploadHeader {
                    sandbox_id: sb.id.clone(),
                    file: Some(envd::WriteHeader {
                        path: "/tmp/f".into(),
                        ..Default::default()
                    }),
                })),
            },
            CallOpts {
                timeout: T,
                end_stream: false,
            },
        )
        .unwrap();
    for chunk in data.chunks(proto::limits::CHUNK_LEN) {
        up.send(&c::UploadRequest {
            msg: Some(c::upload_request::Msg::Data(chunk.to_vec().into())),
        })
        .unwrap();
    }
    up.close_send().unwrap();
    let w: envd::WriteResponse = up.recv().unwrap().unwrap();
    assert_eq!(w.bytes_written, data.len() as u64);
    let st: envd::StatResponse = cl
        .unary(
            c::files_methods::STAT,
            &c::StatRequest {
                sandbox_id: sb.id.clone(),
                stat: Some(envd::StatRequest {
                    path: "/tmp/f".into(),
                    ..Default::default()
                }),
            },
            T,
        )
        .unwrap();
    assert_eq!(st.entry.unwrap().size, data.len() as u64);
    let mut dl = cl
        .call(
            c::files_methods::DOWNLOAD,
            &c::DownloadRequest {
                sandbox_id: sb.id.clone(),
                read: Some(envd::ReadRequest {
                    path: "/tmp/f".into(),
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: T,
                end_stream: true,
            },
        )
        .unwrap();
    let mut got = Vec::new();
    let mut first = true;
    let mut crc = None;
    while let Some(m) = dl.recv::<envd::ReadResponse>().unwrap() {
        assert_eq!(m.entry.is_some(), first);
        first = false;
        got.extend_from_slice(&m.data);
        crc = crc.or(m.crc32);
    }
    assert_eq!(got, data);
    assert_eq!(
        crc,
        Some(crc32fast::hash(&data)),
        "envd's checksum reaches the client"
    );

    // End-to-end checksums through ctl: a byte flipped on the way to envd (the fake
    // agent's test hook) fails a checked upload with DATA_LOSS and stores nothing.
    let upload = |path: &str, crc: Option<u32>| -> Result<envd::WriteResponse, proto::Status> {
        let mut up = cl.call(
            c::files_methods::UPLOAD,
            &c::UploadRequest {
                msg: Some(c::upload_request::Msg::Header(c::UploadHeader {
                    sandbox_id: sb.id.clone(),
                    file: Some(envd::WriteHeader {
                        path: path.into(),
                        atomic: true,
                        ..Default::default()
                    }),
                })),
            },
            CallOpts {
                timeout: T,
                end_stream: false,
            },
        )?;
        up.send(&c::UploadRequest {
            msg: Some(c::upload_request::Msg::Data(data.clone().into())),
        })?;
        if let Some(crc) = crc {
            up.send(&c::UploadRequest {
                msg: Some(c::upload_request::Msg::Crc32(crc)),
            })?;
        }
        up.close_send()?;
        Ok(up.recv()?.unwrap())
    };
    upload("/crc/checked", Some(crc32fast::hash(&data))).unwrap();
    fa.state.lock().unwrap().corrupt_files = true;
    let err = upload("/crc/corrupt", Some(crc32fast::hash(&data))).unwrap_err();
    assert_eq!(err.code, Code::DataLoss, "{err}");
    assert!(!fa
        .state
        .lock()
        .unwrap()
        .files
        .keys()
        .any(|(_, p)| p == "/crc/corrupt"));
    // An old client (no checksum) is not checked.
    upload("/crc/unchecked", None).unwrap();
    fa.state.lock().unwrap().corrupt_files = false;
    let mut ls = cl
        .call(
            c::files_methods::LIST,
            &c::ListDirRequest {
                sandbox_id: sb.id.clone(),
                list: Some(envd::ListDirRequest {
                    path: "/tmp".into(),
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: T,
                end_stream: true,
            },
        )
        .unwrap();
    let batch: envd::ListDirResponse = ls.recv().unwrap().unwrap();
    assert_eq!(batch.entries.len(), 1);
    let _: envd::MoveResponse = cl
        .unary(
            c::files_methods::MOVE,
            &c::MoveRequest {
                sandbox_id: sb.id.clone(),
                r#move: Some(envd::MoveRequest {
                    source: "/tmp/f".into(),
                    destination: "/tmp/g".into(),
                    ..Default::default()
                }),
            },
            T,
        )
        .unwrap();
    let _: envd::RemoveResponse = cl
        .unary(
            c::files_methods::REMOVE,
            &c::RemoveRequest {
                sandbox_id: sb.id.clone(),
                remove: Some(envd::RemoveRequest {
                    path: "/tmp/g".into(),
                    ..Default::default()
                }),
            },
            T,
        )
        .unwrap();
    let r = cl.unary::<_, envd::RemoveResponse>(
        c::files_methods::REMOVE,
        &c::RemoveRequest {
            sandbox_id: sb.id.clone(),
            remove: Some(envd::RemoveRequest {
                path: "/tmp/g".into(),
                ..Default::default()
            }),
        },
        T,
    );
    assert_eq!(code(r), Code::NotFound);
    let m: envd::MakeDirResponse = cl
        .unary(
            c::files_methods::MAKE_DIR,
            &c::MakeDirRequest {
                sandbox_id: sb.id.clone(),
                make_dir: Some(envd::MakeDirRequest {
                    path: "/d".into(),
                    ..Default::default()
                }),
            },
            T,
        )
        .unwrap();
    assert!(m.created);
    // Calls that change the sandbox's contents are audited with their outcome.
    let a: c::ListAuditLogsResponse = cl
        .unary(
            c::audit_logs_methods::LIST,
            &c::ListAuditLogsRequest {
                resource_id: sb.id.clone(),
                page_size: 1000,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    let count = |action: &str, status: &str| {
        a.entries
            .iter()
            .filter(|e| e.action == action && e.status == status)
            .count()
    };
    assert_eq!(count("sandbox.exec", "success"), 3, "{a:?}");
    assert_eq!(count("sandbox.exec", "failure"), 1, "the unknown command");
    assert_eq!(count("sandbox.exec_stream", "success"), 1);
    // The first upload, the checked one and the unchecked one; the corrupted one failed.
    assert_eq!(count("sandbox.upload", "success"), 3);
    assert_eq!(count("sandbox.upload", "failure"), 1);
    assert_eq!(count("sandbox.move", "success"), 1);
    assert_eq!(count("sandbox.remove", "success"), 1);
    assert_eq!(count("sandbox.remove", "failure"), 1);
    assert_eq!(count("sandbox.make_dir", "success"), 1);
    assert_eq!(count("sandbox.signal", "success"), 1);
    // An upload whose first message is data is refused.
    let mut up = cl
        .call(
            c::files_methods::UPLOAD,
            &c::UploadRequest {
                msg: Some(c::upload_request::Msg::Data(b"x".to_vec().into())),
            },
            CallOpts {
                timeout: T,
                end_stream: false,
            },
        )
        .unwrap();
    up.close_send().unwrap();
    assert_eq!(
        code(up.recv::<envd::WriteResponse>()),
        Code::InvalidArgument
    );
}

#[test]
fn templates_teams_users_keys_hosts_audit() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let admin = ctl.admin();
    let (fa, host_id) = ctl.add_host(8, 8192, 100_000);
    let sb = create(&cl, "").unwrap();

    // Templates: create from a sandbox (it ends paused), list (team + platform), get by
    // name, snapshot create pinned to its host, delete; platform ones refused.
    let t: c::Template = cl
        .unary(
            c::templates_methods::CREATE,
            &c::CreateTemplateRequest {
                sandbox_id: sb.id.clone(),
                name: "mine".into(),
                platform: false,
            },
            T,
        )
        .unwrap();
    assert_eq!(t.kind, c::TemplateKind::Snapshot as i32);
    assert_eq!(t.host_id, host_id);
    assert_eq!(t.source_sandbox_id, sb.id);
    assert_eq!(
        get(&cl, &sb.id).unwrap().state,
        state(c::SandboxState::Paused)
    );
    let r = cl.unary::<_, c::Template>(
        c::templates_methods::CREATE,
        &c::CreateTemplateRequest {
            sandbox_id: sb.id.clone(),
            name: "mine".into(),
            platform: false,
        },
        T,
    );
    assert_eq!(code(r), Code::AlreadyExists);
    let r = cl.unary::<_, c::Template>(
        c::templates_methods::CREATE,
        &c::CreateTemplateRequest {
            sandbox_id: sb.id.clone(),
            name: "p".into(),
            platform: true,
        },
        T,
    );
    assert_eq!(code(r), Code::PermissionDenied);
    let r = cl.unary::<_, c::Template>(
        c::templates_methods::CREATE,
        &c::CreateTemplateRequest {
            sandbox_id: sb.id.clone(),
            name: "".into(),
            platform: false,
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
    let l: c::ListTemplatesResponse = cl
        .unary(
            c::templates_methods::LIST,
            &c::ListTemplatesRequest::default(),
            T,
        )
        .unwrap();
    assert_eq!(
        l.templates
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        vec!["mine", "minimal"],
        "team first, then platform"
    );
    let l1: c::ListTemplatesResponse = cl
        .unary(
            c::templates_methods::LIST,
            &c::ListTemplatesRequest {
                page_size: 1,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    let l2: c::ListTemplatesResponse = cl
        .unary(
            c::templates_methods::LIST,
            &c::ListTemplatesRequest {
                page_size: 1,
                page_token: l1.next_page_token.clone(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(
        (l1.templates[0].name.as_str(), l2.templates[0].name.as_str()),
        ("mine", "minimal")
    );
    let lt: c::ListTemplatesResponse = cl
        .unary(
            c::templates_methods::LIST,
            &c::ListTemplatesRequest {
                team_only: true,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(lt.templates.len(), 1);
    let g: c::Template = cl
        .unary(
            c::templates_methods::GET,
            &c::GetTemplateRequest {
                template: "minimal".into(),
            },
            T,
        )
        .unwrap();
    assert!(g.platform);
    let from_snap = create(&cl, "mine").unwrap();
    assert_eq!(
        from_snap.host_id, host_id,
        "a snapshot template starts on its host"
    );
    assert_eq!(from_snap.template_id, t.id);
    let r = cl.unary::<_, c::DeleteTemplateResponse>(
        c::templates_methods::DELETE,
        &c::DeleteTemplateRequest {
            template_id: g.id.clone(),
        },
        T,
    );
    assert_eq!(code(r), Code::PermissionDenied);
    let _: c::DeleteTemplateResponse = cl
        .unary(
            c::templates_methods::DELETE,
            &c::DeleteTemplateRequest {
                template_id: t.id.clone(),
            },
            T,
        )
        .unwrap();
    assert!(fa.state.lock().unwrap().templates.is_empty());
    let r = cl.unary::<_, c::Template>(
        c::templates_methods::GET,
        &c::GetTemplateRequest {
            template: t.id.clone(),
        },
        T,
    );
    assert_eq!(code(r), Code::NotFound);

    // Users and members.
    let u: c::User = cl
        .unary(
            c::users_methods::CREATE,
            &c::CreateUserRequest {
                email: "b@example.com".into(),
                name: "Bob".into(),
                role: 0,
            },
            T,
        )
        .unwrap();
    let r = cl.unary::<_, c::User>(
        c::users_methods::CREATE,
        &c::CreateUserRequest {
            email: "b@example.com".into(),
            name: "B".into(),
            role: 0,
        },
        T,
    );
    assert_eq!(code(r), Code::AlreadyExists);
    let r = cl.unary::<_, c::User>(
        c::users_methods::CREATE,
        &c::CreateUserRequest {
            email: "no-at".into(),
            name: "B".into(),
            role: 0,
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
    let g: c::User = cl
        .unary(
            c::users_methods::GET,
            &c::GetUserRequest {
                user_id: u.id.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(g.email, "b@example.com");
    let lu: c::ListUsersResponse = cl
        .unary(c::users_methods::LIST, &c::ListUsersRequest::default(), T)
        .unwrap();
    assert_eq!(lu.users.len(), 2);
    let lm: c::ListMembersResponse = cl
        .unary(
            c::teams_methods::LIST_MEMBERS,
            &c::ListMembersRequest::default(),
            T,
        )
        .unwrap();
    assert_eq!(lm.members.len(), 2);
    let r = cl.unary::<_, c::Member>(
        c::teams_methods::ADD_MEMBER,
        &c::AddMemberRequest {
            team_id: String::new(),
            user_id: u.id.clone(),
            role: 0,
        },
        T,
    );
    assert_eq!(code(r), Code::AlreadyExists);
    let r = cl.unary::<_, c::RemoveMemberResponse>(
        c::teams_methods::REMOVE_MEMBER,
        &c::RemoveMemberRequest {
            team_id: String::new(),
            user_id: ctl.user_id.clone(),
        },
        T,
    );
    assert_eq!(code(r), Code::FailedPrecondition, "last owner");
    let _: c::RemoveMemberResponse = cl
        .unary(
            c::teams_methods::REMOVE_MEMBER,
            &c::RemoveMemberRequest {
                team_id: String::new(),
                user_id: u.id.clone(),
            },
            T,
        )
        .unwrap();
    let m: c::Member = cl
        .unary(
            c::teams_methods::ADD_MEMBER,
            &c::AddMemberRequest {
                team_id: String::new(),
                user_id: u.id.clone(),
                role: c::TeamRole::Admin as i32,
            },
            T,
        )
        .unwrap();
    assert_eq!(m.role, c::TeamRole::Admin as i32);

    // API keys: create (plaintext once, it works), list, revoke (then unauthenticated).
    let k: c::CreateApiKeyResponse = cl
        .unary(
            c::api_keys_methods::CREATE,
            &c::CreateApiKeyRequest {
                name: "ci".into(),
                platform_admin: false,
            },
            T,
        )
        .unwrap();
    assert!(k.plaintext.starts_with("wrn_"));
    assert!(k.plaintext.starts_with(&k.key.as_ref().unwrap().prefix));
    let r = cl.unary::<_, c::CreateApiKeyResponse>(
        c::api_keys_methods::CREATE,
        &c::CreateApiKeyRequest {
            name: "x".into(),
            platform_admin: true,
        },
        T,
    );
    assert_eq!(code(r), Code::PermissionDenied);
    let other = ctl.client(&k.plaintext);
    let _: c::Team = other
        .unary(c::teams_methods::GET, &c::GetTeamRequest::default(), T)
        .unwrap();
    let open_conn = ctl.client(&k.plaintext);
    let lk: c::ListApiKeysResponse = cl
        .unary(
            c::api_keys_methods::LIST,
            &c::ListApiKeysRequest::default(),
            T,
        )
        .unwrap();
    assert_eq!(lk.keys.len(), 2);
    let _: c::RevokeApiKeyResponse = cl
        .unary(
            c::api_keys_methods::REVOKE,
            &c::RevokeApiKeyRequest {
                key_id: k.key.unwrap().id,
            },
            T,
        )
        .unwrap();
    let r = connect(ctl.addr(), Credential::api_key(&k.plaintext)).and_then(|c2| {
        c2.unary::<_, c::Team>(c::teams_methods::GET, &c::GetTeamRequest::default(), T)
    });
    assert_eq!(code(r), Code::Unauthenticated);
    // A connection opened before the revocation stops working at once (same replica).
    let r = open_conn.unary::<_, c::Team>(c::teams_methods::GET, &c::GetTeamRequest::default(), T);
    assert_eq!(code(r), Code::Unauthenticated);

    // Hosts: admin only; list, get, drain (no new sandboxes), delete refused while busy.
    let r = cl.unary::<_, c::ListHostsResponse>(
        c::hosts_methods::LIST,
        &c::ListHostsRequest::default(),
        T,
    );
    assert_eq!(code(r), Code::PermissionDenied);
    let lh: c::ListHostsResponse = admin
        .unary(c::hosts_methods::LIST, &c::ListHostsRequest::default(), T)
        .unwrap();
    assert_eq!(lh.hosts.len(), 1);
    assert_eq!(lh.hosts[0].status, c::HostStatus::Online as i32);
    let d: c::DrainHostResponse = admin
        .unary(
            c::hosts_methods::DRAIN,
            &c::DrainHostRequest {
                host_id: host_id.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(d.host.unwrap().status, c::HostStatus::Draining as i32);
    assert_eq!(d.remaining_sandbox_ids.len(), 2);
    assert_eq!(
        code(create(&cl, "")),
        Code::Unavailable,
        "draining host takes nothing: no host is online"
    );
    let r = admin.unary::<_, c::DeleteHostResponse>(
        c::hosts_methods::DELETE,
        &c::DeleteHostRequest {
            host_id: host_id.clone(),
            force: false,
        },
        T,
    );
    assert_eq!(code(r), Code::FailedPrecondition);
    let r = admin.unary::<_, c::Host>(
        c::hosts_methods::GET,
        &c::GetHostRequest {
            host_id: "host-x".into(),
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
    for id in d.remaining_sandbox_ids {
        let _: c::DestroySandboxResponse = cl
            .unary(
                c::sandboxes_methods::DESTROY,
                &c::DestroySandboxRequest {
                    sandbox_id: id,
                    force: false,
                },
                T,
            )
            .unwrap();
    }
    let _: c::DeleteHostResponse = admin
        .unary(
            c::hosts_methods::DELETE,
            &c::DeleteHostRequest {
                host_id: host_id.clone(),
                force: false,
            },
            T,
        )
        .unwrap();
    let r = admin.unary::<_, c::Host>(
        c::hosts_methods::GET,
        &c::GetHostRequest {
            host_id: host_id.clone(),
        },
        T,
    );
    assert_eq!(code(r), Code::NotFound);
    // A used registration token does not work twice.
    let tok: c::CreateRegistrationTokenResponse = admin
        .unary(
            c::hosts_methods::CREATE_REGISTRATION_TOKEN,
            &c::CreateRegistrationTokenRequest { ttl_s: 0 },
            T,
        )
        .unwrap();
    let reg = |t: &str| {
        let rc = connect(ctl.host_addr(), Credential::host_token("")).unwrap();
        rc.unary::<_, proto::gen::wrenn::host::v1::RegisterResponse>(
            proto::gen::wrenn::host::v1::host_methods::REGISTER,
            &proto::gen::wrenn::host::v1::RegisterRequest {
                registration_token: t.into(),
                agent_address: "127.0.0.1:1".into(),
                capacity: Some(proto::gen::wrenn::agent::v1::Resources {
                    vcpus: 1,
                    memory_mib: 1,
                    disk_mib: 1,
                }),
                ..Default::default()
            },
            T,
        )
    };
    reg(&tok.token).unwrap();
    assert_eq!(code(reg(&tok.token)), Code::Unauthenticated);
    assert_eq!(code(reg("wrr_nope")), Code::Unauthenticated);

    // Audit: every mutating call wrote a row; keyset pages are stable and filters work.
    let a: c::ListAuditLogsResponse = cl
        .unary(
            c::audit_logs_methods::LIST,
            &c::ListAuditLogsRequest {
                action: "sandbox.create".into(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(a.entries.iter().all(|e| e.actor_type == "api_key"));
    assert_eq!(
        a.entries.iter().filter(|e| e.status == "success").count(),
        2
    );
    // The create refused while the host drained is recorded as a failure.
    assert!(a
        .entries
        .iter()
        .any(|e| e.status == "failure" && e.metadata_json.contains("unavailable")));
    let mut all = Vec::new();
    let mut tok = String::new();
    loop {
        let p: c::ListAuditLogsResponse = cl
            .unary(
                c::audit_logs_methods::LIST,
                &c::ListAuditLogsRequest {
                    page_size: 3,
                    page_token: tok.clone(),
                    ..Default::default()
                },
                T,
            )
            .unwrap();
        all.extend(p.entries.into_iter().map(|e| e.id));
        if p.next_page_token.is_empty() {
            break;
        }
        tok = p.next_page_token;
    }
    let mut dedup = all.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), all.len(), "no entry twice across pages");
    assert!(all.len() >= 12, "{}", all.len());
    let r = cl.unary::<_, c::ListAuditLogsResponse>(
        c::audit_logs_methods::LIST,
        &c::ListAuditLogsRequest {
            page_token: "1.x".into(),
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
    // Host-level entries are visible to the platform admin only.
    let ah: c::ListAuditLogsResponse = admin
        .unary(
            c::audit_logs_methods::LIST,
            &c::ListAuditLogsRequest {
                resource_type: "host".into(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(ah.entries.iter().any(|e| e.action == "host.register"));
    let at: c::ListAuditLogsResponse = cl
        .unary(
            c::audit_logs_methods::LIST,
            &c::ListAuditLogsRequest {
                resource_type: "host".into(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(at.entries.is_empty());
}

/// Opens Ports.Connect; returns the stream after `opened`.
fn open_port(cl: &Client, sb: &str, port: u32) -> Result<proto::rpc::ClientStream, proto::Status> {
    let mut s = cl.call(
        c::ports_methods::CONNECT,
        &c::PortConnectRequest {
            kind: Some(c::port_connect_request::Kind::Open(c::PortOpen {
                sandbox_id: sb.into(),
                port,
            })),
        },
        CallOpts {
            timeout: T,
            end_stream: false,
        },
    )?;
    let first: Option<c::PortConnectResponse> = s.recv()?;
    assert_eq!(
        first.and_then(|m| m.kind),
        Some(c::port_connect_response::Kind::Opened(true))
    );
    Ok(s)
}

/// Ports.Connect relays bytes both ways through the sandbox's agent, half-closes, and answers
/// another team's, a paused, an unknown sandbox and envd's port with their errors.
#[test]
fn ports_connect_relays_through_the_agent() {
    use c::port_connect_request::Kind as Up;
    use c::port_connect_response::Kind as Down;
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (_fa, _host) = ctl.add_host(8, 8192, 100_000);
    let sb = create(&cl, "").unwrap();

    let mut s = open_port(&cl, &sb.id, 8080).unwrap();
    let mut echoed = Vec::new();
    for i in 0..50 {
        let chunk = format!("chunk {i} ").repeat(1000);
        s.send(&c::PortConnectRequest {
            kind: Some(Up::Data(chunk.clone().into_bytes().into())),
        })
        .unwrap();
        match s.recv::<c::PortConnectResponse>().unwrap().unwrap().kind {
            Some(Down::Data(d)) => echoed.extend_from_slice(&d),
            other => panic!("{other:?}"),
        }
        assert!(echoed.ends_with(chunk.to_uppercase().as_bytes()));
    }
    s.close_send().unwrap();
    let mut tail = Vec::new();
    while let Some(m) = s.recv::<c::PortConnectResponse>().unwrap() {
        if let Some(Down::Data(d)) = m.kind {
            tail.extend_from_slice(&d);
        }
    }
    assert_eq!(tail, b"bye", "the sandbox's answer after the half-close");

    // A server that closes first ends the call at once, though the caller still has its side
    // open (ctl's worker was waiting for the caller's next message: it used to learn of the
    // end only at its next 200 ms poll).
    for _ in 0..3 {
        let mut s = open_port(&cl, &sb.id, 2).unwrap();
        let opened = std::time::Instant::now();
        match s.recv::<c::PortConnectResponse>().unwrap().unwrap().kind {
            Some(Down::Data(d)) => assert_eq!(&d[..], b"hello"),
            other => panic!("{other:?}"),
        }
        assert!(s.recv::<c::PortConnectResponse>().unwrap().is_none());
        let took = opened.elapsed();
        assert!(
            took < std::time::Duration::from_millis(150),
            "the call ended {took:?} after the server closed"
        );
    }

    // Errors: envd's port and port 0, nothing listening, an unknown sandbox, another team's.
    assert_eq!(code(open_port(&cl, &sb.id, 49983)), Code::InvalidArgument);
    assert_eq!(code(open_port(&cl, &sb.id, 0)), Code::InvalidArgument);
    assert_eq!(code(open_port(&cl, &sb.id, 1)), Code::Unavailable);
    let unknown = "sb-00000000-0000-4000-8000-000000000001";
    assert_eq!(code(open_port(&cl, unknown, 80)), Code::NotFound);
    let (_, other_key) = ctl.other_team("team-b", "b@example.com");
    let other = ctl.client(&other_key);
    assert_eq!(code(open_port(&other, &sb.id, 80)), Code::NotFound);
    // Paused: FAILED_PRECONDITION naming the state.
    let _: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::PAUSE,
            &c::PauseSandboxRequest {
                sandbox_id: sb.id.clone(),
            },
            T,
        )
        .unwrap();
    let e = open_port(&cl, &sb.id, 8080).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);
    assert!(e.message.contains("paused"), "{e}");
}

/// The network policy: checked at create (nothing placed when bad), passed to the agent in the
/// spec, stored and shown, replaced by UpdateNetwork on running and paused sandboxes (the
/// agent gets it), audited, refused for another team's sandbox.
#[test]
fn network_policy_at_create_and_update() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (fa, _host) = ctl.add_host(8, 8192, 100_000);
    let policy = |allow: &[&str]| c::NetworkPolicy {
        allow_internet_access: Some(false),
        deny_out: vec![],
        allow_out: allow.iter().map(|s| s.to_string()).collect(),
    };
    let creates_before = fa.creates.load(std::sync::atomic::Ordering::Relaxed);
    let bad = cl.unary::<_, c::Sandbox>(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            network: Some(policy(&["not a name"])),
            ..Default::default()
        },
        T,
    );
    let e = bad.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    assert!(e.message.contains("not a name"), "{e}");
    assert_eq!(
        fa.creates.load(std::sync::atomic::Ordering::Relaxed),
        creates_before,
        "a bad policy reaches no agent"
    );

    let sb: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                network: Some(policy(&["*.example.com", "203.0.113.0/24"])),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(
        sb.network,
        Some(policy(&["*.example.com", "203.0.113.0/24"]))
    );
    assert_eq!(get(&cl, &sb.id).unwrap().network, sb.network);
    let sent = fa.state.lock().unwrap().networks[&sb.id].clone().unwrap();
    assert_eq!(sent.allow_out, vec!["*.example.com", "203.0.113.0/24"]);
    assert_eq!(sent.allow_internet_access, Some(false));

    let update = |id: &str, n: Option<c::NetworkPolicy>| {
        cl.unary::<_, c::Sandbox>(
            c::sandboxes_methods::UPDATE_NETWORK,
            &c::UpdateNetworkRequest {
                sandbox_id: id.into(),
                network: n,
            },
            T,
        )
    };
    let s = update(&sb.id, Some(policy(&["api.example.org"]))).unwrap();
    assert_eq!(s.network, Some(policy(&["api.example.org"])));
    assert_eq!(
        fa.state.lock().unwrap().networks[&sb.id]
            .clone()
            .unwrap()
            .allow_out,
        vec!["api.example.org"]
    );
    // Bad: nothing changes.
    assert_eq!(
        code(update(&sb.id, Some(policy(&["::1"])))),
        Code::InvalidArgument
    );
    assert_eq!(
        get(&cl, &sb.id).unwrap().network,
        Some(policy(&["api.example.org"]))
    );
    // Paused: stored and passed on (the agent applies it at resume).
    let _: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::PAUSE,
            &c::PauseSandboxRequest {
                sandbox_id: sb.id.clone(),
            },
            T,
        )
        .unwrap();
    let s = update(&sb.id, None).unwrap();
    assert_eq!(s.network, None);
    assert_eq!(fa.state.lock().unwrap().networks[&sb.id], None);
    // Another team's sandbox: not found.
    let (_, other_key) = ctl.other_team("team-n", "n@example.com");
    let other = ctl.client(&other_key);
    let r = other.unary::<_, c::Sandbox>(
        c::sandboxes_methods::UPDATE_NETWORK,
        &c::UpdateNetworkRequest {
            sandbox_id: sb.id.clone(),
            network: None,
        },
        T,
    );
    assert_eq!(code(r), Code::NotFound);
    // Audited, failures too.
    let rows = crate::harness::audit(&cl, "sandbox.update_network");
    assert!(rows.iter().any(|r| r.status == "success"), "{rows:?}");
    assert!(rows.iter().any(|r| r.status == "failure"), "{rows:?}");
}

/// Every method the `wrenn.ctl.v1` descriptors name is served: called with an empty request
/// (a client stream closed at once), each ends with its own answer or error, never
/// `unimplemented` (the generated dispatch or the forwarding path has every one).
#[test]
fn every_ctl_method_is_served() {
    let Some(ctl) = Ctl::start() else { return };
    let mut served = 0;
    for (cl, who) in [(ctl.team(), "team"), (ctl.admin(), "admin")] {
        for m in c::METHODS.iter().flat_map(|s| s.iter()) {
            let opts = CallOpts {
                timeout: Some(Duration::from_secs(10)),
                end_stream: !m.client_streaming,
            };
            let end = cl
                .call(m.name, &c::GetTeamRequest::default(), opts)
                .and_then(|mut s| {
                    if m.client_streaming {
                        // The server may have ended the call already.
                        let _ = s.close_send();
                    }
                    while s.recv_bytes()?.is_some() {}
                    Ok(())
                });
            if let Err(e) = end {
                assert_ne!(e.code, Code::Unimplemented, "{who} {}: {e}", m.name);
                assert_ne!(e.code, Code::DeadlineExceeded, "{who} {}: {e}", m.name);
            }
            served += 1;
        }
    }
    // Both keys went through every method (the descriptors are not empty).
    let methods: usize = c::METHODS.iter().map(|s| s.len()).sum();
    assert!(methods > 40, "{methods}");
    assert_eq!(served, 2 * methods);
}

/// The traffic token: made at create (distinct per sandbox), returned by Create and Get and
/// by nothing else (List, lifecycle answers), replaced by RotateTrafficToken (audited), never
/// shown to another team; `allow_public_traffic` stored as given (default false).
#[test]
fn traffic_token_create_get_rotate() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (_fa, _host) = ctl.add_host(8, 8192, 100_000);
    let a = create(&cl, "minimal").unwrap();
    assert!(a.traffic_token.starts_with("wtt_"), "{a:?}");
    assert_eq!(a.traffic_token.len(), 4 + 64);
    assert!(!a.allow_public_traffic);
    let b: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                allow_public_traffic: true,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(b.allow_public_traffic);
    assert_ne!(a.traffic_token, b.traffic_token);
    assert_eq!(get(&cl, &a.id).unwrap().traffic_token, a.traffic_token);
    assert!(get(&cl, &b.id).unwrap().allow_public_traffic);
    // Not in List nor in a lifecycle answer.
    let l: c::ListSandboxesResponse = cl
        .unary(
            c::sandboxes_methods::LIST,
            &c::ListSandboxesRequest::default(),
            T,
        )
        .unwrap();
    assert_eq!(l.sandboxes.len(), 2);
    assert!(l.sandboxes.iter().all(|s| s.traffic_token.is_empty()));
    let p: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::PING,
            &c::PingSandboxRequest {
                sandbox_id: a.id.clone(),
            },
            T,
        )
        .unwrap();
    assert!(p.traffic_token.is_empty());
    // Rotate: a new token, Get shows it.
    let rotate = |cl: &Client, id: &str| {
        cl.unary::<_, c::Sandbox>(
            c::sandboxes_methods::ROTATE_TRAFFIC_TOKEN,
            &c::RotateTrafficTokenRequest {
                sandbox_id: id.into(),
            },
            T,
        )
    };
    let r = rotate(&cl, &a.id).unwrap();
    assert!(r.traffic_token.starts_with("wtt_"));
    assert_ne!(r.traffic_token, a.traffic_token);
    assert_eq!(get(&cl, &a.id).unwrap().traffic_token, r.traffic_token);
    // Another team: neither Get nor Rotate.
    let (_, other_key) = ctl.other_team("team-t", "t@example.com");
    let other = ctl.client(&other_key);
    assert_eq!(code(get(&other, &a.id)), Code::NotFound);
    assert_eq!(code(rotate(&other, &a.id)), Code::NotFound);
    assert_eq!(get(&cl, &a.id).unwrap().traffic_token, r.traffic_token);
    // A stopped sandbox keeps no usable token.
    let _: c::DestroySandboxResponse = cl
        .unary(
            c::sandboxes_methods::DESTROY,
            &c::DestroySandboxRequest {
                sandbox_id: b.id.clone(),
                force: false,
            },
            T,
        )
        .unwrap();
    let e = rotate(&cl, &b.id).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e}");
    let rows = crate::harness::audit(&cl, "sandbox.rotate_traffic_token");
    assert!(rows.iter().any(|r| r.status == "success"), "{rows:?}");
    assert!(rows.iter().any(|r| r.status == "failure"), "{rows:?}");
}

//! The RPC server over TCP with the fake VM layer: authentication, bad input, every method
//! answered, and the proxies to envd (unary, streams, client streams, flow control, cancel).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::host::{Host, IdentityCell};
use agent::rpc::AgentService;
use agent::statedir::Identity;
use proto::gen::wrenn::agent::v1 as pb;
use proto::gen::wrenn::envd::v1 as envd;
use proto::id::{self, Uuid};
use proto::rpc::{CallOpts, Client, Credential, Server, ServerConfig, ServerHandle};
use proto::Code;

use crate::Env;

pub const TOKEN: &str = "agent-secret-token";

pub struct Rig {
    env: Env,
    pub addr: std::net::SocketAddr,
    handle: ServerHandle,
    host: Arc<Host>,
    relays: Arc<agent::ports::PortRelays>,
}

impl Rig {
    pub fn new(name: &str) -> Rig {
        Rig::with_config(name, ServerConfig::new("wrenn-agent"))
    }

    pub fn with_config(name: &str, cfg: ServerConfig) -> Rig {
        let env = Env::new(name);
        let identity = Arc::new(IdentityCell::new(Some(Identity {
            host_id: Uuid::from_u128(5),
            host_token: "host".into(),
            agent_token: TOKEN.into(),
        })));
        let host = Arc::new(Host {
            manager: env.manager.clone(),
            identity: identity.clone(),
            extra_problems: Vec::new(),
            overcommit: Default::default(),
        });
        let svc = AgentService::new(env.manager.clone(), host.clone(), identity).unwrap();
        let relays = svc.port_relays();
        let mut server = Server::new(cfg, Arc::new(svc)).unwrap();
        let addr = server.listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let (handle, _join) = server.spawn().unwrap();
        Rig {
            env,
            addr,
            handle,
            host,
            relays,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect_tcp(self.addr, Credential::agent_token(TOKEN)).unwrap()
    }

    pub fn create(&self, c: &Client, n: u128) -> pb::SandboxInfo {
        c.unary(
            pb::sandboxes_methods::CREATE,
            &proto::sandbox::SandboxSpec {
                sandbox_id: id::format_sandbox(Uuid::from_u128(n)),
                template_id: id::format_template(crate::BASE),
                template_kind: proto::sandbox::TemplateKind::Base as i32,
                ..Default::default()
            },
            Some(Duration::from_secs(30)),
        )
        .unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

pub fn sb(n: u128) -> String {
    id::format_sandbox(Uuid::from_u128(n))
}

fn exec_req(n: u128, cmd: &str, args: &[&str]) -> pb::ExecRequest {
    pb::ExecRequest {
        sandbox_id: sb(n),
        process: Some(envd::ProcessConfig {
            cmd: cmd.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn only_ctl_with_the_agent_token_gets_in() {
    let rig = Rig::new("auth");
    for cred in [
        Credential::agent_token("wrong"),
        Credential::agent_token(""),
        Credential::host_token(TOKEN),
        Credential::access_token(TOKEN),
        Credential::none(),
    ] {
        let kind = cred.kind;
        let e = Client::connect_tcp(rig.addr, cred).unwrap_err();
        assert_eq!(e.code, Code::Unauthenticated, "{kind:?}: {e}");
    }
    let c = rig.client();
    let info: pb::HostInfo = c
        .unary(pb::host_methods::INFO, &pb::HostInfoRequest {}, None)
        .unwrap();
    assert!(info.can_host_sandboxes, "{:?}", info.problems);
    assert_eq!(info.host_id, id::format_host(Uuid::from_u128(5)));
    assert_eq!(info.restore_backend, "uffd");
    assert!(info.capacity.unwrap().memory_mib > 0);
    assert!(agent::metrics::RPC_REFUSED.get() >= 5);
}

#[test]
fn every_method_of_the_schema_is_served_and_checks_its_input() {
    let rig = Rig::new("methods");
    let c = rig.client();
    for all in [
        pb::sandboxes_methods::ALL,
        pb::processes_methods::ALL,
        pb::files_methods::ALL,
        pb::templates_methods::ALL,
        pb::host_methods::ALL,
        pb::ports_methods::ALL,
    ] {
        for m in all {
            // An empty message: every sandbox/template id is "" (invalid), lists are empty.
            let mut s = c
                .call(
                    m.name,
                    &pb::GetSandboxRequest::default(),
                    CallOpts {
                        timeout: Some(Duration::from_secs(10)),
                        end_stream: true,
                    },
                )
                .unwrap();
            let r = s.recv_bytes();
            let code = match r {
                Ok(_) => Code::Ok,
                Err(e) => e.code,
            };
            assert_ne!(code, Code::Unimplemented, "{}", m.name);
            let ok_without_id = [
                pb::sandboxes_methods::LIST,
                pb::templates_methods::LIST,
                pb::host_methods::INFO,
                pb::host_methods::METRICS,
            ];
            if ok_without_id.contains(&m.name) {
                assert_eq!(code, Code::Ok, "{}", m.name);
            } else {
                assert_eq!(code, Code::InvalidArgument, "{}", m.name);
            }
        }
    }
    let mut s = c
        .call(
            "wrenn.agent.v1.Sandboxes/Explode",
            &pb::GetSandboxRequest::default(),
            CallOpts::default(),
        )
        .unwrap();
    assert_eq!(s.recv_bytes().unwrap_err().code, Code::Unimplemented);
}

#[test]
fn bad_ids_unknown_sandboxes_wrong_states_and_oversized_frames() {
    let rig = Rig::new("badinput");
    let c = rig.client();
    let get = |s: &str| {
        c.unary::<_, pb::SandboxInfo>(
            pb::sandboxes_methods::GET,
            &pb::GetSandboxRequest {
                sandbox_id: s.into(),
            },
            None,
        )
        .unwrap_err()
        .code
    };
    assert_eq!(get("sb-1"), Code::InvalidArgument);
    assert_eq!(get(&sb(1).to_uppercase()), Code::InvalidArgument);
    assert_eq!(
        get(&id::format_template(Uuid::from_u128(1))),
        Code::InvalidArgument
    );
    assert_eq!(get(&format!(" {}", sb(1))), Code::InvalidArgument);
    assert_eq!(get(&sb(1)), Code::NotFound);
    let e = c
        .unary::<_, pb::ExecResponse>(pb::processes_methods::EXEC, &exec_req(1, "echo", &[]), None)
        .unwrap_err();
    assert_eq!(e.code, Code::NotFound);
    let e = c
        .unary::<_, pb::TemplateInfo>(
            pb::templates_methods::CREATE,
            &pb::CreateTemplateRequest {
                sandbox_id: sb(1),
                template_id: "tpl-nope".into(),
            },
            None,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);

    rig.create(&c, 1);
    let pause = |n| {
        c.unary::<_, pb::SandboxInfo>(
            pb::sandboxes_methods::PAUSE,
            &pb::PauseSandboxRequest { sandbox_id: sb(n) },
            None,
        )
    };
    pause(1).unwrap();
    assert_eq!(pause(1).unwrap_err().code, Code::FailedPrecondition);
    let e = c
        .unary::<_, pb::ExecResponse>(pb::processes_methods::EXEC, &exec_req(1, "echo", &[]), None)
        .unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "exec on a paused sandbox");
    let e = c
        .unary::<_, pb::SandboxInfo>(
            pb::sandboxes_methods::SET_TIMEOUT,
            &pb::SetTimeoutRequest {
                sandbox_id: sb(1),
                timeout_s: 0,
                on_timeout: 0,
            },
            None,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    let e = c
        .unary::<_, pb::ListSandboxesResponse>(
            pb::sandboxes_methods::LIST,
            &pb::ListSandboxesRequest { states: vec![42] },
            None,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    let paused: pb::ListSandboxesResponse = c
        .unary(
            pb::sandboxes_methods::LIST,
            &pb::ListSandboxesRequest {
                states: vec![proto::sandbox::SandboxState::Paused as i32],
            },
            None,
        )
        .unwrap();
    assert_eq!(paused.sandboxes.len(), 1);

    // A message over the frame limit is refused; the agent keeps serving.
    let big = proto::sandbox::SandboxSpec {
        sandbox_id: sb(2),
        metadata: [("k".to_string(), "x".repeat(3 << 20))].into(),
        ..Default::default()
    };
    let r = c.unary::<_, pb::SandboxInfo>(pb::sandboxes_methods::CREATE, &big, None);
    assert!(r.is_err(), "oversized create accepted");
    eprintln!("oversized frame: {:?}", r.unwrap_err());
    // The same, raw on the wire (a client that ignores the limit): the agent drops the
    // connection instead of buffering it.
    {
        use prost::Message;
        use std::io::{Read, Write};
        let mut raw = std::net::TcpStream::connect(rig.addr).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let hello = proto::rpc::Hello {
            version: proto::PROTOCOL_VERSION,
            credential_kind: proto::rpc::CredentialKind::AgentToken as i32,
            credential: TOKEN.into(),
            ..Default::default()
        };
        let mut out = Vec::new();
        proto::frame::put_frame(
            &mut out,
            0,
            proto::frame::Kind::Hello,
            0,
            &hello.encode_to_vec(),
        );
        raw.write_all(&out).unwrap();
        let mut ack = [0u8; 256];
        assert!(raw.read(&mut ack).unwrap() > 0, "no HELLO_ACK");
        let mut out = Vec::new();
        proto::frame::put_request(
            &mut out,
            1,
            0,
            pb::sandboxes_methods::CREATE,
            0,
            &big.encode_to_vec(),
        );
        let _ = raw.write_all(&out);
        let mut sink = [0u8; 4096];
        let closed = loop {
            match raw.read(&mut sink) {
                Ok(0) | Err(_) => break true,
                Ok(_) => continue, // a GOAWAY or ERROR frame first
            }
        };
        assert!(closed);
    }
    let c2 = rig.client();
    assert_eq!(
        c2.unary::<_, pb::SandboxInfo>(
            pb::sandboxes_methods::GET,
            &pb::GetSandboxRequest { sandbox_id: sb(2) },
            None
        )
        .unwrap_err()
        .code,
        Code::NotFound
    );
    assert!(!rig.env.dir(2).exists());
}

/// A guest that keeps its connection up but never reports the start (seen on nested KVM)
/// costs an Exec a bounded wait, not a worker forever; envd's side is closed and the next
/// Exec is served.
#[test]
fn exec_gives_up_on_a_start_that_never_comes() {
    let rig = Rig::new("exec-stall");
    let c = rig.client();
    rig.create(&c, 1);
    let t = Instant::now();
    let e = c
        .unary::<_, pb::ExecResponse>(
            pb::processes_methods::EXEC,
            &exec_req(1, "stall", &[]),
            None,
        )
        .unwrap_err();
    let waited = t.elapsed();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(
        e.message.contains("did not report the process started"),
        "{e}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "waited {waited:?} for a 2 s start limit"
    );
    let envd = rig.env.vmm.envd(&rig.env.dir(1)).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while envd.stalls_seen_cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < end,
            "envd's side of the stalled start was never closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r: pb::ExecResponse = c
        .unary(
            pb::processes_methods::EXEC,
            &exec_req(1, "echo", &["x"]),
            None,
        )
        .unwrap();
    assert_eq!(&r.stdout[..], b"x");
}

#[test]
fn exec_collects_bounded_output_and_feeds_stdin() {
    let rig = Rig::new("exec");
    let c = rig.client();
    rig.create(&c, 1);
    let r: pb::ExecResponse = c
        .unary(
            pb::processes_methods::EXEC,
            &exec_req(1, "echo", &["a", "b"]),
            None,
        )
        .unwrap();
    assert_eq!(&r.stdout[..], b"a b");
    assert_eq!(&r.stderr[..], b"warn");
    assert_eq!(
        r.exited.unwrap().status,
        Some(envd::process_exited::Status::ExitCode(0))
    );
    assert!(r.duration_ns > 0);

    let mut big = exec_req(1, "big", &["3145728"]);
    big.output_limit_bytes = 1 << 20;
    let r: pb::ExecResponse = c.unary(pb::processes_methods::EXEC, &big, None).unwrap();
    assert_eq!(r.stdout.len(), 1 << 20);
    assert!(r.stdout_truncated && !r.stderr_truncated);
    assert!(
        r.exited.is_some(),
        "the rest was read and dropped to the end"
    );

    let mut cat = exec_req(1, "cat", &[]);
    cat.process.as_mut().unwrap().stdin = true;
    cat.stdin = b"from stdin".to_vec().into();
    let r: pb::ExecResponse = c.unary(pb::processes_methods::EXEC, &cat, None).unwrap();
    assert_eq!(&r.stdout[..], b"from stdin");

    let mut bg = exec_req(1, "sleep", &[]);
    bg.background = true;
    let r: pb::ExecResponse = c.unary(pb::processes_methods::EXEC, &bg, None).unwrap();
    assert!(r.pid >= 100 && r.exited.is_none());

    let e = c
        .unary::<_, pb::ExecResponse>(
            pb::processes_methods::EXEC,
            &exec_req(1, "missing", &[]),
            None,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::NotFound, "envd's status passes through");

    let m: envd::GetMetricsResponse = c
        .unary(
            pb::sandboxes_methods::METRICS,
            &pb::SandboxMetricsRequest { sandbox_id: sb(1) },
            None,
        )
        .unwrap();
    assert_eq!(m.now_unix_ns, 42);
}

#[test]
fn a_slow_reader_slows_the_guest_and_a_cancel_stops_it() {
    let rig = Rig::new("flow");
    let c = rig.client();
    rig.create(&c, 1);
    let guest = rig.env.vmm.envd(&rig.env.dir(1)).unwrap();
    let mut s = c
        .call(
            pb::processes_methods::EXEC_STREAM,
            &pb::ExecStreamRequest {
                sandbox_id: sb(1),
                process: Some(envd::ProcessConfig {
                    cmd: "yes".into(),
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: None,
                end_stream: true,
            },
        )
        .unwrap();
    let first: envd::ProcessEvent = s.recv().unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(envd::process_event::Event::Started(_))
    ));
    // Do not read for a while: the generator must stall at the windows' size.
    std::thread::sleep(Duration::from_millis(1500));
    let stalled = guest.yes_sent.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    let later = guest.yes_sent.load(Ordering::SeqCst);
    eprintln!("bytes the guest could send to a client that does not read: {stalled}");
    assert_eq!(
        stalled, later,
        "the guest kept producing for a reader that does not read"
    );
    assert!(
        stalled < 32 << 20,
        "{stalled} bytes buffered between guest and client"
    );
    // Reading resumes the flow.
    let mut got = 0usize;
    while got < 40 << 20 {
        let ev: envd::ProcessEvent = s.recv().unwrap().unwrap();
        if let Some(envd::process_event::Event::Output(o)) = ev.event {
            got += o.data.len();
        }
    }
    assert!(guest.yes_sent.load(Ordering::SeqCst) > stalled);
    // Cancelling the call stops the guest's producer.
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    let a = guest.yes_sent.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        a,
        guest.yes_sent.load(Ordering::SeqCst),
        "producer still running after cancel"
    );
}

#[test]
fn files_stream_both_ways_and_idle_streams_are_cancelled() {
    let rig = Rig::new("files");
    let c = rig.client();
    rig.create(&c, 1);
    // Write 3 MiB in chunks (header-first client stream).
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let mut w = c
        .call(
            pb::files_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    sandbox_id: sb(1),
                    file: Some(envd::WriteHeader {
                        path: "/tmp/blob".into(),
                        ..Default::default()
                    }),
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    for chunk in data.chunks(64 * 1024) {
        w.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Data(chunk.to_vec().into())),
        })
        .unwrap();
    }
    // The end-to-end checksum travels through the agent to envd.
    w.send(&pb::WriteRequest {
        msg: Some(pb::write_request::Msg::Crc32(crc32fast::hash(&data))),
    })
    .unwrap();
    w.close_send().unwrap();
    let resp: envd::WriteResponse = w.recv().unwrap().unwrap();
    assert_eq!(resp.bytes_written, data.len() as u64);

    // A byte flipped on the way (after the sender computed its checksum): envd's
    // DATA_LOSS comes back through the agent.
    let mut w = c
        .call(
            pb::files_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    sandbox_id: sb(1),
                    file: Some(envd::WriteHeader {
                        path: "/tmp/flipped".into(),
                        ..Default::default()
                    }),
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    let mut flipped = data[..100_000].to_vec();
    let crc = crc32fast::hash(&flipped);
    flipped[4242] ^= 1;
    for m in [
        pb::write_request::Msg::Data(flipped.into()),
        pb::write_request::Msg::Crc32(crc),
    ] {
        w.send(&pb::WriteRequest { msg: Some(m) }).unwrap();
    }
    w.close_send().unwrap();
    assert_eq!(
        w.recv::<envd::WriteResponse>().unwrap_err().code,
        Code::DataLoss
    );

    // A second header is refused.
    let mut w = c
        .call(
            pb::files_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    sandbox_id: sb(1),
                    file: Some(envd::WriteHeader {
                        path: "/tmp/x".into(),
                        ..Default::default()
                    }),
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    let _ = w.send(&pb::WriteRequest {
        msg: Some(pb::write_request::Msg::Header(pb::WriteHeader::default())),
    });
    let _ = w.close_send();
    assert_eq!(
        w.recv::<envd::WriteResponse>().unwrap_err().code,
        Code::InvalidArgument
    );

    // Read it back.
    let mut r = c
        .call(
            pb::files_methods::READ,
            &pb::ReadRequest {
                sandbox_id: sb(1),
                read: Some(envd::ReadRequest {
                    path: "/tmp/blob".into(),
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: None,
                end_stream: true,
            },
        )
        .unwrap();
    let mut back = Vec::new();
    let mut first = true;
    let mut crc = None;
    while let Some(m) = r.recv::<envd::ReadResponse>().unwrap() {
        if first {
            assert_eq!(m.entry.unwrap().size, data.len() as u64);
            first = false;
        }
        back.extend_from_slice(&m.data);
        crc = crc.or(m.crc32);
    }
    assert!(back == data, "read back differs");
    // envd's checksum of the download arrives through the agent.
    assert_eq!(crc, Some(crc32fast::hash(&data)));
    let st: envd::StatResponse = c
        .unary(
            pb::files_methods::STAT,
            &pb::StatRequest {
                sandbox_id: sb(1),
                stat: Some(envd::StatRequest {
                    path: "/tmp/blob".into(),
                    ..Default::default()
                }),
            },
            None,
        )
        .unwrap();
    assert_eq!(st.entry.unwrap().size, data.len() as u64);

    // A watch that never gets an event is still cut off when the caller cancels.
    let before = crate::fake::WATCH_ENDED.load(Ordering::SeqCst);
    let mut wt = c
        .call(
            pb::files_methods::WATCH,
            &pb::WatchRequest {
                sandbox_id: sb(1),
                watch: Some(envd::WatchRequest {
                    path: "/tmp".into(),
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: None,
                end_stream: true,
            },
        )
        .unwrap();
    let started: envd::WatchResponse = wt.recv().unwrap().unwrap();
    assert!(matches!(
        started.msg,
        Some(envd::watch_response::Msg::Started(_))
    ));
    drop(wt);
    let end = Instant::now() + Duration::from_secs(5);
    while crate::fake::WATCH_ENDED.load(Ordering::SeqCst) == before {
        assert!(
            Instant::now() < end,
            "the envd watch outlived its cancelled caller"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stdin_streams_through_to_a_running_process() {
    let rig = Rig::new("stdin");
    let c = rig.client();
    rig.create(&c, 1);
    let mut out = c
        .call(
            pb::processes_methods::EXEC_STREAM,
            &pb::ExecStreamRequest {
                sandbox_id: sb(1),
                process: Some(envd::ProcessConfig {
                    cmd: "cat".into(),
                    stdin: true,
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: None,
                end_stream: true,
            },
        )
        .unwrap();
    let pid = match out.recv::<envd::ProcessEvent>().unwrap().unwrap().event {
        Some(envd::process_event::Event::Started(s)) => s.pid,
        e => panic!("{e:?}"),
    };
    let sel = Some(envd::ProcessSelector {
        selector: Some(envd::process_selector::Selector::Pid(pid)),
    });
    let mut input = c
        .call(
            pb::processes_methods::SEND_INPUT,
            &pb::SendInputRequest {
                sandbox_id: sb(1),
                input: Some(envd::SendInputRequest {
                    process: sel.clone(),
                    data: b"hello ".to_vec().into(),
                    close: false,
                }),
            },
            CallOpts::default(),
        )
        .unwrap();
    input
        .send(&pb::SendInputRequest {
            sandbox_id: String::new(),
            input: Some(envd::SendInputRequest {
                process: None,
                data: b"world".to_vec().into(),
                close: true,
            }),
        })
        .unwrap();
    input.close_send().unwrap();
    let r: envd::SendInputResponse = input.recv().unwrap().unwrap();
    assert_eq!(r.bytes_written, 11);
    let mut text = Vec::new();
    let mut exited = false;
    while let Some(ev) = out.recv::<envd::ProcessEvent>().unwrap() {
        match ev.event {
            Some(envd::process_event::Event::Output(o)) => text.extend_from_slice(&o.data),
            Some(envd::process_event::Event::Exited(_)) => exited = true,
            _ => {}
        }
    }
    assert_eq!(text, b"hello world");
    assert!(exited);
}

#[test]
fn host_metrics_and_http_endpoints() {
    let rig = Rig::new("http");
    let c = rig.client();
    rig.create(&c, 1);
    let m: pb::HostMetrics = c
        .unary(pb::host_methods::METRICS, &pb::HostMetricsRequest {}, None)
        .unwrap();
    let running = m
        .samples
        .iter()
        .find(|s| {
            s.name == "wrenn_agent_sandboxes"
                && s.labels.get("state").map(String::as_str) == Some("running")
        })
        .unwrap();
    assert_eq!(running.value, 1.0);
    let http =
        agent::http::HttpServer::start("127.0.0.1:0".parse().unwrap(), rig.host.clone()).unwrap();
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(http.addr()).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let h = get("/health");
    assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("ok\n"), "{h}");
    let m = get("/metrics");
    assert!(
        m.contains("wrenn_agent_sandboxes{state=\"running\"} 1"),
        "{m}"
    );
    assert!(m.contains("# TYPE wrenn_agent_create_seconds histogram"));
    assert!(get("/nope").starts_with("HTTP/1.1 404"));
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http.addr()).unwrap();
    s.write_all(&vec![b'A'; 20_000]).unwrap_or(());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 4"), "{out}");
}

/// Issue 18 on the agent's metrics/health port: idle and slow-header floods cost no thread
/// and cannot starve a probe (before the event loop, 16 idle connections held all 16
/// connection threads for 5 s each and every probe got 503). Bounded, loopback, stops by
/// itself.
#[test]
fn metrics_listener_survives_idle_and_slow_floods() {
    use agent::limits::HTTP_CONNECTIONS_MAX;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let rig = Rig::new("http-flood");
    let http = agent::http::HttpServer::start_with(
        "127.0.0.1:0".parse().unwrap(),
        rig.host.clone(),
        agent::http::HttpLimits {
            timeout: Duration::from_millis(800),
            ..Default::default()
        },
    )
    .unwrap();
    let a = http.addr();
    let probe = |path: &str| {
        let t = Instant::now();
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        (out, t.elapsed())
    };
    // Idle: three times the connection bound, sending nothing.
    let idle: Vec<TcpStream> = (0..3 * HTTP_CONNECTIONS_MAX)
        .map(|_| TcpStream::connect(a).unwrap())
        .collect();
    // Slow headers: the connection bound again, each stalled inside its head.
    let slow: Vec<TcpStream> = (0..HTTP_CONNECTIONS_MAX)
        .map(|_| {
            let mut s = TcpStream::connect(a).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    for round in 0..5 {
        let (h, took) = probe("/health");
        assert!(
            h.starts_with("HTTP/1.1 200") && h.ends_with("ok\n"),
            "round {round}: {h:?}"
        );
        assert!(
            took < Duration::from_secs(1),
            "round {round}: probe took {took:?}"
        );
        let (m, _) = probe("/metrics");
        assert!(
            m.contains("# TYPE wrenn_agent_create_seconds histogram"),
            "round {round}"
        );
    }
    // Every flood connection is closed by the deadline (evicted sooner, most of them).
    let t = Instant::now();
    for mut s in idle.into_iter().chain(slow) {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 64];
        // EOF, a reset, or a 4xx answer to a half head: all mean closed by the server.
        let _ = s.read(&mut b);
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "flood connections closed by the 0.8 s deadline, took {:?}",
        t.elapsed()
    );
}

/// Opens Ports.Connect to `port` of sandbox `n`; returns the stream after `opened`.
fn open_port(c: &Client, n: u128, port: u32) -> Result<proto::rpc::ClientStream, proto::Status> {
    use pb::port_connect_response::Kind;
    let mut s = c.call(
        pb::ports_methods::CONNECT,
        &pb::PortConnectRequest {
            kind: Some(pb::port_connect_request::Kind::Open(pb::PortOpen {
                sandbox_id: sb(n),
                port,
            })),
        },
        CallOpts {
            // Bounds the test: a stream that never ends fails instead of hanging.
            timeout: Some(Duration::from_secs(30)),
            end_stream: false,
        },
    )?;
    let first: Option<pb::PortConnectResponse> = s.recv()?;
    assert_eq!(first.and_then(|m| m.kind), Some(Kind::Opened(true)));
    Ok(s)
}

fn port_data(s: &mut proto::rpc::ClientStream) -> Option<Vec<u8>> {
    use pb::port_connect_response::Kind;
    match s.recv::<pb::PortConnectResponse>().unwrap()?.kind {
        Some(Kind::Data(d)) => Some(d.to_vec()),
        other => panic!("unexpected {other:?}"),
    }
}

/// An idle port stream holds no thread on the agent: its two relay halves park, the call's
/// RPC worker goes back to the pool (more idle streams than the agent has workers stay open,
/// and a lifecycle call still gets a worker), and each stream resumes when either side
/// sends: ctl's bytes, the guest's bytes, the guest's close.
#[test]
fn idle_port_streams_hold_no_worker() {
    use std::io::{Read, Write};
    const WORKERS: usize = 3;
    const STREAMS: usize = 7;
    let mut cfg = ServerConfig::new("wrenn-agent");
    cfg.workers_max = WORKERS;
    let rig = Rig::with_config("ports-park", cfg);
    let c = rig.client();
    rig.create(&c, 1);
    // The guest: echoes; `q` closes the connection, `!` makes it write first after a pause.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = u32::from(listener.local_addr().unwrap().port());
    std::thread::spawn(move || {
        for _ in 0..STREAMS {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let mut b = [0u8; 1024];
                loop {
                    let n = match conn.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    match &b[..n] {
                        b"q" => return,
                        b"!" => {
                            std::thread::sleep(Duration::from_millis(2500));
                            let _ = conn.write_all(b"unprompted");
                        }
                        d => {
                            let _ = conn.write_all(d);
                        }
                    }
                }
            });
        }
    });
    let send = |s: &mut proto::rpc::ClientStream, b: &[u8]| {
        s.send(&pb::PortConnectRequest {
            kind: Some(pb::port_connect_request::Kind::Data(b.to_vec().into())),
        })
        .unwrap()
    };
    let settles = |want: (usize, usize)| {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let now = rig.relays.halves();
            if now == want {
                return;
            }
            assert!(
                Instant::now() < end,
                "halves (running, parked) {now:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // More streams than workers, opened one after another once the previous ones parked.
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let mut s = open_port(&c, 1, port).unwrap_or_else(|e| panic!("stream {i}: {e:?}"));
        send(&mut s, format!("hello {i}").as_bytes());
        assert_eq!(port_data(&mut s).unwrap(), format!("hello {i}").as_bytes());
        streams.push(s);
        if (i + 1) % WORKERS == 0 {
            settles((0, 2 * (i + 1)));
        }
    }
    settles((0, 2 * STREAMS));
    // A lifecycle call gets a worker.
    let got: pb::SandboxInfo = c
        .unary(
            pb::sandboxes_methods::GET,
            &pb::GetSandboxRequest { sandbox_id: sb(1) },
            Some(Duration::from_secs(10)),
        )
        .unwrap();
    assert_eq!(got.sandbox_id, sb(1));
    // Each parked stream resumes for ctl's bytes.
    for (i, s) in streams.iter_mut().enumerate() {
        send(s, format!("again {i}").as_bytes());
        assert_eq!(port_data(s).unwrap(), format!("again {i}").as_bytes());
    }
    settles((0, 2 * STREAMS));
    // ... and for the guest's: it writes after both halves parked.
    send(&mut streams[0], b"!");
    settles((0, 2 * STREAMS));
    assert_eq!(port_data(&mut streams[0]).unwrap(), b"unprompted");
    // The guest closes a parked stream: the call ends, both halves are gone.
    send(&mut streams[1], b"q");
    assert!(port_data(&mut streams[1]).is_none());
    settles((0, 2 * (STREAMS - 1)));
    drop(streams);
    settles((0, 0));
}

/// Ports.Connect carries bytes both ways to a server of the (fake) guest, half-closes,
/// ends when the guest closes, answers a paused sandbox with its state, refuses envd's port,
/// and keeps the per-sandbox budget.
#[test]
fn ports_connect_moves_bytes_both_ways() {
    use std::io::{Read, Write};
    let rig = Rig::new("ports");
    let c = rig.client();
    rig.create(&c, 1);
    // The "guest" server: uppercases what it reads until EOF, then writes "bye" and closes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = u32::from(listener.local_addr().unwrap().port());
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut buf = [0u8; 65536];
            let mut total = 0usize;
            loop {
                let n = conn.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                total += n;
                conn.write_all(&buf[..n].to_ascii_uppercase()).unwrap();
            }
            conn.write_all(format!("bye {total}").as_bytes()).unwrap();
        }
    });

    let mut s = open_port(&c, 1, port).unwrap();
    let send = |s: &mut proto::rpc::ClientStream, b: &[u8]| {
        s.send(&pb::PortConnectRequest {
            kind: Some(pb::port_connect_request::Kind::Data(b.to_vec().into())),
        })
        .unwrap()
    };
    send(&mut s, b"hello");
    assert_eq!(port_data(&mut s).unwrap(), b"HELLO");
    // 4 MiB through, read back in full.
    let big = vec![b'x'; 4 << 20];
    let mut got = Vec::new();
    let mut sent = 0;
    for chunk in big.chunks(256 << 10) {
        send(&mut s, chunk);
        sent += chunk.len();
        while got.len() < sent {
            got.extend(port_data(&mut s).unwrap());
        }
    }
    assert_eq!(got.len(), big.len());
    assert!(got.iter().all(|&b| b == b'X'));
    // Half-close: the guest sees EOF, answers, closes; the call ends.
    s.close_send().unwrap();
    let mut tail = Vec::new();
    while let Some(d) = port_data(&mut s) {
        tail.extend(d);
    }
    assert_eq!(tail, format!("bye {}", 5 + big.len()).as_bytes());

    // A second connection works (the server accepts two).
    let mut s = open_port(&c, 1, port).unwrap();
    send(&mut s, b"again");
    assert_eq!(port_data(&mut s).unwrap(), b"AGAIN");
    s.close_send().unwrap();
    while port_data(&mut s).is_some() {}
    server.join().unwrap();

    // A guest that closes first ends the call at once while ctl's side stays open (the
    // worker waiting for ctl's next message used to see it only at its next 200 ms poll).
    let quick = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let quick_port = u32::from(quick.local_addr().unwrap().port());
    let closer = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut conn, _) = quick.accept().unwrap();
            conn.write_all(b"hi").unwrap();
        }
    });
    for _ in 0..3 {
        let mut s = open_port(&c, 1, quick_port).unwrap();
        let opened = std::time::Instant::now();
        let mut got = Vec::new();
        while let Some(d) = port_data(&mut s) {
            got.extend(d);
        }
        assert_eq!(got, b"hi");
        let took = opened.elapsed();
        assert!(
            took < Duration::from_millis(150),
            "the call ended {took:?} after the guest closed"
        );
    }
    closer.join().unwrap();

    // Nothing listening: UNAVAILABLE. envd's port, port 0: INVALID_ARGUMENT.
    assert_eq!(open_port(&c, 1, port).unwrap_err().code, Code::Unavailable);
    assert_eq!(
        open_port(&c, 1, 49983).unwrap_err().code,
        Code::InvalidArgument
    );
    assert_eq!(open_port(&c, 1, 0).unwrap_err().code, Code::InvalidArgument);
    // Unknown sandbox: NOT_FOUND; paused: FAILED_PRECONDITION naming the state.
    assert_eq!(open_port(&c, 9, port).unwrap_err().code, Code::NotFound);
    let _: pb::SandboxInfo = c
        .unary(
            pb::sandboxes_methods::PAUSE,
            &pb::PauseSandboxRequest { sandbox_id: sb(1) },
            Some(Duration::from_secs(30)),
        )
        .unwrap();
    let e = open_port(&c, 1, port).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);
    assert!(e.message.contains("paused"), "{e}");
}

//! The code proto-codegen writes for every service: a `<Service>Server` trait served through
//! `dispatch_<service>` and a typed `<Service>Client`, over a real socket, for every streaming
//! shape (unary, server streaming, client streaming) and for a method of another service.

use std::sync::Arc;

use proto::gen::wrenn::envd::v1 as pb;
use proto::rpc::{
    Call, CallCtx, Credential, Hello, Peer, Server, ServerConfig, ServerStream, Service,
};
use proto::{Code, Status};

/// A `Process` service that starts nothing: `Start` echoes the command as output, `SendInput`
/// counts bytes, `List` answers what the call's context says of the caller (the principal
/// hello attached, its source, whether it presented a certificate), the rest fail with
/// their own codes.
struct Fake;

fn caller(ctx: &CallCtx) -> String {
    let name = ctx
        .peer
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    format!("{name}|{:?}|{}", ctx.source, ctx.client_cert.is_some())
}

impl pb::ProcessServer for Fake {
    fn start(
        &self,
        _: &CallCtx,
        req: pb::StartRequest,
        stream: &mut ServerStream,
    ) -> Result<(), Status> {
        let cmd = req.process.map(|p| p.cmd).unwrap_or_default();
        for (i, part) in [cmd.as_str(), "!"].iter().enumerate() {
            stream.send(&pb::ProcessEvent {
                event: Some(pb::process_event::Event::Output(pb::ProcessOutput {
                    data: part.as_bytes().to_vec().into(),
                    offset: i as u64,
                    ..Default::default()
                })),
            })?;
        }
        Ok(())
    }

    fn connect(
        &self,
        _: &CallCtx,
        _: pb::ConnectRequest,
        _: &mut ServerStream,
    ) -> Result<(), Status> {
        Err(Status::not_found("no such process"))
    }

    fn send_input(
        &self,
        _: &CallCtx,
        first: pb::SendInputRequest,
        stream: &mut ServerStream,
    ) -> Result<pb::SendInputResponse, Status> {
        let mut n = first.data.len() as u64;
        while let Some(m) = stream.recv::<pb::SendInputRequest>()? {
            n += m.data.len() as u64;
        }
        Ok(pb::SendInputResponse { bytes_written: n })
    }

    fn close_stdin(
        &self,
        _: &CallCtx,
        _: pb::CloseStdinRequest,
    ) -> Result<pb::CloseStdinResponse, Status> {
        Err(Status::failed_precondition("no stdin"))
    }

    fn signal(&self, _: &CallCtx, _: pb::SignalRequest) -> Result<pb::SignalResponse, Status> {
        Err(Status::permission_denied("no"))
    }

    fn resize_pty(
        &self,
        _: &CallCtx,
        _: pb::ResizePtyRequest,
    ) -> Result<pb::ResizePtyResponse, Status> {
        Err(Status::invalid_argument("no pty"))
    }

    fn list(
        &self,
        ctx: &CallCtx,
        _: pb::ListProcessesRequest,
    ) -> Result<pb::ListProcessesResponse, Status> {
        Ok(pb::ListProcessesResponse {
            processes: vec![pb::ProcessInfo {
                tag: caller(ctx),
                ..Default::default()
            }],
        })
    }
}

struct Svc(Arc<Fake>, Arc<std::sync::Mutex<Vec<Code>>>);

impl Service for Svc {
    fn hello(&self, hello: &Hello) -> Result<Peer, Status> {
        Ok(Arc::new(hello.client.clone()))
    }

    fn call(&self, call: Call) {
        let (svc, codes) = (self.0.clone(), self.1.clone());
        call.spawn(move |s| {
            let code = pb::dispatch_process(&*svc, s).unwrap_or_else(proto::rpc::serve::unknown);
            codes.lock().unwrap().push(code);
        });
    }
}

#[test]
fn generated_server_and_client_carry_every_shape() {
    let dir = crate::support::TempDir::new("gen");
    let sock = dir.path.join("s.sock");
    let codes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut server = Server::new(
        ServerConfig::new("gen"),
        Arc::new(Svc(Arc::new(Fake), codes.clone())),
    )
    .unwrap();
    server.listen_unix(&sock).unwrap();
    let (handle, _thread) = server.spawn().unwrap();
    let client = proto::rpc::Client::connect_unix(&sock, Credential::none()).unwrap();
    let c = pb::ProcessClient::new(&client).with_timeout(std::time::Duration::from_secs(10));

    // Unary, with the peer the service attached at hello.
    let list = c.list(&pb::ListProcessesRequest {}).unwrap();
    assert_eq!(list.processes.len(), 1);
    let tag = &list.processes[0].tag;
    assert!(
        tag.len() > "|Local|false".len() && tag.ends_with("|Local|false"),
        "the call's context reached the handler: {tag}"
    );

    // Server streaming: every message, then the end.
    let mut s = c
        .start(&pb::StartRequest {
            process: Some(pb::ProcessConfig {
                cmd: "echo".into(),
                ..Default::default()
            }),
        })
        .unwrap();
    let mut got = Vec::new();
    while let Some(ev) = s.recv::<pb::ProcessEvent>().unwrap() {
        match ev.event {
            Some(pb::process_event::Event::Output(o)) => got.push(o.data.to_vec()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, [b"echo".to_vec(), b"!".to_vec()]);

    // Client streaming: the header message, more data, half-close, one reply.
    let mut s = c
        .send_input(&pb::SendInputRequest {
            data: vec![1; 10].into(),
            ..Default::default()
        })
        .unwrap();
    s.send(&pb::SendInputRequest {
        data: vec![2; 5].into(),
        ..Default::default()
    })
    .unwrap();
    s.close_send().unwrap();
    let r = s.recv::<pb::SendInputResponse>().unwrap().unwrap();
    assert_eq!(r.bytes_written, 15);

    // Errors keep their codes; a method of another service is unimplemented, by name.
    let e = c
        .close_stdin(&pb::CloseStdinRequest::default())
        .unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);
    let mut s = c.connect(&pb::ConnectRequest::default()).unwrap();
    assert_eq!(
        s.recv::<pb::ProcessEvent>().unwrap_err().code,
        Code::NotFound
    );
    let e = pb::HealthClient::new(&client)
        .check(&pb::HealthCheckRequest {})
        .unwrap_err();
    assert_eq!(e.code, Code::Unimplemented);
    assert!(
        e.message.contains("wrenn.envd.v1.Health/Check"),
        "{}",
        e.message
    );

    // The final code of each call reached the caller of dispatch (a worker records it just
    // after the client saw the end, so wait for the sixth).
    drop(client);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while codes.lock().unwrap().len() < 6 && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    handle.shutdown();
    let mut codes = codes.lock().unwrap().clone();
    codes.sort_by_key(|c| *c as u16);
    let mut want = vec![
        Code::Ok,
        Code::Ok,
        Code::Ok,
        Code::FailedPrecondition,
        Code::NotFound,
        Code::Unimplemented,
    ];
    want.sort_by_key(|c| *c as u16);
    assert_eq!(codes, want);
}

/// A host.v1 server served through `dispatch_package`: every service of the package by one
/// call, anything else given back.
struct Host;

impl proto::gen::wrenn::host::v1::HostServer for Host {
    fn register(
        &self,
        ctx: &CallCtx,
        _: proto::gen::wrenn::host::v1::RegisterRequest,
    ) -> Result<proto::gen::wrenn::host::v1::RegisterResponse, Status> {
        Ok(proto::gen::wrenn::host::v1::RegisterResponse {
            host_id: caller(ctx),
            ..Default::default()
        })
    }

    fn heartbeat(
        &self,
        _: &CallCtx,
        _: proto::gen::wrenn::host::v1::HeartbeatRequest,
    ) -> Result<proto::gen::wrenn::host::v1::HeartbeatResponse, Status> {
        Err(Status::unavailable("not now"))
    }

    fn report_state(
        &self,
        _: &CallCtx,
        _: proto::gen::wrenn::host::v1::ReportStateRequest,
    ) -> Result<proto::gen::wrenn::host::v1::ReportStateResponse, Status> {
        Err(Status::new(Code::Aborted, "no"))
    }

    fn renew_certificate(
        &self,
        _: &CallCtx,
        _: proto::gen::wrenn::host::v1::RenewCertificateRequest,
    ) -> Result<proto::gen::wrenn::host::v1::RenewCertificateResponse, Status> {
        Err(Status::failed_precondition("no certificate"))
    }
}

struct HostSvc;

impl Service for HostSvc {
    fn hello(&self, hello: &Hello) -> Result<Peer, Status> {
        Ok(Arc::new(hello.client.clone()))
    }

    fn call(&self, call: Call) {
        call.spawn(|s| {
            let _ = proto::gen::wrenn::host::v1::dispatch_package(&Host, s)
                .unwrap_or_else(proto::rpc::serve::unknown);
        });
    }
}

#[test]
fn package_dispatch_serves_every_service_of_the_package() {
    use proto::gen::wrenn::host::v1 as host;
    let dir = crate::support::TempDir::new("pkg");
    let sock = dir.path.join("s.sock");
    let mut server = Server::new(ServerConfig::new("pkg"), Arc::new(HostSvc)).unwrap();
    server.listen_unix(&sock).unwrap();
    let (handle, _thread) = server.spawn().unwrap();
    let client = proto::rpc::Client::connect_unix(&sock, Credential::none()).unwrap();
    let c = host::HostClient::new(&client).with_timeout(std::time::Duration::from_secs(10));
    let r = c.register(&host::RegisterRequest::default()).unwrap();
    assert!(r.host_id.ends_with("|Local|false"), "{}", r.host_id);
    let e = c.heartbeat(&host::HeartbeatRequest::default()).unwrap_err();
    assert_eq!(e.code, Code::Unavailable);
    let e = c
        .report_state(&host::ReportStateRequest::default())
        .unwrap_err();
    assert_eq!(e.code, Code::Aborted);
    // A method of another package is given back, and answered unimplemented by name.
    let e = pb::HealthClient::new(&client)
        .check(&pb::HealthCheckRequest {})
        .unwrap_err();
    assert_eq!(e.code, Code::Unimplemented);
    assert!(e.message.contains("Health/Check"), "{}", e.message);
    drop(client);
    handle.shutdown();
}

/// The encoded-message form of a package's unary methods (ctl's HTTP gateway calls the same
/// trait methods through it): a response for a unary method, the handler's error, a
/// malformed request refused before the handler, None for anything else.
#[test]
fn call_unary_runs_a_package_method_on_encoded_messages() {
    use prost::Message;
    use proto::gen::wrenn::host::v1 as host;
    let ctx = CallCtx::new(Arc::new("gw".to_owned()), proto::rpc::Source::Local);
    let req = host::RegisterRequest::default().encode_to_vec();
    let out = host::call_unary_package(&Host, &ctx, host::host_methods::REGISTER, &req)
        .expect("Register is a unary method of host.v1")
        .unwrap();
    let r = host::RegisterResponse::decode(&out[..]).unwrap();
    assert_eq!(r.host_id, "gw|Local|false");
    let e = host::call_unary_package(&Host, &ctx, host::host_methods::HEARTBEAT, &[])
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code, Code::Unavailable);
    let e = host::call_unary_package(&Host, &ctx, host::host_methods::REGISTER, &[0xff])
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    assert!(e.message.contains("malformed request"), "{}", e.message);
    assert!(host::call_unary_package(&Host, &ctx, pb::health_methods::CHECK, &[]).is_none());
}

//! Hybrid vsock, host side, against a stand-in for Firecracker's vsock socket: the CONNECT
//! handshake (one write, bytes after `OK` kept, refusal, garbage, deadline), an RPC client
//! over it, and the readiness listener served with proto's runtime.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::gen::wrenn::envd::v1::{announce_methods, ReadyRequest, ReadyResponse};
use proto::gen::wrenn::wire::v1::Hello;
use proto::rpc::{Call, Client, Credential, Peer, Server, ServerConfig, Service};
use proto::{Code, Status};
use vmm_glue::vsock::{self, ReadinessListener, VsockError, READINESS_PORT};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = PathBuf::from(format!("/tmp/vgv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A stand-in for Firecracker's vsock socket: accepts one connection, checks that the first
/// read holds the whole `CONNECT <port>\n`, then runs `then` on the stream.
fn fake_vsock(
    path: PathBuf,
    port: u32,
    then: impl FnOnce(UnixStream) + Send + 'static,
) -> JoinHandle<()> {
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            format!("CONNECT {port}\n").as_bytes(),
            "one write"
        );
        then(s)
    })
}

#[test]
fn connect_keeps_bytes_after_ok() {
    let d = TempDir::new("ok");
    let uds = d.0.join("v.sock");
    let t = fake_vsock(uds.clone(), 49983, |mut s| {
        // The reply and the guest's first bytes in one write.
        s.write_all(b"OK 1073741824\nhello from the guest").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
    });
    let mut s = vsock::connect(&uds, 49983, Duration::from_secs(2)).unwrap();
    let mut got = [0u8; 20];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello from the guest");
    s.write_all(b"ping").unwrap();
    t.join().unwrap();
}

#[test]
fn connect_refused_garbage_slow() {
    let d = TempDir::new("bad");
    let uds = d.0.join("r.sock");
    let t = fake_vsock(uds.clone(), 7, drop);
    assert!(matches!(
        vsock::connect(&uds, 7, Duration::from_secs(2)),
        Err(VsockError::Refused { port: 7 })
    ));
    t.join().unwrap();

    let uds = d.0.join("g.sock");
    let t = fake_vsock(uds.clone(), 8, |mut s| {
        s.write_all(b"NOPE\n").unwrap();
    });
    assert!(matches!(
        vsock::connect(&uds, 8, Duration::from_secs(2)),
        Err(VsockError::BadReply { .. })
    ));
    t.join().unwrap();

    let uds = d.0.join("l.sock");
    let t = fake_vsock(uds.clone(), 9, |mut s| {
        // No newline, ever: the bounded reply buffer ends it.
        let _ = s.write_all(&[b'O'; 200]);
    });
    assert!(matches!(
        vsock::connect(&uds, 9, Duration::from_secs(2)),
        Err(VsockError::BadReply { .. })
    ));
    t.join().unwrap();

    let uds = d.0.join("s.sock");
    let t = fake_vsock(uds.clone(), 10, |mut s| {
        std::thread::sleep(Duration::from_millis(600));
        let _ = s.write_all(b"OK 1\n");
    });
    let t0 = Instant::now();
    assert!(matches!(
        vsock::connect(&uds, 10, Duration::from_millis(150)),
        Err(VsockError::Timeout { port: 10, .. })
    ));
    assert!(t0.elapsed() < Duration::from_millis(500));
    t.join().unwrap();

    assert!(matches!(
        vsock::connect(&d.0.join("absent.sock"), 1, Duration::from_secs(1)),
        Err(VsockError::Connect { .. })
    ));
}

/// A one-method service standing in for envd's API.
struct Echo;

impl Service for Echo {
    fn hello(&self, _h: &Hello) -> Result<Peer, Status> {
        Ok(Arc::new(()))
    }
    fn call(&self, call: Call) {
        match call.decode::<ReadyRequest>() {
            Ok(mut r) => {
                r.hostname = format!("echo:{}", r.hostname);
                call.reply(&r);
            }
            Err(s) => call.fail(s),
        }
    }
}

fn pump(mut from: UnixStream, mut to: UnixStream) {
    let mut b = [0u8; 16 * 1024];
    loop {
        match from.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

#[test]
fn rpc_over_hybrid_vsock() {
    let d = TempDir::new("rpc");
    let guest = d.0.join("guest.sock");
    let mut server = Server::new(ServerConfig::new("guest"), Arc::new(Echo)).unwrap();
    server.listen_unix(&guest).unwrap();
    let (handle, join) = server.spawn().unwrap();
    let uds = d.0.join("v.sock");
    // The stand-in Firecracker answers OK and then relays bytes to the "guest" server.
    let t = fake_vsock(uds.clone(), vsock::ENVD_PORT, move |mut s| {
        s.write_all(b"OK 1073741825\n").unwrap();
        let g = UnixStream::connect(&guest).unwrap();
        let (s2, g2) = (s.try_clone().unwrap(), g.try_clone().unwrap());
        let a = std::thread::spawn(move || pump(s2, g2));
        pump(g, s);
        let _ = a.join();
    });
    let client = vsock::connect_rpc(
        &uds,
        vsock::ENVD_PORT,
        Credential::access_token("tok"),
        Duration::from_secs(2),
    )
    .unwrap();
    let req = ReadyRequest {
        hostname: "sb".into(),
        ..Default::default()
    };
    let resp: ReadyRequest = client
        .unary(
            "wrenn.test.v1.Echo/Echo",
            &req,
            Some(Duration::from_secs(5)),
        )
        .unwrap();
    assert_eq!(resp.hostname, "echo:sb");
    client.close();
    drop(client);
    handle.shutdown();
    join.join().unwrap().unwrap();
    t.join().unwrap();
}

#[test]
fn readiness_listener_delivers_ready() {
    let d = TempDir::new("ready");
    let uds = d.0.join("v.sock");
    let (listener, rx) = ReadinessListener::with_channel(&uds).unwrap();
    assert_eq!(listener.path(), vsock::listener_path(&uds, READINESS_PORT));
    // What envd does: connect to host port 49984 (here the Unix socket Firecracker would
    // connect to) without a credential, and call Announce/Ready.
    let c = Client::connect_unix(listener.path(), Credential::none()).unwrap();
    let req = ReadyRequest {
        envd_version: "0.1.0".into(),
        boot_id: "b-1".into(),
        instance_id: "i-1".into(),
        resumed: true,
        hostname: "sandbox".into(),
        sandbox_id: "sb-x".into(),
        initialized: true,
        api_port: vsock::ENVD_PORT,
    };
    let _: ReadyResponse = c
        .unary(announce_methods::READY, &req, Some(Duration::from_secs(5)))
        .unwrap();
    let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(got, req);
    // Any other method is refused.
    let err = c
        .unary::<ReadyRequest, ReadyResponse>(
            "wrenn.envd.v1.Process/List",
            &req,
            Some(Duration::from_secs(5)),
        )
        .unwrap_err();
    assert_eq!(err.code, Code::Unimplemented);
    c.close();
    let path = listener.path().to_owned();
    listener.shutdown();
    assert!(!path.exists(), "socket file removed");
    assert!(rx.try_recv().is_err());
}

/// The hello is bounded by the caller's timeout, not the network default
/// (`proto::limits::HELLO_TIMEOUT`, 10 s): a guest that answers late but within it is served,
/// and one that never answers costs the caller's timeout.
#[test]
fn rpc_hello_waits_as_long_as_the_caller_allows() {
    let d = TempDir::new("slowhello");
    let guest = d.0.join("guest.sock");
    let mut server = Server::new(ServerConfig::new("guest"), Arc::new(Echo)).unwrap();
    server.listen_unix(&guest).unwrap();
    let (handle, join) = server.spawn().unwrap();
    let late = proto::limits::HELLO_TIMEOUT + Duration::from_secs(1);
    let uds = d.0.join("v.sock");
    // OK at once, then the guest's side only after `late`.
    let t = fake_vsock(uds.clone(), vsock::ENVD_PORT, move |mut s| {
        s.write_all(b"OK 1073741825\n").unwrap();
        std::thread::sleep(late);
        let g = UnixStream::connect(&guest).unwrap();
        let (s2, g2) = (s.try_clone().unwrap(), g.try_clone().unwrap());
        let a = std::thread::spawn(move || pump(s2, g2));
        pump(g, s);
        let _ = a.join();
    });
    let client = vsock::connect_rpc(
        &uds,
        vsock::ENVD_PORT,
        Credential::access_token("tok"),
        late + Duration::from_secs(10),
    )
    .expect("a hello answered within the caller's timeout");
    client.close();
    drop(client);
    t.join().unwrap();

    let uds2 = d.0.join("v2.sock");
    let t = fake_vsock(uds2.clone(), vsock::ENVD_PORT, |mut s| {
        s.write_all(b"OK 1073741825\n").unwrap();
        std::thread::sleep(Duration::from_secs(6));
    });
    let t0 = Instant::now();
    let e = vsock::connect_rpc(
        &uds2,
        vsock::ENVD_PORT,
        Credential::access_token("tok"),
        Duration::from_secs(1),
    )
    .map(|_| ())
    .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a silent guest held the caller {:?} past its 1 s timeout: {e}",
        t0.elapsed()
    );
    t.join().unwrap();
    handle.shutdown();
    join.join().unwrap().unwrap();
}

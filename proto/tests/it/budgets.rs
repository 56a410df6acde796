//! The server's connection budgets (issue 12 item 2, issue 18): pre-hello budget with
//! eviction, hello deadline, per-source accept rate, per-credential budget, reserved slots.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::frame::{self, Kind};
use proto::rpc::{Client, ClientConfig, Credential, CredentialKind, Server, ServerConfig};
use proto::Code;

use crate::support::*;

/// Reads frames until EOF; returns the last connection error (code, message), if any.
fn conn_error<S: Read>(s: &mut S) -> Option<(Code, String)> {
    let mut err = None;
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return err;
        }
        let mut rest = vec![0u8; u32::from_be_bytes(len) as usize];
        if s.read_exact(&mut rest).is_err() {
            return err;
        }
        if rest[4] == Kind::Error as u8 && rest[..4] == [0, 0, 0, 0] {
            let (code, msg) = frame::parse_error(&rest[6..]).unwrap();
            err = Some((code, msg.to_owned()));
        }
    }
}

fn refused_count(budget: &str) -> u64 {
    proto::rpc::admission::refusals()
        .into_iter()
        .find(|(b, _)| *b == budget)
        .unwrap()
        .1
}

struct TcpServer {
    handle: proto::rpc::ServerHandle,
    addr: SocketAddr,
    join: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TcpServer {
    fn start(cfg: ServerConfig) -> TcpServer {
        let svc = Arc::new(TestService {
            stats: Default::default(),
            secret: None,
        });
        let mut server = Server::new(cfg, svc).unwrap();
        let addr = server.listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let (handle, join) = server.spawn().unwrap();
        TcpServer {
            handle,
            addr,
            join: Some(join),
        }
    }

    fn connect(&self, cred: Credential) -> Result<Client, proto::Status> {
        Client::connect_tcp(self.addr, cred)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// A TCP connection from the given loopback source address (127.0.0.0/8 is all local).
fn connect_from(src: [u8; 4], to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: fd is a new socket that nothing else owns.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    let bind = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes(src).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `bind` is a valid sockaddr_in and its size is passed.
    let r = unsafe {
        libc::bind(
            fd,
            (&bind as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "bind {src:?}: {}", std::io::Error::last_os_error());
    let SocketAddr::V4(to4) = to else { panic!() };
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `dst` is a valid sockaddr_in and its size is passed.
    let r = unsafe {
        libc::connect(
            fd,
            (&dst as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn per_credential_budget_refuses_naming_it() {
    let mut cfg = ServerConfig::new("test");
    cfg.per_credential_max[CredentialKind::ApiKey as usize] = 2;
    let srv = TcpServer::start(cfg);
    let before = refused_count("per_credential_max");
    let a = srv.connect(Credential::api_key("k1")).unwrap();
    let b = srv.connect(Credential::api_key("k1")).unwrap();
    let e = srv.connect(Credential::api_key("k1")).unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted, "{e}");
    assert!(e.message.contains("per_credential_max"), "{e}");
    assert!(refused_count("per_credential_max") > before);
    // Another key has its own budget; closing one frees a slot of the first.
    let _c = srv.connect(Credential::api_key("k2")).unwrap();
    a.close();
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    let again = loop {
        match srv.connect(Credential::api_key("k1")) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    };
    let r: Blob = again.unary(UNARY, &Blob::default(), None).unwrap();
    assert_eq!(r, Blob::default());
    drop(b);
}

#[test]
fn reserved_slots_keep_room_for_the_privileged_kind() {
    let mut cfg = ServerConfig::new("test").reserve_for(CredentialKind::AgentToken);
    cfg.connections_max = 4;
    cfg.reserved_connections = 2;
    let srv = TcpServer::start(cfg);
    let _held: Vec<_> = (0..2)
        .map(|i| srv.connect(Credential::api_key(format!("k{i}"))).unwrap())
        .collect();
    let e = srv.connect(Credential::api_key("k9")).unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted);
    assert!(
        e.message.contains("connections_max") && e.message.contains("AGENT_TOKEN"),
        "{e}"
    );
    // The reserved kind still gets in, up to the total.
    let ctl1 = srv.connect(Credential::agent_token("t")).unwrap();
    let _ctl2 = srv.connect(Credential::agent_token("t")).unwrap();
    let e = srv.connect(Credential::agent_token("t")).unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted);
    let r: Blob = ctl1.unary(UNARY, &Blob::default(), None).unwrap();
    assert_eq!(r, Blob::default());
}

#[test]
fn full_pre_hello_budget_evicts_the_oldest_for_a_newcomer() {
    let mut cfg = ServerConfig::new("test");
    cfg.pre_hello_max = 4;
    cfg.pre_hello_per_source_max = 4;
    let srv = TestServer::start_with(cfg, None);
    let before = refused_count("pre_hello_max");
    // Four idle Unix connections fill the budget (Unix peers are one source).
    let mut idle: Vec<UnixStream> = (0..4)
        .map(|_| {
            let s = UnixStream::connect(&srv.path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    // A legitimate client still gets in, at once; the oldest idle one was evicted.
    let t0 = Instant::now();
    let c = srv.client();
    let r: Blob = c.unary(UNARY, &Blob::default(), None).unwrap();
    assert_eq!(r, Blob::default());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let (code, msg) = conn_error(&mut idle[0]).expect("the oldest was told why");
    assert_eq!(code, Code::ResourceExhausted);
    assert!(msg.contains("pre_hello_max"), "{msg}");
    assert!(refused_count("pre_hello_max") > before);
    // The others are still open (a write succeeds, nothing to read yet).
    idle[1].set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        idle[1].read(&mut b).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
}

#[test]
fn connections_without_hello_close_at_the_hello_deadline() {
    let mut cfg = ServerConfig::new("test");
    cfg.hello_timeout = Duration::from_millis(300);
    let srv = TestServer::start_with(cfg, None);
    let mut s = UnixStream::connect(&srv.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Half a hello: trickled bytes do not extend the deadline.
    s.write_all(&[0, 0, 0, 40, 0, 0]).unwrap();
    let t0 = Instant::now();
    let (code, _) = conn_error(&mut s).expect("an error before the close");
    assert_eq!(code, Code::DeadlineExceeded);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn accept_rate_is_limited_per_source_address() {
    let mut cfg = ServerConfig::new("test");
    cfg.accept_rate_per_source = 1;
    cfg.accept_burst_per_source = 3;
    let srv = TcpServer::start(cfg);
    let before = refused_count("accept_rate_per_source");
    let held: Vec<_> = (0..3)
        .map(|_| connect_from([127, 0, 0, 7], srv.addr))
        .collect();
    let mut fourth = connect_from([127, 0, 0, 7], srv.addr);
    let (code, msg) = conn_error(&mut fourth).expect("refused with a reason");
    assert_eq!(code, Code::ResourceExhausted);
    assert!(msg.contains("accept_rate_per_source"), "{msg}");
    assert!(refused_count("accept_rate_per_source") > before);
    // Another address is not affected.
    let s = connect_from([127, 0, 0, 8], srv.addr);
    let cfg = ClientConfig::default();
    let c = Client::from_stream(s.into(), Credential::none(), &cfg).unwrap();
    let r: Blob = c.unary(UNARY, &Blob::default(), None).unwrap();
    assert_eq!(r, Blob::default());
    drop(held);
}

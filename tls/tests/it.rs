//! The TLS transport end to end over loopback: unary and streamed calls, the refusals (wrong
//! CA, plaintext to a TLS port, TLS to a plaintext port, garbage records, missing or foreign
//! client certificates), and the server serving everyone else meanwhile.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use proto::rpc::{
    Call, CallOpts, Client, ClientConfig, Credential, Hello, Peer, Server, ServerConfig,
    ServerHandle, Service,
};
use proto::Status;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tls::{ClientOptions, ClientTls, ServerOptions, ServerTls, ALPN_WRENN};

#[derive(Clone, PartialEq, prost::Message)]
struct Blob {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
    #[prost(uint64, tag = "2")]
    n: u64,
}

const ECHO: &str = "t.T/Echo";
const STREAM: &str = "t.T/Stream";
/// Answers the client certificate the call's context holds (empty without one).
const CERT: &str = "t.T/Cert";

struct Svc;

impl Service for Svc {
    fn hello(&self, _: &Hello) -> Result<Peer, Status> {
        Ok(Arc::new(()))
    }
    fn call(&self, call: Call) {
        match call.method() {
            ECHO => {
                let r = call.decode::<Blob>();
                call.respond(r)
            }
            STREAM => call.spawn(|mut s| {
                let req: Blob = match s.first() {
                    Ok(r) => r,
                    Err(e) => return s.finish(Err(e)),
                };
                for i in 0..req.n {
                    let m = Blob {
                        data: vec![(i % 251) as u8; req.data.len()],
                        n: i,
                    };
                    if let Err(e) = s.send(&m) {
                        return s.finish(Err(e));
                    }
                }
                s.finish(Ok(()))
            }),
            CERT => {
                let data = call.ctx().client_cert.clone().unwrap_or_default().to_vec();
                call.reply(&Blob { data, n: 0 })
            }
            _ => call.fail(Status::unimplemented("no")),
        }
    }
}

fn pem(label: &str, der: &[u8]) -> Vec<u8> {
    let b = proto::base64::encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out.into_bytes()
}

/// A CA and what it signs, all in memory.
struct Ca {
    cert_pem: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: pem("CERTIFICATE", cert.der()),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for these names.
    fn leaf(&self, names: &[&str]) -> (Vec<u8>, Vec<u8>) {
        self.leaf_with(names, |_| {})
    }

    /// A leaf with its parameters adjusted (e.g. its validity).
    fn leaf_with(
        &self,
        names: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            pem("CERTIFICATE", cert.der()),
            pem("PRIVATE KEY", &key.serialize_der()),
        )
    }
}

fn wrenn_reply() -> Vec<u8> {
    let mut out = Vec::new();
    proto::frame::put_error(
        &mut out,
        0,
        proto::Code::Unavailable,
        "server speaks TLS: connect with TLS (ALPN wrenn/1)",
    );
    out
}

fn server_opts() -> ServerOptions {
    ServerOptions {
        alpn: vec![ALPN_WRENN.to_vec()],
        plaintext_reply: Some(wrenn_reply()),
        ..Default::default()
    }
}

/// A server on a loopback port; with `tls`, over TLS.
fn serve(tls: Option<&ServerTls>) -> (SocketAddr, ServerHandle) {
    let mut cfg = ServerConfig::new("tls-test");
    cfg.hello_timeout = Duration::from_secs(2);
    let mut server = Server::new(cfg, Arc::new(Svc)).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    match tls {
        Some(t) => server.listen_fd_with(l.into(), t.wrap()).unwrap(),
        None => server.listen_fd(l.into()).unwrap(),
    }
    let (h, _) = server.spawn().unwrap();
    (addr, h)
}

fn client_tls(ca: &Ca) -> ClientTls {
    ClientTls::from_ca_pem(
        &ca.cert_pem,
        ClientOptions {
            alpn: vec![ALPN_WRENN.to_vec()],
            ..Default::default()
        },
    )
    .unwrap()
}

fn connect(addr: SocketAddr, tls: &ClientTls) -> Result<Client, Status> {
    let cfg = ClientConfig {
        hello_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    tls::connect(&addr.to_string(), tls, Credential::none(), &cfg)
}

fn echo(c: &Client, data: Vec<u8>) -> Blob {
    c.unary(ECHO, &Blob { data, n: 7 }, Some(Duration::from_secs(10)))
        .unwrap()
}

fn tls_server(ca: &Ca) -> (SocketAddr, ServerHandle) {
    let (cert, key) = ca.leaf(&["127.0.0.1", "localhost"]);
    let st = ServerTls::from_pem(&cert, &key, &server_opts()).unwrap();
    serve(Some(&st))
}

#[test]
fn unary_and_streams_over_tls() {
    let ca = Ca::new("test CA");
    let (addr, h) = tls_server(&ca);
    let c = connect(addr, &client_tls(&ca)).unwrap();
    assert_eq!(echo(&c, b"hi".to_vec()).data, b"hi");
    // A message larger than a record and than rustls' buffer.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(echo(&c, big.clone()).data, big);
    // 64 MiB streamed: many records, the socket full at times.
    let mut s = c
        .call(
            STREAM,
            &Blob {
                data: vec![0; 64 * 1024],
                n: 1024,
            },
            CallOpts {
                timeout: Some(Duration::from_secs(60)),
                end_stream: true,
            },
        )
        .unwrap();
    let mut count = 0u64;
    while let Some(m) = s.recv::<Blob>().unwrap() {
        assert_eq!(m.n, count);
        assert_eq!(m.data.len(), 64 * 1024);
        assert!(m.data.iter().all(|&b| b == (count % 251) as u8));
        count += 1;
    }
    assert_eq!(count, 1024);
    // Many calls at once from many threads on one connection.
    std::thread::scope(|sc| {
        for t in 0..8u8 {
            let c = c.clone();
            sc.spawn(move || {
                for i in 0..50u8 {
                    let d = vec![t ^ i; 1000 + i as usize * 100];
                    assert_eq!(echo(&c, d.clone()).data, d);
                }
            });
        }
    });
    h.shutdown();
}

#[test]
fn a_client_trusting_another_ca_is_refused_and_others_still_served() {
    let ca = Ca::new("right CA");
    let other = Ca::new("other CA");
    let (addr, h) = tls_server(&ca);
    let good = connect(addr, &client_tls(&ca)).unwrap();
    let err = connect(addr, &client_tls(&other)).unwrap_err();
    assert!(
        err.message.contains("certificate") && err.message.contains("TLS"),
        "{err:?}"
    );
    assert_eq!(echo(&good, b"still".to_vec()).data, b"still");
    assert!(connect(addr, &client_tls(&ca)).is_ok());
    h.shutdown();
}

#[test]
fn a_certificate_for_another_name_is_refused() {
    let ca = Ca::new("CA");
    let (cert, key) = ca.leaf(&["ctl.example"]);
    let st = ServerTls::from_pem(&cert, &key, &server_opts()).unwrap();
    let (addr, h) = serve(Some(&st));
    let err = connect(addr, &client_tls(&ca)).unwrap_err();
    assert!(err.message.contains("certificate"), "{err:?}");
    h.shutdown();
}

#[test]
fn a_plaintext_client_on_a_tls_port_hears_that_the_server_speaks_tls() {
    let ca = Ca::new("CA");
    let (addr, h) = tls_server(&ca);
    let t0 = std::time::Instant::now();
    let err = Client::connect_tcp(addr, Credential::none()).unwrap_err();
    assert!(err.message.contains("server speaks TLS"), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "no hang");
    assert!(connect(addr, &client_tls(&ca)).is_ok());
    h.shutdown();
}

#[test]
fn a_tls_client_on_a_plaintext_port_hears_that_the_server_does_not_speak_tls() {
    let ca = Ca::new("CA");
    let (addr, h) = serve(None);
    let t0 = std::time::Instant::now();
    let err = connect(addr, &client_tls(&ca)).unwrap_err();
    assert!(err.message.contains("server does not speak TLS"), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "no hang");
    h.shutdown();
}

#[test]
fn garbage_and_truncated_records_are_refused_and_others_still_served() {
    let ca = Ca::new("CA");
    let (addr, h) = tls_server(&ca);
    let good = connect(addr, &client_tls(&ca)).unwrap();
    let cases: [&[u8]; 4] = [
        // A handshake record whose body is garbage.
        &[0x16, 0x03, 0x01, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8],
        // A record longer than TLS allows.
        &[0x16, 0x03, 0x03, 0xff, 0xff, 0, 0, 0],
        // An application-data record before any handshake.
        &[0x17, 0x03, 0x03, 0x00, 0x04, 9, 9, 9, 9],
        // A truncated ClientHello, then the client goes away.
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01],
    ];
    for (i, bytes) in cases.iter().enumerate() {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(bytes).unwrap();
        if i == 3 {
            drop(s);
            continue;
        }
        // The server answers with an alert or a plaintext refusal, then closes.
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(
            got.is_empty() || got[0] == tls::RECORD_ALERT || got[0] == 0,
            "case {i}: {got:?}"
        );
    }
    assert_eq!(echo(&good, b"fine".to_vec()).data, b"fine");
    assert!(connect(addr, &client_tls(&ca)).is_ok());
    h.shutdown();
}

#[test]
fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let ca = Ca::new("host CA");
    let rogue = Ca::new("rogue CA");
    let (cert, key) = ca.leaf(&["127.0.0.1"]);
    let opts = ServerOptions {
        client_ca_pem: Some(ca.cert_pem.clone()),
        ..server_opts()
    };
    let st = ServerTls::from_pem(&cert, &key, &opts).unwrap();
    let (addr, h) = serve(Some(&st));
    let with_identity = |signer: &Ca| {
        let (c, k) = signer.leaf(&["host-1.hosts.wrenn"]);
        ClientTls::from_ca_pem(
            &ca.cert_pem,
            ClientOptions {
                alpn: vec![ALPN_WRENN.to_vec()],
                identity: Some((
                    tls::certs_from_pem(&c, "c").unwrap(),
                    tls::key_from_pem(&k, "k").unwrap(),
                )),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let (c, k) = ca.leaf(&["host-1.hosts.wrenn"]);
    let identity = ClientTls::from_ca_pem(
        &ca.cert_pem,
        ClientOptions {
            alpn: vec![ALPN_WRENN.to_vec()],
            identity: Some((
                tls::certs_from_pem(&c, "c").unwrap(),
                tls::key_from_pem(&k, "k").unwrap(),
            )),
            ..Default::default()
        },
    )
    .unwrap();
    let good = connect(addr, &identity).unwrap();
    assert_eq!(echo(&good, b"m".to_vec()).data, b"m");
    // Every call's context carries the certificate the client presented.
    let seen: Blob = good.unary(CERT, &Blob::default(), None).unwrap();
    let der = tls::certs_from_pem(&c, "c").unwrap();
    assert_eq!(seen.data, der[0].as_ref());
    // TLS 1.3 client authentication fails after the client's Finished: the refusal
    // reaches the client as an alert when it reads, or as a closed connection.
    assert!(connect(addr, &client_tls(&ca)).is_err(), "no certificate");
    assert!(connect(addr, &with_identity(&rogue)).is_err(), "foreign CA");
    assert_eq!(echo(&good, b"n".to_vec()).data, b"n");
    h.shutdown();
}

#[test]
fn bad_pem_files_get_errors_naming_them() {
    let dir = std::env::temp_dir().join(format!("wrenn-tls-pem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, b"not a pem").unwrap();
    std::fs::write(&key, b"").unwrap();
    let e = ServerTls::from_pem_files(&cert, &key, &server_opts()).unwrap_err();
    assert!(e.to_string().contains("cert.pem"), "{e}");
    let ca = Ca::new("CA");
    let (c, _) = ca.leaf(&["x"]);
    std::fs::write(&cert, &c).unwrap();
    let e = ServerTls::from_pem_files(&cert, &key, &server_opts()).unwrap_err();
    assert!(e.to_string().contains("key.pem"), "{e}");
    let e = ServerTls::from_pem_files(&dir.join("missing"), &key, &server_opts()).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A flood of half-finished TLS handshakes (from 127.0.0.2+) does not slow an authenticated
/// client that connects anew every tenth call: the budget of connections before their hello
/// covers handshakes (loaded p99 at most 2x unloaded p99 plus `flood::TEST_FLOOR`, bounded in time).
#[test]
fn half_finished_handshakes_do_not_slow_others() {
    use proto::rpc::flood::{self, Scenario, Size, Target};
    let ca = Ca::new("CA");
    let (cert, key) = ca.leaf(&["127.0.0.1"]);
    let st = ServerTls::from_pem(&cert, &key, &server_opts()).unwrap();
    let mut server = Server::new(ServerConfig::new("tls-flood"), Arc::new(Svc)).unwrap();
    let addr = server
        .listen_tcp_with("127.0.0.1:0".parse().unwrap(), st.wrap())
        .unwrap();
    let (h, _) = server.spawn().unwrap();
    let client = client_tls(&ca);
    let mut conn: Option<Client> = None;
    let mut n = 0u32;
    let mut legit = || -> Result<(), String> {
        n += 1;
        if n % 10 == 0 || conn.is_none() {
            if let Some(old) = conn.take() {
                old.close();
            }
            conn = Some(connect(addr, &client).map_err(|e| format!("connect: {e}"))?);
        }
        let c = conn.as_ref().expect("connected above");
        let r: Blob = c
            .unary(
                ECHO,
                &Blob {
                    data: vec![1; 64],
                    n: 1,
                },
                Some(Duration::from_secs(10)),
            )
            .map_err(|e| format!("echo: {e}"))?;
        (r.n == 1)
            .then_some(())
            .ok_or_else(|| "wrong echo".to_string())
    };
    let r = flood::run_checked(
        &Target::Tcp(addr),
        &Scenario::TlsHalfHandshake,
        &Size::quick(),
        None,
        &mut legit,
        flood::TEST_FLOOR,
        0,
    );
    h.shutdown();
    let r = r.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("tls {}", r.line());
    assert!(r.opened > 64, "the flood opened only {}", r.opened);
}

/// Replays the committed corpus of the `tls_first_bytes` fuzz target.
#[test]
fn first_bytes_corpus() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/tls_first_bytes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("corpus directory") {
        tls::fuzz_first_bytes(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0);
}

/// Replays the committed corpus of the `cert_serial` fuzz target (a real certificate, its
/// truncations and corruptions).
#[test]
fn cert_serial_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/cert_serial");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("corpus directory") {
        tls::peer::fuzz_cert_serial(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0);
}

/// Issue 14: a second certificate chosen by SNI (the sandbox ports' wildcard): a client
/// naming a host under that domain gets it, a client dialing the IP address gets the main
/// one; each verifies against its own name.
#[test]
fn a_second_certificate_is_chosen_by_sni() {
    let ca = Ca::new("CA");
    let (cert, key) = ca.leaf(&["127.0.0.1"]);
    let (wc, wk) = ca.leaf(&["*.sbx.example"]);
    let opts = ServerOptions {
        sni: vec![tls::SniCert {
            domain: "sbx.example".into(),
            cert_pem: wc,
            key_pem: wk,
        }],
        ..server_opts()
    };
    let st = ServerTls::from_pem(&cert, &key, &opts).unwrap();
    let (addr, h) = serve(Some(&st));
    let named = |name: &str| {
        ClientTls::from_ca_pem(
            &ca.cert_pem,
            ClientOptions {
                alpn: vec![ALPN_WRENN.to_vec()],
                server_name: Some(name.into()),
                ..Default::default()
            },
        )
        .unwrap()
    };
    // The IP address: no SNI, the main certificate.
    let c = connect(addr, &client_tls(&ca)).unwrap();
    assert_eq!(echo(&c, b"a".to_vec()).data, b"a");
    // A name under the domain: the wildcard certificate.
    let c = connect(addr, &named("p-8080.sbx.example")).unwrap();
    assert_eq!(echo(&c, b"b".to_vec()).data, b"b");
    // Another name gets the main certificate, which does not carry it: refused.
    let e = connect(addr, &named("other.example")).unwrap_err();
    assert!(e.message.contains("certificate"), "{e:?}");
    h.shutdown();
}

/// An expired server certificate is refused by the client, naming the reason, and the
/// server keeps serving (it does not know or care).
#[test]
fn an_expired_certificate_is_refused() {
    let ca = Ca::new("CA");
    let (cert, key) = ca.leaf_with(&["127.0.0.1"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let st = ServerTls::from_pem(&cert, &key, &server_opts()).unwrap();
    let (addr, h) = serve(Some(&st));
    let e = connect(addr, &client_tls(&ca)).unwrap_err();
    assert!(e.message.contains("certificate expired"), "{e:?}");
    h.shutdown();
}

/// Issue 14: an agent's first connection trusts only the CA its registration token pins
/// (the CA's SHA-256), found in the server's chain or in the `--ctl-ca` bundle; a server
/// whose CA does not match is refused, naming the pin, even when its chain is valid.
#[test]
fn a_registration_pin_refuses_a_server_with_another_ca() {
    let ca = Ca::new("ctl CA");
    let mitm = Ca::new("someone else's CA");
    let pin_of = |c: &Ca| {
        let der = tls::certs_from_pem(&c.cert_pem, "ca").unwrap();
        tls::hostkey::cert_sha256(der[0].as_ref())
    };
    let pinned = |pin, bundle: &[u8]| {
        tls::hostkey::pinned_client(pin, bundle, vec![ALPN_WRENN.to_vec()]).unwrap()
    };
    // ctl serving its chain with the CA in it: the pin alone is enough.
    let (leaf, key) = ca.leaf(&["127.0.0.1"]);
    let chain = [leaf.clone(), ca.cert_pem.clone()].concat();
    let st = ServerTls::from_pem(&chain, &key, &server_opts()).unwrap();
    let (addr, h) = serve(Some(&st));
    let c = connect(addr, &pinned(pin_of(&ca), &[])).unwrap();
    assert_eq!(echo(&c, b"pinned".to_vec()).data, b"pinned");
    // The token pins another CA: refused, however valid the chain.
    let e = connect(addr, &pinned(pin_of(&mitm), &ca.cert_pem)).unwrap_err();
    assert!(
        e.message
            .contains("does not match the registration token's pin"),
        "{e:?}"
    );
    h.shutdown();
    // A man in the middle with his own CA in his chain, the agent's token pinning ctl's.
    let (leaf, key) = mitm.leaf(&["127.0.0.1"]);
    let chain = [leaf, mitm.cert_pem.clone()].concat();
    let st = ServerTls::from_pem(&chain, &key, &server_opts()).unwrap();
    let (addr, h) = serve(Some(&st));
    let e = connect(addr, &pinned(pin_of(&ca), &ca.cert_pem)).unwrap_err();
    assert!(
        e.message
            .contains("does not chain to the CA the registration token pins"),
        "{e:?}"
    );
    let e = connect(addr, &pinned(pin_of(&ca), &[])).unwrap_err();
    assert!(
        e.message
            .contains("does not match the registration token's pin"),
        "{e:?}"
    );
    // Control: the same server is accepted when the pin is its CA's.
    let e = connect(addr, &pinned(pin_of(&mitm), &[])).map(|_| ());
    assert!(e.is_ok(), "the pin matches the server's CA here: {e:?}");
    h.shutdown();
    // The CA only in the bundle (a server sending its leaf alone).
    let (addr, h) = tls_server(&ca);
    let c = connect(addr, &pinned(pin_of(&ca), &ca.cert_pem)).unwrap();
    assert_eq!(echo(&c, b"bundle".to_vec()).data, b"bundle");
    let e = connect(addr, &pinned(pin_of(&ca), &[])).unwrap_err();
    assert!(e.message.contains("pin"), "{e:?}");
    h.shutdown();
}

/// Issue 14: the host key round-trips through its PEM file and its proof verifies only for
/// its token.
#[test]
fn host_key_signs_the_token_it_registers_with() {
    let k = tls::HostKey::generate().unwrap();
    let again = tls::HostKey::from_pem(k.to_pem().as_bytes()).unwrap();
    let sig = again.sign_token("wrr_t");
    tls::hostkey::verify_registration(k.public_key(), &sig, "wrr_t").unwrap();
    assert!(tls::hostkey::verify_registration(k.public_key(), &sig, "wrr_u").is_err());
}

/// A server-side [`tls::TlsTransport`] on an accepted loopback socket, and a rustls client
/// (buffered, driven by hand) on the other end: the test decides exactly which bytes of the
/// TLS stream the transport has when it reads.
fn hand_driven_pair(ca: &Ca) -> (tls::TlsTransport, tls::rustls::ClientConnection, TcpStream) {
    use proto::rpc::{SocketTransport, Transport};
    let (cert, key) = ca.leaf(&["127.0.0.1"]);
    let st = ServerTls::from_pem(&cert, &key, &server_opts()).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let client_sock = TcpStream::connect(addr).unwrap();
    client_sock.set_nodelay(true).unwrap();
    let (srv_sock, _) = l.accept().unwrap();
    let srv = st
        .accept(SocketTransport::new(std::os::fd::OwnedFd::from(srv_sock)))
        .unwrap();
    let mut roots = tls::rustls::RootCertStore::empty();
    for c in tls::certs_from_pem(&ca.cert_pem, "CA").unwrap() {
        roots.add(c).unwrap();
    }
    // The ring provider (deprecated for its lack of post-quantum key exchange; wrenn's own
    // configurations use it too, see config.rs).
    #[allow(deprecated)]
    let provider = tls::rustls::crypto::ring::default_provider();
    let mut cfg = tls::rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_WRENN.to_vec()];
    let name = tls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = tls::rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    // The handshake: the client blocking on its own thread, the server read by hand.
    let t = std::thread::spawn(move || {
        let mut s = client_sock;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut s).unwrap();
        }
        (conn, s)
    });
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut scratch = proto::rpc::BytesMut::with_capacity(64);
    while srv.is_handshaking() || !t.is_finished() {
        match srv.read_into(&mut scratch, false) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            r => panic!("handshake read: {r:?}"),
        }
        assert!(std::time::Instant::now() < end, "handshake timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
    let (conn, s) = t.join().unwrap();
    assert!(scratch.is_empty());
    (srv, conn, s)
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + seed * 13) % 251) as u8)
        .collect()
}

/// Issue 14's receive path (our own buffer, rustls' unbuffered API): the TLS stream reaches
/// the transport cut at every byte of its first records and at odd sizes after, full 16 KiB
/// records and small ones, and is read into buffers of 1 byte up to 40 KiB; every plaintext
/// byte comes out once, in order; a read that fills its buffer leaves the rest readable
/// (`poll` says so); after close_notify the reader sees end of stream and nothing that
/// followed.
#[test]
fn records_cut_anywhere_and_read_in_any_size_arrive_whole() {
    use proto::rpc::Transport;
    let ca = Ca::new("CA");
    let (srv, mut conn, mut sock) = hand_driven_pair(&ca);
    // Session tickets the server sent after its handshake.
    sock.set_nonblocking(true).unwrap();
    let _ = conn.read_tls(&mut sock);
    let _ = conn.process_new_packets();
    sock.set_nonblocking(false).unwrap();
    let sizes = [
        1,
        5,
        16 * 1024,
        16 * 1024 + 1,
        40_000,
        3,
        3 * 16 * 1024,
        700,
    ];
    let mut want = Vec::new();
    let mut wire = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let p = pattern(*n, i);
        conn.writer().write_all(&p).unwrap();
        want.extend_from_slice(&p);
        while conn.wants_write() {
            conn.write_tls(&mut wire).unwrap();
        }
    }
    conn.send_close_notify();
    while conn.wants_write() {
        conn.write_tls(&mut wire).unwrap();
    }
    // Bytes after close_notify are not read.
    wire.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x02, 0xde, 0xad]);
    let reads = [1, 3, 4096, 16 * 1024, 40_000, 7, 2];
    let mut got = Vec::new();
    let mut eof = false;
    let mut sent = 0;
    let mut i = 0;
    let read_some = |got: &mut Vec<u8>, i: &mut usize| -> bool {
        loop {
            let mut b = proto::rpc::BytesMut::with_capacity(reads[*i % reads.len()]);
            *i += 1;
            match srv.read_into(&mut b, false) {
                Ok(0) => return true,
                Ok(n) => {
                    assert_eq!(n, b.len());
                    got.extend_from_slice(&b);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) => panic!("read: {e}"),
            }
        }
    };
    // The first 20,000 bytes (the small records, a full one and the next one's start) one
    // byte at a time, then pieces of odd sizes.
    let cuts = [1usize, 2, 3, 5, 8, 13, 1021, 4099, 16_411, 17_000];
    let mut k = 0;
    while sent < wire.len() {
        let n = if sent < 20_000 {
            1
        } else {
            k += 1;
            cuts[k % cuts.len()]
        }
        .min(wire.len() - sent);
        sock.write_all(&wire[sent..sent + n]).unwrap();
        sent += n;
        // Loopback delivers before write returns; give the kernel a moment anyway now
        // and then.
        if k % 16 == 15 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!eof, "end of stream before close_notify");
        eof = read_some(&mut got, &mut i);
    }
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !eof {
        assert!(std::time::Instant::now() < end, "no end of stream");
        std::thread::sleep(Duration::from_millis(1));
        eof = read_some(&mut got, &mut i);
    }
    assert_eq!(got.len(), want.len());
    assert!(got == want, "plaintext differs");
    // End of stream stays end of stream.
    let mut b = proto::rpc::BytesMut::with_capacity(10);
    assert_eq!(srv.read_into(&mut b, false).unwrap(), 0);
}

/// A read into a buffer smaller than a record leaves the rest of the record held: `poll`
/// reports it readable at once and the next read returns it.
#[test]
fn the_rest_of_a_record_a_small_read_left_is_readable() {
    use proto::rpc::Transport;
    let ca = Ca::new("CA");
    let (srv, mut conn, mut sock) = hand_driven_pair(&ca);
    let p = pattern(10_000, 3);
    conn.writer().write_all(&p).unwrap();
    while conn.wants_write() {
        conn.write_tls(&mut sock).unwrap();
    }
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    let mut b = proto::rpc::BytesMut::with_capacity(100);
    while got.is_empty() {
        assert!(std::time::Instant::now() < end);
        match srv.read_into(&mut b, false) {
            Ok(n) => {
                assert_eq!(n, 100, "a full buffer");
                got.extend_from_slice(&b);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        srv.poll(false, Duration::ZERO).unwrap().0,
        "the rest is readable"
    );
    let mut rest = proto::rpc::BytesMut::with_capacity(20_000);
    assert_eq!(srv.read_into(&mut rest, false).unwrap(), 9_900);
    got.extend_from_slice(&rest);
    assert!(got == p);
    assert!(!srv.poll(false, Duration::ZERO).unwrap().0, "nothing more");
}

/// The send path: 3 MiB written through the transport in pieces of every size up to 64
/// KiB (full records, partial ones, more than the send bound at once) reach a rustls peer
/// whole, and shutdown_write ends them with close_notify.
#[test]
fn writes_of_any_size_reach_the_peer_whole_and_end_with_close_notify() {
    use proto::rpc::Transport;
    let ca = Ca::new("CA");
    let (srv, mut conn, mut sock) = hand_driven_pair(&ca);
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        loop {
            match conn.read_tls(&mut sock) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => panic!("client read: {e}"),
            }
            let io = conn.process_new_packets().unwrap();
            let mut left = io.plaintext_bytes_to_read();
            while left > 0 {
                let n = conn.reader().read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                left -= n;
            }
            if io.peer_has_closed() {
                return (got, true);
            }
        }
        (got, false)
    });
    let want = pattern(3 << 20, 9);
    let mut off = 0;
    let mut size = 1;
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while off < want.len() {
        let n = size.min(want.len() - off);
        match srv.write(&want[off..off + n]) {
            Ok(k) => off += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                srv.poll(true, Duration::from_millis(10)).unwrap();
                srv.flush().unwrap();
            }
            Err(e) => panic!("write: {e}"),
        }
        size = size * 3 % 65_537 + 1;
        assert!(std::time::Instant::now() < end, "writes timed out");
    }
    while srv.flush().unwrap() {
        srv.poll(true, Duration::from_millis(10)).unwrap();
        assert!(std::time::Instant::now() < end, "flush timed out");
    }
    srv.shutdown_write();
    let (got, closed) = reader.join().unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "plaintext differs");
    assert!(closed, "close_notify");
}

//! The transport seam (issue 11 §5): frame handling runs over any `Transport`. A toy
//! transport that scrambles every byte (as TLS would transform them) carries unary and
//! streamed calls with no change to the runtime, and a peer that does not speak it fails.

use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use proto::rpc::{
    CallOpts, Client, ClientConfig, Credential, ReadMode, Server, ServerConfig, SocketTransport,
    Source, Transport,
};

use crate::support::*;

const KEY: u8 = 0x5a;

struct Xor(SocketTransport);

impl Transport for Xor {
    fn read_into(&self, buf: &mut prost::bytes::BytesMut, block: bool) -> io::Result<usize> {
        let at = buf.len();
        let n = self.0.read_into(buf, block)?;
        for b in &mut buf[at..] {
            *b ^= KEY;
        }
        Ok(n)
    }
    fn write(&self, data: &[u8]) -> io::Result<usize> {
        let x: Vec<u8> = data.iter().map(|b| b ^ KEY).collect();
        self.0.write(&x)
    }
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let x: Vec<u8> = bufs
            .iter()
            .flat_map(|s| s.iter())
            .map(|b| b ^ KEY)
            .collect();
        self.0.write(&x)
    }
    fn poll(&self, want_write: bool, timeout: Duration) -> io::Result<(bool, bool)> {
        self.0.poll(want_write, timeout)
    }
    fn set_read_mode(&self, mode: ReadMode) -> io::Result<()> {
        self.0.set_read_mode(mode)
    }
    fn shutdown(&self) {
        self.0.shutdown()
    }
    fn fd(&self) -> BorrowedFd<'_> {
        self.0.fd()
    }
    fn source(&self) -> Source {
        self.0.source()
    }
}

#[test]
fn calls_run_over_a_wrapped_transport_without_frame_changes() {
    let dir = TempDir::new("xor");
    let path = dir.path.join("x.sock");
    let svc = Arc::new(TestService {
        stats: Default::default(),
        secret: None,
    });
    let mut server = Server::new(ServerConfig::new("xor"), svc).unwrap();
    let l = UnixListener::bind(&path).unwrap();
    server
        .listen_fd_with(
            l.into(),
            Arc::new(|s| Box::new(Xor(s)) as Box<dyn Transport>),
        )
        .unwrap();
    let (handle, join) = server.spawn().unwrap();

    let sock = UnixStream::connect(&path).unwrap();
    let io = Box::new(Xor(SocketTransport::new(sock.into())));
    let c = Client::from_transport(io, Credential::none(), &ClientConfig::default()).unwrap();
    let b = Blob {
        data: b"through the seam".to_vec(),
        n: 5,
        size: 0,
    };
    let r: Blob = c.unary(UNARY, &b, None).unwrap();
    assert_eq!(r, b);
    // Large payloads go through write_vectored (zero-copy segments) and come back intact.
    let mut s = c
        .call(
            PAYLOAD,
            &Blob {
                n: 14,
                ..Blob::default()
            },
            CallOpts {
                timeout: Some(Duration::from_secs(30)),
                end_stream: true,
            },
        )
        .unwrap();
    let mut i = 0;
    while let Some(m) = s.recv_bytes().unwrap() {
        let m: Blob = prost::Message::decode(m).unwrap();
        assert_eq!(m.data, payload_for(i), "message {i}");
        i += 1;
    }
    assert_eq!(i, 14);
    // A peer that does not speak the transport gets nowhere.
    let e = Client::connect_unix(&path, Credential::none()).unwrap_err();
    assert_ne!(e.code, proto::Code::Ok);

    handle.shutdown();
    join.join().unwrap().unwrap();
}

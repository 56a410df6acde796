//! RPC runtime cases: unary round trip against a raw socket ping-pong of the same bytes,
//! and streamed throughput against a raw socket copy of the same bytes.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use prost::Message;
use proto::rpc::{Call, CallOpts, Client, Credential, Hello, Peer, Server, ServerConfig, Service};
use proto::Status;

use crate::harness::{latency_line, measure, throughput_line, Case, Goal, Opts};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "rpc_unary",
            run: rpc_unary,
        },
        Case {
            name: "rpc_stream",
            run: rpc_stream,
        },
        Case {
            name: "listener_flood",
            run: listener_flood,
        },
    ]
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Blob {
    #[prost(bytes = "bytes", tag = "1")]
    pub(crate) data: proto::rpc::Bytes,
    #[prost(uint64, tag = "2")]
    pub(crate) n: u64,
}

pub(crate) const ECHO: &str = "bench.B/Echo";
pub(crate) const STREAM: &str = "bench.B/Stream";
/// Bytes per streamed message: the runtime's bulk chunk size.
pub(crate) const CHUNK: usize = proto::limits::CHUNK_LEN;

pub(crate) struct Bench;

impl Service for Bench {
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
                // Bulk data goes out as a payload: written from its own buffer, not copied.
                let chunk = proto::rpc::Bytes::from(vec![0x5a; CHUNK]);
                let header = Blob {
                    data: Default::default(),
                    n: 0,
                };
                for _ in 0..req.n {
                    if let Err(e) = s.send_payload(&header, 1, chunk.clone()) {
                        return s.finish(Err(e));
                    }
                }
                s.finish(Ok(()))
            }),
            _ => call.fail(Status::unimplemented("no such method")),
        }
    }
}

struct Fixture {
    _dir: TempDir,
    client: Client,
    handle: proto::rpc::ServerHandle,
    join: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.client.close();
        self.handle.shutdown();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir, String> {
        let p = std::env::temp_dir().join(format!("wrenn-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture() -> Result<Fixture, String> {
    let dir = TempDir::new("rpc")?;
    let path = dir.0.join("rpc.sock");
    let mut server =
        Server::new(ServerConfig::new("bench"), Arc::new(Bench)).map_err(|e| e.to_string())?;
    server.listen_unix(&path).map_err(|e| e.to_string())?;
    let (handle, join) = server.spawn().map_err(|e| e.to_string())?;
    let client = Client::connect_unix(&path, Credential::none()).map_err(|e| e.to_string())?;
    Ok(Fixture {
        _dir: dir,
        client,
        handle,
        join: Some(join),
    })
}

/// Wire bytes of one unary exchange, so the baseline moves exactly as many.
fn unary_wire_lens(req: &Blob) -> (usize, usize) {
    let body = req.encoded_len();
    let request = 4 + 6 + 1 + ECHO.len() + 4 + body;
    let response = 4 + 6 + body;
    (request, response)
}

fn rpc_unary(opts: &Opts) -> Result<(), String> {
    let iters = opts.iters(20_000, 200);
    let req = Blob {
        data: vec![7; 64].into(),
        n: 1,
    };
    let fx = fixture()?;
    let ours = measure(iters, iters / 10, || {
        let r: Blob = fx
            .client
            .unary(ECHO, &req, None)
            .map_err(|e| e.to_string())?;
        if r.n != 1 {
            return Err("wrong echo".into());
        }
        Ok(())
    })?;
    drop(fx);

    // Baseline: a thread that reads a request of the same size and writes back a reply of
    // the same size over a Unix socket, blocking I/O, no framing or dispatch.
    let (req_len, resp_len) = unary_wire_lens(&req);
    let (mut a, mut b) = UnixStream::pair().map_err(|e| e.to_string())?;
    let echo = std::thread::spawn(move || {
        let mut inb = vec![0u8; req_len];
        let out = vec![1u8; resp_len];
        while b.read_exact(&mut inb).is_ok() {
            if b.write_all(&out).is_err() {
                break;
            }
        }
    });
    let out = vec![2u8; req_len];
    let mut inb = vec![0u8; resp_len];
    let base = measure(iters, iters / 10, || {
        a.write_all(&out).map_err(|e| e.to_string())?;
        a.read_exact(&mut inb).map_err(|e| e.to_string())
    })?;
    drop(a);
    let _ = echo.join();
    println!(
        "{}",
        latency_line(
            "rpc_unary",
            &ours,
            "raw_socket_pingpong",
            &base,
            Goal::AtMost(1.5)
        )
    );
    Ok(())
}

fn rpc_stream(opts: &Opts) -> Result<(), String> {
    // Each iteration moves this many chunks (64 MiB normally, 4 MiB quick).
    let chunks = if opts.quick { 64 } else { 1024 };
    let iters = opts.iters(15, 1);
    let fx = fixture()?;
    let ours = measure(iters, 1, || {
        let mut s = fx
            .client
            .call(
                STREAM,
                &Blob {
                    data: Default::default(),
                    n: chunks,
                },
                CallOpts {
                    timeout: None,
                    end_stream: true,
                },
            )
            .map_err(|e| e.to_string())?;
        let mut n = 0u64;
        while let Some(m) = s.recv::<Blob>().map_err(|e| e.to_string())? {
            n += m.data.len() as u64;
        }
        if n != chunks * CHUNK as u64 {
            return Err(format!("received {n} bytes"));
        }
        Ok(())
    })?;
    drop(fx);

    // Baseline: the same bytes (frame overhead included) copied through a Unix socket by a
    // writer thread in CHUNK-sized writes, read by this thread.
    let frame_len = 4
        + 6
        + Blob {
            data: vec![0; CHUNK].into(),
            n: 0,
        }
        .encoded_len();
    let total = frame_len * chunks as usize;
    let dir = TempDir::new("copy")?;
    let path = dir.0.join("copy.sock");
    let listener = UnixListener::bind(&path).map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let buf = vec![0x5a; frame_len];
        let mut go = [0u8; 1];
        while s.read_exact(&mut go).is_ok() {
            for _ in 0..chunks {
                s.write_all(&buf)?;
            }
        }
        Ok(())
    });
    let mut s = UnixStream::connect(&path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; CHUNK];
    let base = measure(iters, 1, || {
        s.write_all(&[1]).map_err(|e| e.to_string())?;
        let mut got = 0;
        while got < total {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("baseline writer closed".into());
            }
            got += n;
        }
        Ok(())
    })?;
    drop(s);
    let _ = writer.join();
    println!(
        "{}",
        throughput_line(
            "rpc_stream",
            &ours,
            "raw_socket_copy",
            &base,
            Goal::AtLeast(0.7)
        )
    );
    Ok(())
}

/// Issue 18 at full size: a TCP server with the default budgets under each flood of
/// `proto::rpc::flood` (from 127.0.0.2+), while a legitimate client makes unary calls from
/// 127.0.0.1, connecting anew every tenth call. Prints the loaded/unloaded p99 ratio per scenario (goal
/// at most 2) and the process's peak RSS.
fn listener_flood(opts: &Opts) -> Result<(), String> {
    use proto::rpc::flood::{self, Scenario, Size, Target};
    let mut server = Server::new(ServerConfig::new("bench-flood"), Arc::new(Bench))
        .map_err(|e| e.to_string())?;
    let addr = server
        .listen_tcp("127.0.0.1:0".parse().map_err(|e| format!("{e}"))?)
        .map_err(|e| e.to_string())?;
    let (handle, join) = server.spawn().map_err(|e| e.to_string())?;
    let req = Blob {
        data: vec![7; 64].into(),
        n: 1,
    };
    // A new connection every tenth call (the newcomer must get in), as a pooled client.
    let mut conn: Option<Client> = None;
    let mut n = 0u32;
    let mut legit = || -> Result<(), String> {
        n += 1;
        if n % 10 == 0 || conn.is_none() {
            if let Some(old) = conn.take() {
                old.close();
            }
            conn = Some(Client::connect_tcp(addr, Credential::none()).map_err(|e| e.to_string())?);
        }
        let c = conn.as_ref().ok_or("not connected")?;
        let r: Blob = c.unary(ECHO, &req, None).map_err(|e| e.to_string())?;
        if r.n != 1 {
            return Err("wrong echo".into());
        }
        Ok(())
    };
    let size = if opts.quick {
        Size::quick()
    } else {
        Size::full()
    };
    let target = Target::Tcp(addr);
    let pid = std::process::id();
    for scenario in [
        Scenario::IdleUnauthenticated,
        Scenario::SlowHello,
        Scenario::HalfWrittenFrames(None),
        Scenario::HalfWrittenFrames(Some(Credential::api_key("k"))),
        Scenario::OneCredentialMany(Credential::api_key("k")),
    ] {
        let r = flood::run(&target, &scenario, &size, Some(pid), &mut legit);
        println!("# {}", r.line());
        println!(
            "{}",
            crate::harness::metric_line(
                &format!("listener_flood_{}_p99_ratio", r.scenario),
                r.ratio(),
                "x",
                Goal::AtMost(2.0),
            )
        );
        if r.failed > 0 {
            println!(
                "# {} legitimate calls failed: {:?}",
                r.failed,
                r.errors.first()
            );
        }
    }
    handle.shutdown();
    let _ = join.join();
    Ok(())
}

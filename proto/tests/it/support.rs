//! A test service and helpers shared by the RPC tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::rpc::{Call, Credential, Hello, Peer, Server, ServerConfig, ServerHandle, Service};
use proto::{Code, Status};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Blob {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
    /// Count of messages (Count), bytes per message (Count), or a total (Sum).
    #[prost(uint64, tag = "2")]
    pub n: u64,
    #[prost(uint64, tag = "3")]
    pub size: u64,
}

pub const UNARY: &str = "test.T/Unary";
pub const COUNT: &str = "test.T/Count";
pub const SUM: &str = "test.T/Sum";
pub const BIDI: &str = "test.T/Bidi";
pub const HANG: &str = "test.T/Hang";
pub const FAIL: &str = "test.T/Fail";
pub const PAYLOAD: &str = "test.T/Payload";
/// Unary answered from a worker thread ([`proto::rpc::ServerStream::reply`]).
pub const WORKER_UNARY: &str = "test.T/WorkerUnary";
/// Unary answered the older way: DATA, then a separate END (clients must accept it).
pub const TWO_FRAME_UNARY: &str = "test.T/TwoFrameUnary";
/// Unary on a worker that sleeps `n` milliseconds, then answers with the request.
pub const SLOW: &str = "test.T/Slow";

/// Payload bytes of message `i` in the PAYLOAD stream: sizes straddle the zero-copy
/// threshold, contents depend on `i`.
pub fn payload_for(i: u64) -> Vec<u8> {
    let len = [
        0usize,
        10,
        16 * 1024 - 1,
        16 * 1024,
        64 * 1024,
        200_000,
        1000,
    ][(i % 7) as usize];
    (0..len).map(|k| (k as u64 * 31 + i) as u8).collect()
}

#[derive(Default)]
pub struct Stats {
    pub cancelled: AtomicUsize,
    pub hang_started: AtomicUsize,
}

pub struct TestService {
    pub stats: Arc<Stats>,
    pub secret: Option<String>,
}

impl Service for TestService {
    fn hello(&self, hello: &Hello) -> Result<Peer, Status> {
        if let Some(s) = &self.secret {
            if &hello.credential != s {
                return Err(Status::unauthenticated("wrong credential"));
            }
        }
        Ok(Arc::new(hello.client.clone()))
    }

    fn call(&self, call: Call) {
        match call.method() {
            UNARY => match call.decode::<Blob>() {
                Ok(b) => call.reply(&b),
                Err(e) => call.fail(e),
            },
            FAIL => call.fail(Status::not_found("nothing here")),
            WORKER_UNARY => call.spawn(|s| {
                let r = s.first::<Blob>();
                s.respond(r);
            }),
            SLOW => call.spawn(|s| {
                let r = s.first::<Blob>();
                if let Ok(b) = &r {
                    std::thread::sleep(Duration::from_millis(b.n));
                }
                s.respond(r);
            }),
            TWO_FRAME_UNARY => call.spawn(|mut s| {
                let r = s.first::<Blob>().and_then(|b| s.send(&b));
                s.finish(r)
            }),
            PAYLOAD => call.spawn(|mut s| {
                let req: Blob = match s.first() {
                    Ok(r) => r,
                    Err(e) => return s.finish(Err(e)),
                };
                for i in 0..req.n {
                    let header = Blob {
                        data: vec![],
                        n: i,
                        size: 7,
                    };
                    let r = if i % 3 == 2 {
                        // Mixed in: ordinary copied sends keep their place in the stream.
                        s.send(&Blob {
                            data: payload_for(i),
                            n: i,
                            size: 7,
                        })
                    } else {
                        s.send_payload(&header, 1, payload_for(i).into())
                    };
                    if let Err(e) = r {
                        return s.finish(Err(e));
                    }
                }
                s.finish(Ok(()))
            }),
            COUNT => call.spawn(|mut s| {
                let req: Blob = match s.first() {
                    Ok(r) => r,
                    Err(e) => return s.finish(Err(e)),
                };
                for i in 0..req.n {
                    let msg = Blob {
                        data: vec![(i % 251) as u8; req.size as usize],
                        n: i,
                        size: 0,
                    };
                    if let Err(e) = s.send(&msg) {
                        return s.finish(Err(e));
                    }
                }
                s.finish(Ok(()))
            }),
            SUM => call.spawn(|mut s| {
                let mut total = 0u64;
                let mut count = 0u64;
                loop {
                    match s.recv::<Blob>() {
                        Ok(Some(b)) => {
                            total += b.data.len() as u64;
                            count += 1;
                        }
                        Ok(None) => break,
                        Err(e) => return s.finish(Err(e)),
                    }
                }
                let r = s.send(&Blob {
                    data: vec![],
                    n: count,
                    size: total,
                });
                s.finish(r)
            }),
            BIDI => call.spawn(|mut s| loop {
                match s.recv::<Blob>() {
                    Ok(Some(b)) => {
                        if let Err(e) = s.send(&b) {
                            return s.finish(Err(e));
                        }
                    }
                    Ok(None) => return s.finish(Ok(())),
                    Err(e) => return s.finish(Err(e)),
                }
            }),
            HANG => {
                let stats = self.stats.clone();
                call.spawn(move |s| {
                    stats.hang_started.fetch_add(1, Ordering::SeqCst);
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !s.is_cancelled() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    if s.is_cancelled() {
                        stats.cancelled.fetch_add(1, Ordering::SeqCst);
                    }
                    s.finish(Err(Status::cancelled("hang ended")))
                })
            }
            m => {
                let m = m.to_owned();
                call.fail(Status::unimplemented(format!("no method {m}")))
            }
        }
    }
}

pub struct TestServer {
    pub handle: ServerHandle,
    pub path: std::path::PathBuf,
    pub stats: Arc<Stats>,
    pub _dir: TempDir,
    join: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::start_with(ServerConfig::new("test"), None)
    }

    pub fn start_with(cfg: ServerConfig, secret: Option<String>) -> TestServer {
        let dir = TempDir::new("rpc");
        let path = dir.path.join("s.sock");
        let stats = Arc::new(Stats::default());
        let svc = Arc::new(TestService {
            stats: stats.clone(),
            secret,
        });
        let mut server = Server::new(cfg, svc).unwrap();
        server.listen_unix(&path).unwrap();
        let (handle, join) = server.spawn().unwrap();
        TestServer {
            handle,
            path,
            stats,
            _dir: dir,
            join: Some(join),
        }
    }

    /// Shuts the server down gracefully and waits for its loop to return.
    pub fn stop(mut self) {
        self.handle.shutdown();
        if let Some(j) = self.join.take() {
            j.join().unwrap().unwrap();
        }
    }

    pub fn client(&self) -> proto::rpc::Client {
        proto::rpc::Client::connect_unix(&self.path, Credential::none()).unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "wrenn-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A small deterministic generator (xorshift64*) for seeded property tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seed for a property test: `WRENN_SEED` or the clock; printed so a failure can be
/// replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("WRENN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {seed} (replay with WRENN_SEED={seed})");
    seed
}

pub fn code_of<T: std::fmt::Debug>(r: Result<T, Status>) -> Code {
    r.expect_err("expected an error").code
}

//! A Firecracker-like harness: guest memory in two anonymous regions with a gap between them,
//! registered with a userfaultfd (MISSING mode, REMOVE events), handed to the page server with
//! one sendmsg (fd + JSON), exactly as Firecracker does after `snapshot/load`.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uffd::generation::{self, SnapshotKind};
use uffd::handshake::{self, Region};
use uffd::header::{BuildId, Header};
use uffd::page_server::{Config, Outcome, PageServer};
use uffd::stats::Stats;
use uffd::sys::{self, AnonMapping};

pub const PAGE: u64 = 4096;

/// Prints `skipped: <reason>` and returns true, or panics when `WRENN_REQUIRE_E2E=1`.
pub fn skip(reason: &str) -> bool {
    proto::skip::skip("uffd", reason);
    true
}

/// Whether userfaultfd works here; prints the skip otherwise.
pub fn uffd_unavailable() -> bool {
    match sys::userfaultfd_new() {
        Ok(_) => false,
        Err(e) => skip(&format!("userfaultfd unavailable: {e}")),
    }
}

/// splitmix64.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "uffd-it-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A snapshot chain on disk and the bytes it must read back as.
pub struct Chain {
    pub dir: TempDir,
    pub header: Header,
    pub expected: Vec<u8>,
}

impl Chain {
    pub fn header_path(&self) -> PathBuf {
        self.dir.path().join("header")
    }
    pub fn layer_dir(&self) -> PathBuf {
        self.dir.path().join("layers")
    }
}

fn random_page(rng: &mut Rng, gen: u8) -> Vec<u8> {
    let mut p = vec![0u8; PAGE as usize];
    let salt = rng.next();
    for (i, w) in p.chunks_exact_mut(8).enumerate() {
        let v = salt.wrapping_mul(i as u64 + 1) ^ u64::from(gen) << 56 | 1;
        w.copy_from_slice(&v.to_le_bytes());
    }
    p
}

/// Builds a three-generation chain through the real builder: a Full snapshot with zero pages,
/// then two Diff snapshots (sparse memory files) whose dirty pages include zero pages that must
/// hide their parent's data.
pub fn build_chain(seed: u64, memory_size: u64) -> Chain {
    build_chain_with(seed, memory_size, |_, _| {})
}

/// As [`build_chain`], letting `patch(gen, &mut expected)` force bytes into the final content
/// (written as dirty data of the last generation).
pub fn build_chain_with(seed: u64, memory_size: u64, patch: impl Fn(u8, &mut [u8])) -> Chain {
    let dir = TempDir::new("chain");
    std::fs::create_dir_all(dir.path().join("layers")).unwrap();
    let mut rng = Rng(seed);
    let pages = memory_size / PAGE;
    let mut expected = vec![0u8; memory_size as usize];
    let mut header: Option<Header> = None;
    for gen in 1u8..=3 {
        let mem_path = dir.path().join(format!("mem{gen}"));
        let mem = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&mem_path)
            .unwrap();
        mem.set_len(memory_size).unwrap();
        let kind = if gen == 1 {
            SnapshotKind::Full
        } else {
            SnapshotKind::Diff
        };
        for p in 0..pages {
            let dirty = gen == 1 || rng.below(5) == 0;
            if !dirty {
                continue;
            }
            let zero = rng.below(4) == 0;
            let page = if zero {
                vec![0u8; PAGE as usize]
            } else {
                random_page(&mut rng, gen)
            };
            if gen == 1 && zero && rng.below(2) == 0 {
                // A hole in a Full snapshot: zeros too.
            } else {
                mem.write_all_at(&page, p * PAGE).unwrap();
            }
            expected[(p * PAGE) as usize..((p + 1) * PAGE) as usize].copy_from_slice(&page);
        }
        if gen == 3 {
            let before = expected.clone();
            patch(gen, &mut expected);
            for p in 0..pages {
                let r = (p * PAGE) as usize..((p + 1) * PAGE) as usize;
                if before[r.clone()] != expected[r.clone()] {
                    mem.write_all_at(&expected[r], p * PAGE).unwrap();
                }
            }
        }
        let id = BuildId([
            gen,
            0xAB,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            (seed as u8) | 1,
        ]);
        let layer_path = dir.path().join("layers").join(id.layer_file_name());
        let mut layer = std::io::BufWriter::new(File::create(&layer_path).unwrap());
        let (diff, stats) = generation::build(&mem, memory_size, kind, &mut layer).unwrap();
        drop(layer);
        assert_eq!(
            std::fs::metadata(&layer_path).unwrap().len(),
            diff.layer_size
        );
        if gen > 1 {
            assert!(
                stats.zero_pages > 0,
                "the chain must contain dirty zero pages"
            );
        }
        header = Some(match header {
            None => Header::from_base(memory_size, id, &diff).unwrap(),
            Some(h) => h.merge(&diff, id).unwrap(),
        });
        std::fs::remove_file(&mem_path).unwrap();
    }
    let header = header.unwrap();
    assert_eq!(header.generation, 3);
    assert!(header.extents.iter().any(|e| e.is_zero()));
    std::fs::write(dir.path().join("header"), header.serialize()).unwrap();
    Chain {
        dir,
        header,
        expected,
    }
}

/// The guest memory of a fake VM: two regions with an unmapped gap, registered with a uffd.
pub struct FakeVm {
    pub mem: AnonMapping,
    pub regions: Vec<Region>,
    pub uffd: OwnedFd,
    pub gap: u64,
    pub split: u64,
}

impl FakeVm {
    /// Memory offsets `[0, split)` map at the reservation's start; `[split, size)` after a gap.
    pub fn new(memory_size: u64, split: u64, gap: u64) -> FakeVm {
        assert!(split > 0 && split < memory_size && split % PAGE == 0 && gap % PAGE == 0);
        let mem = AnonMapping::new((memory_size + gap) as usize, false).unwrap();
        mem.make_accessible(0, split as usize).unwrap();
        mem.make_accessible((split + gap) as usize, (memory_size - split) as usize)
            .unwrap();
        let regions = vec![
            Region {
                base_host_virt_addr: mem.addr(),
                size: split,
                offset: 0,
                page_size: PAGE,
            },
            Region {
                base_host_virt_addr: mem.addr() + split + gap,
                size: memory_size - split,
                offset: split,
                page_size: PAGE,
            },
        ];
        let uffd = sys::userfaultfd_new().unwrap();
        sys::uffdio_api(uffd.as_fd(), sys::UFFD_FEATURE_EVENT_REMOVE).unwrap();
        for r in &regions {
            sys::uffdio_register(
                uffd.as_fd(),
                r.base_host_virt_addr,
                r.size,
                sys::UFFDIO_REGISTER_MODE_MISSING,
            )
            .unwrap();
        }
        FakeVm {
            mem,
            regions,
            uffd,
            gap,
            split,
        }
    }

    /// Offset inside the reservation of memory offset `off`.
    pub fn host(&self, off: u64) -> usize {
        (if off < self.split {
            off
        } else {
            off + self.gap
        }) as usize
    }

    /// Connects to the server and sends the handshake; returns the connection (kept open, as
    /// Firecracker keeps it).
    pub fn connect(&self, socket: &Path) -> UnixStream {
        let s = connect_when_ready(socket);
        let json = handshake::to_json(&self.regions);
        sys::send_with_fds(s.as_fd(), json.as_bytes(), &[self.uffd.as_fd()]).unwrap();
        s
    }

    pub fn read_page(&self, off: u64) -> Vec<u8> {
        let mut v = vec![0u8; PAGE as usize];
        self.mem.read(self.host(off), &mut v);
        v
    }
}

pub fn connect_when_ready(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
        }
    }
}

/// A page server running in a thread of this process (which plays Firecracker: pid = ours).
pub struct Running {
    pub socket: PathBuf,
    pub stats_path: PathBuf,
    stop: UnixStream,
    thread: Option<std::thread::JoinHandle<Result<(Outcome, Stats), uffd::page_server::Error>>>,
}

impl Running {
    pub fn start(chain: &Chain, tune: impl FnOnce(&mut Config)) -> Running {
        static N: AtomicU64 = AtomicU64::new(0);
        let socket = chain
            .dir
            .path()
            .join(format!("uffd-{}.sock", N.fetch_add(1, Ordering::Relaxed)));
        let stats_path = chain.dir.path().join("stats");
        let mut config = Config::new(
            socket.clone(),
            std::process::id() as i32,
            chain.header_path(),
            chain.layer_dir(),
        );
        config.kill_on_fatal = false;
        config.stats_path = Some(stats_path.clone());
        let (stop, stop_rx) = UnixStream::pair().unwrap();
        config.stop_fd = Some(OwnedFd::from(stop_rx));
        tune(&mut config);
        let socket = config.socket_path.clone();
        let server = PageServer::bind(config).unwrap();
        assert!(socket.exists(), "bind creates the socket before returning");
        let thread = std::thread::spawn(move || server.run());
        Running {
            socket,
            stats_path,
            stop,
            thread: Some(thread),
        }
    }

    /// Asks the server to stop and returns how it ended.
    pub fn stop(mut self) -> Result<(Outcome, Stats), uffd::page_server::Error> {
        use std::io::Write;
        let _ = (&self.stop).write_all(b"x");
        self.thread.take().unwrap().join().unwrap()
    }

    /// Waits for the server to end by itself.
    pub fn join(mut self) -> Result<(Outcome, Stats), uffd::page_server::Error> {
        self.thread.take().unwrap().join().unwrap()
    }

    pub fn stats_text(&self) -> String {
        std::fs::read_to_string(&self.stats_path).unwrap_or_default()
    }

    /// Waits until the stats file satisfies `f`.
    pub fn wait_stats(&self, what: &str, f: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f(&self.stats_text()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; stats:\n{}",
                self.stats_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            use std::io::Write;
            let _ = (&self.stop).write_all(b"x");
            let _ = t.join();
        }
    }
}

pub fn stat(text: &str, key: &str) -> u64 {
    uffd::stats::value(text, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

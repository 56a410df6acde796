//! Page-server cases (issue 3), each against a baseline in the same run:
//!
//! - `uffd_fault_latency`: single demand faults at random addresses (background fill off) vs a
//!   naive handler that sleeps in poll, reads one message and installs exactly one page (as
//!   Firecracker's example handler does), in interleaved rounds (each on a fresh VM), both
//!   medians reported. Goal p50 ratio <= 0.5.
//! - `uffd_touch_random`: touch every page of 1 GiB once in random order (fault-around 64 KiB,
//!   fill off) vs the naive handler. Goal time ratio <= 0.1.
//! - `uffd_populate`: the background fill of 1 GiB (2 MiB `UFFDIO_COPY`s) vs memcpy of the
//!   same bytes into fresh anonymous memory. Goal throughput ratio >= 1.5.
//! - `uffd_prefetch`: touching a recorded working set with prefetch vs demand faults only.
//!   Goal time ratio <= 0.3.
//! - info: the page-cache baseline (touching a mapping of the same file); metric: idle RSS of
//!   the `wrenn-uffd` binary minus its mapped layer pages (goal <= 4 MiB).

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use uffd::handshake::Region;
use uffd::header::{BuildId, Diff, DiffExtent, DiffKind, Header, Layers};
use uffd::page_server::{Config, LayerSet, Outcome, PageServer};
use uffd::sys::{self, AnonMapping};
use uffd::working_set::WorkingSet;

use crate::harness::{
    info_line, latency_line, metric_line, throughput_line, Case, Goal, Opts, Samples,
};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "uffd_fault_latency",
            run: fault_latency,
        },
        Case {
            name: "uffd_touch_random",
            run: touch_random,
        },
        Case {
            name: "uffd_populate",
            run: populate,
        },
        Case {
            name: "uffd_prefetch",
            run: prefetch,
        },
        Case {
            name: "uffd_idle_rss",
            run: idle_rss,
        },
    ]
}

fn err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// splitmix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// A one-layer snapshot of `memory` bytes of non-zero data, on disk.
struct Fixture {
    dir: PathBuf,
    header: Header,
}

impl Fixture {
    fn new(memory: u64) -> Result<Fixture, String> {
        let dir = std::env::temp_dir().join(format!("wrenn-bench-uffd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(err("create the fixture directory"))?;
        let id = BuildId([7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(dir.join(id.layer_file_name()))
                .map_err(err("create the layer"))?,
        );
        let mut rng = Rng(1);
        let mut chunk = vec![0u8; MIB as usize];
        for _ in 0..memory / MIB {
            for w in chunk.chunks_exact_mut(8) {
                w.copy_from_slice(&(rng.next() | 1).to_le_bytes());
            }
            f.write_all(&chunk).map_err(err("write the layer"))?;
        }
        f.flush().map_err(err("write the layer"))?;
        let diff = Diff {
            extents: vec![DiffExtent {
                offset: 0,
                length: memory,
                kind: DiffKind::Data { storage_offset: 0 },
            }],
            layer_size: memory,
        };
        let header = Header::from_base(memory, id, &diff).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("header"), header.serialize()).map_err(err("write the header"))?;
        Ok(Fixture { dir, header })
    }

    fn layers(&self) -> Result<LayerSet, String> {
        LayerSet::open(&self.header, &self.dir).map_err(|e| e.to_string())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Guest memory registered like Firecracker's (one region, MISSING, REMOVE events).
struct Vm {
    mem: AnonMapping,
    uffd: OwnedFd,
    region: Region,
}

impl Vm {
    fn new(memory: u64) -> Result<Vm, String> {
        let mem = AnonMapping::new(memory as usize, true).map_err(err("map guest memory"))?;
        let uffd = sys::userfaultfd_new().map_err(err("userfaultfd"))?;
        sys::uffdio_api(uffd.as_fd(), sys::UFFD_FEATURE_EVENT_REMOVE).map_err(err("UFFDIO_API"))?;
        sys::uffdio_register(
            uffd.as_fd(),
            mem.addr(),
            memory,
            sys::UFFDIO_REGISTER_MODE_MISSING,
        )
        .map_err(err("UFFDIO_REGISTER"))?;
        let region = Region {
            base_host_virt_addr: mem.addr(),
            size: memory,
            offset: 0,
            page_size: PAGE,
        };
        Ok(Vm { mem, uffd, region })
    }

    fn connect(&self, socket: &Path) -> Result<UnixStream, String> {
        let s = UnixStream::connect(socket).map_err(err("connect to the page server"))?;
        let json = uffd::handshake::to_json(&[self.region]);
        sys::send_with_fds(s.as_fd(), json.as_bytes(), &[self.uffd.as_fd()])
            .map_err(err("send the handshake"))?;
        Ok(s)
    }
}

/// Our page server on a thread of this process (which plays Firecracker).
struct Ours {
    stop: UnixStream,
    thread:
        std::thread::JoinHandle<Result<(Outcome, uffd::stats::Stats), uffd::page_server::Error>>,
    _conn: UnixStream,
}

impl Ours {
    fn start(fx: &Fixture, vm: &Vm, tune: impl FnOnce(&mut Config)) -> Result<Ours, String> {
        let socket = fx.dir.join("ours.sock");
        let mut c = Config::new(
            socket.clone(),
            std::process::id() as i32,
            fx.dir.join("header"),
            fx.dir.clone(),
        );
        c.kill_on_fatal = false;
        let (stop, rx) = UnixStream::pair().map_err(err("socketpair"))?;
        c.stop_fd = Some(rx.into());
        tune(&mut c);
        // `WRENN_BENCH_SPIN_US` overrides the spin (to compare spinning and sleeping).
        if let Some(us) = std::env::var("WRENN_BENCH_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            c.spin = Duration::from_micros(us);
        }
        let server = PageServer::bind(c).map_err(|e| e.to_string())?;
        let thread = std::thread::spawn(move || server.run());
        let conn = vm.connect(&socket)?;
        Ok(Ours {
            stop,
            thread,
            _conn: conn,
        })
    }

    fn finish(self) -> Result<uffd::stats::Stats, String> {
        let _ = (&self.stop).write_all(b"x");
        let (_, stats) = self
            .thread
            .join()
            .map_err(|_| "page server panicked".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(stats)
    }
}

/// The naive handler: sleep in poll, read one message, install exactly one page.
fn naive_handler(uffd: &OwnedFd, base: u64, layer: &[u8], stop: &AtomicBool) -> Result<(), String> {
    let mut msg = [sys::UffdMsg::default(); 1];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 50) };
        if n <= 0 {
            continue;
        }
        if sys::read_uffd_msgs(uffd.as_fd(), &mut msg).map_err(err("read"))? == 0 {
            continue;
        }
        if msg[0].event != sys::UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let page = msg[0].arg[1] & !(PAGE - 1);
        let off = (page - base) as usize;
        if let Err(e) = sys::uffdio_copy(uffd.as_fd(), page, &layer[off..off + PAGE as usize], 0) {
            if e.error.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("naive copy: {}", e.error));
            }
        }
    }
    Ok(())
}

/// Runs `f` with the naive handler serving `vm`.
fn with_naive<T>(fx: &Fixture, vm: &Vm, f: impl FnOnce() -> T) -> Result<T, String> {
    let layers = fx.layers()?;
    let layer = layers.layer(&fx.header.build_id).ok_or("layer missing")?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| naive_handler(&vm.uffd, vm.mem.addr(), layer, &stop));
        let out = f();
        stop.store(true, Ordering::Relaxed);
        h.join()
            .map_err(|_| "naive handler panicked".to_string())??;
        Ok(out)
    })
}

fn fault_latency(o: &Opts) -> Result<(), String> {
    let memory = if o.quick { 16 * MIB } else { 256 * MIB };
    let n = o.iters(2000, 50);
    let fx = Fixture::new(memory)?;
    // Random pages in distinct 64 KiB windows, so fault-around never pre-installs the next one.
    let mut windows: Vec<u64> = (0..memory / (64 * 1024)).collect();
    Rng(3).shuffle(&mut windows);
    let mut rng = Rng(4);
    let pages: Vec<u64> = windows
        .iter()
        .take(n)
        .map(|w| w * 64 * 1024 + (rng.next() % 16) * PAGE)
        .collect();
    let time_touches = |vm: &Vm| -> Vec<u64> {
        pages
            .iter()
            .map(|&p| {
                let t = Instant::now();
                std::hint::black_box(vm.mem.read_u8(p as usize));
                t.elapsed().as_nanos() as u64
            })
            .collect()
    };
    // Interleaved: rounds alternate ours and the naive handler (and which of them goes
    // first), each on a fresh VM over the same pages, so both meet the machine's load and
    // frequency modes equally.
    let rounds = if o.quick { 2 } else { 10 };
    let (mut ours_ns, mut naive_ns) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for turn in 0..2 {
            let vm = Vm::new(memory)?;
            if (round + turn) % 2 == 0 {
                let ours = Ours::start(&fx, &vm, |c| c.background_fill = false)?;
                ours_ns.extend(time_touches(&vm));
                ours.finish()?;
            } else {
                naive_ns.extend(with_naive(&fx, &vm, || time_touches(&vm))?);
            }
        }
    }
    let (ours, naive) = (Samples::new(ours_ns), Samples::new(naive_ns));
    println!(
        "{}",
        latency_line(
            "uffd_fault_latency",
            &ours,
            "naive_one_page_handler",
            &naive,
            Goal::AtMost(0.5)
        )
    );
    println!(
        "{}",
        info_line(
            "uffd_fault_latency_naive",
            &naive,
            &format!("rounds={rounds} interleaved=true median_ns={}", naive.p50())
        )
    );
    Ok(())
}

fn touch_all(vm: &Vm, order: &[u64]) -> u64 {
    let t = Instant::now();
    for &p in order {
        std::hint::black_box(vm.mem.read_u8(p as usize));
    }
    t.elapsed().as_nanos() as u64
}

fn touch_random(o: &Opts) -> Result<(), String> {
    let memory = if o.quick { 32 * MIB } else { 1024 * MIB };
    let fx = Fixture::new(memory)?;
    let mut order: Vec<u64> = (0..memory / PAGE).map(|p| p * PAGE).collect();
    Rng(5).shuffle(&mut order);
    let vm = Vm::new(memory)?;
    let ours = Ours::start(&fx, &vm, |c| {
        c.background_fill = false;
        c.fault_around = 64 * 1024;
    })?;
    let ours_ns = touch_all(&vm, &order);
    let st = ours.finish()?;
    // How many faults ours took, against one per 64 KiB window (the fault-around floor):
    // on a loaded machine the handler falls behind and the count varies from run to run.
    println!(
        "info=uffd_touch_random_ours_faults faults={} windows={} pages_faulted={}",
        st.faults,
        memory / (64 * 1024),
        st.pages_faulted
    );
    drop(vm);
    let vm = Vm::new(memory)?;
    let naive_ns = with_naive(&fx, &vm, || touch_all(&vm, &order))?;
    println!(
        "{}",
        latency_line(
            "uffd_touch_random",
            &Samples::new(vec![ours_ns]),
            "naive_one_page_handler",
            &Samples::new(vec![naive_ns]),
            Goal::AtMost(0.1)
        )
    );
    // Information: the page-cache baseline, touching a fresh mapping of the same file (shared
    // pages, no copy), in ns per page.
    let layers = fx.layers()?;
    let layer = layers.layer(&fx.header.build_id).ok_or("layer missing")?;
    let t = Instant::now();
    let mut sum = 0u8;
    for &p in &order {
        sum ^= layer[p as usize];
    }
    std::hint::black_box(sum);
    let per_page = t.elapsed().as_nanos() as u64 / order.len() as u64;
    println!(
        "{}",
        info_line(
            "uffd_page_cache_touch_per_page",
            &Samples::new(vec![per_page]),
            "mapping_of_the_layer_file_random_order"
        )
    );
    println!(
        "{}",
        info_line(
            "uffd_touch_random_per_page",
            &Samples::new(vec![ours_ns / order.len() as u64]),
            "ours_ns_per_page"
        )
    );
    Ok(())
}

fn populate(o: &Opts) -> Result<(), String> {
    let memory = if o.quick { 32 * MIB } else { 1024 * MIB };
    let iters = o.iters(3, 1);
    let fx = Fixture::new(memory)?;
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for _ in 0..iters {
        let vm = Vm::new(memory)?;
        let t = Instant::now();
        let srv = Ours::start(&fx, &vm, |c| c.spin = Duration::ZERO)?;
        let (outcome, _) = srv
            .thread
            .join()
            .map_err(|_| "page server panicked".to_string())?
            .map_err(|e| e.to_string())?;
        ours.push(t.elapsed().as_nanos() as u64);
        if outcome != Outcome::Resident {
            return Err(format!("fill ended {outcome:?}"));
        }
        drop(vm);
        // Baseline: the kernel allocating and filling as much, from a fresh mapping of the
        // same file, as our server's fresh mapping.
        let layers = fx.layers()?;
        let layer = layers.layer(&fx.header.build_id).ok_or("layer missing")?;
        let t = Instant::now();
        let dst = AnonMapping::new(memory as usize, true).map_err(err("map"))?;
        for off in (0..memory).step_by((2 * MIB) as usize) {
            dst.write(off as usize, &layer[off as usize..(off + 2 * MIB) as usize]);
        }
        base.push(t.elapsed().as_nanos() as u64);
    }
    println!(
        "{}",
        throughput_line(
            "uffd_populate",
            &Samples::new(ours),
            "memcpy_into_fresh_anon",
            &Samples::new(base),
            Goal::AtLeast(1.5)
        )
    );
    Ok(())
}

fn prefetch(o: &Opts) -> Result<(), String> {
    let memory = if o.quick { 16 * MIB } else { 256 * MIB };
    let count = o.iters(8192, 256);
    let iters = o.iters(3, 1);
    let fx = Fixture::new(memory)?;
    // A working set of clustered runs (1-16 pages) scattered over the memory, as a booted
    // guest's is: runs in the order the guest touched them.
    let mut rng = Rng(6);
    let mut seen = std::collections::HashSet::new();
    let mut pages = Vec::with_capacity(count);
    while pages.len() < count {
        let start = rng.next() % (memory / PAGE);
        let len = 1 + rng.next() % 16;
        for p in start..(start + len).min(memory / PAGE) {
            if pages.len() < count && seen.insert(p) {
                pages.push(p * PAGE);
            }
        }
    }
    let ws = WorkingSet {
        memory_size: memory,
        build_id: fx.header.build_id,
        pages: pages.clone(),
    };
    let ws_path = fx.dir.join("working-set");
    std::fs::write(&ws_path, ws.serialize()).map_err(err("write the working set"))?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for _ in 0..iters {
        for prefetch in [true, false] {
            let vm = Vm::new(memory)?;
            let wsp = ws_path.clone();
            let t = Instant::now();
            let srv = Ours::start(&fx, &vm, move |c| {
                c.background_fill = false;
                if prefetch {
                    c.prefetch = Some(wsp);
                }
            })?;
            touch_all(&vm, &pages);
            let ns = t.elapsed().as_nanos() as u64;
            srv.finish()?;
            if prefetch {
                with.push(ns)
            } else {
                without.push(ns)
            }
        }
    }
    println!(
        "{}",
        latency_line(
            "uffd_prefetch",
            &Samples::new(with),
            "demand_faults_only",
            &Samples::new(without),
            Goal::AtMost(0.3)
        )
    );
    Ok(())
}

/// Resident KiB of the mappings of `*.layer` files in a process.
fn layer_rss_kib(pid: u32) -> Result<u64, String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(err("read smaps"))?;
    let mut in_layer = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_layer = line.ends_with(".layer");
        } else if in_layer {
            if let Some(v) = line.strip_prefix("Rss:") {
                kib += v
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Ok(kib)
}

fn idle_rss(o: &Opts) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(err("current_exe"))?;
    let bin = exe
        .parent()
        .map(|d| d.join("wrenn-uffd"))
        .ok_or("no exe dir")?;
    if !bin.exists() {
        // Like the other cases that need a binary built beside this one: skip, visibly.
        let why = format!(
            "{} missing: build it with `cargo build --release -p uffd`",
            bin.display()
        );
        println!("metric=uffd_idle_rss skipped={}", why.replace(' ', "_"));
        return Ok(());
    }
    let memory = if o.quick { 32 * MIB } else { 1024 * MIB };
    let fx = Fixture::new(memory)?;
    let socket = fx.dir.join("bin.sock");
    // This process plays Firecracker.
    let mut child = std::process::Command::new(&bin)
        .arg("--socket")
        .arg(&socket)
        .args([
            "--firecracker-pid",
            &std::process::id().to_string(),
            "--no-background-fill",
            "--header",
        ])
        .arg(fx.dir.join("header"))
        .arg("--layers")
        .arg(&fx.dir)
        .env("WRENN_LOG", "warn")
        .spawn()
        .map_err(err("spawn wrenn-uffd"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("wrenn-uffd socket never appeared".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let vm = Vm::new(memory)?;
    let conn = vm.connect(&socket)?;
    for p in (0..memory).step_by((MIB) as usize) {
        std::hint::black_box(vm.mem.read_u8(p as usize));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss = crate::harness::rss_kib(child.id());
    let layer = layer_rss_kib(child.id());
    // SAFETY: kill(2) with our own child's pid and SIGTERM; the child has not been reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    drop(conn);
    let (rss, layer) = (rss?, layer?);
    let value = (rss.saturating_sub(layer)) as f64 / 1024.0;
    println!(
        "{}",
        metric_line(
            "uffd_idle_rss_minus_mapped_layers",
            (value * 100.0).round() / 100.0,
            "MiB",
            Goal::AtMost(4.0)
        )
    );
    Ok(())
}

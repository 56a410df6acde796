//! The page server against the real kernel, through the Firecracker-like harness.

use std::time::Duration;

use uffd::page_server::Outcome;
use uffd::working_set::WorkingSet;

use crate::harness::{build_chain, stat, uffd_unavailable, FakeVm, Rng, Running, PAGE};

const MIB: u64 = 1 << 20;

fn check_page(vm: &FakeVm, expected: &[u8], off: u64) {
    let got = vm.read_page(off);
    let want = &expected[off as usize..(off + PAGE) as usize];
    assert!(got == want, "page at memory offset {off:#x} differs");
}

#[test]
fn threads_touch_a_three_generation_chain_and_removed_ranges_read_zero() {
    if uffd_unavailable() {
        return;
    }
    let memory = 8 * MIB;
    let chain = build_chain(11, memory);
    let mut expected = chain.expected.clone();
    // Split the memory off any fault-around boundary; a 1 MiB gap like the x86 MMIO hole.
    let vm = FakeVm::new(memory, 3 * MIB + 3 * PAGE, MIB);
    let srv = Running::start(&chain, |c| {
        c.background_fill = false;
        c.fault_around = 64 * 1024;
        // Exercise the spinning path too (off by default).
        c.spin = Duration::from_micros(200);
    });
    let _conn = vm.connect(&srv.socket);

    // Discard never-touched pages first: they must read zeros, not the snapshot.
    let r0 = (MIB + 5 * PAGE, 37 * PAGE);
    vm.mem.dontneed(vm.host(r0.0), r0.1 as usize).unwrap();
    expected[r0.0 as usize..(r0.0 + r0.1) as usize].fill(0);

    // Leave the last 256 KiB (four whole fault-around windows) untouched for now, so that the
    // server is still registered when the second discard comes.
    let held_back = memory - 64 * PAGE;
    let mut pages: Vec<u64> = (0..held_back / PAGE).map(|p| p * PAGE).collect();
    Rng(5).shuffle(&mut pages);
    let threads = 4;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (vm, expected, pages) = (&vm, &expected, &pages);
            s.spawn(move || {
                for off in pages.iter().skip(t).step_by(threads) {
                    check_page(vm, expected, *off);
                }
            });
        }
    });
    // Every byte again, now resident.
    for p in 0..held_back / PAGE {
        check_page(&vm, &expected, p * PAGE);
    }
    // Discard resident pages across the region boundary: zeros again.
    let r1 = (3 * MIB - 8 * PAGE, 64 * PAGE);
    let split = vm.split;
    vm.mem
        .dontneed(vm.host(r1.0), (split - r1.0) as usize)
        .unwrap();
    vm.mem
        .dontneed(vm.host(split), (r1.0 + r1.1 - split) as usize)
        .unwrap();
    expected[r1.0 as usize..(r1.0 + r1.1) as usize].fill(0);
    for p in 0..held_back / PAGE {
        check_page(&vm, &expected, p * PAGE);
    }
    // The rest: now every page is resident and the server unregisters and ends by itself.
    for p in held_back / PAGE..memory / PAGE {
        check_page(&vm, &expected, p * PAGE);
    }
    let (outcome, stats) = srv.join().unwrap();
    assert_eq!(outcome, Outcome::Resident);
    assert!(stats.faults > 0);
    assert!(stats.remove_events >= 3, "{stats:?}");
    assert!(stats.zero_pages > 0);
    assert_eq!(stats.pages_filled, 0, "background fill is off");
    // Fault-around installed neighbours: fewer faults than pages.
    assert!(stats.faults < memory / PAGE, "{stats:?}");
    eprintln!("stats: {stats:?}");
}

#[test]
fn background_fill_makes_everything_resident_then_unregisters() {
    if uffd_unavailable() {
        return;
    }
    let memory = 6 * MIB;
    let chain = build_chain(12, memory);
    let vm = FakeVm::new(memory, 2 * MIB, 2 * MIB);
    let srv = Running::start(&chain, |c| c.spin = Duration::ZERO);
    let _conn = vm.connect(&srv.socket);
    for off in [0, 5 * MIB + 3 * PAGE, 2 * MIB] {
        check_page(&vm, &chain.expected, off);
    }
    let stats_path = srv.stats_path.clone();
    let (outcome, stats) = srv.join().unwrap();
    assert_eq!(outcome, Outcome::Resident);
    assert_eq!(stats.pages_resident, memory / PAGE);
    assert_eq!(stats.pages_total, memory / PAGE);
    assert!(stats.pages_filled > 0);
    let text = std::fs::read_to_string(stats_path).unwrap();
    assert_eq!(
        uffd::stats::value(&text, "state").as_deref(),
        Some("resident")
    );
    assert_eq!(stat(&text, "pages_resident"), memory / PAGE);
    // Three pages were touched: the first fault's time is reported (µs + 1, so never 0).
    assert!(stats.faults > 0);
    assert!(stat(&text, "first_fault_us") > 0, "{text}");
    assert!(stat(&text, "first_fault_us") <= stat(&text, "resident_ms") * 1000 + 1000);
    // The server is gone and the memory unregistered: reads never block, and every byte is
    // there (a page left missing would now read as zeros and fail the comparison).
    for p in 0..memory / PAGE {
        check_page(&vm, &chain.expected, p * PAGE);
    }
    // Later discards are the kernel's own.
    vm.mem.dontneed(vm.host(PAGE), PAGE as usize).unwrap();
    assert!(vm.read_page(PAGE).iter().all(|b| *b == 0));
}

#[test]
fn recorded_working_set_is_prefetched_on_the_next_restore() {
    if uffd_unavailable() {
        return;
    }
    let memory = 4 * MIB;
    let chain = build_chain(13, memory);
    let ws_path = chain.dir.path().join("working-set");
    let mut rng = Rng(99);
    let mut touched: Vec<u64> = Vec::new();
    while touched.len() < 50 {
        let off = rng.below(memory / PAGE) * PAGE;
        if !touched.contains(&off) {
            touched.push(off);
        }
    }
    // Record.
    {
        let vm = FakeVm::new(memory, MIB, MIB);
        let (stop_rec, stop_rec_rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let wsp = ws_path.clone();
        let srv = Running::start(&chain, move |c| {
            c.record = Some(wsp);
            c.record_stop_fd = Some(stop_rec_rx.into());
            c.background_fill = false;
        });
        let _conn = vm.connect(&srv.socket);
        for off in &touched {
            check_page(&vm, &chain.expected, *off);
        }
        use std::io::Write;
        (&stop_rec).write_all(b"x").unwrap();
        srv.wait_stats("recording to stop", |t| {
            crate::harness::stat(t, "pages_recorded") == 50
        });
        let (_, stats) = srv.stop().unwrap();
        assert_eq!(
            stats.faults, 50,
            "recording installs single pages: {stats:?}"
        );
    }
    let ws = WorkingSet::parse(&std::fs::read(&ws_path).unwrap()).unwrap();
    assert_eq!(ws.pages, touched, "first-touch order");
    assert_eq!(ws.build_id, chain.header.build_id);
    // Prefetch.
    let vm = FakeVm::new(memory, MIB, MIB);
    let wsp = ws_path.clone();
    let srv = Running::start(&chain, move |c| {
        c.prefetch = Some(wsp);
        c.background_fill = false;
    });
    let _conn = vm.connect(&srv.socket);
    srv.wait_stats("prefetch", |t| stat(t, "pages_prefetched") == 50);
    for off in &touched {
        check_page(&vm, &chain.expected, *off);
    }
    let (_, stats) = srv.stop().unwrap();
    assert_eq!(stats.faults, 0, "prefetched pages never fault: {stats:?}");
    assert_eq!(stats.pages_prefetched, 50);
}

#[test]
fn a_missing_layer_is_a_clean_error() {
    let memory = MIB;
    let chain = build_chain(14, memory);
    let victim = chain.header.layers[0].build_id.layer_file_name();
    std::fs::remove_file(chain.layer_dir().join(victim)).unwrap();
    let config = uffd::page_server::Config::new(
        chain.dir.path().join("s.sock"),
        std::process::id() as i32,
        chain.header_path(),
        chain.layer_dir(),
    );
    let err = uffd::page_server::PageServer::bind(config).unwrap_err();
    assert!(
        matches!(err, uffd::page_server::Error::OpenLayer { .. }),
        "{err}"
    );
}

#[test]
fn a_squashed_chain_serves_the_same_bytes() {
    if uffd_unavailable() {
        return;
    }
    use uffd::header::{squash, BuildId};
    let memory = 2 * MIB;
    let chain = build_chain(15, memory);
    let layers = uffd::page_server::LayerSet::open(&chain.header, &chain.layer_dir()).unwrap();
    let id = BuildId([0x5a; 16]);
    let out_path = chain.layer_dir().join(id.layer_file_name());
    let mut out = std::io::BufWriter::new(std::fs::File::create(&out_path).unwrap());
    let squashed = squash(&chain.header, &layers, &mut out, id).unwrap();
    drop(out);
    assert_eq!(squashed.layers.len(), 1);
    // Serve the squashed header from a directory holding only its layer.
    for l in &chain.header.layers {
        std::fs::remove_file(chain.layer_dir().join(l.build_id.layer_file_name())).unwrap();
    }
    std::fs::write(chain.header_path(), squashed.serialize()).unwrap();
    let vm = FakeVm::new(memory, MIB, MIB);
    let srv = Running::start(&chain, |_| {});
    let _conn = vm.connect(&srv.socket);
    let (outcome, _) = srv.join().unwrap();
    assert_eq!(outcome, Outcome::Resident);
    for p in 0..memory / PAGE {
        check_page(&vm, &chain.expected, p * PAGE);
    }
}

#[test]
fn layers_are_found_across_several_directories() {
    if uffd_unavailable() {
        return;
    }
    let memory = MIB;
    let chain = build_chain(16, memory);
    // Move the base layer elsewhere, as a template's shared layers live apart from a sandbox's.
    let other = chain.dir.path().join("template-layers");
    std::fs::create_dir_all(&other).unwrap();
    let base = chain.header.layers[0].build_id.layer_file_name();
    std::fs::rename(chain.layer_dir().join(&base), other.join(&base)).unwrap();
    let vm = FakeVm::new(memory, MIB / 2, MIB);
    let own = chain.layer_dir();
    let srv = Running::start(&chain, move |c| c.layer_dirs = vec![own, other]);
    let _conn = vm.connect(&srv.socket);
    let (outcome, _) = srv.join().unwrap();
    assert_eq!(outcome, Outcome::Resident);
    for p in 0..memory / PAGE {
        check_page(&vm, &chain.expected, p * PAGE);
    }
}

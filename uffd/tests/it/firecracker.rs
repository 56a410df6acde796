//! End to end with the real Firecracker (`WRENN_FIRECRACKER`): boot a tiny ELF "kernel" (a
//! spin loop), take a Full snapshot, build a generation from its memory file, restore it with
//! the Uffd backend served by the `wrenn-uffd` binary, and check that the VM runs, the server
//! fills every page, unregisters and exits, and that a second snapshot of the restored VM has
//! the bytes of the first (every page came back right through the page server), except the few
//! that Firecracker itself rewrites on restore.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uffd::generation::{self, SnapshotKind};
use uffd::header::{BuildId, Header};

use crate::harness::{skip, TempDir};

const MEM_MIB: u64 = 64;

fn firecracker() -> Option<PathBuf> {
    let Some(p) = std::env::var_os("WRENN_FIRECRACKER").map(PathBuf::from) else {
        skip("WRENN_FIRECRACKER is not set");
        return None;
    };
    if !p.exists() {
        skip(&format!("{} does not exist", p.display()));
        return None;
    }
    if File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        skip("/dev/kvm unavailable");
        return None;
    }
    Some(p)
}

/// A 64-bit ELF whose one segment, loaded at 16 MiB, is `pause; jmp .-2`.
fn tiny_kernel(path: &Path) {
    let base: u64 = 0x100_0000;
    let code = [0xf3u8, 0x90, 0xeb, 0xfc];
    let mut img = Vec::new();
    img.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    img.extend_from_slice(&[0; 8]);
    img.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    img.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    img.extend_from_slice(&1u32.to_le_bytes());
    img.extend_from_slice(&base.to_le_bytes()); // entry
    img.extend_from_slice(&64u64.to_le_bytes()); // phoff
    img.extend_from_slice(&0u64.to_le_bytes()); // shoff
    img.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        img.extend_from_slice(&v.to_le_bytes());
    }
    // PT_LOAD, R+X, file offset 0x1000.
    img.extend_from_slice(&1u32.to_le_bytes());
    img.extend_from_slice(&5u32.to_le_bytes());
    for v in [
        0x1000u64,
        base,
        base,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        img.extend_from_slice(&v.to_le_bytes());
    }
    img.resize(0x1000, 0);
    img.extend_from_slice(&code);
    std::fs::write(path, img).unwrap();
}

struct Fc {
    child: Child,
    sock: PathBuf,
}

impl Fc {
    fn start(bin: &Path, dir: &Path, name: &str) -> Fc {
        let sock = dir.join(format!("{name}.api"));
        let log = File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(bin)
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "firecracker api socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Fc { child, sock }
    }

    /// One API request; returns the status code (and the body on errors, for messages).
    fn api(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Accept: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, text)
    }

    fn ok(&self, method: &str, path: &str, body: &str) {
        let (code, text) = self.api(method, path, body);
        assert!((200..300).contains(&code), "{method} {path}: {text}");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Fc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn restore_through_wrenn_uffd_with_real_firecracker() {
    let Some(fc_bin) = firecracker() else { return };
    let dir = TempDir::new("fc");
    let d = dir.path();
    let kernel = d.join("kernel.elf");
    tiny_kernel(&kernel);

    // Boot, pause, Full snapshot.
    let fc1 = Fc::start(&fc_bin, d, "fc1");
    fc1.ok(
        "PUT",
        "/boot-source",
        &format!("{{\"kernel_image_path\":\"{}\"}}", kernel.display()),
    );
    fc1.ok(
        "PUT",
        "/machine-config",
        &format!("{{\"vcpu_count\":1,\"mem_size_mib\":{MEM_MIB}}}"),
    );
    fc1.ok("PUT", "/actions", "{\"action_type\":\"InstanceStart\"}");
    std::thread::sleep(Duration::from_millis(300));
    fc1.ok("PATCH", "/vm", "{\"state\":\"Paused\"}");
    let (snap, mem1) = (d.join("vm.snap"), d.join("vm.mem"));
    fc1.ok(
        "PUT",
        "/snapshot/create",
        &format!(
            "{{\"snapshot_type\":\"Full\",\"snapshot_path\":\"{}\",\"mem_file_path\":\"{}\"}}",
            snap.display(),
            mem1.display()
        ),
    );
    drop(fc1);

    // The generation and header.
    let memory = MEM_MIB << 20;
    let layers = d.join("layers");
    std::fs::create_dir_all(&layers).unwrap();
    let id = BuildId([0xf1; 16]);
    let mut layer =
        std::io::BufWriter::new(File::create(layers.join(id.layer_file_name())).unwrap());
    let (diff, stats) = generation::build(
        &File::open(&mem1).unwrap(),
        memory,
        SnapshotKind::Full,
        &mut layer,
    )
    .unwrap();
    drop(layer);
    eprintln!("generation: {stats:?}");
    let header = Header::from_base(memory, id, &diff).unwrap();
    std::fs::write(d.join("header"), header.serialize()).unwrap();

    // Restore: Firecracker (API only), then wrenn-uffd with its pid, then snapshot/load.
    let (fc2, _) = restore(&fc_bin, d, "fc2", &snap, &d.join("header"), &layers);

    // The VM still runs without its handler. A Diff snapshot (its dirty pages: what Firecracker
    // wrote on restore), then a Full one of the same state.
    std::thread::sleep(Duration::from_millis(200));
    fc2.ok("PATCH", "/vm", "{\"state\":\"Paused\"}");
    let (snap2d, mem2d) = (d.join("vm2d.snap"), d.join("vm2d.mem"));
    snapshot(&fc2, "Diff", &snap2d, &mem2d);
    let (snap2, mem2) = (d.join("vm2.snap"), d.join("vm2.mem"));
    snapshot(&fc2, "Full", &snap2, &mem2);
    drop(fc2);
    let full2 = std::fs::read(&mem2).unwrap();
    assert_same_but_system_area(&std::fs::read(&mem1).unwrap(), &full2);

    // Generation 2 from the Diff file, merged over generation 1: it must read exactly as the
    // Full snapshot of the same state.
    let id2 = BuildId([0xf2; 16]);
    let mut layer =
        std::io::BufWriter::new(File::create(layers.join(id2.layer_file_name())).unwrap());
    let (diff2, stats2) = generation::build(
        &File::open(&mem2d).unwrap(),
        memory,
        SnapshotKind::Diff,
        &mut layer,
    )
    .unwrap();
    drop(layer);
    eprintln!("generation 2 (diff): {stats2:?}");
    assert!(
        stats2.pages_scanned > 0 && stats2.pages_scanned < memory / 4096,
        "{stats2:?}"
    );
    let header2 = header.merge(&diff2, id2).unwrap();
    let set = uffd::page_server::LayerSet::open(&header2, &layers).unwrap();
    for p in 0..(memory / 4096) as usize {
        let off = p as u64 * 4096;
        let e = &header2.extents[header2.find(off).unwrap()];
        let want = &full2[p * 4096..(p + 1) * 4096];
        if e.is_zero() {
            assert!(want.iter().all(|b| *b == 0), "page {p} should be zeros");
        } else {
            let data = uffd::header::Layers::layer(&set, &e.build_id).unwrap();
            let s = (e.storage_offset + off - e.offset) as usize;
            assert!(
                &data[s..s + 4096] == want,
                "page {p} differs from the Full snapshot"
            );
        }
    }
    std::fs::write(d.join("header2"), header2.serialize()).unwrap();

    // Restore generation 2 (the Diff snapshot's VM state) through the page server.
    let (fc3, _) = restore(&fc_bin, d, "fc3", &snap2d, &d.join("header2"), &layers);
    std::thread::sleep(Duration::from_millis(200));
    fc3.ok("PATCH", "/vm", "{\"state\":\"Paused\"}");
    let (snap3, mem3) = (d.join("vm3.snap"), d.join("vm3.mem"));
    snapshot(&fc3, "Full", &snap3, &mem3);
    assert_same_but_system_area(&full2, &std::fs::read(&mem3).unwrap());
}

fn snapshot(fc: &Fc, kind: &str, snap: &Path, mem: &Path) {
    fc.ok(
        "PUT",
        "/snapshot/create",
        &format!(
            "{{\"snapshot_type\":\"{kind}\",\"snapshot_path\":\"{}\",\"mem_file_path\":\"{}\"}}",
            snap.display(),
            mem.display()
        ),
    );
}

/// Starts Firecracker and `wrenn-uffd` for it, loads `snap` through the page server (resumed,
/// dirty pages tracked) and waits until the server has made every page resident and exited.
fn restore(
    fc_bin: &Path,
    d: &Path,
    name: &str,
    snap: &Path,
    header: &Path,
    layers: &Path,
) -> (Fc, String) {
    let fc = Fc::start(fc_bin, d, name);
    let uffd_sock = d.join(format!("{name}.uffd"));
    let stats_path = d.join(format!("{name}.stats"));
    let mut srv = Command::new(env!("CARGO_BIN_EXE_wrenn-uffd"))
        .arg("--socket")
        .arg(&uffd_sock)
        .args(["--firecracker-pid", &fc.pid().to_string(), "--header"])
        .arg(header)
        .arg("--layers")
        .arg(layers)
        .arg("--stats")
        .arg(&stats_path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !uffd_sock.exists() {
        assert!(
            Instant::now() < deadline,
            "wrenn-uffd socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    fc.ok(
        "PUT",
        "/snapshot/load",
        &format!(
            "{{\"snapshot_path\":\"{}\",\"mem_backend\":{{\"backend_type\":\"Uffd\",\"backend_path\":\"{}\"}},\"track_dirty_pages\":true,\"resume_vm\":true}}",
            snap.display(),
            uffd_sock.display()
        ),
    );
    eprintln!("{name}: snapshot/load + resume took {:?}", t.elapsed());
    // The server fills every page, unregisters and exits by itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = srv.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = srv.kill();
            panic!(
                "wrenn-uffd did not finish: {}",
                std::fs::read_to_string(&stats_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&stats_path).unwrap();
    eprintln!("{name}: wrenn-uffd stats:\n{text}");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        uffd::stats::value(&text, "state").as_deref(),
        Some("resident")
    );
    assert_eq!(
        uffd::stats::value(&text, "pages_total").as_deref(),
        Some(((MEM_MIB << 20) / 4096).to_string().as_str())
    );
    (fc, text)
}

/// Two memory images are byte-identical except for the few bytes Firecracker itself writes into
/// guest memory on restore: the VMGenID device's new 16-byte generation id and the vmclock
/// page's counters, in the system area below 1 MiB (seen here: pages 0xde and 0xdf).
fn assert_same_but_system_area(a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len());
    let differing: Vec<usize> = (0..a.len() / 4096)
        .filter(|p| a[p * 4096..(p + 1) * 4096] != b[p * 4096..(p + 1) * 4096])
        .collect();
    for &p in &differing {
        let diffs: Vec<(usize, u8, u8)> = (p * 4096..(p + 1) * 4096)
            .filter(|&i| a[i] != b[i])
            .map(|i| (i, a[i], b[i]))
            .take(24)
            .collect();
        eprintln!("page {p:#x}: {diffs:x?}");
    }
    assert!(
        differing.len() <= 4,
        "too many pages differ after the restore: {differing:?}"
    );
    assert!(
        differing.iter().all(|&p| (0x9f..0x100).contains(&p)),
        "pages outside Firecracker's system area differ after the restore: {differing:?}"
    );
}

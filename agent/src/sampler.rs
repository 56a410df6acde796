//! The usage sampler: once a second, reads every running sandbox's counters as the host
//! sees them and records them in [`crate::samples::Store`].
//!
//! - CPU: the cgroup of the Firecracker process (`cpu.stat` `usage_usec` on cgroup v2,
//!   `cpuacct.usage` on v1), else the process's `utime + stime` from `/proc/<pid>/stat`.
//! - Memory: the cgroup's `memory.current` (v2) / `memory.usage_in_bytes` (v1), else the
//!   process's `VmRSS`.
//! - Disk: blocks allocated to the sandbox's disk file (`st_blocks × 512`).
//! - Network: the slot's tap counters, read from `/proc/<pid>/net/dev`, which shows the
//!   network namespace the Firecracker process lives in (the tap is not visible from the
//!   host's namespace); the tap's receive is the guest's send and the other way round.
//!
//! The process is checked against its recorded start time before and after the reading,
//! so a reused pid is never sampled. A reading that fails (the VM just stopped) is skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use proto::id::Uuid;

use crate::manager::Manager;
use crate::samples::{Reading, Store};
use crate::statedir::ProcRef;

/// Clock ticks per second of `/proc/<pid>/stat` times: USER_HZ, fixed at 100 in the kernel's
/// user ABI on x86-64 and arm64 (the architectures Firecracker runs on).
const USER_HZ: u64 = 100;

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The tap every slot gives its Firecracker (`vmm_glue::net::slot`).
const TAP_NAME: &str = vmm_glue::net::slot::TAP_NAME;

/// Reads one VM's counters; `None` when the process is gone or is not the recorded one.
pub fn read(p: ProcRef, disk: &Path) -> Option<Reading> {
    if proto::process::start_ticks(p.pid).ok()? != p.start_ticks {
        return None;
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).ok()?;
    let cg = cgroup_dirs(&cgroup);
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).ok()?;
    let cpu_usec = cg
        .as_ref()
        .and_then(cgroup_cpu_usec)
        .or_else(|| proc_cpu_usec(&stat))?;
    let memory_bytes = match cg.as_ref().and_then(cgroup_memory_bytes) {
        Some(m) => m,
        None => {
            let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).ok()?;
            vm_rss_bytes(&status)?
        }
    };
    let netdev = std::fs::read_to_string(format!("/proc/{}/net/dev", p.pid)).unwrap_or_default();
    // A tap counts from the host's side: what Firecracker writes into it (the guest's
    // frames) is the tap's *receive*, what it reads out (frames for the guest) its
    // *transmit*. The samples count from the guest's side, so the two swap.
    let (tap_rx, tap_tx) = net_dev_bytes(&netdev, TAP_NAME).unwrap_or((0, 0));
    let (net_rx_bytes, net_tx_bytes) = (tap_tx, tap_rx);
    let disk_bytes = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(disk)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    };
    // Still the same process: the counters above are its own.
    if proto::process::start_ticks(p.pid).ok()? != p.start_ticks {
        return None;
    }
    Some(Reading {
        cpu_usec,
        memory_bytes,
        disk_bytes,
        net_rx_bytes,
        net_tx_bytes,
    })
}

/// The cgroup directories of a process from its `/proc/<pid>/cgroup`; `None` when it sits
/// in a root cgroup (no per-sandbox cgroup: the process's own counters are used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupDirs {
    V2(PathBuf),
    V1 {
        cpuacct: Option<PathBuf>,
        memory: Option<PathBuf>,
    },
}

pub fn cgroup_dirs(proc_cgroup: &str) -> Option<CgroupDirs> {
    let mut cpuacct = None;
    let mut memory = None;
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if path == "/" || !path.starts_with('/') || path.contains("/../") {
            continue;
        }
        let rel = path.trim_start_matches('/');
        if ctrls.is_empty() {
            return Some(CgroupDirs::V2(Path::new(CGROUP_ROOT).join(rel)));
        }
        for c in ctrls.split(',') {
            match c {
                "cpuacct" => cpuacct = Some(Path::new(CGROUP_ROOT).join(ctrls).join(rel)),
                "memory" => memory = Some(Path::new(CGROUP_ROOT).join("memory").join(rel)),
                _ => {}
            }
        }
    }
    (cpuacct.is_some() || memory.is_some()).then_some(CgroupDirs::V1 { cpuacct, memory })
}

fn cgroup_cpu_usec(cg: &CgroupDirs) -> Option<u64> {
    match cg {
        CgroupDirs::V2(d) => {
            cpu_stat_usage_usec(&std::fs::read_to_string(d.join("cpu.stat")).ok()?)
        }
        CgroupDirs::V1 { cpuacct, .. } => {
            let ns: u64 = std::fs::read_to_string(cpuacct.as_ref()?.join("cpuacct.usage"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some(ns / 1000)
        }
    }
}

fn cgroup_memory_bytes(cg: &CgroupDirs) -> Option<u64> {
    let file = match cg {
        CgroupDirs::V2(d) => d.join("memory.current"),
        CgroupDirs::V1 { memory, .. } => memory.as_ref()?.join("memory.usage_in_bytes"),
    };
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// `usage_usec` of a cgroup v2 `cpu.stat`.
pub fn cpu_stat_usage_usec(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line, microseconds.
pub fn proc_cpu_usec(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 is the first, so fields 14 and 15 are the 12th and 13th.
    let mut f = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime).saturating_mul(1_000_000 / USER_HZ))
}

/// `VmRSS` of a `/proc/<pid>/status`, bytes.
pub fn vm_rss_bytes(status: &str) -> Option<u64> {
    let v = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Received and sent bytes of interface `name` in a `/proc/net/dev` table.
pub fn net_dev_bytes(table: &str, name: &str) -> Option<(u64, u64)> {
    for line in table.lines().skip(2) {
        let Some((iface, counters)) = line.split_once(':') else {
            continue;
        };
        if iface.trim() != name {
            continue;
        }
        let f: Vec<&str> = counters.split_ascii_whitespace().collect();
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes ...
        let rx = f.first()?.parse().ok()?;
        let tx = f.get(8)?.parse().ok()?;
        return Some((rx, tx));
    }
    None
}

/// One pass: reads every running VM and freezes the series of those that are gone.
/// Returns how many were read.
pub fn sample_once(manager: &Manager, store: &Store) -> usize {
    let now = manager.clock().now_unix_ns();
    let vms = manager.vm_processes();
    let mut live: Vec<Uuid> = Vec::with_capacity(vms.len());
    let mut n = 0;
    for (id, p, disk) in vms {
        if let Some(r) = read(p, &disk) {
            if store.record(id, (p.pid, p.start_ticks), now, r) {
                n += 1;
            } else {
                log::warn!("usage samples full; sandbox not sampled");
            }
            live.push(id);
        }
    }
    store.sweep(&live, now);
    n
}

/// Runs [`sample_once`] every [`crate::limits::SAMPLE_INTERVAL`] on its own thread.
pub fn spawn(manager: Arc<Manager>, store: Arc<Store>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("agent-sampler".into())
        .spawn(move || {
            let period = crate::limits::SAMPLE_INTERVAL;
            let mut next = Instant::now();
            loop {
                sample_once(&manager, &store);
                next += period;
                let now = Instant::now();
                if next <= now {
                    // A pass took longer than the period: start again from now, no burst.
                    next = now + period;
                }
                std::thread::sleep(next - now);
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cgroup_files() {
        assert_eq!(
            cgroup_dirs("0::/wrenn/sb-1\n"),
            Some(CgroupDirs::V2(PathBuf::from("/sys/fs/cgroup/wrenn/sb-1")))
        );
        assert_eq!(cgroup_dirs("0::/\n"), None);
        assert_eq!(cgroup_dirs("garbage"), None);
        let v1 = "12:memory:/wrenn/x\n4:cpu,cpuacct:/wrenn/x\n1:name=systemd:/\n";
        assert_eq!(
            cgroup_dirs(v1),
            Some(CgroupDirs::V1 {
                cpuacct: Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/wrenn/x")),
                memory: Some(PathBuf::from("/sys/fs/cgroup/memory/wrenn/x")),
            })
        );
        assert_eq!(cgroup_dirs("0::/a/../../etc\n"), None);
        assert_eq!(
            cpu_stat_usage_usec("usage_usec 1234\nuser_usec 1000\n"),
            Some(1234)
        );
        assert_eq!(cpu_stat_usage_usec("nothing"), None);
    }

    #[test]
    fn parses_proc_files() {
        let stat = "42 (fire cracker) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 999 0 0";
        assert_eq!(proc_cpu_usec(stat), Some(3_000_000));
        assert_eq!(proc_cpu_usec("42 (x"), None);
        assert_eq!(vm_rss_bytes("Name:\tx\nVmRSS:\t  2048 kB\n"), Some(2 << 20));
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None);
        let dev = "Inter-|   Receive                                                |  Transmit\n \
face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  \
tap0:    1500      10    0    0    0     0          0         0     9000      20    0    0    0     0       0          0\n";
        assert_eq!(net_dev_bytes(dev, "tap0"), Some((1500, 9000)));
        assert_eq!(net_dev_bytes(dev, "eth9"), None);
    }

    /// Manual check on a real VM: `WRENN_SAMPLE_PID=<firecracker pid> cargo test -p agent
    /// --lib sampler::tests::reads_a_running_firecracker -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs a running Firecracker named by WRENN_SAMPLE_PID"]
    fn reads_a_running_firecracker() {
        let Some(pid) = std::env::var("WRENN_SAMPLE_PID")
            .ok()
            .and_then(|v| v.parse().ok())
        else {
            println!("skipped: WRENN_SAMPLE_PID not set");
            return;
        };
        let p = ProcRef {
            pid,
            start_ticks: proto::process::start_ticks(pid).unwrap(),
        };
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        println!("cgroup {:?} -> {:?}", cg.trim(), cgroup_dirs(&cg));
        let a = read(p, Path::new("/nonexistent")).expect("first reading");
        std::thread::sleep(std::time::Duration::from_secs(2));
        let b = read(p, Path::new("/nonexistent")).expect("second reading");
        println!("first  {a:?}\nsecond {b:?}");
        println!(
            "cpu over 2 s: {:.1}% of one cpu",
            (b.cpu_usec - a.cpu_usec) as f64 / 20_000.0
        );
        assert!(b.cpu_usec >= a.cpu_usec && b.memory_bytes > 0);
    }

    #[test]
    fn reads_this_process() {
        // The test process stands in for a Firecracker: its counters must be readable.
        let pid = i32::try_from(std::process::id()).unwrap();
        let p = ProcRef {
            pid,
            start_ticks: proto::process::start_ticks(pid).unwrap(),
        };
        let disk = std::env::current_exe().unwrap();
        let r = read(p, &disk).expect("reading this process");
        assert!(r.memory_bytes > 0);
        assert!(r.disk_bytes > 0);
        let wrong = ProcRef {
            pid,
            start_ticks: p.start_ticks + 1,
        };
        assert_eq!(read(wrong, &disk), None, "a reused pid is not sampled");
    }
}

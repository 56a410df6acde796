//! The host as a whole: identity (from registration), capacity, versions, problems.

use std::sync::{Arc, RwLock};

use proto::gen::wrenn::agent::v1 as pb;
use proto::id;

use crate::manager::Manager;
use crate::statedir::Identity;

/// wrenn-agent's version.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The host's identity, shared by the RPC server (which checks ctl's agent token) and the
/// ctl client (which registers and presents the host token).
#[derive(Debug, Default)]
pub struct IdentityCell(RwLock<Option<Identity>>);

impl IdentityCell {
    pub fn new(id: Option<Identity>) -> IdentityCell {
        IdentityCell(RwLock::new(id))
    }
    pub fn get(&self) -> Option<Identity> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn set(&self, id: Identity) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(id);
    }
}

/// How much of the host is offered to sandboxes per unit of its own (`--vcpu-overcommit`,
/// `--memory-overcommit`; bounds in `proto::sandbox_limits`). Disk is never overcommitted
/// here: sparse disks grow, and a full file system fails every sandbox on it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Overcommit {
    pub vcpu: f64,
    pub memory: f64,
}

impl Default for Overcommit {
    fn default() -> Overcommit {
        Overcommit {
            vcpu: proto::sandbox_limits::VCPU_OVERCOMMIT_DEFAULT,
            memory: proto::sandbox_limits::MEMORY_OVERCOMMIT_DEFAULT,
        }
    }
}

impl Overcommit {
    /// `physical` times the ratios (rounded down; never below what the host has when a
    /// ratio is at least 1).
    pub fn apply(&self, physical: &pb::Resources) -> pb::Resources {
        pb::Resources {
            vcpus: (f64::from(physical.vcpus) * self.vcpu) as u32,
            memory_mib: (physical.memory_mib as f64 * self.memory) as u64,
            disk_mib: physical.disk_mib,
        }
    }
}

/// Everything Host.Info reports.
pub struct Host {
    pub manager: Arc<Manager>,
    pub identity: Arc<IdentityCell>,
    /// Problems found at start besides the VM layer's (missing rootfs, ...).
    pub extra_problems: Vec<String>,
    pub overcommit: Overcommit,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Host")
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// MemTotal of /proc/meminfo, MiB.
pub fn mem_total_mib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

impl Host {
    /// Why this host cannot run sandboxes (empty when it can).
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.manager.vmm().problems();
        p.extend(self.extra_problems.iter().cloned());
        p
    }

    /// What the host has: its CPUs, memory and the state root's file system.
    pub fn physical(&self) -> pb::Resources {
        let disk = crate::sys::fs_space(&self.manager.layout().root)
            .map(|(total, _)| total >> 20)
            .unwrap_or(0);
        pb::Resources {
            vcpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_mib: mem_total_mib(),
            disk_mib: disk,
        }
    }

    /// What the host offers to sandboxes: [`Host::physical`] times the overcommit ratios.
    pub fn capacity(&self) -> pb::Resources {
        self.overcommit.apply(&self.physical())
    }

    pub fn usage(&self) -> pb::Resources {
        let u = self.manager.usage();
        pb::Resources {
            vcpus: u.vcpus,
            memory_mib: u.memory_mib,
            disk_mib: u.disk_mib,
        }
    }

    /// Guest kernels available (`kernels/vmlinux-<version>`).
    pub fn guest_kernels(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.manager.layout().kernels())
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_prefix("vmlinux-"))
                            .map(str::to_owned)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn info(&self) -> pb::HostInfo {
        let problems = self.problems();
        let u = self.manager.usage();
        pb::HostInfo {
            host_id: self
                .identity
                .get()
                .map(|i| id::format_host(i.host_id))
                .unwrap_or_default(),
            hostname: read_trim("/proc/sys/kernel/hostname"),
            agent_version: AGENT_VERSION.to_owned(),
            firecracker_version: self.manager.vmm().firecracker_version(),
            host_kernel: read_trim("/proc/sys/kernel/osrelease"),
            guest_kernels: self.guest_kernels(),
            capacity: Some(self.capacity()),
            usage: Some(self.usage()),
            can_host_sandboxes: problems.is_empty(),
            problems,
            sandboxes_running: u.running,
            sandboxes_paused: u.paused,
            restore_backend: self.manager.vmm().restore_backend().to_owned(),
            now_unix_ns: self.manager.clock().now_unix_ns(),
            physical: Some(self.physical()),
            vcpu_overcommit: self.overcommit.vcpu,
            memory_overcommit: self.overcommit.memory,
        }
    }

    /// Gauges computed now (for /metrics and Host.Metrics).
    pub fn gauges(&self) -> Vec<crate::metrics::Sample> {
        use crate::metrics::Sample;
        let u = self.manager.usage();
        let mut by_state = std::collections::BTreeMap::new();
        for (_, st, _, _) in self.manager.summaries() {
            *by_state.entry(st.name()).or_insert(0u32) += 1;
        }
        let mut out: Vec<Sample> = crate::state::State::ALL
            .iter()
            .map(|s| Sample {
                name: "wrenn_agent_sandboxes",
                labels: vec![("state", s.name().to_owned())],
                value: f64::from(*by_state.get(s.name()).unwrap_or(&0)),
            })
            .collect();
        let g = |name, v: f64| Sample {
            name,
            labels: Vec::new(),
            value: v,
        };
        out.push(g(
            "wrenn_agent_slots_used",
            f64::from(self.manager.slots_used()),
        ));
        out.push(g("wrenn_agent_vcpus_used", f64::from(u.vcpus)));
        out.push(g("wrenn_agent_memory_used_mib", u.memory_mib as f64));
        out.push(g("wrenn_agent_disk_used_mib", u.disk_mib as f64));
        out.push(g(
            "wrenn_agent_can_host_sandboxes",
            if self.problems().is_empty() { 1.0 } else { 0.0 },
        ));
        out
    }

    pub fn metrics(&self) -> pb::HostMetrics {
        let mut all = crate::metrics::counters();
        all.extend(self.gauges());
        pb::HostMetrics {
            samples: all
                .into_iter()
                .map(|s| pb::MetricSample {
                    name: s.name.to_owned(),
                    labels: s
                        .labels
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                    value: s.value,
                })
                .collect(),
        }
    }

    /// Prometheus text for /metrics.
    pub fn prometheus(&self) -> String {
        crate::metrics::render(&self.gauges())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overcommit_scales_cpus_and_memory_not_disk() {
        let physical = pb::Resources {
            vcpus: 2,
            memory_mib: 24 * 1024,
            disk_mib: 1000,
        };
        let offered = Overcommit::default().apply(&physical);
        assert_eq!(
            (offered.vcpus, offered.memory_mib, offered.disk_mib),
            (8, 24 * 1024, 1000)
        );
        let o = Overcommit {
            vcpu: 0.5,
            memory: 1.5,
        };
        let offered = o.apply(&physical);
        assert_eq!((offered.vcpus, offered.memory_mib), (1, 36 * 1024));
    }
}

//! The VM layer on Firecracker: [`Vmm`] implemented with `vmm-glue` (API client, typed
//! requests, network slots) and `uffd` (generations, headers, the page server binary).

use std::path::{Path, PathBuf};

use proto::rpc::Client;
use proto::Status;

use crate::flags::{Flags, RestoreBackend};
use crate::statedir::{ProcRef, SandboxDir, SandboxRecord, TemplateDir};
use crate::vm::{RestoreSource, VmError, Vmm};

/// Settings of the Firecracker VM layer.
#[derive(Clone, Debug)]
pub struct FcConfig {
    pub firecracker: PathBuf,
    /// Default guest kernel; else the newest `<state-root>/kernels/vmlinux-*`.
    pub kernel: Option<PathBuf>,
    pub uffd_bin: Option<PathBuf>,
    pub backend: RestoreBackend,
    pub boot_args_extra: String,
    pub state_root: PathBuf,
}

impl FcConfig {
    pub fn from_flags(f: &Flags) -> FcConfig {
        FcConfig {
            firecracker: f.firecracker.clone(),
            kernel: f.kernel.clone(),
            uffd_bin: f.uffd_bin.clone().or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("wrenn-uffd")))
            }),
            backend: f.restore_backend,
            boot_args_extra: f.boot_args_extra.clone(),
            state_root: f.state_root.clone(),
        }
    }
}

/// The Firecracker VM layer.
#[derive(Debug)]
pub struct FirecrackerVmm {
    cfg: FcConfig,
}

impl FirecrackerVmm {
    pub fn new(cfg: FcConfig) -> FirecrackerVmm {
        FirecrackerVmm { cfg }
    }

    /// The guest kernel used for `version` ("" = the default).
    pub fn kernel_path(&self, version: &str) -> Option<PathBuf> {
        let kernels = self.cfg.state_root.join("kernels");
        if !version.is_empty() {
            let p = kernels.join(format!("vmlinux-{version}"));
            return p.exists().then_some(p);
        }
        if let Some(k) = &self.cfg.kernel {
            return k.exists().then(|| k.clone());
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(&kernels)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinux-"))
            })
            .collect();
        found.sort();
        found.pop()
    }

    fn unsupported(&self, action: &str) -> VmError {
        VmError::new(
            action,
            "this build's VM layer cannot start Firecracker yet (vmm-glue process launcher missing)",
        )
    }
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Vmm for FirecrackerVmm {
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !executable(&self.cfg.firecracker) {
            p.push(format!(
                "firecracker not found at {} (set --firecracker or WRENN_FIRECRACKER)",
                self.cfg.firecracker.display()
            ));
        }
        if self.kernel_path("").is_none() {
            p.push(format!(
                "no guest kernel (set --kernel or WRENN_KERNEL, or put vmlinux-<version> in {})",
                self.cfg.state_root.join("kernels").display()
            ));
        }
        if !Path::new("/dev/kvm").exists() {
            p.push("/dev/kvm is missing (enable KVM; load kvm_intel or kvm_amd)".into());
        }
        if self.cfg.backend == RestoreBackend::Uffd
            && !self.cfg.uffd_bin.as_deref().is_some_and(executable)
        {
            p.push(format!(
                "wrenn-uffd not found at {} (install it next to wrenn-agent, set --uffd-bin, or use --restore-backend file)",
                self.cfg
                    .uffd_bin
                    .as_deref()
                    .map_or_else(|| "(none)".into(), |b| b.display().to_string())
            ));
        }
        p.push(self.unsupported("start").reason);
        p
    }

    fn firecracker_version(&self) -> String {
        if !executable(&self.cfg.firecracker) {
            return String::new();
        }
        std::process::Command::new(&self.cfg.firecracker)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
            .unwrap_or_default()
    }

    fn restore_backend(&self) -> &'static str {
        match self.cfg.backend {
            RestoreBackend::Uffd => "uffd",
            RestoreBackend::File => "file",
        }
    }

    fn create_slot(&self, _index: u32) -> Result<(), VmError> {
        Err(self.unsupported("create slot"))
    }

    fn destroy_slot(&self, _index: u32) -> Result<(), VmError> {
        Ok(())
    }

    fn cleanup_slots(&self, _keep: &[u32]) -> Result<Vec<u32>, VmError> {
        Ok(Vec::new())
    }

    fn copy_file(&self, _src: &Path, _dst: &Path, _size: Option<u64>) -> Result<(), VmError> {
        Err(self.unsupported("copy"))
    }

    fn boot(&self, _: &mut SandboxRecord, _: &SandboxDir, _: &TemplateDir) -> Result<(), VmError> {
        Err(self.unsupported("boot"))
    }

    fn restore(
        &self,
        _: &mut SandboxRecord,
        _: &SandboxDir,
        _: &RestoreSource<'_>,
    ) -> Result<(), VmError> {
        Err(self.unsupported("restore"))
    }

    fn snapshot(&self, _: &mut SandboxRecord, _: &SandboxDir) -> Result<(), VmError> {
        Err(self.unsupported("snapshot"))
    }

    fn stop(&self, rec: &SandboxRecord, _: &SandboxDir) {
        for p in [rec.firecracker, rec.page_server].into_iter().flatten() {
            crate::sys::kill_and_reap(p, std::time::Duration::from_secs(10));
        }
    }

    fn alive(&self, p: ProcRef) -> bool {
        crate::sys::alive(p)
    }

    fn readopt(&self, _: &SandboxRecord, _: &SandboxDir) -> Result<(), VmError> {
        Err(self.unsupported("re-adopt"))
    }

    fn resume_vm(&self, _: &SandboxRecord, _: &SandboxDir) -> Result<(), VmError> {
        Err(self.unsupported("resume vm"))
    }

    fn connect_envd(&self, _: &SandboxDir, _: &str) -> Result<Client, Status> {
        Err(Status::unavailable(
            self.unsupported("connect envd").to_string(),
        ))
    }
}

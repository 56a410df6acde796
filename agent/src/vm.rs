//! What the manager needs from the VM layer, as a trait, so the lifecycle logic (state
//! machine, slots, records, TTL, reports) is tested without Firecracker, and the Firecracker
//! implementation ([`crate::firecracker`]) is one place that speaks to `vmm-glue` and `uffd`.
//!
//! Contract of every method that starts something: on error it has already stopped what it
//! started (processes, sockets), so the manager only has to release the slot and the files.
//! Methods read the sandbox's record and return what they did as a typed outcome
//! ([`Started`], the new [`Chain`]); the manager alone writes the record.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::path::Path;

use proto::rpc::Client;
use proto::{Code, Status};

use vmm_glue::net::Egress;

use crate::statedir::{Chain, ProcRef, SandboxDir, SandboxRecord, TemplateDir};

/// A failure in the VM layer: what was being done, and the typed error of the layer below
/// (vmm-glue, uffd, the file system), kept as the source so the status and the logs say
/// both, and flags for what the failure left behind.
#[derive(Debug)]
pub struct VmError {
    /// What was being done ("start firecracker", "snapshot/create").
    pub action: Cow<'static, str>,
    /// Why: the error underneath, typed.
    pub source: Box<dyn Error + Send + Sync>,
    /// Firecracker's last log lines when they explain more ("" when none).
    pub log_tail: String,
    /// After a failed snapshot: the VM still runs (the pause can be undone).
    pub vm_still_running: bool,
    /// After a failed snapshot: Firecracker may have reset its dirty-page log, so the next
    /// snapshot must be Full or the pages dirtied before it would be lost.
    pub full_snapshot_needed: bool,
    /// The host lacks a resource (slot, memory, disk): RESOURCE_EXHAUSTED.
    pub exhausted: bool,
}

impl VmError {
    pub fn new(
        action: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn Error + Send + Sync>>,
    ) -> VmError {
        VmError {
            action: action.into(),
            source: source.into(),
            log_tail: String::new(),
            vm_still_running: false,
            full_snapshot_needed: false,
            exhausted: false,
        }
    }

    /// The status code a call that failed with it answers: RESOURCE_EXHAUSTED when the host
    /// lacks a resource, else UNAVAILABLE (the host cannot run it now).
    pub fn code(&self) -> Code {
        if self.exhausted {
            Code::ResourceExhausted
        } else {
            Code::Unavailable
        }
    }

    /// The call status: [`Self::code`] and the whole message.
    pub fn status(&self) -> Status {
        Status::new(self.code(), self.to_string())
    }
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.action, self.source)?;
        if !self.log_tail.is_empty() {
            write!(f, "; log: {}", self.log_tail)?;
        }
        Ok(())
    }
}

impl Error for VmError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.source)
    }
}

/// What a boot or a restore started, for the manager to record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Started {
    /// The Firecracker process.
    pub firecracker: Option<ProcRef>,
    /// The page server (a restore through wrenn-uffd).
    pub page_server: Option<ProcRef>,
    /// The guest kernel's version (a cold boot; a restore keeps the snapshot's).
    pub kernel_version: Option<String>,
    /// envd's version from its readiness push (a cold boot).
    pub envd_version: Option<String>,
}

/// Where a restore takes its memory and VM state from.
#[derive(Debug, Clone)]
pub struct RestoreSource<'a> {
    pub chain: &'a Chain,
    /// Record the working set (first-touch order) into this file while serving faults:
    /// the one restore made while a template is created.
    pub record_working_set: Option<&'a Path>,
    /// A recorded working set to install first.
    pub working_set: Option<&'a Path>,
    /// The template's one memory file (fully materialized from its chain, sparse, root's,
    /// mode 0444, never written again): a restore from the template with the File backend
    /// maps it directly (`MAP_PRIVATE`, so clones share its clean pages and nothing is
    /// copied); jailed, it is hard-linked read-only into the chroot. `None`: restore from
    /// `chain` (a resume of a paused sandbox, its own chain).
    pub template_memory: Option<&'a Path>,
}

/// The VM layer.
pub trait Vmm: Send + Sync {
    /// Why this host cannot run sandboxes, one line each with the fix; empty when it can.
    fn problems(&self) -> Vec<String>;

    /// `firecracker --version` ("" when unknown).
    fn firecracker_version(&self) -> String;

    /// "uffd" or "file".
    fn restore_backend(&self) -> &'static str;

    /// Creates network slot `index` (namespace, veth, tap, NAT) with egress policy `egress`,
    /// in place before any guest runs in it.
    fn create_slot(&self, index: u32, egress: &Egress) -> Result<(), VmError>;

    /// Replaces the egress policy of live slot `index` atomically; connections to what it
    /// now refuses are cut.
    fn set_egress(&self, index: u32, egress: &Egress) -> Result<(), VmError>;

    /// Where the host reaches the guest of slot `index` (its guest alias).
    fn guest_ip(&self, index: u32) -> std::net::Ipv4Addr;

    /// Removes network slot `index`; a missing slot is fine.
    fn destroy_slot(&self, index: u32) -> Result<(), VmError>;

    /// Removes every slot on the host except `keep` (after a restart); returns those removed.
    fn cleanup_slots(&self, keep: &[u32]) -> Result<Vec<u32>, VmError>;

    /// Copies a file for a sandbox or template (reflink when possible, else sparse copy),
    /// optionally growing it to `size_bytes`.
    fn copy_file(&self, src: &Path, dst: &Path, size_bytes: Option<u64>) -> Result<(), VmError>;

    /// Cold boot in `rec.slot`: disk clone from the template, Firecracker, configure,
    /// InstanceStart, wait for envd's readiness push. envd is not initialized yet.
    fn boot(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        template: &TemplateDir,
    ) -> Result<Started, VmError>;

    /// Restore in `rec.slot` from a snapshot chain (the sandbox's own, or a template's):
    /// Firecracker, page server (or a materialized memory file), snapshot/load, resume.
    /// The disk must already be at `dir.disk()`. envd has not been told `Resumed` yet.
    fn restore(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        src: &RestoreSource<'_>,
    ) -> Result<Started, VmError>;

    /// Pause: pause the VM, snapshot (Full the first time for a cold-booted sandbox, Diff
    /// afterwards), build the new generation, merge (and squash) the header into
    /// `dir.snapshot()`, then stop Firecracker and the page server. Returns the new chain.
    /// On error with `vm_still_running`, the VM has been resumed.
    fn snapshot(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<Chain, VmError>;

    /// Ends the working-set recording of a restore made with `record_working_set` and
    /// waits until the file is written.
    fn finish_recording(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        path: &Path,
    ) -> Result<(), VmError>;

    /// Stops every process of the sandbox (Firecracker, page server); idempotent.
    fn stop(&self, rec: &SandboxRecord, dir: &SandboxDir);

    /// Whether the recorded process still runs.
    fn alive(&self, p: ProcRef) -> bool;

    /// Reconnects to a re-adopted VM after an agent restart (API socket answers).
    fn readopt(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<(), VmError>;

    /// Resumes a VM left paused by an interrupted pause (PATCH /vm Resumed).
    fn resume_vm(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<(), VmError>;

    /// A new connection to the sandbox's envd, authenticated with `token` ("" = none).
    fn connect_envd(&self, dir: &SandboxDir, token: &str) -> Result<Client, Status>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_source_and_map_to_their_code() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let mut e = VmError::new("read header", io);
        assert_eq!(e.code(), Code::Unavailable);
        let inner = Error::source(&e).unwrap();
        assert!(
            inner.downcast_ref::<std::io::Error>().is_some(),
            "source stays typed"
        );
        e.log_tail = "last line".into();
        assert_eq!(e.to_string(), "read header: no such file; log: last line");
        e.exhausted = true;
        let st = e.status();
        assert_eq!(st.code, Code::ResourceExhausted);
        assert!(
            st.message.contains("read header: no such file"),
            "{}",
            st.message
        );
    }
}

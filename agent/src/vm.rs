//! What the manager needs from the VM layer, as a trait, so the lifecycle logic (state
//! machine, slots, records, TTL, reports) is tested without Firecracker, and the Firecracker
//! implementation ([`crate::firecracker`]) is one place that speaks to `vmm-glue` and `uffd`.
//!
//! Contract of every method that starts something: on error it has already stopped what it
//! started (processes, sockets), so the manager only has to release the slot and the files.
//! The record is updated in place with what was started (pids, versions, chain).

use std::fmt;
use std::path::Path;

use proto::rpc::Client;
use proto::Status;

use vmm_glue::net::Egress;

use crate::statedir::{Chain, ProcRef, SandboxDir, SandboxRecord, TemplateDir};

/// A failure in the VM layer.
#[derive(Debug)]
pub struct VmError {
    /// What was being done ("start firecracker", "snapshot/create").
    pub action: String,
    /// Why, for people.
    pub reason: String,
    /// After a failed snapshot: the VM still runs (the pause can be undone).
    pub vm_still_running: bool,
    /// The host lacks a resource (slot, memory, disk): RESOURCE_EXHAUSTED.
    pub exhausted: bool,
}

impl VmError {
    pub fn new(action: impl Into<String>, reason: impl fmt::Display) -> VmError {
        VmError {
            action: action.into(),
            reason: reason.to_string(),
            vm_still_running: false,
            exhausted: false,
        }
    }
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.action, self.reason)
    }
}

impl std::error::Error for VmError {}

/// Where a restore takes its memory and VM state from.
#[derive(Debug, Clone)]
pub struct RestoreSource<'a> {
    pub chain: &'a Chain,
    /// Record the working set (first-touch order) into this file while serving faults:
    /// the one restore made while a template is created.
    pub record_working_set: Option<&'a Path>,
    /// A recorded working set to install first.
    pub working_set: Option<&'a Path>,
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
        rec: &mut SandboxRecord,
        dir: &SandboxDir,
        template: &TemplateDir,
    ) -> Result<(), VmError>;

    /// Restore in `rec.slot` from a snapshot chain (the sandbox's own, or a template's):
    /// Firecracker, page server (or a materialized memory file), snapshot/load, resume.
    /// The disk must already be at `dir.disk()`. envd has not been told `Resumed` yet.
    fn restore(
        &self,
        rec: &mut SandboxRecord,
        dir: &SandboxDir,
        src: &RestoreSource<'_>,
    ) -> Result<(), VmError>;

    /// Pause: pause the VM, snapshot (Full the first time for a cold-booted sandbox, Diff
    /// afterwards), build the new generation, merge (and squash) the header into
    /// `dir.snapshot()`, then stop Firecracker and the page server. Sets `rec.chain`.
    /// On error with `vm_still_running`, the VM has been resumed.
    fn snapshot(&self, rec: &mut SandboxRecord, dir: &SandboxDir) -> Result<(), VmError>;

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

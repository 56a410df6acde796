//! The sandbox manager: every lifecycle operation, the bookkeeping of slots, disks and
//! records, the TTL policy, VM-death detection and re-adoption after a restart.
//!
//! Concurrency: each sandbox has an operation lock. An operation takes it with `try_lock`,
//! so a second operation on the same sandbox fails at once with ABORTED (the schema's
//! contract) instead of queueing; different sandboxes proceed in parallel. Slow work
//! (copies, boots, snapshots) additionally takes a lifecycle turn from a bounded pool
//! ([`LIFECYCLE_CONCURRENCY_MAX`] at once, [`LIFECYCLE_QUEUE_MAX`] waiting). Reads (Get,
//! List) take only the record's short lock.
//!
//! Architecture invariant: a record is saved before the state it describes is left, and
//! every slot, process and directory a failed operation made is released before the
//! operation answers; after a crash, [`Manager::recover`] finishes the job from the records.
//!
//! One module per operation: `create` (create, destroy), `pause` (pause, resume),
//! `timeout` (SetTimeout, Ping, expiry), `template` (templates on this host),
//! `recovery` (re-adoption, VM death, stray processes). This file keeps what they share:
//! the per-sandbox locks and records, state steps and reports, slots and uids, envd.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use proto::gen::wrenn::agent::v1 as pb;
use proto::gen::wrenn::envd::v1 as envd;
use proto::gen::wrenn::host::v1::{ReportStateRequest, StateChangeReason};
use proto::id::{self, Uuid};
use proto::rpc::Client;
use proto::{Code, Status};
use vmm_glue::net::SlotAllocator;

use crate::limits::{
    ACCESS_TOKEN_BYTES, ENVD_CALL_TIMEOUT, FIELD_LEN_MAX, LIFECYCLE_CONCURRENCY_MAX,
    LIFECYCLE_QUEUE_MAX, RESTORE_READY_TIMEOUT, SANDBOXES_MAX, TIMEOUT_MAX,
};
use crate::state::{self, Event, State};
use crate::statedir::{
    Chain, Layout, SandboxDir, SandboxRecord, SandboxSpec, TemplateDir, TemplateKind,
    TemplateRecord, TimeoutPolicy,
};
use crate::sys;
use crate::ttl::{self, Clock, Outcome, Reaper};
use crate::uid_pool::{UidPool, UidRange};
use crate::vm::{RestoreSource, Started, VmError, Vmm};

mod create;
mod network;
mod pause;
mod recovery;
mod template;
mod timeout;

use create::check_timeout;
pub use create::{parse_id, CreateSpec};
pub use network::egress_of;
pub use recovery::{decide, stray_processes, Action, Decision};
pub use template::{allocated_bytes, write_template_memory};

/// Where the manager sends state changes it makes on its own (TTL, VM death, adoption).
pub trait Events: Send + Sync {
    fn state_changed(&self, report: ReportStateRequest);
}

/// Drops every report (no ctl configured).
#[derive(Debug, Default)]
pub struct NoEvents;

impl Events for NoEvents {
    fn state_changed(&self, _: ReportStateRequest) {}
}

/// Manager settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub layout: Layout,
    /// Network slots (and so running sandboxes) this host offers.
    pub slot_capacity: u32,
    /// Timeout of a sandbox created with `timeout_s = 0`.
    pub default_timeout: Duration,
    /// Uids for jailed Firecrackers (one per running sandbox, held with its slot); `None`:
    /// Firecracker runs unjailed (`--unjailed`) and records carry no uid.
    pub jail_uids: Option<UidRange>,
    /// Where this agent's chroots are (`--chroot-base-dir`): recovery kills a jailed process
    /// no record holds only when the jailer's pid file in one of them names it.
    pub jail_chroot_base: Option<PathBuf>,
    /// How long an Exec waits for envd to report the process started
    /// ([`crate::limits::EXEC_START_TIMEOUT`]; tests shorten it).
    pub exec_start_timeout: Duration,
}

impl Config {
    pub fn new(root: impl Into<PathBuf>) -> Config {
        Config {
            layout: Layout::new(root),
            slot_capacity: SANDBOXES_MAX as u32,
            default_timeout: crate::limits::TIMEOUT_DEFAULT,
            jail_uids: None,
            jail_chroot_base: None,
            exec_start_timeout: crate::limits::EXEC_START_TIMEOUT,
        }
    }
}

// ---- the manager ----

struct Sandbox {
    id: Uuid,
    dir: SandboxDir,
    /// Held for the whole of an operation.
    op: Mutex<()>,
    /// The current record (saved on disk at every state change).
    rec: Mutex<SandboxRecord>,
}

impl Sandbox {
    fn rec(&self) -> SandboxRecord {
        self.rec.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The bounded pool of lifecycle turns.
struct Turns {
    st: Mutex<(usize, usize)>,
    cv: Condvar,
}

struct Turn<'a>(&'a Turns);

impl Turns {
    fn take(&self) -> Result<Turn<'_>, Status> {
        let mut g = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 >= LIFECYCLE_CONCURRENCY_MAX {
            if g.1 >= LIFECYCLE_QUEUE_MAX {
                return Err(Status::resource_exhausted(
                    "too many lifecycle operations queued on this host",
                ));
            }
            g.1 += 1;
            while g.0 >= LIFECYCLE_CONCURRENCY_MAX {
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.1 -= 1;
        }
        g.0 += 1;
        Ok(Turn(self))
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut g = self.0.st.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        self.0.cv.notify_one();
    }
}

/// Host-wide usage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub running: u32,
    pub paused: u32,
    pub total: u32,
}

/// The sandbox manager of one host.
pub struct Manager {
    cfg: Config,
    vmm: Arc<dyn Vmm>,
    clock: Arc<dyn Clock>,
    events: Arc<dyn Events>,
    reaper: Arc<Reaper>,
    sandboxes: Mutex<HashMap<Uuid, Arc<Sandbox>>>,
    templates: Mutex<HashMap<Uuid, TemplateRecord>>,
    /// Held while a template's memory file is written at a create (one writer: concurrent
    /// first creates of a template wait for its file instead of each writing one).
    template_memory_writer: Mutex<()>,
    slots: Mutex<SlotAllocator>,
    uids: Option<Mutex<UidPool>>,
    turns: Turns,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("root", &self.cfg.layout.root)
            .finish()
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// A VM-layer failure as the call's status (its code from the typed error).
fn vm_status(e: VmError) -> Status {
    e.status()
}

impl Manager {
    /// A manager over the state root; call [`Manager::recover`] before serving.
    pub fn new(
        cfg: Config,
        vmm: Arc<dyn Vmm>,
        clock: Arc<dyn Clock>,
        events: Arc<dyn Events>,
    ) -> Result<Arc<Manager>, Status> {
        cfg.layout.create().map_err(internal)?;
        let slots = SlotAllocator::new(cfg.slot_capacity).map_err(internal)?;
        let uids = match cfg.jail_uids {
            Some(r) => Some(Mutex::new(UidPool::new(r).map_err(internal)?)),
            None => None,
        };
        Ok(Arc::new(Manager {
            cfg,
            vmm,
            clock,
            events,
            reaper: Arc::new(Reaper::new()),
            sandboxes: Mutex::new(HashMap::new()),
            templates: Mutex::new(HashMap::new()),
            template_memory_writer: Mutex::new(()),
            slots: Mutex::new(slots),
            uids,
            turns: Turns {
                st: Mutex::new((0, 0)),
                cv: Condvar::new(),
            },
        }))
    }

    pub fn layout(&self) -> &Layout {
        &self.cfg.layout
    }

    pub fn vmm(&self) -> &Arc<dyn Vmm> {
        &self.vmm
    }

    pub fn reaper(&self) -> &Arc<Reaper> {
        &self.reaper
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    fn now(&self) -> i64 {
        self.clock.now_unix_ns()
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Uuid, Arc<Sandbox>>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lookup(&self, id: Uuid) -> Result<Arc<Sandbox>, Status> {
        self.map().get(&id).cloned().ok_or_else(|| {
            Status::not_found(format!("sandbox {} not found", id::format_sandbox(id)))
        })
    }

    /// Runs `f` holding the sandbox's operation lock (ABORTED when another holds it).
    fn with_op<R>(
        &self,
        id: Uuid,
        f: impl FnOnce(&Arc<Sandbox>) -> Result<R, Status>,
    ) -> Result<R, Status> {
        let sb = self.lookup(id)?;
        let _op = match sb.op.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(Status::new(
                    Code::Aborted,
                    "another operation on this sandbox is in progress",
                ))
            }
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        // Removed from the map between lookup and lock (destroyed).
        if !self.map().contains_key(&id) {
            return Err(Status::not_found(format!(
                "sandbox {} not found",
                id::format_sandbox(id)
            )));
        }
        f(&sb)
    }

    /// Saves `rec` and makes it current.
    fn commit(&self, sb: &Sandbox, rec: &SandboxRecord) -> Result<(), Status> {
        let r = rec.save(&sb.dir).map_err(internal);
        *sb.rec.lock().unwrap_or_else(|e| e.into_inner()) = rec.clone();
        r
    }

    /// Applies a state-machine event to `rec`, saves it.
    fn step(
        &self,
        sb: &Sandbox,
        rec: &mut SandboxRecord,
        ev: Event,
        reason: &str,
    ) -> Result<(), Status> {
        let to = state::next(rec.state, ev)
            .map_err(|e| Status::failed_precondition(format!("sandbox is {}: {e}", rec.state)))?;
        info!(
            "sandbox transition id={} from={} to={} reason={:?}",
            id::format_sandbox(rec.id),
            rec.state,
            to,
            reason
        );
        rec.state = to;
        rec.state_reason = reason.to_owned();
        rec.updated_unix_ns = self.now();
        if to != State::Running {
            rec.expires_unix_ns = 0;
        }
        crate::metrics::TRANSITIONS.inc();
        self.commit(sb, rec)
    }

    fn report(&self, rec: &SandboxRecord, previous: State, reason: StateChangeReason) {
        self.events.state_changed(ReportStateRequest {
            sandbox_id: id::format_sandbox(rec.id),
            state: rec.state as i32,
            previous_state: previous as i32,
            reason: reason as i32,
            message: rec.state_reason.clone(),
            changed_unix_ns: rec.updated_unix_ns,
        });
    }

    // ---- slots ----

    /// Takes a network slot and, when jailed, a uid for `rec`'s Firecracker: both are held
    /// while it runs and given back together by [`Self::release_slot`].
    fn take_slot_for(&self, rec: &mut SandboxRecord) -> Result<(), Status> {
        let index = self.take_slot(&network::stored_egress(rec))?;
        if let Some(pool) = &self.uids {
            let uid = pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allocate(rec.id, crate::uid_pool::uid_has_process);
            match uid {
                Ok(u) => rec.jail_uid = Some(u),
                Err(e) => {
                    if let Err(e) = self.vmm.destroy_slot(index) {
                        warn!("destroy slot failed slot={index} error={e:?}");
                    }
                    self.free_slot_index(index);
                    return Err(Status::resource_exhausted(e.to_string()));
                }
            }
        }
        rec.slot = Some(index);
        Ok(())
    }

    fn release_uid(&self, rec: &mut SandboxRecord) {
        if let (Some(uid), Some(pool)) = (rec.jail_uid.take(), &self.uids) {
            pool.lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(uid, rec.id);
        }
    }

    /// Jail uids held (for tests and metrics).
    pub fn uids_used(&self) -> usize {
        self.uids
            .as_ref()
            .map_or(0, |p| p.lock().unwrap_or_else(|e| e.into_inner()).held())
    }

    /// A slot with the sandbox's egress policy in place before its Firecracker starts.
    fn take_slot(&self, egress: &vmm_glue::net::Egress) -> Result<u32, Status> {
        let index = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate()
            .ok_or_else(|| Status::resource_exhausted("no free network slot on this host"))?;
        if let Err(e) = self.vmm.create_slot(index, egress) {
            self.free_slot_index(index);
            return Err(vm_status(e));
        }
        Ok(index)
    }

    fn free_slot_index(&self, index: u32) {
        let _ = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free(index);
    }

    fn release_slot(&self, rec: &mut SandboxRecord) {
        self.release_uid(rec);
        if let Some(index) = rec.slot.take() {
            if let Err(e) = self.vmm.destroy_slot(index) {
                warn!("destroy slot failed slot={index} error={e:?}");
            }
            self.free_slot_index(index);
        }
    }

    /// Slots in use (for tests and metrics).
    pub fn slots_used(&self) -> u32 {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).used()
    }

    /// Stops processes and releases the slot of `rec` (in memory; the caller saves).
    fn teardown_vm(&self, sb: &Sandbox, rec: &mut SandboxRecord) {
        self.vmm.stop(rec, &sb.dir);
        rec.firecracker = None;
        rec.page_server = None;
        self.release_slot(rec);
    }

    // ---- envd ----

    /// Connects to envd, retrying while it does not answer yet (just restored).
    fn connect_envd_retry(&self, dir: &SandboxDir, token: &str) -> Result<Client, Status> {
        let end = Instant::now() + RESTORE_READY_TIMEOUT;
        let mut delay = Duration::from_millis(20);
        loop {
            match self.vmm.connect_envd(dir, token) {
                Ok(c) => return Ok(c),
                Err(e) if e.code == Code::Unavailable && Instant::now() + delay < end => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Initializes envd with a fresh token; after a restore, first tells it `Resumed`.
    fn init_envd(
        &self,
        sb: &Sandbox,
        rec: &mut SandboxRecord,
        auth_token: &str,
        resumed: bool,
    ) -> Result<(), Status> {
        use envd::{init_methods, InitRequest, InitResponse, ResumedRequest, ResumedResponse};
        let client = self.connect_envd_retry(&sb.dir, auth_token)?;
        if resumed {
            let _: ResumedResponse = client.unary(
                init_methods::RESUMED,
                &ResumedRequest {
                    host_wall_time_unix_ns: self.now(),
                },
                Some(ENVD_CALL_TIMEOUT),
            )?;
        }
        let token = proto::random::hex(ACCESS_TOKEN_BYTES).map_err(internal)?;
        let resp: InitResponse = client.unary(
            init_methods::INIT,
            &InitRequest {
                sandbox_id: id::format_sandbox(rec.id),
                env: rec
                    .spec
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                access_token: token.clone(),
                default_user: rec.spec.default_user.clone(),
                default_cwd: rec.spec.default_cwd.clone(),
                wall_time_unix_ns: self.now(),
                template_id: id::format_template(rec.template_id),
            },
            Some(ENVD_CALL_TIMEOUT),
        )?;
        client.close();
        rec.access_token = token;
        rec.envd_version = resp.envd_version;
        Ok(())
    }

    /// A new connection to a running sandbox's envd (for proxied calls).
    pub fn exec_start_timeout(&self) -> Duration {
        self.cfg.exec_start_timeout
    }

    pub fn envd(&self, id: Uuid) -> Result<Client, Status> {
        let sb = self.lookup(id)?;
        let rec = sb.rec();
        if rec.state != State::Running {
            return Err(Status::failed_precondition(format!(
                "sandbox is {}, not running",
                rec.state
            )));
        }
        self.vmm.connect_envd(&sb.dir, &rec.access_token)
    }

    pub fn get(&self, id: Uuid) -> Result<pb::SandboxInfo, Status> {
        Ok(self.info(&self.lookup(id)?.rec()))
    }

    pub fn list(&self, states: &[State]) -> Vec<pb::SandboxInfo> {
        let all: Vec<Arc<Sandbox>> = self.map().values().cloned().collect();
        let mut out: Vec<pb::SandboxInfo> = all
            .iter()
            .map(|sb| sb.rec())
            .filter(|r| states.is_empty() || states.contains(&r.state))
            .map(|r| self.info(&r))
            .collect();
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        out
    }

    // ---- views ----

    pub fn info(&self, r: &SandboxRecord) -> pb::SandboxInfo {
        pb::SandboxInfo {
            sandbox_id: id::format_sandbox(r.id),
            team_id: r.spec.team_id.clone(),
            template_id: id::format_template(r.template_id),
            state: r.state as i32,
            state_reason: r.state_reason.clone(),
            vcpus: r.spec.vcpus,
            memory_mib: r.spec.memory_mib,
            disk_mib: r.spec.disk_mib,
            timeout_s: r.spec.timeout_s,
            on_timeout: r.on_timeout() as i32,
            expires_unix_ns: r.expires_unix_ns,
            created_unix_ns: r.created_unix_ns,
            updated_unix_ns: r.updated_unix_ns,
            metadata: r.spec.metadata.clone(),
            envd_version: r.envd_version.clone(),
            kernel_version: r.kernel_version.clone(),
        }
    }

    /// What sandboxes hold now.
    pub fn usage(&self) -> Usage {
        let all: Vec<Arc<Sandbox>> = self.map().values().cloned().collect();
        let mut u = Usage::default();
        for sb in all {
            let r = sb.rec();
            u.total += 1;
            u.disk_mib += r.spec.disk_mib;
            if crate::state::has_vm(r.state) {
                u.vcpus += r.spec.vcpus;
                u.memory_mib += u64::from(r.spec.memory_mib);
            }
            match r.state {
                State::Running => u.running += 1,
                State::Paused => u.paused += 1,
                _ => {}
            }
        }
        u
    }

    /// States of every sandbox (for heartbeats).
    pub fn summaries(&self) -> Vec<(Uuid, State, i64, i64)> {
        let all: Vec<Arc<Sandbox>> = self.map().values().cloned().collect();
        all.iter()
            .map(|sb| {
                let r = sb.rec();
                (r.id, r.state, r.expires_unix_ns, r.updated_unix_ns)
            })
            .collect()
    }

    /// Running VMs for the usage sampler (`sampler.rs`): sandbox, Firecracker process, disk.
    pub fn vm_processes(&self) -> Vec<(Uuid, crate::statedir::ProcRef, PathBuf)> {
        let all: Vec<Arc<Sandbox>> = self.map().values().cloned().collect();
        all.iter()
            .filter_map(|sb| {
                let r = sb.rec();
                let fc = r.firecracker.filter(|_| r.state == State::Running)?;
                Some((r.id, fc, sb.dir.disk()))
            })
            .collect()
    }
}

impl SandboxRecord {
    /// Records what a boot or a restore started.
    fn started(&mut self, s: Started) {
        self.firecracker = s.firecracker;
        self.page_server = s.page_server;
        if let Some(v) = s.kernel_version {
            self.kernel_version = v;
        }
        if let Some(v) = s.envd_version {
            self.envd_version = v;
        }
    }

    fn expires_unix_ns_or(&self, now: i64) -> i64 {
        if self.expires_unix_ns == 0 {
            now
        } else {
            self.expires_unix_ns
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statedir::ProcRef;

    fn rec(state: State) -> SandboxRecord {
        let mut r = SandboxRecord::new(Uuid::from_u128(1), Uuid::nil(), TemplateKind::Base, 0);
        r.state = state;
        r.firecracker = Some(ProcRef {
            pid: 77,
            start_ticks: 1,
        });
        r.slot = Some(3);
        r
    }

    #[test]
    fn readoption_decisions() {
        use Action::*;
        // (state, firecracker alive, chain present) -> (action, new state, stop+release)
        let table = [
            (State::Running, true, false, Adopt, State::Running, false),
            (State::Running, false, false, Keep, State::Error, true),
            (
                State::Pausing,
                true,
                false,
                ResumeVmThenAdopt,
                State::Running,
                false,
            ),
            (State::Pausing, false, false, Keep, State::Error, true),
            (State::Starting, true, false, Keep, State::Error, true),
            (State::Starting, false, false, Keep, State::Error, true),
            (State::Resuming, true, true, Keep, State::Paused, true),
            (State::Resuming, false, true, Keep, State::Paused, true),
            (State::Resuming, false, false, Keep, State::Error, true),
            (State::Paused, false, true, Keep, State::Paused, true),
            (State::Paused, true, true, Keep, State::Paused, true),
            (State::Paused, false, false, Keep, State::Error, true),
            (State::Error, true, false, Keep, State::Error, true),
            (State::Pending, false, false, Remove, State::Stopped, true),
            (State::Stopping, true, false, Remove, State::Stopped, true),
            (State::Stopped, false, false, Remove, State::Stopped, true),
        ];
        for (st, alive, chain, action, to, stop) in table.iter().cloned() {
            let d = decide(&rec(st), alive, chain);
            assert_eq!(d.action, action, "{st} alive={alive}");
            assert_eq!(d.state, to, "{st} alive={alive}");
            assert_eq!(d.stop_processes, stop, "{st} alive={alive}");
            assert_eq!(d.release_slot, stop, "{st} alive={alive}");
            if to == State::Error && st != State::Error {
                assert!(!d.reason.is_empty());
            }
        }
        // Every state is covered.
        for s in State::ALL {
            assert!(table.iter().any(|t| t.0 == s), "{s} not covered");
        }
        let d = decide(&rec(State::Running), false, false);
        assert!(d.reason.contains("pid 77"), "{}", d.reason);
    }

    #[test]
    fn create_requests_are_checked_strictly() {
        let good = SandboxSpec {
            sandbox_id: id::format_sandbox(Uuid::from_u128(1)),
            template_id: id::format_template(Uuid::nil()),
            template_kind: TemplateKind::Base as i32,
            ..Default::default()
        };
        let spec = CreateSpec::from_request(&good).unwrap();
        assert_eq!(spec.spec.on_timeout(), TimeoutPolicy::Destroy);
        let bad = |f: &dyn Fn(&mut SandboxSpec)| {
            let mut r = good.clone();
            f(&mut r);
            CreateSpec::from_request(&r).unwrap_err().code
        };
        assert_eq!(
            bad(&|r| r.sandbox_id = "sb-123".into()),
            Code::InvalidArgument
        );
        assert_eq!(
            bad(&|r| r.sandbox_id = r.sandbox_id.to_uppercase()),
            Code::InvalidArgument
        );
        assert_eq!(
            bad(&|r| r.sandbox_id = id::format_template(Uuid::nil())),
            Code::InvalidArgument
        );
        assert_eq!(
            bad(&|r| r.template_id = String::new()),
            Code::InvalidArgument
        );
        assert_eq!(bad(&|r| r.team_id = "team-x".into()), Code::InvalidArgument);
        assert_eq!(bad(&|r| r.template_kind = 0), Code::InvalidArgument);
        assert_eq!(bad(&|r| r.template_kind = 7), Code::InvalidArgument);
        assert_eq!(bad(&|r| r.on_timeout = 9), Code::InvalidArgument);
        // The shared bounds (proto::sandbox_limits), exactly: ctl refuses beyond them too.
        use proto::sandbox_limits as sl;
        let mut top = good.clone();
        (top.vcpus, top.memory_mib, top.disk_mib) =
            (sl::VCPUS_MAX, sl::MEMORY_MIB_MAX, sl::DISK_MIB_MAX);
        assert!(CreateSpec::from_request(&top).is_ok());
        assert_eq!(bad(&|r| r.vcpus = sl::VCPUS_MAX + 1), Code::InvalidArgument);
        assert_eq!(
            bad(&|r| r.memory_mib = sl::MEMORY_MIB_MAX + 1),
            Code::InvalidArgument
        );
        assert_eq!(
            bad(&|r| r.disk_mib = sl::DISK_MIB_MAX + 1),
            Code::InvalidArgument
        );
        assert_eq!(
            bad(&|r| {
                r.metadata
                    .insert("k".into(), "v".repeat(sl::MAP_VALUE_LEN_MAX + 1));
            }),
            Code::InvalidArgument
        );
        assert_eq!(bad(&|r| r.timeout_s = u64::MAX), Code::InvalidArgument);
        assert_eq!(
            bad(&|r| r.kernel = "../../etc".into()),
            Code::InvalidArgument
        );
        assert_eq!(
            bad(&|r| {
                for i in 0..=crate::limits::MAP_ENTRIES_MAX {
                    r.env.insert(i.to_string(), String::new());
                }
            }),
            Code::InvalidArgument
        );
    }

    #[test]
    fn turns_are_bounded() {
        let t = Turns {
            st: Mutex::new((0, 0)),
            cv: Condvar::new(),
        };
        let held: Vec<_> = (0..LIFECYCLE_CONCURRENCY_MAX)
            .map(|_| t.take().unwrap())
            .collect();
        // A full queue refuses at once.
        t.st.lock().unwrap().1 = LIFECYCLE_QUEUE_MAX;
        assert_eq!(t.take().err().unwrap().code, Code::ResourceExhausted);
        t.st.lock().unwrap().1 = 0;
        drop(held);
        assert_eq!(t.st.lock().unwrap().0, 0);
    }

    #[test]
    fn stray_process_scan_finds_a_process_naming_the_directory() {
        let dir = std::env::temp_dir().join(format!("wrenn-stray-{}", std::process::id()));
        let arg = dir.join("00000000-0000-0000-0000-000000000001/fc.sock");
        // The path rides along as $0 of a shell that sleeps.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 100; : \"$0\"")
            .arg(&arg)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let found = stray_processes(&dir, &[]);
        assert!(
            found.iter().any(|p| p.pid == child.id() as i32),
            "{found:?}"
        );
        assert!(stray_processes(&dir, &[child.id() as i32])
            .iter()
            .all(|p| p.pid != child.id() as i32));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

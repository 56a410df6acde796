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

use std::collections::{BTreeMap, HashMap};
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
    Chain, Layout, Policy, SandboxDir, SandboxRecord, TemplateDir, TemplateKind, TemplateRecord,
};
use crate::sys;
use crate::ttl::{self, Clock, Outcome, Reaper};
use crate::uid_pool::{UidPool, UidRange};
use crate::vm::{RestoreSource, VmError, Vmm};

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
}

impl Config {
    pub fn new(root: impl Into<PathBuf>) -> Config {
        Config {
            layout: Layout::new(root),
            slot_capacity: SANDBOXES_MAX as u32,
            default_timeout: crate::limits::TIMEOUT_DEFAULT,
            jail_uids: None,
            jail_chroot_base: None,
        }
    }
}

/// A validated create request.
#[derive(Clone, Debug)]
pub struct CreateSpec {
    pub id: Uuid,
    pub team_id: String,
    pub template_id: Uuid,
    pub kind: TemplateKind,
    pub kernel: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    pub timeout_s: u64,
    pub policy: Policy,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub default_user: String,
    pub default_cwd: String,
}

impl CreateSpec {
    /// Checks a Create request strictly (ids, enum values, bounds).
    pub fn from_request(r: &pb::CreateSandboxRequest) -> Result<CreateSpec, Status> {
        let id = parse_id(id::Kind::Sandbox, &r.sandbox_id)?;
        if !r.team_id.is_empty() {
            parse_id(id::Kind::Team, &r.team_id)?;
        }
        let template_id = parse_id(id::Kind::Template, &r.template_id)?;
        let kind = match pb::TemplateKind::try_from(r.template_kind) {
            Ok(pb::TemplateKind::Base) => TemplateKind::Base,
            Ok(pb::TemplateKind::Snapshot) => TemplateKind::Snapshot,
            _ => {
                return Err(Status::invalid_argument(
                    "template_kind must be BASE or SNAPSHOT",
                ))
            }
        };
        let policy = policy_from(r.on_timeout)?.unwrap_or(Policy::Destroy);
        check_timeout(r.timeout_s, true)?;
        if r.kernel.len() > 64
            || !r
                .kernel
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
        {
            return Err(Status::invalid_argument("kernel: bad version string"));
        }
        // The bounds ctl checks before it reserves capacity (one set, in proto).
        use proto::sandbox_limits as sl;
        if r.vcpus > sl::VCPUS_MAX
            || r.memory_mib > sl::MEMORY_MIB_MAX
            || r.disk_mib > sl::DISK_MIB_MAX
        {
            return Err(Status::invalid_argument(
                "vcpus, memory_mib or disk_mib out of range",
            ));
        }
        for (what, m) in [("env", &r.env), ("metadata", &r.metadata)] {
            if m.len() > sl::MAP_ENTRIES_MAX {
                return Err(Status::invalid_argument(format!(
                    "{what}: too many entries"
                )));
            }
            if m.iter()
                .any(|(k, v)| k.len() > sl::MAP_KEY_LEN_MAX || v.len() > sl::MAP_VALUE_LEN_MAX)
            {
                return Err(Status::invalid_argument(format!("{what}: entry too long")));
            }
        }
        if r.default_user.len() > FIELD_LEN_MAX || r.default_cwd.len() > FIELD_LEN_MAX {
            return Err(Status::invalid_argument(
                "default_user/default_cwd too long",
            ));
        }
        Ok(CreateSpec {
            id,
            team_id: r.team_id.clone(),
            template_id,
            kind,
            kernel: r.kernel.clone(),
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            disk_mib: r.disk_mib,
            timeout_s: r.timeout_s,
            policy,
            env: r.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            metadata: r
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            default_user: r.default_user.clone(),
            default_cwd: r.default_cwd.clone(),
        })
    }
}

/// Parses a wire id strictly (INVALID_ARGUMENT otherwise).
pub fn parse_id(kind: id::Kind, s: &str) -> Result<Uuid, Status> {
    id::parse(kind, s).map_err(|e| Status::invalid_argument(format!("{}: {e}", kind.noun())))
}

fn policy_from(v: i32) -> Result<Option<Policy>, Status> {
    match pb::TimeoutPolicy::try_from(v) {
        Ok(pb::TimeoutPolicy::Unspecified) => Ok(None),
        Ok(pb::TimeoutPolicy::Pause) => Ok(Some(Policy::Pause)),
        Ok(pb::TimeoutPolicy::Destroy) => Ok(Some(Policy::Destroy)),
        Err(_) => Err(Status::invalid_argument("on_timeout: unknown policy")),
    }
}

fn check_timeout(s: u64, zero_ok: bool) -> Result<(), Status> {
    if (!zero_ok && s == 0) || s > TIMEOUT_MAX.as_secs() {
        return Err(Status::invalid_argument(format!(
            "timeout_s must be in 1..={}",
            TIMEOUT_MAX.as_secs()
        )));
    }
    Ok(())
}

// ---- re-adoption decisions ----

/// What to do with a sandbox found in the state directory at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Firecracker is alive: reconnect its API and vsock, keep it running.
    Adopt,
    /// An interrupted pause left the VM alive (maybe paused): resume it, then adopt.
    ResumeVmThenAdopt,
    /// Keep the record in the decided state (paused, error) with processes stopped.
    Keep,
    /// Finish removing it (it was being destroyed, or never started).
    Remove,
}

/// A re-adoption decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// State after the decision.
    pub state: State,
    /// Why (for the record and the report); "" when nothing changed.
    pub reason: String,
    /// Stop every recorded process first.
    pub stop_processes: bool,
    /// Release the recorded slot.
    pub release_slot: bool,
}

/// Decides what a restarted agent does with `rec`, given whether its recorded Firecracker
/// still runs and whether its snapshot chain's files are present.
pub fn decide(rec: &SandboxRecord, firecracker_alive: bool, chain_present: bool) -> Decision {
    let fc = match rec.firecracker {
        Some(p) => format!("firecracker (pid {})", p.pid),
        None => "firecracker".to_owned(),
    };
    let d = |action, state, reason: String, stop| Decision {
        action,
        state,
        reason,
        stop_processes: stop,
        release_slot: stop,
    };
    match rec.state {
        State::Running if firecracker_alive => {
            d(Action::Adopt, State::Running, String::new(), false)
        }
        State::Running => d(
            Action::Keep,
            State::Error,
            format!("{fc} exited while the agent was down"),
            true,
        ),
        State::Pausing if firecracker_alive => d(
            Action::ResumeVmThenAdopt,
            State::Running,
            "pause interrupted by an agent restart; the VM was resumed".into(),
            false,
        ),
        State::Pausing => d(
            Action::Keep,
            State::Error,
            format!("{fc} exited during an interrupted pause"),
            true,
        ),
        State::Starting => d(
            Action::Keep,
            State::Error,
            "create interrupted by an agent restart".into(),
            true,
        ),
        State::Resuming | State::Paused if !chain_present => d(
            Action::Keep,
            State::Error,
            "snapshot files are missing".into(),
            true,
        ),
        State::Resuming => d(
            Action::Keep,
            State::Paused,
            "resume interrupted by an agent restart; still paused".into(),
            true,
        ),
        State::Paused => d(Action::Keep, State::Paused, String::new(), true),
        State::Error => d(Action::Keep, State::Error, rec.state_reason.clone(), true),
        State::Pending | State::Stopping | State::Stopped => {
            d(Action::Remove, State::Stopped, String::new(), true)
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

fn vm_status(e: VmError) -> Status {
    if e.exhausted {
        Status::resource_exhausted(e.to_string())
    } else {
        Status::unavailable(e.to_string())
    }
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
            state: rec.state.to_proto() as i32,
            previous_state: previous.to_proto() as i32,
            reason: reason as i32,
            message: rec.state_reason.clone(),
            changed_unix_ns: rec.updated_unix_ns,
        });
    }

    // ---- slots ----

    /// Takes a network slot and, when jailed, a uid for `rec`'s Firecracker: both are held
    /// while it runs and given back together by [`Self::release_slot`].
    fn take_slot_for(&self, rec: &mut SandboxRecord) -> Result<(), Status> {
        let index = self.take_slot()?;
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

    fn take_slot(&self) -> Result<u32, Status> {
        let index = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate()
            .ok_or_else(|| Status::resource_exhausted("no free network slot on this host"))?;
        if let Err(e) = self.vmm.create_slot(index) {
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

    // ---- templates ----

    /// The template `id` on this host: from memory, else from its directory (a base
    /// template is a directory with `rootfs.ext4` and no record).
    pub fn template(&self, id: Uuid) -> Option<TemplateRecord> {
        if let Some(t) = self
            .templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Some(t.clone());
        }
        let dir = self.cfg.layout.template(id);
        let t = if dir.record().exists() {
            TemplateRecord::load(&dir).ok()?
        } else if dir.rootfs().exists() {
            let meta = fs::metadata(dir.rootfs()).ok()?;
            TemplateRecord {
                id,
                kind: TemplateKind::Base,
                source_sandbox_id: String::new(),
                vcpus: 1,
                memory_mib: 512,
                disk_mib: meta.len().div_ceil(1 << 20),
                kernel_version: String::new(),
                access_token: String::new(),
                working_set_pages: 0,
                created_unix_ns: meta.modified().map(ttl::unix_ns).unwrap_or(0),
                generation: 0,
            }
        } else {
            return None;
        };
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, t.clone());
        Some(t)
    }

    /// Gives a sandbox its own view of a template's snapshot: the layers are hard-linked
    /// (layer files are immutable once written, and a link keeps the data alive after the
    /// template is deleted), the small header and VM state are copied (they are replaced
    /// at every pause). Falls back to copies across file systems.
    fn adopt_template_chain(&self, t: &TemplateRecord, own: &SandboxDir) -> Result<Chain, Status> {
        let tsnap = self.cfg.layout.template(t.id).snapshot();
        let header = fs::read(tsnap.join("header")).map_err(internal)?;
        let header = uffd::header::Header::parse(&header).map_err(internal)?;
        for l in &header.layers {
            let name = l.build_id.layer_file_name();
            self.link_or_copy(&tsnap.join(&name), &own.snapshot().join(&name))?;
        }
        for f in ["header", "vmstate"] {
            self.vmm
                .copy_file(&tsnap.join(f), &own.snapshot().join(f), None)
                .map_err(vm_status)?;
        }
        Ok(Chain {
            header: own.snapshot().join("header"),
            vmstate: own.snapshot().join("vmstate"),
            layer_dirs: vec![own.snapshot()],
            generation: t.generation,
        })
    }

    fn link_or_copy(&self, src: &Path, dst: &Path) -> Result<(), Status> {
        match fs::hard_link(src, dst) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(_) => self.vmm.copy_file(src, dst, None).map_err(vm_status),
        }
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
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                access_token: token.clone(),
                default_user: rec.default_user.clone(),
                default_cwd: rec.default_cwd.clone(),
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

    // ---- operations ----

    /// Creates and starts a sandbox; on error everything it made is gone.
    pub fn create(&self, spec: CreateSpec) -> Result<pb::SandboxInfo, Status> {
        let problems = self.vmm.problems();
        if !problems.is_empty() {
            return Err(Status::unavailable(format!(
                "this host cannot run sandboxes: {}",
                problems.join("; ")
            )));
        }
        let template = self.template(spec.template_id).ok_or_else(|| {
            Status::not_found(format!(
                "template {} not found on this host",
                id::format_template(spec.template_id)
            ))
        })?;
        if template.kind != spec.kind {
            return Err(Status::failed_precondition(format!(
                "template is {}, request says {}",
                template.kind.name(),
                spec.kind.name()
            )));
        }
        let now = self.now();
        let mut rec = SandboxRecord::new(spec.id, spec.template_id, spec.kind, now);
        rec.team_id = spec.team_id.clone();
        rec.kernel = spec.kernel.clone();
        rec.timeout_s = if spec.timeout_s == 0 {
            self.cfg.default_timeout.as_secs()
        } else {
            spec.timeout_s
        };
        rec.policy = spec.policy;
        rec.env = spec.env.clone();
        rec.metadata = spec.metadata.clone();
        rec.default_user = spec.default_user.clone();
        rec.default_cwd = spec.default_cwd.clone();
        match spec.kind {
            TemplateKind::Base => {
                rec.vcpus = if spec.vcpus == 0 {
                    template.vcpus
                } else {
                    spec.vcpus
                };
                rec.memory_mib = if spec.memory_mib == 0 {
                    template.memory_mib
                } else {
                    spec.memory_mib
                };
                rec.disk_mib = spec.disk_mib.max(template.disk_mib);
            }
            TemplateKind::Snapshot => {
                rec.vcpus = template.vcpus;
                rec.memory_mib = template.memory_mib;
                rec.disk_mib = template.disk_mib;
                rec.kernel_version = template.kernel_version.clone();
            }
        }
        let sb = Arc::new(Sandbox {
            id: spec.id,
            dir: self.cfg.layout.sandbox(spec.id),
            op: Mutex::new(()),
            rec: Mutex::new(rec.clone()),
        });
        let _op = sb.op.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut map = self.map();
            if map.contains_key(&spec.id) || sb.dir.path().exists() {
                return Err(Status::already_exists(format!(
                    "sandbox {} already exists",
                    id::format_sandbox(spec.id)
                )));
            }
            if map.len() >= SANDBOXES_MAX {
                return Err(Status::resource_exhausted(
                    "too many sandboxes on this host",
                ));
            }
            map.insert(spec.id, sb.clone());
        }
        let _turn = match self.turns.take() {
            Ok(t) => t,
            Err(e) => {
                self.map().remove(&spec.id);
                return Err(e);
            }
        };
        let started = Instant::now();
        let r = self.create_inner(&sb, &mut rec, &template);
        match r {
            Ok(()) => {
                crate::metrics::CREATE_SECONDS.observe(started.elapsed());
                Ok(self.info(&rec))
            }
            Err(e) => {
                warn!(
                    "create failed id={} error={:?}",
                    id::format_sandbox(spec.id),
                    e.message
                );
                self.teardown_vm(&sb, &mut rec);
                if let Err(e) = sb.dir.remove() {
                    error!("remove sandbox directory failed error={e}");
                }
                self.map().remove(&spec.id);
                Err(e)
            }
        }
    }

    fn create_inner(
        &self,
        sb: &Sandbox,
        rec: &mut SandboxRecord,
        template: &TemplateRecord,
    ) -> Result<(), Status> {
        sb.dir.create().map_err(internal)?;
        self.step(sb, rec, Event::Start, "")?;
        let tdir = self.cfg.layout.template(template.id);
        let disk_bytes = rec.disk_mib.checked_mul(1 << 20);
        self.vmm
            .copy_file(&tdir.rootfs(), &sb.dir.disk(), disk_bytes)
            .map_err(vm_status)?;
        self.take_slot_for(rec)?;
        self.commit(sb, rec)?;
        match template.kind {
            TemplateKind::Base => {
                let r = self.vmm.boot(rec, &sb.dir, &tdir);
                self.commit(sb, rec)?;
                r.map_err(vm_status)?;
                self.init_envd(sb, rec, "", false)?;
            }
            TemplateKind::Snapshot => {
                let chain = self.adopt_template_chain(template, &sb.dir)?;
                rec.chain = Some(chain.clone());
                // Firecracker tracks dirty pages from the restore on: the first pause is a
                // Diff on top of the template's layers.
                rec.full_snapshot_taken = true;
                let ws = tdir.snapshot().join("working_set");
                let src = RestoreSource {
                    chain: &chain,
                    record_working_set: None,
                    working_set: ws.exists().then_some(ws.as_path()),
                };
                let r = self.vmm.restore(rec, &sb.dir, &src);
                self.commit(sb, rec)?;
                r.map_err(vm_status)?;
                self.init_envd(sb, rec, &template.access_token, true)?;
            }
        }
        rec.expires_unix_ns = ttl::deadline(self.now(), Duration::from_secs(rec.timeout_s));
        self.step(sb, rec, Event::Started, "")?;
        self.reaper.set(rec.id, rec.expires_unix_ns);
        Ok(())
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

    /// Stops and removes everything of a sandbox.
    pub fn destroy(&self, id: Uuid) -> Result<(), Status> {
        self.with_op(id, |sb| self.destroy_locked(sb))
    }

    fn destroy_locked(&self, sb: &Arc<Sandbox>) -> Result<(), Status> {
        let mut rec = sb.rec();
        self.step(sb, &mut rec, Event::Stop, "")?;
        self.reaper.clear(rec.id);
        self.teardown_vm(sb, &mut rec);
        sb.dir.remove().map_err(internal)?;
        rec.state = State::Stopped;
        rec.updated_unix_ns = self.now();
        *sb.rec.lock().unwrap_or_else(|e| e.into_inner()) = rec;
        self.map().remove(&sb.id);
        info!("sandbox destroyed id={}", id::format_sandbox(sb.id));
        Ok(())
    }

    pub fn pause(&self, id: Uuid) -> Result<pb::SandboxInfo, Status> {
        self.with_op(id, |sb| {
            let mut rec = sb.rec();
            self.pause_locked(sb, &mut rec, "")?;
            Ok(self.info(&rec))
        })
    }

    fn pause_locked(&self, sb: &Sandbox, rec: &mut SandboxRecord, why: &str) -> Result<(), Status> {
        self.step(sb, rec, Event::Pause, why)?;
        self.reaper.clear(rec.id);
        let _turn = match self.turns.take() {
            Ok(t) => t,
            Err(e) => {
                self.step(sb, rec, Event::Abort, "pause refused: host busy")?;
                self.reaper.set(rec.id, rec.expires_unix_ns_or(self.now()));
                return Err(e);
            }
        };
        let started = Instant::now();
        match self.vmm.snapshot(rec, &sb.dir) {
            Ok(()) => {
                self.vmm.stop(rec, &sb.dir);
                rec.firecracker = None;
                rec.page_server = None;
                self.release_slot(rec);
                self.step(sb, rec, Event::Paused, why)?;
                crate::metrics::PAUSE_SECONDS.observe(started.elapsed());
                Ok(())
            }
            Err(e) if e.vm_still_running => {
                let msg = format!("pause failed: {e}");
                rec.expires_unix_ns = ttl::deadline(self.now(), Duration::from_secs(rec.timeout_s));
                self.step(sb, rec, Event::Abort, &msg)?;
                self.reaper.set(rec.id, rec.expires_unix_ns);
                Err(Status::unavailable(msg))
            }
            Err(e) => {
                let msg = format!("pause failed: {e}");
                self.teardown_vm(sb, rec);
                self.step(sb, rec, Event::Fail, &msg)?;
                Err(Status::unavailable(msg))
            }
        }
    }

    pub fn resume(&self, id: Uuid, timeout_s: u64) -> Result<pb::SandboxInfo, Status> {
        check_timeout(timeout_s, true)?;
        self.with_op(id, |sb| {
            let mut rec = sb.rec();
            self.step(sb, &mut rec, Event::Resume, "")?;
            if timeout_s != 0 {
                rec.timeout_s = timeout_s;
            }
            let started = Instant::now();
            match self.resume_inner(sb, &mut rec) {
                Ok(()) => {
                    crate::metrics::RESUME_SECONDS.observe(started.elapsed());
                    Ok(self.info(&rec))
                }
                Err(e) => {
                    self.teardown_vm(sb, &mut rec);
                    let msg = format!("resume failed: {}", e.message);
                    self.step(sb, &mut rec, Event::Abort, &msg)?;
                    Err(e)
                }
            }
        })
    }

    fn resume_inner(&self, sb: &Sandbox, rec: &mut SandboxRecord) -> Result<(), Status> {
        let _turn = self.turns.take()?;
        let chain = rec
            .chain
            .clone()
            .ok_or_else(|| Status::internal("paused sandbox has no snapshot chain"))?;
        self.take_slot_for(rec)?;
        self.commit(sb, rec)?;
        let src = RestoreSource {
            chain: &chain,
            record_working_set: None,
            working_set: None,
        };
        let r = self.vmm.restore(rec, &sb.dir, &src);
        self.commit(sb, rec)?;
        r.map_err(vm_status)?;
        let token = rec.access_token.clone();
        self.init_envd(sb, rec, &token, true)?;
        rec.expires_unix_ns = ttl::deadline(self.now(), Duration::from_secs(rec.timeout_s));
        self.step(sb, rec, Event::Resumed, "")?;
        self.reaper.set(rec.id, rec.expires_unix_ns);
        Ok(())
    }

    pub fn set_timeout(
        &self,
        id: Uuid,
        timeout_s: u64,
        policy: i32,
    ) -> Result<pb::SandboxInfo, Status> {
        check_timeout(timeout_s, false)?;
        let policy = policy_from(policy)?;
        self.with_op(id, |sb| {
            let mut rec = sb.rec();
            rec.timeout_s = timeout_s;
            if let Some(p) = policy {
                rec.policy = p;
            }
            self.extend(sb, &mut rec)
        })
    }

    pub fn ping(&self, id: Uuid) -> Result<pb::SandboxInfo, Status> {
        self.with_op(id, |sb| {
            let mut rec = sb.rec();
            if rec.state != State::Running {
                return Err(Status::failed_precondition(format!(
                    "sandbox is {}, not running",
                    rec.state
                )));
            }
            self.extend(sb, &mut rec)
        })
    }

    fn extend(&self, sb: &Sandbox, rec: &mut SandboxRecord) -> Result<pb::SandboxInfo, Status> {
        if rec.state == State::Running {
            rec.expires_unix_ns = ttl::deadline(self.now(), Duration::from_secs(rec.timeout_s));
            self.reaper.set(rec.id, rec.expires_unix_ns);
        }
        self.commit(sb, rec)?;
        Ok(self.info(rec))
    }

    /// The reaper's callback: applies the policy of an expired sandbox.
    pub fn expire(&self, id: Uuid) -> Outcome {
        let r = self.with_op(id, |sb| {
            let mut rec = sb.rec();
            if rec.state != State::Running {
                return Ok(());
            }
            if rec.expires_unix_ns > self.now() {
                // Pinged after the deadline was taken: keep running.
                self.reaper.set(id, rec.expires_unix_ns);
                return Ok(());
            }
            let before = rec.state;
            crate::metrics::EXPIRED.inc();
            match rec.policy {
                Policy::Pause => {
                    let r = self.pause_locked(sb, &mut rec, "timeout");
                    self.report(&rec, before, StateChangeReason::Timeout);
                    r
                }
                Policy::Destroy => {
                    let r = self.destroy_locked(sb);
                    let mut gone = sb.rec();
                    gone.state_reason = "timeout".into();
                    self.report(&gone, before, StateChangeReason::Timeout);
                    r
                }
            }
        });
        match r {
            Err(e) if e.code == Code::Aborted => Outcome::Busy,
            Err(e) => {
                if e.code != Code::NotFound {
                    warn!(
                        "timeout action failed id={} error={:?}",
                        id::format_sandbox(id),
                        e.message
                    );
                }
                Outcome::Done
            }
            Ok(()) => Outcome::Done,
        }
    }

    /// Finds running sandboxes whose Firecracker died; marks them `error`, releases their
    /// slot and processes, reports them. Returns how many were found.
    pub fn check_vms(&self) -> usize {
        let all: Vec<Arc<Sandbox>> = self.map().values().cloned().collect();
        let mut found = 0;
        for sb in all {
            let Ok(_op) = sb.op.try_lock() else {
                continue; // an operation is on it; it sees the death itself
            };
            let mut rec = sb.rec();
            let dead =
                rec.state == State::Running && rec.firecracker.is_some_and(|p| !self.vmm.alive(p));
            if !dead {
                continue;
            }
            found += 1;
            let before = rec.state;
            let msg = format!(
                "firecracker (pid {}) exited",
                rec.firecracker.map_or(0, |p| p.pid)
            );
            self.reaper.clear(rec.id);
            self.teardown_vm(&sb, &mut rec);
            if let Err(e) = self.step(&sb, &mut rec, Event::Fail, &msg) {
                error!("record vm death failed error={:?}", e.message);
            }
            self.report(&rec, before, StateChangeReason::VmExited);
        }
        found
    }

    // ---- templates ----

    /// Makes a snapshot template from a running or paused sandbox (which ends paused).
    pub fn create_template(
        &self,
        sandbox: Uuid,
        template: Uuid,
    ) -> Result<pb::TemplateInfo, Status> {
        let tdir = self.cfg.layout.template(template);
        if self.template(template).is_some() || tdir.path().exists() {
            return Err(Status::already_exists(format!(
                "template {} already exists on this host",
                id::format_template(template)
            )));
        }
        self.with_op(sandbox, |sb| {
            let mut rec = sb.rec();
            match rec.state {
                State::Running => self.pause_locked(sb, &mut rec, "snapshot template")?,
                State::Paused => {}
                s => {
                    return Err(Status::failed_precondition(format!(
                        "sandbox is {s}; a template needs a running or paused one"
                    )))
                }
            }
            let _turn = self.turns.take()?;
            let tmp = TemplateDir(
                self.cfg
                    .layout
                    .templates()
                    .join(format!(".tmp-{}", template.hyphenated())),
            );
            let r = self.build_template(&rec, sb, template, &tmp);
            match r {
                Ok(t) => {
                    fs::rename(tmp.path(), tdir.path()).map_err(internal)?;
                    self.templates
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(template, t.clone());
                    Ok(self.template_info(&t))
                }
                Err(e) => {
                    let _ = fs::remove_dir_all(tmp.path());
                    Err(e)
                }
            }
        })
    }

    fn build_template(
        &self,
        rec: &SandboxRecord,
        sb: &Sandbox,
        template: Uuid,
        tmp: &TemplateDir,
    ) -> Result<TemplateRecord, Status> {
        let _ = fs::remove_dir_all(tmp.path());
        fs::create_dir_all(tmp.snapshot()).map_err(internal)?;
        let chain = rec
            .chain
            .as_ref()
            .ok_or_else(|| Status::internal("paused sandbox has no snapshot chain"))?;
        let header_bytes = fs::read(&chain.header).map_err(internal)?;
        let header = uffd::header::Header::parse(&header_bytes).map_err(internal)?;
        let cp = |src: &Path, dst: PathBuf| self.vmm.copy_file(src, &dst, None).map_err(vm_status);
        for l in &header.layers {
            let name = l.build_id.layer_file_name();
            let src = find_layer(&chain.layer_dirs, &name)
                .ok_or_else(|| Status::internal(format!("layer {name} not found")))?;
            self.link_or_copy(&src, &tmp.snapshot().join(&name))?;
        }
        cp(&chain.header, tmp.snapshot().join("header"))?;
        cp(&chain.vmstate, tmp.snapshot().join("vmstate"))?;
        cp(&sb.dir.disk(), tmp.rootfs())?;
        let mut t = TemplateRecord {
            id: template,
            kind: TemplateKind::Snapshot,
            source_sandbox_id: id::format_sandbox(rec.id),
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            disk_mib: rec.disk_mib,
            kernel_version: rec.kernel_version.clone(),
            access_token: rec.access_token.clone(),
            working_set_pages: 0,
            created_unix_ns: self.now(),
            generation: chain.generation,
        };
        t.working_set_pages = self.record_working_set(&t, tmp)?;
        t.save(tmp).map_err(internal)?;
        Ok(t)
    }

    /// One restore of the not yet published template, recording the order in which the
    /// guest touches its pages; then the scratch VM is thrown away.
    fn record_working_set(&self, t: &TemplateRecord, tmp: &TemplateDir) -> Result<u64, Status> {
        let scratch_id = proto::random::uuid_v4().map_err(internal)?;
        let dir = SandboxDir(
            self.cfg
                .layout
                .sandboxes()
                .join(format!(".ws-{}", scratch_id.hyphenated())),
        );
        let mut rec = SandboxRecord::new(scratch_id, t.id, TemplateKind::Snapshot, self.now());
        rec.access_token = t.access_token.clone();
        let ws_path = tmp.snapshot().join("working_set");
        let chain = Chain {
            header: tmp.snapshot().join("header"),
            vmstate: tmp.snapshot().join("vmstate"),
            layer_dirs: vec![tmp.snapshot()],
            generation: t.generation,
        };
        let r = (|| -> Result<(), Status> {
            dir.create().map_err(internal)?;
            self.vmm
                .copy_file(&tmp.rootfs(), &dir.disk(), None)
                .map_err(vm_status)?;
            self.take_slot_for(&mut rec)?;
            let src = RestoreSource {
                chain: &chain,
                record_working_set: Some(&ws_path),
                working_set: None,
            };
            self.vmm.restore(&mut rec, &dir, &src).map_err(vm_status)?;
            // Wake envd so the pages a restore needs are touched, without changing its
            // token (the template's files never see this VM's changes).
            let client = self.connect_envd_retry(&dir, &t.access_token)?;
            let _: envd::ResumedResponse = client.unary(
                envd::init_methods::RESUMED,
                &envd::ResumedRequest {
                    host_wall_time_unix_ns: self.now(),
                },
                Some(ENVD_CALL_TIMEOUT),
            )?;
            let _: envd::HealthCheckResponse = client.unary(
                envd::health_methods::CHECK,
                &envd::HealthCheckRequest {},
                Some(ENVD_CALL_TIMEOUT),
            )?;
            client.close();
            self.vmm
                .finish_recording(&rec, &dir, &ws_path)
                .map_err(vm_status)
        })();
        self.vmm.stop(&rec, &dir);
        self.release_slot(&mut rec);
        let _ = dir.remove();
        r?;
        // The page server writes the set when it stops; a backend without one leaves none.
        match fs::read(&ws_path) {
            Ok(b) => uffd::working_set::WorkingSet::parse(&b)
                .map(|w| w.pages.len() as u64)
                .map_err(internal),
            Err(_) => Ok(0),
        }
    }

    /// Removes a template's files. Sandboxes restored from it are unaffected: they hold
    /// their own links to its layers and copies of its header, state and disk.
    pub fn delete_template(&self, id: Uuid) -> Result<(), Status> {
        let t = self.template(id).ok_or_else(|| {
            Status::not_found(format!("template {} not found", id::format_template(id)))
        })?;
        let dir = self.cfg.layout.template(t.id);
        match fs::remove_dir_all(dir.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal(e)),
        }
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        Ok(())
    }

    /// Templates on this host (records, and base templates found by their rootfs).
    pub fn list_templates(&self) -> Vec<pb::TemplateInfo> {
        if let Ok((ids, _)) = Layout::list_dirs(&self.cfg.layout.templates()) {
            for id in ids {
                let _ = self.template(id);
            }
        }
        let ts: Vec<TemplateRecord> = self
            .templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out: Vec<_> = ts
            .iter()
            .filter(|t| self.cfg.layout.template(t.id).path().exists())
            .map(|t| self.template_info(t))
            .collect();
        out.sort_by(|a, b| a.template_id.cmp(&b.template_id));
        out
    }

    fn template_info(&self, t: &TemplateRecord) -> pb::TemplateInfo {
        let dir = self.cfg.layout.template(t.id);
        pb::TemplateInfo {
            template_id: id::format_template(t.id),
            kind: match t.kind {
                TemplateKind::Base => pb::TemplateKind::Base,
                TemplateKind::Snapshot => pb::TemplateKind::Snapshot,
            } as i32,
            source_sandbox_id: t.source_sandbox_id.clone(),
            vcpus: t.vcpus,
            memory_mib: t.memory_mib,
            disk_mib: t.disk_mib,
            size_bytes: allocated_bytes(dir.path()),
            kernel_version: t.kernel_version.clone(),
            working_set_pages: t.working_set_pages,
            created_unix_ns: t.created_unix_ns,
        }
    }

    // ---- views ----

    pub fn info(&self, r: &SandboxRecord) -> pb::SandboxInfo {
        pb::SandboxInfo {
            sandbox_id: id::format_sandbox(r.id),
            team_id: r.team_id.clone(),
            template_id: id::format_template(r.template_id),
            state: r.state.to_proto() as i32,
            state_reason: r.state_reason.clone(),
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            disk_mib: r.disk_mib,
            timeout_s: r.timeout_s,
            on_timeout: match r.policy {
                Policy::Pause => pb::TimeoutPolicy::Pause,
                Policy::Destroy => pb::TimeoutPolicy::Destroy,
            } as i32,
            expires_unix_ns: r.expires_unix_ns,
            created_unix_ns: r.created_unix_ns,
            updated_unix_ns: r.updated_unix_ns,
            metadata: r
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
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
            u.disk_mib += r.disk_mib;
            if r.state.has_vm() {
                u.vcpus += r.vcpus;
                u.memory_mib += u64::from(r.memory_mib);
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

    // ---- start-up ----

    /// Re-adopts what the state directory describes: live VMs are reconnected, dead ones
    /// are reported as `error`, interrupted operations are finished or undone. Leftover
    /// slots and stray processes of unknown sandboxes are removed. Returns the decisions.
    pub fn recover(&self) -> Vec<(Uuid, Decision)> {
        let layout = &self.cfg.layout;
        let (ids, strays) = match Layout::list_dirs(&layout.sandboxes()) {
            Ok(x) => x,
            Err(e) => {
                error!("list sandboxes failed error={e}");
                return Vec::new();
            }
        };
        for s in strays {
            // Scratch directories of an interrupted template build, temp files.
            let p = layout.sandboxes().join(&s);
            warn!("removing stray entry path={}", p.display());
            let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
        }
        if let Ok((_, tstrays)) = Layout::list_dirs(&layout.templates()) {
            for s in tstrays.iter().filter(|s| s.starts_with(".tmp-")) {
                let _ = fs::remove_dir_all(layout.templates().join(s));
            }
        }
        let mut out = Vec::new();
        for id in ids {
            let dir = layout.sandbox(id);
            let rec = match SandboxRecord::load(&dir) {
                Ok(r) if r.id == id => r,
                Ok(_) | Err(_) => {
                    let why = match SandboxRecord::load(&dir) {
                        Err(e) => format!("record unreadable: {e}"),
                        Ok(_) => "record names another sandbox".to_owned(),
                    };
                    let _ = fs::rename(dir.record(), dir.path().join("sandbox.conf.corrupt"));
                    let mut r = SandboxRecord::new(id, Uuid::nil(), TemplateKind::Base, self.now());
                    r.state = State::Error;
                    r.state_reason = why;
                    r
                }
            };
            let d = self.recover_one(&dir, rec);
            out.push((id, d));
        }
        // Processes started for sandboxes the records do not know (a crash between spawn
        // and save) still name the sandbox directory on their command line.
        let known: Vec<i32> = self
            .map()
            .values()
            .filter_map(|sb| {
                let r = sb.rec();
                Some([r.firecracker?.pid, r.page_server.map_or(0, |p| p.pid)])
            })
            .flatten()
            .collect();
        for p in stray_processes(&layout.sandboxes(), &known) {
            warn!("killing stray process pid={}", p.pid);
            sys::kill_and_reap(p, Duration::from_secs(5));
        }
        // Jailed Firecrackers name no directory on their command line: found through the
        // jailer's pid files in this agent's chroots (never by uid alone: another agent may
        // share the range).
        let strays = match (self.cfg.jail_uids, &self.cfg.jail_chroot_base) {
            (Some(r), Some(base)) => crate::uid_pool::strays_in_chroots(base, r, &known),
            _ => Vec::new(),
        };
        for pid in strays {
            if let Some(p) = sys::proc_ref(pid) {
                warn!("killing stray jailed process pid={pid}");
                sys::kill_and_reap(p, Duration::from_secs(5));
            }
        }
        let keep: Vec<u32> = self.map().values().filter_map(|sb| sb.rec().slot).collect();
        match self.vmm.cleanup_slots(&keep) {
            Ok(removed) if !removed.is_empty() => info!("removed leftover slots {removed:?}"),
            Ok(_) => {}
            Err(e) => warn!("slot clean-up failed error={e}"),
        }
        out
    }

    fn recover_one(&self, dir: &SandboxDir, mut rec: SandboxRecord) -> Decision {
        let fc_alive = rec.firecracker.is_some_and(|p| self.vmm.alive(p));
        let chain_present = rec
            .chain
            .as_ref()
            .is_some_and(|c| c.header.exists() && c.vmstate.exists());
        let mut d = decide(&rec, fc_alive, chain_present);
        let id = rec.id;
        let before = rec.state;
        let sb = Arc::new(Sandbox {
            id,
            dir: dir.clone(),
            op: Mutex::new(()),
            rec: Mutex::new(rec.clone()),
        });
        if let Some(slot) = rec.slot {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if !matches!(slots.mark_used(slot), Ok(true)) {
                // Out of range or taken twice: the record is wrong; never share a slot.
                drop(slots);
                if d.action == Action::Adopt || d.action == Action::ResumeVmThenAdopt {
                    d = Decision {
                        action: Action::Keep,
                        state: State::Error,
                        reason: format!("slot {slot} invalid or already in use"),
                        stop_processes: true,
                        release_slot: false,
                    };
                }
                rec.slot = None;
            }
        }
        // A uid is held with the slot: marked before any new sandbox takes one, so a live
        // Firecracker's uid never goes to a second sandbox. A uid outside the range or held
        // twice means the record is wrong: the VM is stopped, never shares a uid.
        if let (Some(uid), Some(pool)) = (rec.jail_uid, &self.uids) {
            let kept = rec.slot.is_some()
                && pool
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .mark_used(uid, rec.id);
            if !kept {
                rec.jail_uid = None;
                if d.action == Action::Adopt || d.action == Action::ResumeVmThenAdopt {
                    d = Decision {
                        action: Action::Keep,
                        state: State::Error,
                        reason: format!("jail uid {uid} invalid or already in use"),
                        stop_processes: true,
                        release_slot: true,
                    };
                }
            }
        }
        let adopt = match d.action {
            Action::Adopt => self.vmm.readopt(&rec, dir),
            Action::ResumeVmThenAdopt => self
                .vmm
                .resume_vm(&rec, dir)
                .and_then(|()| self.vmm.readopt(&rec, dir)),
            _ => Ok(()),
        };
        if let Err(e) = adopt {
            d = Decision {
                action: Action::Keep,
                state: State::Error,
                reason: format!("re-adoption failed: {e}"),
                stop_processes: true,
                release_slot: true,
            };
        }
        if d.stop_processes {
            self.vmm.stop(&rec, dir);
            rec.firecracker = None;
            rec.page_server = None;
        }
        if d.release_slot {
            self.release_slot(&mut rec);
        }
        if d.action == Action::Remove {
            if let Err(e) = dir.remove() {
                error!("remove sandbox directory failed error={e}");
            }
            info!("finished removing sandbox id={}", id::format_sandbox(id));
            if before == State::Stopping {
                rec.state = State::Stopped;
                rec.updated_unix_ns = self.now();
                self.report(&rec, before, StateChangeReason::AdoptionFailed);
            }
            return d;
        }
        let changed = rec.state != d.state || !d.reason.is_empty() && rec.state_reason != d.reason;
        if changed {
            rec.state = d.state;
            rec.state_reason = d.reason.clone();
            rec.updated_unix_ns = self.now();
        }
        if rec.state == State::Running {
            if d.action == Action::ResumeVmThenAdopt || rec.expires_unix_ns == 0 {
                rec.expires_unix_ns = ttl::deadline(self.now(), Duration::from_secs(rec.timeout_s));
            }
            self.reaper.set(id, rec.expires_unix_ns);
        } else {
            rec.expires_unix_ns = 0;
        }
        if let Err(e) = self.commit(&sb, &rec) {
            error!("save record failed error={:?}", e.message);
        }
        info!(
            "re-adoption id={} state={} action={:?} reason={:?}",
            id::format_sandbox(id),
            rec.state,
            d.action,
            d.reason
        );
        self.map().insert(id, sb);
        if changed && rec.state == State::Error {
            self.report(&rec, before, StateChangeReason::AdoptionFailed);
        }
        d
    }
}

impl SandboxRecord {
    fn expires_unix_ns_or(&self, now: i64) -> i64 {
        if self.expires_unix_ns == 0 {
            now
        } else {
            self.expires_unix_ns
        }
    }
}

fn find_layer(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.exists())
}

/// Bytes allocated on disk under `dir` (sparse files count what they hold).
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for ent in rd.flatten() {
            let Ok(m) = ent.metadata() else { continue };
            if m.is_dir() {
                stack.push(ent.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Processes whose command line names a path under `sandboxes_dir` and that are not in
/// `known`: what a crash between spawning and saving a record leaves behind.
pub fn stray_processes(sandboxes_dir: &Path, known: &[i32]) -> Vec<crate::statedir::ProcRef> {
    let needle = sandboxes_dir.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for ent in rd.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || known.contains(&pid) {
            continue;
        }
        let Ok(cmd) = fs::read(ent.path().join("cmdline")) else {
            continue;
        };
        let names_dir = cmd.split(|&b| b == 0).any(|arg| {
            arg.len() > needle.len() && arg.starts_with(needle) && arg[needle.len()] == b'/'
        });
        if names_dir {
            if let Some(p) = sys::proc_ref(pid) {
                out.push(p);
            }
        }
    }
    out
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
        let good = pb::CreateSandboxRequest {
            sandbox_id: id::format_sandbox(Uuid::from_u128(1)),
            template_id: id::format_template(Uuid::nil()),
            template_kind: pb::TemplateKind::Base as i32,
            ..Default::default()
        };
        let spec = CreateSpec::from_request(&good).unwrap();
        assert_eq!(spec.policy, Policy::Destroy);
        let bad = |f: &dyn Fn(&mut pb::CreateSandboxRequest)| {
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

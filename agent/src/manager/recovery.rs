//! Recovery: what to do with each record after an agent restart (re-adopt, resume, mark
//! failed, remove), VM-death detection, and the scan for stray processes.

use super::*;

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
/// Finds the snapshot a sandbox resumes from: in its own snapshot directory, the newest
/// complete generation (incomplete and older ones are removed, `uffd::snapshot::recover`),
/// which replaces the record's chain when a crash came between the publish and the record
/// write; a chain elsewhere (none today) must have its header and VM state. Whether one is
/// there.
pub(super) fn recover_chain(dir: &SandboxDir, rec: &mut SandboxRecord) -> bool {
    let Some(c) = rec.chain.as_mut() else {
        return false;
    };
    let snap = dir.snapshot();
    if !c.header.starts_with(&snap) {
        return c.header.exists() && c.vmstate.exists();
    }
    let g = match uffd::snapshot::recover(&snap) {
        Ok(r) => {
            for p in &r.removed {
                warn!("removed snapshot generation path={}", p.display());
            }
            r.generation
        }
        Err(e) => {
            warn!("snapshot recovery failed id={} error={e}", rec.id);
            None
        }
    };
    let Some(g) = g else { return false };
    let generation = fs::read(g.header())
        .ok()
        .and_then(|b| uffd::header::Header::parse(&b).ok())
        .map(|h| h.generation);
    let Some(generation) = generation else {
        return false;
    };
    if c.header != g.header() {
        info!(
            "snapshot chain taken from the newest generation id={} path={}",
            id::format_sandbox(rec.id),
            g.dir.display()
        );
    }
    let mut layer_dirs = vec![g.layer_dir().to_owned()];
    if g.legacy {
        // The layout before generations may name a template's directory after its own.
        layer_dirs = c.layer_dirs.clone();
    }
    *c = Chain {
        header: g.header(),
        vmstate: g.vmstate(),
        layer_dirs,
        generation,
    };
    true
}

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
        // UNSPECIFIED is never stored (a record's state is read by name); treat it as gone.
        State::Pending | State::Stopping | State::Stopped | State::Unspecified => {
            d(Action::Remove, State::Stopped, String::new(), true)
        }
    }
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

impl Manager {
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

    pub(super) fn recover_one(&self, dir: &SandboxDir, mut rec: SandboxRecord) -> Decision {
        let fc_alive = rec.firecracker.is_some_and(|p| self.vmm.alive(p));
        let chain_present = recover_chain(dir, &mut rec);
        let mut d = decide(&rec, fc_alive, chain_present);
        if d.action == Action::ResumeVmThenAdopt {
            // The interrupted pause may have reset Firecracker's dirty-page log without
            // publishing its generation: only a Full snapshot is safe next.
            rec.full_snapshot_taken = false;
        }
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
                rec.expires_unix_ns =
                    ttl::deadline(self.now(), Duration::from_secs(rec.spec.timeout_s));
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

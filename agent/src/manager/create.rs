//! Create and destroy: the checked spec, the disk, the slot, the VM, envd.

use super::*;

/// A checked create request: the shared spec as ctl sent it (an UNSPECIFIED policy made
/// DESTROY) and its ids, parsed.
#[derive(Clone, Debug)]
pub struct CreateSpec {
    pub id: Uuid,
    pub template_id: Uuid,
    pub spec: SandboxSpec,
}

/// Where a create's time went, in microseconds (logged as `create phases`): waiting for a
/// create turn, the disk clone, the network slot (and the record commit), linking the
/// template's chain, the VM (cold boot, or restore: its own `restore phases` line), and
/// envd's init (ready to serve).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct CreatePhases {
    turn_wait_us: u128,
    disk_clone_us: u128,
    slot_us: u128,
    chain_us: u128,
    vm_us: u128,
    envd_us: u128,
}

impl CreateSpec {
    /// Checks a Create request strictly (ids, enum values, bounds).
    pub fn from_request(r: &SandboxSpec) -> Result<CreateSpec, Status> {
        let id = parse_id(id::Kind::Sandbox, &r.sandbox_id)?;
        if !r.team_id.is_empty() {
            parse_id(id::Kind::Team, &r.team_id)?;
        }
        let template_id = parse_id(id::Kind::Template, &r.template_id)?;
        if !matches!(
            TemplateKind::try_from(r.template_kind),
            Ok(TemplateKind::Base | TemplateKind::Snapshot)
        ) {
            return Err(Status::invalid_argument(
                "template_kind must be BASE or SNAPSHOT",
            ));
        }
        let policy = TimeoutPolicy::from_wire(r.on_timeout)?.unwrap_or(TimeoutPolicy::Destroy);
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
        super::network::egress_of(r.network.as_ref())?;
        let mut spec = r.clone();
        spec.on_timeout = policy as i32;
        Ok(CreateSpec {
            id,
            template_id,
            spec,
        })
    }
}

/// Parses a wire id strictly (INVALID_ARGUMENT otherwise).
pub fn parse_id(kind: id::Kind, s: &str) -> Result<Uuid, Status> {
    id::parse(kind, s).map_err(|e| Status::invalid_argument(format!("{}: {e}", kind.noun())))
}

pub(super) fn check_timeout(s: u64, zero_ok: bool) -> Result<(), Status> {
    if (!zero_ok && s == 0) || s > TIMEOUT_MAX.as_secs() {
        return Err(Status::invalid_argument(format!(
            "timeout_s must be in 1..={}",
            TIMEOUT_MAX.as_secs()
        )));
    }
    Ok(())
}

impl Manager {
    /// Creates and starts a sandbox from the spec ctl sent (checked here first); on error
    /// everything it made is gone.
    pub fn create(&self, spec: SandboxSpec) -> Result<pb::SandboxInfo, Status> {
        let spec = CreateSpec::from_request(&spec)?;
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
        let kind = spec.spec.template_kind();
        if template.kind != kind {
            return Err(Status::failed_precondition(format!(
                "template is {}, request says {}",
                template.kind.name(),
                kind.name()
            )));
        }
        let now = self.now();
        let mut rec = SandboxRecord::new(spec.id, spec.template_id, kind, now);
        // The spec as sent, with the host's and the template's defaults filled in.
        rec.spec = spec.spec.clone();
        if rec.spec.timeout_s == 0 {
            rec.spec.timeout_s = self.cfg.default_timeout.as_secs();
        }
        if kind == TemplateKind::Snapshot {
            rec.spec.vcpus = template.vcpus;
            rec.spec.memory_mib = template.memory_mib;
            rec.spec.disk_mib = template.disk_mib;
            rec.kernel_version = template.kernel_version.clone();
        } else {
            if rec.spec.vcpus == 0 {
                rec.spec.vcpus = template.vcpus;
            }
            if rec.spec.memory_mib == 0 {
                rec.spec.memory_mib = template.memory_mib;
            }
            rec.spec.disk_mib = rec.spec.disk_mib.max(template.disk_mib);
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
        let t_turn = Instant::now();
        let _turn = match self.turns.take() {
            Ok(t) => t,
            Err(e) => {
                self.map().remove(&spec.id);
                return Err(e);
            }
        };
        let mut ph = CreatePhases {
            turn_wait_us: t_turn.elapsed().as_micros(),
            ..CreatePhases::default()
        };
        let started = Instant::now();
        let r = self.create_inner(&sb, &mut rec, &template, &mut ph);
        match r {
            Ok(()) => {
                crate::metrics::CREATE_SECONDS.observe(started.elapsed());
                // One line per create with where its time went (the restore's own phases
                // are in its `restore phases` line).
                info!(
                    "create phases id={} kind={} turn_wait_us={} disk_clone_us={} slot_us={} \
                     chain_us={} vm_us={} envd_us={} total_us={}",
                    id::format_sandbox(spec.id),
                    kind.name(),
                    ph.turn_wait_us,
                    ph.disk_clone_us,
                    ph.slot_us,
                    ph.chain_us,
                    ph.vm_us,
                    ph.envd_us,
                    started.elapsed().as_micros()
                );
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

    pub(super) fn create_inner(
        &self,
        sb: &Sandbox,
        rec: &mut SandboxRecord,
        template: &TemplateRecord,
        ph: &mut CreatePhases,
    ) -> Result<(), Status> {
        sb.dir.create().map_err(internal)?;
        self.step(sb, rec, Event::Start, "")?;
        let tdir = self.cfg.layout.template(template.id);
        let disk_bytes = rec.spec.disk_mib.checked_mul(1 << 20);
        let t = Instant::now();
        self.vmm
            .copy_file(&tdir.rootfs(), &sb.dir.disk(), disk_bytes)
            .map_err(vm_status)?;
        ph.disk_clone_us = t.elapsed().as_micros();
        let t = Instant::now();
        self.take_slot_for(rec)?;
        self.commit(sb, rec)?;
        ph.slot_us = t.elapsed().as_micros();
        match template.kind {
            // UNSPECIFIED is never stored: template records hold base or snapshot.
            TemplateKind::Base | TemplateKind::Unspecified => {
                let t = Instant::now();
                let r = self.vmm.boot(rec, &sb.dir, &tdir).map(|s| rec.started(s));
                self.commit(sb, rec)?;
                r.map_err(vm_status)?;
                ph.vm_us = t.elapsed().as_micros();
                let t = Instant::now();
                self.init_envd(sb, rec, "", false)?;
                ph.envd_us = t.elapsed().as_micros();
            }
            TemplateKind::Snapshot => {
                let t = Instant::now();
                let chain = self.adopt_template_chain(template, &sb.dir)?;
                rec.chain = Some(chain.clone());
                // Firecracker tracks dirty pages from the restore on: the first pause is a
                // Diff on top of the template's layers.
                rec.full_snapshot_taken = true;
                let ws = tdir.snapshot().join("working_set");
                let memory = self.template_memory(template);
                let src = RestoreSource {
                    chain: &chain,
                    record_working_set: None,
                    working_set: ws.exists().then_some(ws.as_path()),
                    template_memory: memory.as_deref(),
                };
                ph.chain_us = t.elapsed().as_micros();
                let t = Instant::now();
                let r = self.vmm.restore(rec, &sb.dir, &src).map(|s| rec.started(s));
                self.commit(sb, rec)?;
                r.map_err(vm_status)?;
                ph.vm_us = t.elapsed().as_micros();
                let t = Instant::now();
                self.init_envd(sb, rec, &template.access_token, true)?;
                ph.envd_us = t.elapsed().as_micros();
            }
        }
        rec.expires_unix_ns = ttl::deadline(self.now(), Duration::from_secs(rec.spec.timeout_s));
        self.step(sb, rec, Event::Started, "")?;
        self.reaper.set(rec.id, rec.expires_unix_ns);
        Ok(())
    }

    /// Stops and removes everything of a sandbox.
    pub fn destroy(&self, id: Uuid) -> Result<(), Status> {
        self.with_op(id, |sb| self.destroy_locked(sb))
    }

    pub(super) fn destroy_locked(&self, sb: &Arc<Sandbox>) -> Result<(), Status> {
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
}

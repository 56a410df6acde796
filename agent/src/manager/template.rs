//! Templates: the ones this host holds, making a snapshot template from a sandbox (with its
//! recorded working set), deleting and listing them.

use super::*;

pub(super) fn find_layer(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.exists())
}

/// Bytes allocated on disk under `dir` (sparse files count what they hold).
pub fn allocated_bytes(dir: &Path) -> u64 {
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

/// Name prefix of a template memory file being written.
const MEMORY_TMP_PREFIX: &str = ".memory.tmp-";

/// Writes a snapshot template's one memory file, `tdir.memory()`, from its chain (the
/// header and layers in `tdir.snapshot()`): every data extent at its offset, zero ranges left
/// as holes (sparse: it allocates what the layers hold), synced, mode 0444 and owned by the
/// agent (root), then renamed into place, so a reader sees the whole file or none. Written
/// once per template; never written again (restores map it `MAP_PRIVATE`: guest writes go
/// to private copies of pages). Returns the bytes allocated.
pub fn write_template_memory(tdir: &TemplateDir) -> Result<u64, Status> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let snap = tdir.snapshot();
    let header = fs::read(snap.join("header")).map_err(internal)?;
    let header = uffd::header::Header::parse(&header).map_err(internal)?;
    // A temporary an interrupted write left (an agent killed while writing) goes first.
    if let Ok(rd) = fs::read_dir(tdir.path()) {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(MEMORY_TMP_PREFIX)
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let tmp = tdir.path().join(format!(
        "{MEMORY_TMP_PREFIX}{}",
        proto::random::hex(8).map_err(internal)?
    ));
    let r = (|| -> Result<u64, Status> {
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(internal)?;
        uffd::snapshot::materialize(&header, &[snap], &f).map_err(internal)?;
        f.sync_all().map_err(internal)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)).map_err(internal)?;
        let allocated = f.metadata().map_err(internal)?.blocks() * 512;
        fs::rename(&tmp, tdir.memory()).map_err(internal)?;
        fs::File::open(tdir.path())
            .and_then(|d| d.sync_all())
            .map_err(internal)?;
        Ok(allocated)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

impl Manager {
    /// The memory file a File-backed restore from snapshot template `t` maps: written when
    /// the template was published, or now, once, for a template published while the agent
    /// restored through wrenn-uffd (or by an older agent). `None` with the uffd backend, or
    /// when it cannot be written (logged; the restore then goes through wrenn-uffd).
    pub(super) fn template_memory(&self, t: &TemplateRecord) -> Option<PathBuf> {
        if self.vmm.restore_backend() != "file" {
            return None;
        }
        let tdir = self.cfg.layout.template(t.id);
        let path = tdir.memory();
        if path.exists() {
            return Some(path);
        }
        let _one = self
            .template_memory_writer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if path.exists() {
            // Written by a create that held the lock first.
            return Some(path);
        }
        let started = Instant::now();
        match write_template_memory(&tdir) {
            Ok(bytes) => {
                info!(
                    "template memory written template={} allocated_bytes={bytes} ms={}",
                    id::format_template(t.id),
                    started.elapsed().as_millis()
                );
                Some(path)
            }
            Err(e) => {
                warn!(
                    "template memory not written template={} error={:?}",
                    id::format_template(t.id),
                    e.message
                );
                None
            }
        }
    }

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
    pub(super) fn adopt_template_chain(
        &self,
        t: &TemplateRecord,
        own: &SandboxDir,
    ) -> Result<Chain, Status> {
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

    pub(super) fn link_or_copy(&self, src: &Path, dst: &Path) -> Result<(), Status> {
        match fs::hard_link(src, dst) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(_) => self.vmm.copy_file(src, dst, None).map_err(vm_status),
        }
    }

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

    pub(super) fn build_template(
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
            vcpus: rec.spec.vcpus,
            memory_mib: rec.spec.memory_mib,
            disk_mib: rec.spec.disk_mib,
            kernel_version: rec.kernel_version.clone(),
            access_token: rec.access_token.clone(),
            working_set_pages: 0,
            created_unix_ns: self.now(),
            generation: chain.generation,
        };
        t.working_set_pages = self.record_working_set(&t, tmp)?;
        // The File backend's one memory file, published with the template.
        if self.vmm.restore_backend() == "file" {
            write_template_memory(tmp)?;
        }
        t.save(tmp).map_err(internal)?;
        Ok(t)
    }

    /// One restore of the not yet published template, recording the order in which the
    /// guest touches its pages; then the scratch VM is thrown away.
    pub(super) fn record_working_set(
        &self,
        t: &TemplateRecord,
        tmp: &TemplateDir,
    ) -> Result<u64, Status> {
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
                template_memory: None,
            };
            let started = self.vmm.restore(&rec, &dir, &src).map_err(vm_status)?;
            rec.started(started);
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

    pub(super) fn template_info(&self, t: &TemplateRecord) -> pb::TemplateInfo {
        let dir = self.cfg.layout.template(t.id);
        pb::TemplateInfo {
            template_id: id::format_template(t.id),
            kind: t.kind as i32,
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
}

//! Pause and resume: a running sandbox into a new snapshot generation, and back.

use super::*;

impl Manager {
    pub fn pause(&self, id: Uuid) -> Result<pb::SandboxInfo, Status> {
        self.with_op(id, |sb| {
            let mut rec = sb.rec();
            self.pause_locked(sb, &mut rec, "")?;
            Ok(self.info(&rec))
        })
    }

    pub(super) fn pause_locked(
        &self,
        sb: &Sandbox,
        rec: &mut SandboxRecord,
        why: &str,
    ) -> Result<(), Status> {
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
            Ok(chain) => {
                rec.chain = Some(chain);
                rec.full_snapshot_taken = true;
                self.vmm.stop(rec, &sb.dir);
                rec.firecracker = None;
                rec.page_server = None;
                self.release_slot(rec);
                self.step(sb, rec, Event::Paused, why)?;
                crate::metrics::PAUSE_SECONDS.observe(started.elapsed());
                Ok(())
            }
            Err(e) if e.vm_still_running => {
                if e.full_snapshot_needed {
                    rec.full_snapshot_taken = false;
                }
                let msg = format!("pause failed: {e}");
                rec.expires_unix_ns =
                    ttl::deadline(self.now(), Duration::from_secs(rec.spec.timeout_s));
                self.step(sb, rec, Event::Abort, &msg)?;
                self.reaper.set(rec.id, rec.expires_unix_ns);
                Err(Status::new(e.code(), msg))
            }
            Err(e) => {
                if e.full_snapshot_needed {
                    rec.full_snapshot_taken = false;
                }
                let msg = format!("pause failed: {e}");
                self.teardown_vm(sb, rec);
                self.step(sb, rec, Event::Fail, &msg)?;
                Err(Status::new(e.code(), msg))
            }
        }
    }

    pub fn resume(&self, id: Uuid, timeout_s: u64) -> Result<pb::SandboxInfo, Status> {
        check_timeout(timeout_s, true)?;
        self.with_op(id, |sb| {
            let mut rec = sb.rec();
            self.step(sb, &mut rec, Event::Resume, "")?;
            if timeout_s != 0 {
                rec.spec.timeout_s = timeout_s;
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

    pub(super) fn resume_inner(&self, sb: &Sandbox, rec: &mut SandboxRecord) -> Result<(), Status> {
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
            template_memory: None,
        };
        let r = self.vmm.restore(rec, &sb.dir, &src).map(|s| rec.started(s));
        self.commit(sb, rec)?;
        r.map_err(vm_status)?;
        let token = rec.access_token.clone();
        self.init_envd(sb, rec, &token, true)?;
        rec.expires_unix_ns = ttl::deadline(self.now(), Duration::from_secs(rec.spec.timeout_s));
        self.step(sb, rec, Event::Resumed, "")?;
        self.reaper.set(rec.id, rec.expires_unix_ns);
        Ok(())
    }
}

//! Timeouts: SetTimeout, Ping and the reaper's expiry (pause or destroy per policy).

use super::*;

impl Manager {
    pub fn set_timeout(
        &self,
        id: Uuid,
        timeout_s: u64,
        policy: i32,
    ) -> Result<pb::SandboxInfo, Status> {
        check_timeout(timeout_s, false)?;
        let policy = TimeoutPolicy::from_wire(policy)?;
        self.with_op(id, |sb| {
            let mut rec = sb.rec();
            rec.spec.timeout_s = timeout_s;
            if let Some(p) = policy {
                rec.spec.on_timeout = p as i32;
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

    pub(super) fn extend(
        &self,
        sb: &Sandbox,
        rec: &mut SandboxRecord,
    ) -> Result<pb::SandboxInfo, Status> {
        if rec.state == State::Running {
            rec.expires_unix_ns =
                ttl::deadline(self.now(), Duration::from_secs(rec.spec.timeout_s));
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
            match rec.on_timeout() {
                TimeoutPolicy::Pause => {
                    let r = self.pause_locked(sb, &mut rec, "timeout");
                    self.report(&rec, before, StateChangeReason::Timeout);
                    r
                }
                TimeoutPolicy::Destroy | TimeoutPolicy::Unspecified => {
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
}

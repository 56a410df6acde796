//! The sandbox's network: its egress policy (the spec's `network`, applied to every slot it
//! gets) and where a port stream to it goes.

use super::*;
use proto::sandbox::NetworkPolicy;
use vmm_glue::net::Egress;

/// The slot policy of a spec's `network` (absent: open), or INVALID_ARGUMENT naming the item.
pub fn egress_of(n: Option<&NetworkPolicy>) -> Result<Egress, Status> {
    let Some(n) = n else {
        return Ok(Egress::default());
    };
    Egress::from_lists(
        n.allow_internet_access.unwrap_or(true),
        &n.deny_out,
        &n.allow_out,
    )
    .map_err(|e| Status::invalid_argument(format!("network: {e}")))
}

/// The slot policy of a stored spec. Stored policies were checked when they were set; one
/// that no longer parses (a record edited by hand) closes the slot rather than opening it.
pub(super) fn stored_egress(rec: &SandboxRecord) -> Egress {
    egress_of(rec.spec.network.as_ref()).unwrap_or_else(|e| {
        warn!(
            "stored network policy refused, egress closed sandbox={} error={}",
            id::format_sandbox(rec.id),
            e.message
        );
        Egress::none()
    })
}

impl Manager {
    /// Replaces the sandbox's network policy: at once on its slot if it has one (running),
    /// else when it next gets one (resume). The record changes only if the slot took it.
    pub fn update_network(
        &self,
        id: Uuid,
        network: Option<NetworkPolicy>,
    ) -> Result<pb::SandboxInfo, Status> {
        let egress = egress_of(network.as_ref())?;
        self.with_op(id, |sb| {
            let mut rec = sb.rec();
            if matches!(rec.state, State::Stopping | State::Stopped) {
                return Err(Status::failed_precondition(format!(
                    "sandbox is {}",
                    rec.state
                )));
            }
            let old = stored_egress(&rec);
            if let Some(index) = rec.slot {
                self.vmm.set_egress(index, &egress).map_err(vm_status)?;
            }
            rec.spec.network = network.clone();
            if let Err(e) = self.commit(sb, &rec) {
                // Put the slot back to what the record says.
                if let Some(index) = rec.slot {
                    let _ = self.vmm.set_egress(index, &old);
                }
                return Err(e);
            }
            Ok(self.info(&rec))
        })
    }

    /// Where a Ports.Connect to `port` of sandbox `id` goes: the guest's address on the host.
    /// FAILED_PRECONDITION (naming the state) unless it is running.
    pub fn port_target(&self, id: Uuid, port: u32) -> Result<std::net::SocketAddrV4, Status> {
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0 && u32::from(*p) != crate::limits::ENVD_PORT)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "port {port}: must be 1 to 65535 and not envd's {}",
                    crate::limits::ENVD_PORT
                ))
            })?;
        let sb = self.lookup(id)?;
        let rec = sb.rec();
        match (rec.state, rec.slot) {
            (State::Running, Some(index)) => {
                Ok(std::net::SocketAddrV4::new(self.vmm.guest_ip(index), port))
            }
            (state, _) => Err(Status::failed_precondition(format!(
                "sandbox is {state}, not running"
            ))),
        }
    }
}

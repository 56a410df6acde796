//! Placement and the capacity ledger.
//!
//! Each host row keeps `used_*`, the sum of what its sandboxes hold; each sandbox row keeps
//! `held_*`, what it holds now. Both change only together, in SQL, inside the caller's
//! transaction, so the ledger never drifts and concurrent creates on any number of ctl
//! replicas never overbook a host: a reservation is one conditional UPDATE (`used + need <=
//! capacity`), which PostgreSQL re-checks on the latest row version after any concurrent
//! writer commits. Placement of a new sandbox is that UPDATE inside the one statement that
//! also inserts the sandbox and its audit row (`service::sandboxes::insert_reserved`);
//! growth of an existing sandbox (resume) is [`set_state`], pinned to its own host.
//!
//! What a sandbox holds follows its state ([`holds`]): everything while it has (or is
//! getting) a VM, the disk only while paused, nothing once stopped or failed (an agent
//! cleans up after a failed create; an errored sandbox's leftovers are removed by Destroy).

use std::time::SystemTime;

use postgres::GenericClient;
use proto::id::Uuid;
use proto::Status;

use crate::db::pg_err;

/// Lifecycle state of a sandbox: the shared `wrenn.sandbox.v1.SandboxState`. It is stored
/// by its name (`sandboxes.state`, `State::name`), and its wire number is the same in
/// wrenn.ctl.v1, wrenn.agent.v1 and wrenn.host.v1 (`service::convert` tests the public one).
pub use proto::sandbox::SandboxState as State;

/// A state on the way to freeing the sandbox's resources: entering it never takes more than
/// the sandbox already holds (a paused sandbox being destroyed must not need the vCPUs and
/// memory it gave back, or Destroy would fail on a full host).
pub const fn frees(s: State) -> bool {
    matches!(s, State::Stopping | State::Stopped | State::Error)
}

/// Amounts of host resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Need {
    pub vcpus: i32,
    pub memory_mib: i64,
    pub disk_mib: i64,
}

impl Need {
    fn min(self, o: Need) -> Need {
        Need {
            vcpus: self.vcpus.min(o.vcpus),
            memory_mib: self.memory_mib.min(o.memory_mib),
            disk_mib: self.disk_mib.min(o.disk_mib),
        }
    }

    fn minus(self, o: Need) -> Need {
        Need {
            vcpus: self.vcpus - o.vcpus,
            memory_mib: self.memory_mib - o.memory_mib,
            disk_mib: self.disk_mib - o.disk_mib,
        }
    }
}

/// What a sandbox of size `size` holds on its host in `state`.
pub fn holds(state: State, size: Need) -> Need {
    match state {
        State::Pending
        | State::Starting
        | State::Running
        | State::Pausing
        | State::Resuming
        | State::Stopping => size,
        State::Paused => Need {
            vcpus: 0,
            memory_mib: 0,
            disk_mib: size.disk_mib,
        },
        // UNSPECIFIED is never stored (the column's CHECK lists the names).
        State::Stopped | State::Error | State::Unspecified => Need::default(),
    }
}

/// A sandbox's state and holdings, locked for update.
#[derive(Clone, Debug)]
pub struct Locked {
    pub state: State,
    pub host: Option<Uuid>,
    pub size: Need,
    pub held: Need,
}

/// Locks a sandbox row (`FOR UPDATE`); `None` when it does not exist.
pub fn lock(tx: &mut impl GenericClient, sandbox: Uuid) -> Result<Option<Locked>, Status> {
    let row = tx
        .query_opt(
            "SELECT state, host_id, vcpus, memory_mib, disk_mib, held_vcpus, held_memory_mib, \
                held_disk_mib FROM sandboxes WHERE id = $1 FOR UPDATE",
            &[&sandbox],
        )
        .map_err(pg_err)?;
    Ok(row.map(|r| Locked {
        state: State::from_name(r.get(0)).unwrap_or(State::Error),
        host: r.get(1),
        size: Need {
            vcpus: r.get(2),
            memory_mib: i64::from(r.get::<_, i32>(3)),
            disk_mib: r.get(4),
        },
        held: Need {
            vcpus: r.get(5),
            memory_mib: r.get(6),
            disk_mib: r.get(7),
        },
    }))
}

/// Moves a sandbox to `state` and adjusts its host's ledger by the change in what it holds.
/// Growing (paused → resuming) must fit on its host (`resource_exhausted` otherwise);
/// a state that frees ([`State::frees`]) never grows.
/// `expires` sets `expires_at` (`Some(None)` clears it).
pub fn set_state(
    tx: &mut impl GenericClient,
    sandbox: Uuid,
    state: State,
    reason: &str,
    expires: Option<Option<SystemTime>>,
) -> Result<Locked, Status> {
    let cur = lock(tx, sandbox)?.ok_or_else(|| Status::not_found("sandbox not found"))?;
    let want = match cur.host {
        Some(_) if frees(state) => holds(state, cur.size).min(cur.held),
        Some(_) => holds(state, cur.size),
        None => Need::default(),
    };
    let delta = want.minus(cur.held);
    if delta != Need::default() {
        let Some(host) = cur.host else {
            return Err(Status::internal("sandbox holds resources without a host"));
        };
        let grows = delta.vcpus > 0 || delta.memory_mib > 0 || delta.disk_mib > 0;
        let n = tx
            .execute(
                "UPDATE hosts SET used_vcpus = GREATEST(used_vcpus + $2, 0), \
                    used_memory_mib = GREATEST(used_memory_mib + $3, 0), \
                    used_disk_mib = GREATEST(used_disk_mib + $4, 0) \
                 WHERE id = $1 AND ($5 = false OR (used_vcpus + $2 <= capacity_vcpus \
                    AND used_memory_mib + $3 <= capacity_memory_mib \
                    AND used_disk_mib + $4 <= capacity_disk_mib))",
                &[
                    &host,
                    &delta.vcpus,
                    &delta.memory_mib,
                    &delta.disk_mib,
                    &grows,
                ],
            )
            .map_err(pg_err)?;
        if n == 0 && grows {
            crate::metrics::SCHEDULE_EXHAUSTED.inc();
            return Err(Status::resource_exhausted(
                "the sandbox's host has no free capacity",
            ));
        }
    }
    let (set_exp, exp) = match expires {
        Some(e) => (true, e),
        None => (false, None),
    };
    // Reasons may come from an agent (or a guest through it): never let one break the row.
    let reason = crate::db::storable(reason);
    let reason: &str = &reason;
    tx.execute(
        "UPDATE sandboxes SET state = $2, state_reason = $3, held_vcpus = $4, \
            held_memory_mib = $5, held_disk_mib = $6, updated_at = now(), \
            expires_at = CASE WHEN $7 THEN $8 ELSE expires_at END WHERE id = $1",
        &[
            &sandbox,
            &state.name(),
            &reason,
            &want.vcpus,
            &want.memory_mib,
            &want.disk_mib,
            &set_exp,
            &exp,
        ],
    )
    .map_err(pg_err)?;
    Ok(Locked {
        state,
        held: want,
        ..cur
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdings_follow_state() {
        let size = Need {
            vcpus: 2,
            memory_mib: 1024,
            disk_mib: 5120,
        };
        assert_eq!(holds(State::Running, size), size);
        assert_eq!(
            holds(State::Paused, size),
            Need {
                vcpus: 0,
                memory_mib: 0,
                disk_mib: 5120
            }
        );
        assert_eq!(holds(State::Stopped, size), Need::default());
        assert_eq!(holds(State::Error, size), Need::default());
        assert_eq!(holds(State::Resuming, size), size);
    }
}

//! The reconciler: compares each reachable host's sandbox list (agent `Sandboxes/List`)
//! with the database and corrects drift.
//!
//! Decisions ([`decide`]) are a pure function of the two lists, so they are unit-tested:
//! - in the database but missing on the host: STOPPING → stopped; expired (the agent's TTL
//!   destroyed it and the report was lost) → stopped; otherwise → error "missing on host";
//! - on the host but stopped in the database (a forced Destroy while the host was gone):
//!   destroyed, whatever the policy for unknown ones;
//! - on the host but unknown to the database: destroyed when configured (default), else only
//!   reported;
//! - on both with different states: the agent's state is applied (TTL pauses and destroys
//!   the agent made but could not report, VMs that died); a STOPPING sandbox still on the
//!   host is destroyed again.
//!
//! Between passes, each heartbeat's sandbox summaries go through the same decisions in the
//! heartbeat's own transaction ([`note_heartbeat_drift`]), which marks a host whose summaries
//! show drift in the database; the jobs thread of whichever replica takes the advisory lock
//! ([`check_heartbeats`]) reconciles such a host at once, from its own list. Nothing about it
//! lives in a replica's memory.
//!
//! Sandboxes in transition and new ones are left alone for a grace period: the lifecycle
//! call that moves them may still be running. A create is the exception: the agent lists a
//! sandbox from the start of its Create, so a `starting` row is settled from the host's
//! word (missing → error, settled → that state) once it is older than the new-sandbox grace,
//! and on a host that does not answer once its create's own deadline and
//! `limits::CREATE_DEADLINE_GRACE` passed ([`settle_cut_off_creates`]). The agent's list is read *before* the
//! database's, so a sandbox the agent has was always inserted before it was read.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use proto::gen::wrenn::agent::v1 as agent;
use proto::id::{self, Kind, Uuid};
use proto::Status;

use crate::config::JobsConfig;
use crate::db::pg_err;
use crate::monitor::{claim, RECONCILE_LOCK};

/// Advisory lock key of the heartbeat-drift job ("wrenn-dr").
pub const DRIFT_LOCK: i64 = 0x7772_656e_6e2d_6472;
use crate::scheduler::{self, State};
use crate::service::{audit_entry, audit_write, time_from_ns, Actor, Api};

/// A sandbox as the database has it.
#[derive(Clone, Debug)]
pub struct DbSandbox {
    pub id: Uuid,
    pub state: State,
    pub updated_at: SystemTime,
    pub expires_at: Option<SystemTime>,
}

/// A sandbox as the agent has it.
#[derive(Clone, Debug)]
pub struct HostSandbox {
    pub id: Uuid,
    pub state: State,
    pub expires_at: Option<SystemTime>,
    pub reason: String,
}

/// One correction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Record a state (with the agent's expiry when running).
    Apply {
        id: Uuid,
        state: State,
        reason: String,
        expires_at: Option<SystemTime>,
    },
    /// Destroy on the host (unknown to the database, or still there while stopping).
    Destroy { id: Uuid, known: bool },
    /// Unknown on the host but left alone (destroy_unknown = false).
    ReportUnknown { id: Uuid },
}

/// Decides the corrections for one host.
pub fn decide(
    db: &[DbSandbox],
    host: &[HostSandbox],
    now: SystemTime,
    cfg: &JobsConfig,
) -> Vec<Action> {
    let on_host: HashMap<Uuid, &HostSandbox> = host.iter().map(|h| (h.id, h)).collect();
    let in_db: HashMap<Uuid, &DbSandbox> = db.iter().map(|d| (d.id, d)).collect();
    let age = |t: SystemTime| now.duration_since(t).unwrap_or(Duration::ZERO);
    let mut out = Vec::new();
    for d in db {
        if d.state == State::Stopped {
            continue;
        }
        // A create is settled from the host's word, not after the long transition grace:
        // the agent lists a sandbox from the start of its Create, so one it does not have
        // is being created by nobody (a ctl crashed before or while calling), and a state
        // the agent settled (running, error) is what ctl would record itself. Only while the
        // agent still says starting is the create left alone. Hosts that do not answer are
        // covered by [`settle_cut_off_creates`].
        if d.state == State::Starting {
            if let Some(a) = settle_starting(d, on_host.get(&d.id).copied(), now, cfg) {
                out.push(a);
            }
            continue;
        }
        let busy = d.state.is_transient()
            && d.state != State::Stopping
            && age(d.updated_at) < cfg.transition_grace;
        match on_host.get(&d.id) {
            Some(h) => {
                if h.state == d.state || busy {
                    continue;
                }
                if d.state == State::Stopping {
                    if h.state == State::Stopped {
                        out.push(Action::Apply {
                            id: d.id,
                            state: State::Stopped,
                            reason: "destroyed".into(),
                            expires_at: None,
                        });
                    } else if age(d.updated_at) >= cfg.new_grace {
                        out.push(Action::Destroy {
                            id: d.id,
                            known: true,
                        });
                    }
                    continue;
                }
                if h.state.is_transient() {
                    continue; // the agent is moving it; look again next pass
                }
                out.push(Action::Apply {
                    id: d.id,
                    state: h.state,
                    reason: if h.reason.is_empty() {
                        "reconciled with host".into()
                    } else {
                        h.reason.clone()
                    },
                    expires_at: h.expires_at,
                });
            }
            None => {
                if busy || age(d.updated_at) < cfg.new_grace {
                    continue;
                }
                match d.state {
                    State::Stopping => out.push(Action::Apply {
                        id: d.id,
                        state: State::Stopped,
                        reason: "destroyed".into(),
                        expires_at: None,
                    }),
                    State::Error => {}
                    State::Running if d.expires_at.is_some_and(|e| e <= now) => {
                        out.push(Action::Apply {
                            id: d.id,
                            state: State::Stopped,
                            reason: "timeout".into(),
                            expires_at: None,
                        })
                    }
                    _ => out.push(Action::Apply {
                        id: d.id,
                        state: State::Error,
                        reason: "missing on host".into(),
                        expires_at: None,
                    }),
                }
            }
        }
    }
    for h in host {
        if h.state == State::Stopped {
            continue;
        }
        let known = in_db.get(&h.id).is_some_and(|d| d.state != State::Stopped);
        if !known && in_db.contains_key(&h.id) {
            // Stopped in the database (a forced Destroy while the host was gone, or a lost
            // destroy): ours, and meant to be gone whatever the policy for strangers.
            out.push(Action::Destroy {
                id: h.id,
                known: true,
            });
        } else if !known {
            out.push(if cfg.destroy_unknown {
                Action::Destroy {
                    id: h.id,
                    known: in_db.contains_key(&h.id),
                }
            } else {
                Action::ReportUnknown { id: h.id }
            });
        }
    }
    out
}

/// The correction of a sandbox the database has `starting` (see [`decide`]).
fn settle_starting(
    d: &DbSandbox,
    host: Option<&HostSandbox>,
    now: SystemTime,
    cfg: &JobsConfig,
) -> Option<Action> {
    let age = now.duration_since(d.updated_at).unwrap_or(Duration::ZERO);
    if age < cfg.new_grace {
        return None; // ctl's Create may not have reached the agent yet
    }
    match host {
        None => Some(Action::Apply {
            id: d.id,
            state: State::Error,
            reason: "create cut off: not on its host".into(),
            expires_at: None,
        }),
        // The agent is still creating it (its own steps bound that).
        Some(h) if h.state.is_transient() => None,
        Some(h) => Some(Action::Apply {
            id: d.id,
            state: h.state,
            reason: if h.reason.is_empty() {
                "reconciled with host".into()
            } else {
                h.reason.clone()
            },
            expires_at: h.expires_at,
        }),
    }
}

/// Runs a pass when this replica wins the period's claim. Returns whether it ran.
pub fn run_if_due(api: &Api, cfg: &JobsConfig) -> Result<bool, Status> {
    let period = cfg.reconcile_interval;
    let won = api
        .db()
        .tx(move |tx| claim(tx, RECONCILE_LOCK, "reconciler", period))?;
    if won {
        run_once(api, cfg)?;
    }
    Ok(won)
}

/// One pass over every reachable host (no claim: tests and `run_if_due`). Returns the
/// actions applied per host.
pub fn run_once(api: &Api, cfg: &JobsConfig) -> Result<Vec<(Uuid, Vec<Action>)>, Status> {
    crate::metrics::RECONCILE_RUNS.inc();
    let hosts: Vec<Uuid> = api.db().run(|c| {
        Ok(c.query(
            "SELECT id FROM hosts WHERE status IN ('online', 'draining')",
            &[],
        )
        .map_err(pg_err)?
        .iter()
        .map(|r| r.get(0))
        .collect())
    })?;
    if let Err(e) = settle_cut_off_creates(api, cfg) {
        log::warn!("settling cut-off creates failed: {}", e.message);
    }
    if let Err(e) = crate::service::builds::fail_dead_builds(api) {
        log::warn!("failing builds of dead runners failed: {}", e.message);
    }
    let mut all = Vec::new();
    for h in hosts {
        match reconcile_host(api, h, cfg) {
            Ok(actions) => all.push((h, actions)),
            Err(e) => log::warn!(
                "reconcile host={} failed: {}",
                id::format(Kind::Host, h),
                e.message
            ),
        }
    }
    Ok(all)
}

/// Marks `error` the sandboxes still `starting` past their create's own deadline plus
/// [`crate::limits::CREATE_DEADLINE_GRACE`] on a host the pass cannot ask (unreachable):
/// no ctl is creating them any more, and their capacity goes back to the host. Returns how
/// many. (Reachable hosts settle theirs from their own list, in [`decide`].)
pub fn settle_cut_off_creates(api: &Api, cfg: &JobsConfig) -> Result<usize, Status> {
    let bound = (cfg.create_deadline + crate::limits::CREATE_DEADLINE_GRACE).as_secs_f64();
    api.db().tx(move |tx| {
        let rows = tx
            .query(
                "SELECT s.id, s.team_id FROM sandboxes s LEFT JOIN hosts h ON h.id = s.host_id \
                 WHERE s.state = 'starting' AND s.updated_at < now() - make_interval(secs => $1) \
                   AND (h.id IS NULL OR h.status = 'unreachable') \
                 ORDER BY s.updated_at LIMIT 1000 FOR UPDATE OF s SKIP LOCKED",
                &[&bound],
            )
            .map_err(pg_err)?;
        for r in &rows {
            let id: Uuid = r.get(0);
            let reason = "create cut off: past its deadline on an unreachable host";
            scheduler::set_state(tx, id, State::Error, reason, Some(None))?;
            audit_write(
                tx,
                audit_entry(
                    Some(r.get(1)),
                    &Actor::System,
                    "sandbox",
                    id::format(Kind::Sandbox, id),
                    "sandbox.reconcile",
                    serde_json::json!({"from": "starting", "to": "error", "reason": reason}),
                ),
            )?;
        }
        Ok(rows.len())
    })
}

/// Parses an agent's view of its sandboxes (`(id, state, expires_unix_ns, reason)`, from a
/// List answer or a heartbeat), skipping malformed entries with a warning.
pub fn host_sandboxes(
    host: Uuid,
    entries: impl IntoIterator<Item = (String, i32, i64, String)>,
) -> Vec<HostSandbox> {
    let mut out = Vec::new();
    for (sandbox_id, state, expires_unix_ns, reason) in entries {
        let (Ok(id), Some(state)) = (
            id::parse(Kind::Sandbox, &sandbox_id),
            State::from_wire(state),
        ) else {
            log::warn!(
                "agent listed a malformed sandbox host={} id={sandbox_id:?}",
                id::format(Kind::Host, host),
            );
            continue;
        };
        out.push(HostSandbox {
            id,
            state,
            expires_at: (expires_unix_ns > 0).then(|| time_from_ns(expires_unix_ns)),
            // Stored as the state reason and in audit rows: keep it storable.
            reason: crate::db::storable(&reason).into_owned(),
        });
    }
    out
}

/// The database's sandboxes of `host`, and those the host has wherever the database puts them.
fn db_sandboxes(api: &Api, host: Uuid, on_host: &[HostSandbox]) -> Result<Vec<DbSandbox>, Status> {
    let ids: Vec<Uuid> = on_host.iter().map(|s| s.id).collect();
    api.db().run(move |c| db_sandboxes_in(c, host, &ids))
}

/// [`db_sandboxes`] with the caller's client (`ids`: the sandboxes the host has).
fn db_sandboxes_in(
    c: &mut impl postgres::GenericClient,
    host: Uuid,
    ids: &[Uuid],
) -> Result<Vec<DbSandbox>, Status> {
    Ok(c.query(
        "SELECT id, state, updated_at, expires_at FROM sandboxes \
             WHERE (host_id = $1 AND state <> 'stopped') OR id = ANY($2)",
        &[&host, &ids],
    )
    .map_err(pg_err)?
    .iter()
    .map(|r| DbSandbox {
        id: r.get(0),
        state: State::from_name(r.get(1)).unwrap_or(State::Error),
        updated_at: r.get(2),
        expires_at: r.get(3),
    })
    .collect())
}

/// Called by the host service inside a heartbeat's transaction: compares the heartbeat's
/// sandbox summaries with the database (the same decisions as a pass, graces included) and,
/// when they show drift, records it on the host row (`hosts.drift_seen_at`). Nothing is kept
/// in this replica's memory. An unknown sandbox left alone by policy is drift the pass only
/// reports: not worth a list at every heartbeat.
pub fn note_heartbeat_drift(
    tx: &mut impl postgres::GenericClient,
    host: Uuid,
    summaries: &[HostSandbox],
    cfg: &JobsConfig,
) -> Result<bool, Status> {
    let ids: Vec<Uuid> = summaries.iter().map(|s| s.id).collect();
    let db = db_sandboxes_in(tx, host, &ids)?;
    let actions = decide(&db, summaries, SystemTime::now(), cfg);
    let drift = actions
        .iter()
        .any(|a| !matches!(a, Action::ReportUnknown { .. }));
    if drift {
        tx.execute(
            "UPDATE hosts SET drift_seen_at = COALESCE(drift_seen_at, now()) WHERE id = $1",
            &[&host],
        )
        .map_err(pg_err)?;
    }
    Ok(drift)
}

/// Takes the hosts whose heartbeats showed drift ([`note_heartbeat_drift`]) and reconciles
/// each at once from its own `Sandboxes/List`, instead of at the next pass. Heartbeats are a
/// cheap early signal; the list stays the authority. The hosts are claimed (their mark
/// cleared) under the advisory lock [`DRIFT_LOCK`] in one transaction, so among N replicas
/// one takes each mark. Returns the actions applied per host.
pub fn check_heartbeats(api: &Api, cfg: &JobsConfig) -> Vec<(Uuid, Vec<Action>)> {
    let claimed = api.db().tx(|tx| {
        let got: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&DRIFT_LOCK])
            .map_err(pg_err)?
            .get(0);
        if !got {
            return Ok(Vec::new());
        }
        Ok(tx
            .query(
                "UPDATE hosts SET drift_seen_at = NULL WHERE drift_seen_at IS NOT NULL \
                 AND status IN ('online', 'draining') RETURNING id",
                &[],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get::<_, Uuid>(0))
            .collect::<Vec<_>>())
    });
    let hosts = match claimed {
        Ok(h) => h,
        Err(e) => {
            log::warn!("heartbeat drift check failed: {}", e.message);
            return Vec::new();
        }
    };
    let mut done = Vec::new();
    for host in hosts {
        log::info!(
            "heartbeat shows drift, reconciling host={}",
            id::format(Kind::Host, host)
        );
        crate::metrics::RECONCILE_EARLY.inc();
        match reconcile_host(api, host, cfg) {
            Ok(actions) => done.push((host, actions)),
            Err(e) => log::warn!(
                "reconcile host={} failed: {}",
                id::format(Kind::Host, host),
                e.message
            ),
        }
    }
    done
}

fn reconcile_host(api: &Api, host: Uuid, cfg: &JobsConfig) -> Result<Vec<Action>, Status> {
    // Agent first, then the database (see the module comment).
    let list: agent::ListSandboxesResponse = api.agents().unary(
        host,
        agent::sandboxes_methods::LIST,
        &agent::ListSandboxesRequest { states: vec![] },
    )?;
    let on_host = host_sandboxes(
        host,
        list.sandboxes
            .into_iter()
            .map(|s| (s.sandbox_id, s.state, s.expires_unix_ns, s.state_reason)),
    );
    let db = db_sandboxes(api, host, &on_host)?;
    let actions = decide(&db, &on_host, SystemTime::now(), cfg);
    for a in &actions {
        crate::metrics::RECONCILE_ACTIONS.inc();
        if let Err(e) = apply(api, host, a) {
            log::warn!(
                "reconcile action failed host={} action={a:?}: {}",
                id::format(Kind::Host, host),
                e.message
            );
        }
    }
    Ok(actions)
}

fn apply(api: &Api, host: Uuid, a: &Action) -> Result<(), Status> {
    match a.clone() {
        Action::Apply { id, state, reason, expires_at } => api.db().tx(move |tx| {
            let team: Option<Uuid> = tx
                .query_opt("SELECT team_id FROM sandboxes WHERE id = $1", &[&id])
                .map_err(pg_err)?
                .map(|r| r.get(0));
            let from = scheduler::lock(tx, id)?.map(|l| l.state);
            scheduler::set_state(tx, id, state, &reason, Some(if state == State::Running { expires_at } else { None }))?;
            audit_write(tx, audit_entry(
                team,
                &Actor::System,
                "sandbox",
                id::format(Kind::Sandbox, id),
                "sandbox.reconcile",
                serde_json::json!({"from": from.map(State::name), "to": state.name(), "reason": reason}),
            ))
        }),
        Action::Destroy { id, known } => {
            log::warn!("reconciler destroys sandbox={} host={} known={known}", id::format(Kind::Sandbox, id), id::format(Kind::Host, host));
            if known {
                api.agent_destroy(host, id)?;
            } else {
                let r: Result<agent::DestroySandboxResponse, Status> = api.agents().unary(
                    host,
                    agent::sandboxes_methods::DESTROY,
                    &agent::DestroySandboxRequest { sandbox_id: id::format(Kind::Sandbox, id) },
                );
                r?;
            }
            api.db().tx(move |tx| {
                let team: Option<Uuid> = tx
                    .query_opt("SELECT team_id FROM sandboxes WHERE id = $1", &[&id])
                    .map_err(pg_err)?
                    .map(|r| r.get(0));
                audit_write(tx, audit_entry(
                    team,
                    &Actor::System,
                    "sandbox",
                    id::format(Kind::Sandbox, id),
                    "sandbox.reconcile_destroy",
                    serde_json::json!({"host": id::format(Kind::Host, host), "known": known}),
                ))
            })
        }
        Action::ReportUnknown { id } => {
            log::warn!("unknown sandbox on host sandbox={} host={}", id::format(Kind::Sandbox, id), id::format(Kind::Host, host));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> JobsConfig {
        JobsConfig {
            new_grace: Duration::from_secs(60),
            create_deadline: Duration::from_secs(600),
            transition_grace: Duration::from_secs(600),
            ..JobsConfig::default()
        }
    }

    fn u(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn dbs(id: u8, state: State, age_s: u64, now: SystemTime) -> DbSandbox {
        DbSandbox {
            id: u(id),
            state,
            updated_at: now - Duration::from_secs(age_s),
            expires_at: None,
        }
    }

    fn hs(id: u8, state: State) -> HostSandbox {
        HostSandbox {
            id: u(id),
            state,
            expires_at: None,
            reason: String::new(),
        }
    }

    #[test]
    fn agreement_needs_nothing() {
        let now = SystemTime::now();
        let a = decide(
            &[dbs(1, State::Running, 1000, now)],
            &[hs(1, State::Running)],
            now,
            &cfg(),
        );
        assert!(a.is_empty());
    }

    #[test]
    fn missing_on_host() {
        let now = SystemTime::now();
        let mut expired = dbs(2, State::Running, 1000, now);
        expired.expires_at = Some(now - Duration::from_secs(5));
        let db = [
            dbs(1, State::Running, 1000, now),  // → error
            expired,                            // → stopped (timeout)
            dbs(3, State::Stopping, 1000, now), // → stopped
            dbs(4, State::Running, 5, now),     // new: left alone
            dbs(5, State::Pausing, 100, now),   // in transition: left alone
            dbs(6, State::Error, 1000, now),    // already error: left alone
            dbs(7, State::Paused, 1000, now),   // paused but files gone → error
        ];
        let a = decide(&db, &[], now, &cfg());
        assert_eq!(a.len(), 4, "{a:?}");
        assert!(matches!(&a[0], Action::Apply { id, state: State::Error, .. } if *id == u(1)));
        assert!(
            matches!(&a[1], Action::Apply { id, state: State::Stopped, reason, .. } if *id == u(2) && reason == "timeout")
        );
        assert!(matches!(&a[2], Action::Apply { id, state: State::Stopped, .. } if *id == u(3)));
        assert!(matches!(&a[3], Action::Apply { id, state: State::Error, .. } if *id == u(7)));
    }

    #[test]
    fn unknown_on_host_is_destroyed_or_reported() {
        let now = SystemTime::now();
        let host = [hs(9, State::Running), hs(8, State::Stopped)];
        let a = decide(&[], &host, now, &cfg());
        assert_eq!(
            a,
            vec![Action::Destroy {
                id: u(9),
                known: false
            }]
        );
        let c = JobsConfig {
            destroy_unknown: false,
            ..cfg()
        };
        assert_eq!(
            decide(&[], &host, now, &c),
            vec![Action::ReportUnknown { id: u(9) }]
        );
        // Stopped in the database (force-destroyed while its host was gone): destroyed even
        // when unknown ones are only reported.
        assert_eq!(
            decide(&[dbs(9, State::Stopped, 1000, now)], &host, now, &c),
            vec![Action::Destroy {
                id: u(9),
                known: true
            }]
        );
        // Stopped in the database but still on the host: a leftover.
        let a = decide(&[dbs(9, State::Stopped, 1000, now)], &host, now, &cfg());
        assert_eq!(
            a,
            vec![Action::Destroy {
                id: u(9),
                known: true
            }]
        );
    }

    #[test]
    fn agent_transitions_are_applied() {
        let now = SystemTime::now();
        let db = [
            dbs(1, State::Running, 1000, now),
            dbs(2, State::Running, 1000, now),
            dbs(3, State::Pausing, 30, now),
        ];
        let host = [
            hs(1, State::Paused),
            hs(2, State::Error),
            hs(3, State::Paused),
        ];
        let a = decide(&db, &host, now, &cfg());
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(matches!(&a[0], Action::Apply { id, state: State::Paused, .. } if *id == u(1)));
        assert!(matches!(&a[1], Action::Apply { id, state: State::Error, .. } if *id == u(2)));
        // A transition older than the grace is settled by the host's word.
        let db = [dbs(3, State::Pausing, 10_000, now)];
        let a = decide(&db, &host[2..], now, &cfg());
        assert!(matches!(
            &a[0],
            Action::Apply {
                state: State::Paused,
                ..
            }
        ));
    }

    #[test]
    fn creates_cut_off_are_settled_without_the_transition_grace() {
        let now = SystemTime::now();
        // Older than the new-sandbox grace, far younger than the transition grace.
        let db = [
            dbs(1, State::Starting, 120, now), // not on the host: nobody creates it
            dbs(2, State::Starting, 120, now), // the agent finished: running
            dbs(3, State::Starting, 120, now), // the agent still creates it
            dbs(4, State::Starting, 5, now),   // ctl's call may still be in flight
        ];
        let host = [hs(2, State::Running), hs(3, State::Starting)];
        let a = decide(&db, &host, now, &cfg());
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(matches!(&a[0], Action::Apply { id, state: State::Error, .. } if *id == u(1)));
        assert!(matches!(&a[1], Action::Apply { id, state: State::Running, .. } if *id == u(2)));
    }

    #[test]
    fn stopping_still_on_host_is_destroyed_again() {
        let now = SystemTime::now();
        let a = decide(
            &[dbs(1, State::Stopping, 1000, now)],
            &[hs(1, State::Running)],
            now,
            &cfg(),
        );
        assert_eq!(
            a,
            vec![Action::Destroy {
                id: u(1),
                known: true
            }]
        );
    }
}

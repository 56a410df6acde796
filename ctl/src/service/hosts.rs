//! Hosts (platform admin only).

use std::time::{Duration, SystemTime};

use postgres::GenericClient;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self, Kind, Uuid};
use proto::Status;

use super::audit::{self, ns, Actor, Entry};
use super::{page_size, paginate, parse_id, Api, AuthCtx};
use crate::auth;
use crate::db::pg_err;
use crate::limits::{REGISTRATION_TTL_DEFAULT_S, REGISTRATION_TTL_MAX_S};

const HOST_COLS: &str =
    "h.id, h.address, h.hostname, h.status, h.capacity_vcpus, h.capacity_memory_mib, \
    h.capacity_disk_mib, h.used_vcpus, h.used_memory_mib, h.used_disk_mib, h.agent_version, \
    h.firecracker_version, h.can_host, h.problems, h.last_heartbeat_at, h.created_at, \
    (SELECT count(*) FROM sandboxes s WHERE s.host_id = h.id AND s.state <> 'stopped'), \
    h.physical_vcpus, h.physical_memory_mib, h.vcpu_overcommit, h.memory_overcommit";

pub(crate) fn status_wire(s: &str) -> i32 {
    match s {
        "online" => ctl::HostStatus::Online as i32,
        "unreachable" => ctl::HostStatus::Unreachable as i32,
        "draining" => ctl::HostStatus::Draining as i32,
        _ => ctl::HostStatus::Unspecified as i32,
    }
}

fn host(r: &postgres::Row) -> ctl::Host {
    let u32_of = |i: usize| u32::try_from(r.get::<_, i32>(i)).unwrap_or(0);
    let u64_of = |i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
    let problems: serde_json::Value = r.get(13);
    ctl::Host {
        id: id::format(Kind::Host, r.get(0)),
        address: r.get(1),
        hostname: r.get(2),
        status: status_wire(r.get(3)),
        capacity: Some(ctl::Resources {
            vcpus: u32_of(4),
            memory_mib: u64_of(5),
            disk_mib: u64_of(6),
        }),
        usage: Some(ctl::Resources {
            vcpus: u32_of(7),
            memory_mib: u64_of(8),
            disk_mib: u64_of(9),
        }),
        agent_version: r.get(10),
        firecracker_version: r.get(11),
        can_host_sandboxes: r.get(12),
        problems: problems
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        sandbox_count: u32::try_from(r.get::<_, i64>(16)).unwrap_or(u32::MAX),
        last_heartbeat_unix_ns: ns(r.get(14)),
        created_unix_ns: ns(Some(r.get(15))),
        physical: Some(ctl::Resources {
            vcpus: u32_of(17),
            memory_mib: u64_of(18),
            disk_mib: u64_of(6),
        }),
        vcpu_overcommit: r.get(19),
        memory_overcommit: r.get(20),
    }
}

fn fetch(c: &mut impl GenericClient, h: Uuid) -> Result<ctl::Host, Status> {
    let r = c
        .query_opt(
            &format!("SELECT {HOST_COLS} FROM hosts h WHERE h.id = $1"),
            &[&h],
        )
        .map_err(pg_err)?
        .ok_or_else(|| Status::not_found("host not found"))?;
    Ok(host(&r))
}

fn audit_host(
    c: &mut impl GenericClient,
    ctx: &AuthCtx,
    h: String,
    action: &str,
    meta: serde_json::Value,
) -> Result<(), Status> {
    audit::write(
        c,
        Entry {
            team: None,
            actor: &Actor::key(ctx),
            resource_type: "host",
            resource_id: h,
            action,
            success: true,
            metadata: meta,
        },
    )
}

/// Makes a registration token (used by the API and `wrenn-ctl admin`); returns the
/// plaintext and its expiry.
pub fn insert_registration_token(
    c: &mut impl GenericClient,
    ttl_s: u64,
    created_by: Option<Uuid>,
) -> Result<(String, SystemTime), Status> {
    let s = auth::new_secret(auth::REGISTRATION_TOKEN_PREFIX)?;
    let id = audit::new_uuid()?;
    let expires = SystemTime::now() + Duration::from_secs(ttl_s);
    c.execute(
        "INSERT INTO registration_tokens (id, token_hash, created_by, expires_at) VALUES ($1, $2, $3, $4)",
        &[&id, &s.hash, &created_by, &expires],
    )
    .map_err(pg_err)?;
    Ok((s.plaintext, expires))
}

impl Api {
    /// A one-time token an agent exchanges for its identity.
    pub(super) fn create_registration_token_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateRegistrationTokenRequest,
    ) -> Result<ctl::CreateRegistrationTokenResponse, Status> {
        ctx.require_admin()?;
        let ttl = if req.ttl_s == 0 {
            REGISTRATION_TTL_DEFAULT_S
        } else {
            req.ttl_s
        };
        if ttl > REGISTRATION_TTL_MAX_S {
            return Err(Status::invalid_argument(format!(
                "ttl_s must be at most {REGISTRATION_TTL_MAX_S}"
            )));
        }
        let ctx2 = ctx.clone();
        // The CA pin rides along after a dot: the agent refuses a ctl with another CA.
        let pin = self.inner.cfg.issuer.as_ref().map(|ca| ca.fingerprint());
        self.inner.db.tx(move |tx| {
            let (mut token, exp) = insert_registration_token(tx, ttl, Some(ctx2.key_id))?;
            if let Some(pin) = &pin {
                token = format!("{token}{}{pin}", tls::hostkey::PIN_SEPARATOR);
            }
            audit_host(
                tx,
                &ctx2,
                String::new(),
                "host.create_registration_token",
                serde_json::json!({"ttl_s": ttl}),
            )?;
            Ok(ctl::CreateRegistrationTokenResponse {
                token,
                expires_unix_ns: ns(Some(exp)),
            })
        })
    }

    /// Every host (filtered by status), newest first.
    pub fn list_hosts(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListHostsRequest,
    ) -> Result<ctl::ListHostsResponse, Status> {
        ctx.require_admin()?;
        let mut statuses = Vec::new();
        for s in &req.statuses {
            statuses.push(
                match ctl::HostStatus::try_from(*s) {
                    Ok(ctl::HostStatus::Online) => "online",
                    Ok(ctl::HostStatus::Unreachable) => "unreachable",
                    Ok(ctl::HostStatus::Draining) => "draining",
                    _ => return Err(Status::invalid_argument(format!("unknown host status {s}"))),
                }
                .to_owned(),
            );
        }
        let any = statuses.is_empty();
        let after = audit::parse_page_token(&req.page_token)?;
        let (at, aid) = (after.map(|a| a.0), after.map(|a| a.1));
        let limit = page_size(req.page_size);
        let rows = self.inner.db.run(move |c| {
            c.query(
                &format!(
                    "SELECT {HOST_COLS} FROM hosts h WHERE ($1 OR h.status = ANY($2)) \
                     AND ($3::timestamptz IS NULL OR (h.created_at, h.id) < ($3, $4::uuid)) \
                     ORDER BY h.created_at DESC, h.id DESC LIMIT $5"
                ),
                &[&any, &statuses, &at, &aid, &(limit + 1)],
            )
            .map_err(pg_err)
        })?;
        let (hosts, next_page_token) = paginate(&rows, limit, |r| (r.get(15), r.get(0)), host);
        Ok(ctl::ListHostsResponse {
            hosts,
            next_page_token,
        })
    }

    pub fn get_host(&self, ctx: &AuthCtx, req: ctl::GetHostRequest) -> Result<ctl::Host, Status> {
        ctx.require_admin()?;
        let h = parse_id(Kind::Host, &req.host_id)?;
        self.inner.db.run(move |c| fetch(c, h))
    }

    /// Stops placing sandboxes on a host; lists those that remain.
    pub(super) fn drain_host_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::DrainHostRequest,
    ) -> Result<ctl::DrainHostResponse, Status> {
        ctx.require_admin()?;
        let h = parse_id(Kind::Host, &req.host_id)?;
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            let n = tx.execute("UPDATE hosts SET status = 'draining' WHERE id = $1", &[&h]).map_err(pg_err)?;
            if n == 0 {
                return Err(Status::not_found("host not found"));
            }
            audit_host(tx, &ctx2, id::format(Kind::Host, h), "host.drain", serde_json::json!({}))?;
            let remaining = tx
                .query("SELECT id FROM sandboxes WHERE host_id = $1 AND state <> 'stopped' ORDER BY created_at", &[&h])
                .map_err(pg_err)?
                .iter()
                .map(|r| id::format(Kind::Sandbox, r.get(0)))
                .collect();
            Ok(ctl::DrainHostResponse { host: Some(fetch(tx, h)?), remaining_sandbox_ids: remaining })
        })
    }

    /// Places sandboxes on a draining host again (back to online; the monitor marks it
    /// unreachable if its heartbeats have stopped).
    pub(super) fn undrain_host_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::UndrainHostRequest,
    ) -> Result<ctl::Host, Status> {
        ctx.require_admin()?;
        let h = parse_id(Kind::Host, &req.host_id)?;
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            let row = tx
                .query_opt("SELECT status FROM hosts WHERE id = $1 FOR UPDATE", &[&h])
                .map_err(pg_err)?
                .ok_or_else(|| Status::not_found("host not found"))?;
            let status: String = row.get(0);
            if status != "draining" {
                return Err(Status::failed_precondition(format!(
                    "host is {status}, not draining"
                )));
            }
            tx.execute("UPDATE hosts SET status = 'online' WHERE id = $1", &[&h])
                .map_err(pg_err)?;
            audit_host(
                tx,
                &ctx2,
                id::format(Kind::Host, h),
                "host.undrain",
                serde_json::json!({}),
            )?;
            fetch(tx, h)
        })
    }

    /// Forgets a host; refused while sandboxes or snapshot templates remain on it, unless
    /// `force`: then (for a host that is not online) its sandboxes are recorded stopped and
    /// its snapshot templates deleted, each with an audit row its team can see.
    pub(super) fn delete_host_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::DeleteHostRequest,
    ) -> Result<ctl::DeleteHostResponse, Status> {
        ctx.require_admin()?;
        let h = parse_id(Kind::Host, &req.host_id)?;
        let force = req.force;
        let ctx2 = ctx.clone();
        let resp = self.inner.db.tx(move |tx| {
            let row = tx
                .query_opt("SELECT status FROM hosts WHERE id = $1 FOR UPDATE", &[&h])
                .map_err(pg_err)?
                .ok_or_else(|| Status::not_found("host not found"))?;
            let status: String = row.get(0);
            let mut resp = ctl::DeleteHostResponse::default();
            if force {
                if status == "online" {
                    return Err(Status::failed_precondition(
                        "host is online: drain it first, or wait until it is unreachable",
                    ));
                }
                resp = force_clear(tx, h)?;
            } else {
                let busy: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM sandboxes WHERE host_id = $1 AND state <> 'stopped') \
                         OR EXISTS (SELECT 1 FROM templates WHERE host_id = $1)",
                        &[&h],
                    )
                    .map_err(pg_err)?
                    .get(0);
                if busy {
                    return Err(Status::failed_precondition(
                        "sandboxes or snapshot templates remain on the host (force deletes a host that is gone)",
                    ));
                }
            }
            // Its certificates are revoked at once, on every replica (NOTIFY at commit).
            let serials = crate::revocation::revoke_host_certs(tx, h)?;
            tx.execute("DELETE FROM hosts WHERE id = $1", &[&h])
                .map_err(pg_err)?;
            audit_host(
                tx,
                &ctx2,
                id::format(Kind::Host, h),
                "host.delete",
                serde_json::json!({
                    "force": force,
                    "stopped_sandboxes": resp.stopped_sandbox_ids.len(),
                    "deleted_templates": resp.deleted_template_ids.len(),
                }),
            )?;
            Ok((resp, serials))
        })?;
        let (resp, serials) = resp;
        // This replica need not wait for its own notification.
        self.inner.revocations.host_revoked(h, &serials);
        self.inner.agents.forget(h);
        Ok(resp)
    }
}

/// A forced host delete's clean-up: every sandbox left on host `h` is recorded stopped
/// (giving back its capacity) and every snapshot template on it deleted, each audited as
/// the system's doing for its team.
fn force_clear(
    tx: &mut postgres::Transaction<'_>,
    h: Uuid,
) -> Result<ctl::DeleteHostResponse, Status> {
    let mut resp = ctl::DeleteHostResponse::default();
    let rows = tx
        .query(
            "SELECT id, team_id, state FROM sandboxes WHERE host_id = $1 AND state <> 'stopped' \
             ORDER BY created_at FOR UPDATE",
            &[&h],
        )
        .map_err(pg_err)?;
    for r in &rows {
        let sb: Uuid = r.get(0);
        let from: String = r.get(2);
        crate::scheduler::set_state(
            tx,
            sb,
            crate::scheduler::State::Stopped,
            "host deleted",
            Some(None),
        )?;
        let wire = id::format(Kind::Sandbox, sb);
        audit::write(
            tx,
            Entry {
                team: Some(r.get(1)),
                actor: &Actor::System,
                resource_type: "sandbox",
                resource_id: wire.clone(),
                action: "sandbox.force_stop",
                success: true,
                metadata: serde_json::json!({"from": from, "host": id::format(Kind::Host, h), "reason": "host deleted"}),
            },
        )?;
        resp.stopped_sandbox_ids.push(wire);
    }
    let rows = tx
        .query(
            "DELETE FROM templates WHERE host_id = $1 RETURNING id, team_id",
            &[&h],
        )
        .map_err(pg_err)?;
    for r in &rows {
        let wire = id::format(Kind::Template, r.get(0));
        audit::write(
            tx,
            Entry {
                team: Some(r.get(1)),
                actor: &Actor::System,
                resource_type: "template",
                resource_id: wire.clone(),
                action: "template.delete",
                success: true,
                metadata: serde_json::json!({"host": id::format(Kind::Host, h), "reason": "host deleted"}),
            },
        )?;
        resp.deleted_template_ids.push(wire);
    }
    Ok(resp)
}

//! `wrenn.host.v1`: what agents call — Register (one-time token → identity), Heartbeat,
//! ReportState (state changes the agent made on its own).

use std::time::SystemTime;

use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::host::v1 as host;
use proto::id::{self, Kind, Uuid};
use proto::{Code, Status};

use crate::auth;
use crate::db::pg_err;
use crate::scheduler::{self, State};
use crate::service::audit_entry;
use crate::service::{new_uuid, Actor, Api};

/// Largest capacity figures accepted (fit the i32/i64 columns with room for sums).
const VCPUS_MAX: u32 = 1 << 20;
const MIB_MAX: u64 = 1 << 40;

fn check_resources(r: &Option<agent::Resources>) -> Result<(i32, i64, i64), Status> {
    let r = r
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("capacity is required"))?;
    if r.vcpus > VCPUS_MAX || r.memory_mib > MIB_MAX || r.disk_mib > MIB_MAX {
        return Err(Status::invalid_argument("capacity out of range"));
    }
    Ok((r.vcpus as i32, r.memory_mib as i64, r.disk_mib as i64))
}

/// A host's settings from a Register or Heartbeat: its own vCPUs and memory and its
/// overcommit ratios, within the bounds the agent also applies (`proto::sandbox_limits`).
/// An agent that sends none (an older one) is taken as offering what it has.
struct Settings {
    physical_vcpus: i32,
    physical_memory_mib: i64,
    vcpu_overcommit: f64,
    memory_overcommit: f64,
}

fn check_settings(
    physical: &Option<agent::Resources>,
    vcpu_overcommit: f64,
    memory_overcommit: f64,
    capacity: (i32, i64),
) -> Result<Settings, Status> {
    let (physical_vcpus, physical_memory_mib) = match physical {
        Some(_) => {
            let (v, m, _) = check_resources(physical)?;
            (v, m)
        }
        None => capacity,
    };
    let ratio = |r: f64, memory: bool, field: &str| {
        let r = if r == 0.0 { 1.0 } else { r };
        if proto::sandbox_limits::overcommit_ok(r, memory) {
            Ok(r)
        } else {
            Err(Status::invalid_argument(format!(
                "{field} {r} out of range ({} to {})",
                proto::sandbox_limits::OVERCOMMIT_MIN,
                if memory {
                    proto::sandbox_limits::MEMORY_OVERCOMMIT_MAX
                } else {
                    proto::sandbox_limits::VCPU_OVERCOMMIT_MAX
                }
            )))
        }
    };
    Ok(Settings {
        physical_vcpus,
        physical_memory_mib,
        vcpu_overcommit: ratio(vcpu_overcommit, false, "vcpu_overcommit")?,
        memory_overcommit: ratio(memory_overcommit, true, "memory_overcommit")?,
    })
}

fn check_address(a: &str) -> Result<(), Status> {
    let ok = a.len() <= 255
        && a.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        && !a.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument("agent_address must be host:port"))
    }
}

/// Checks the free text of a Register or Heartbeat before it reaches SQL.
fn check_host_text(problems: &[String], texts: &[(&str, &str)]) -> Result<(), Status> {
    for p in problems {
        crate::db::check_text("problems", p)?;
    }
    for (field, v) in texts {
        crate::db::check_text(field, v)?;
    }
    Ok(())
}

fn problems_json(p: &[String]) -> serde_json::Value {
    serde_json::Value::Array(
        p.iter()
            .take(64)
            .map(|s| serde_json::Value::String(s.chars().take(512).collect()))
            .collect(),
    )
}

/// Register: exchanges a one-time registration token for the host's identity and tokens.
pub fn register(
    api: &Api,
    mut req: host::RegisterRequest,
) -> Result<host::RegisterResponse, Status> {
    let host_key = crate::pki::check_register_key(&req)
        .map_err(|e| {
            crate::metrics::AUTH_FAILURES.inc();
            Status::unauthenticated(e.to_string())
        })?
        .map(<[u8]>::to_vec);
    // The token as handed out may carry the CA pin after a dot: only the secret is ours.
    if let Some((secret, _pin)) = req
        .registration_token
        .split_once(tls::hostkey::PIN_SEPARATOR)
    {
        req.registration_token = secret.to_owned();
    }
    if !auth::well_formed(&req.registration_token, auth::REGISTRATION_TOKEN_PREFIX) {
        crate::metrics::AUTH_FAILURES.inc();
        return Err(Status::unauthenticated("malformed registration token"));
    }
    check_address(&req.agent_address)?;
    let (vcpus, mem, disk) = check_resources(&req.capacity)?;
    let set = check_settings(
        &req.physical,
        req.vcpu_overcommit,
        req.memory_overcommit,
        (vcpus, mem),
    )?;
    if req.hostname.len() > 255
        || req.agent_version.len() > 255
        || req.firecracker_version.len() > 255
    {
        return Err(Status::invalid_argument("hostname or versions too long"));
    }
    check_host_text(
        &req.problems,
        &[
            ("hostname", &req.hostname),
            ("agent_version", &req.agent_version),
            ("firecracker_version", &req.firecracker_version),
        ],
    )?;
    let token_hash = auth::hash(&req.registration_token).to_vec();
    let host_token = auth::new_secret(auth::HOST_TOKEN_PREFIX)?;
    let agent_token = auth::new_secret(auth::AGENT_TOKEN_PREFIX)?;
    let id = new_uuid()?;
    let interval = api.config().heartbeat_interval;
    let ht = host_token.clone();
    let at = agent_token.plaintext.clone();
    let issuer = host_key.and_then(|k| api.config().issuer.clone().map(|ca| (ca, k)));
    let lifetime = api.config().host_cert_lifetime;
    let host_id = id::format(Kind::Host, id);
    let hid = host_id.clone();
    let cert = api.db().tx(move |tx| {
        let tok = tx
            .query_opt(
                "SELECT id FROM registration_tokens WHERE token_hash = $1 AND used_at IS NULL \
                 AND expires_at > now() FOR UPDATE",
                &[&token_hash],
            )
            .map_err(pg_err)?;
        let Some(tok) = tok else {
            crate::metrics::AUTH_FAILURES.inc();
            return Err(Status::unauthenticated("unknown, used or expired registration token"));
        };
        let tok_id: Uuid = tok.get(0);
        // Identity = the host id this token is being bound to, whatever the agent asked.
        let cert = match &issuer {
            Some((ca, key)) => Some(
                ca.issue_host(&hid, key, lifetime)
                    .map_err(|e| Status::internal(format!("issuing the host certificate: {e}")))?,
            ),
            None => None,
        };
        let serial = cert.as_ref().map(|c| c.serial.clone());
        let expires = cert.as_ref().map(|c| c.expires);
        tx.execute(
            "INSERT INTO hosts (id, address, hostname, status, capacity_vcpus, capacity_memory_mib, \
                capacity_disk_mib, agent_version, firecracker_version, can_host, problems, \
                last_heartbeat_at, host_token_hash, agent_token, physical_vcpus, \
                physical_memory_mib, vcpu_overcommit, memory_overcommit, cert_serial, \
                cert_expires_at) \
             VALUES ($1,$2,$3,'online',$4,$5,$6,$7,$8,$9,$10,now(),$11,$12,$13,$14,$15,$16,$17,$18)",
            &[
                &id, &req.agent_address, &req.hostname, &vcpus, &mem, &disk, &req.agent_version,
                &req.firecracker_version, &req.can_host_sandboxes, &problems_json(&req.problems),
                &ht.hash, &at, &set.physical_vcpus, &set.physical_memory_mib,
                &set.vcpu_overcommit, &set.memory_overcommit, &serial, &expires,
            ],
        )
        .map_err(pg_err)?;
        tx.execute("UPDATE registration_tokens SET used_at = now(), host_id = $2 WHERE id = $1", &[&tok_id, &id])
            .map_err(pg_err)?;
        crate::service::audit_write(tx, audit_entry(
            None,
            &Actor::Host { id, name: req.hostname.clone() },
            "host",
            id::format(Kind::Host, id),
            "host.register",
            serde_json::json!({"address": req.agent_address}),
        ))?;
        Ok(cert)
    })?;
    log::info!("host registered host={host_id}");
    let mut resp = host::RegisterResponse {
        host_id,
        host_token: host_token.plaintext,
        agent_token: agent_token.plaintext,
        heartbeat_interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    if let (Some(c), Some(ca)) = (cert, api.config().issuer.as_ref()) {
        resp.host_certificate_pem = c.cert_pem;
        resp.ca_certificate_pem = ca.cert_pem.clone();
        resp.host_certificate_expires_unix_ns = c
            .expires
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    }
    Ok(resp)
}

/// RenewCertificate: a new certificate for the same host key, on the host's authenticated
/// connection. The certificate it replaces becomes the host's previous one: still accepted
/// until it expires (connections opened with it go on), revoked with the host.
pub fn renew_certificate(
    api: &Api,
    host_id: Uuid,
    name: &str,
    req: host::RenewCertificateRequest,
) -> Result<host::RenewCertificateResponse, Status> {
    let hid = id::format(Kind::Host, host_id);
    let Some(ca) = api.config().issuer.clone() else {
        return Err(Status::failed_precondition(
            "this ctl issues no certificates (no --tls-ca-cert/--tls-ca-key)",
        ));
    };
    tls::hostkey::verify_renewal(&req.host_public_key, &req.key_signature, &hid).map_err(|e| {
        crate::metrics::AUTH_FAILURES.inc();
        Status::unauthenticated(e.to_string())
    })?;
    let lifetime = api.config().host_cert_lifetime;
    let key = req.host_public_key.to_vec();
    let name = name.to_owned();
    let ca2 = ca.clone();
    let cert = api.db().tx(move |tx| {
        let row = tx
            .query_opt("SELECT cert_serial FROM hosts WHERE id = $1 FOR UPDATE", &[&host_id])
            .map_err(pg_err)?
            .ok_or_else(|| Status::unauthenticated("host no longer registered"))?;
        let current: Option<Vec<u8>> = row.get(0);
        if current.is_none() {
            return Err(Status::failed_precondition(
                "this host registered without a key: it has no certificate to renew",
            ));
        }
        let cert = ca2
            .issue_host(&hid, &key, lifetime)
            .map_err(|e| Status::internal(format!("issuing the host certificate: {e}")))?;
        tx.execute(
            "UPDATE hosts SET prev_cert_serial = cert_serial, prev_cert_expires_at = cert_expires_at, \
                cert_serial = $2, cert_expires_at = $3 WHERE id = $1",
            &[&host_id, &cert.serial, &cert.expires],
        )
        .map_err(pg_err)?;
        crate::service::audit_write(tx, audit_entry(
            None,
            &Actor::Host { id: host_id, name },
            "host",
            hid.clone(),
            "host.renew_certificate",
            serde_json::json!({}),
        ))?;
        Ok(cert)
    })?;
    log::info!(
        "host certificate renewed host={}",
        id::format(Kind::Host, host_id)
    );
    Ok(host::RenewCertificateResponse {
        host_certificate_pem: cert.cert_pem,
        host_certificate_expires_unix_ns: cert
            .expires
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
        ca_certificate_pem: ca.cert_pem.clone(),
    })
}

/// Heartbeat: liveness, capacity and versions; brings an unreachable host back online.
pub fn heartbeat(
    api: &Api,
    host_id: Uuid,
    name: &str,
    req: host::HeartbeatRequest,
) -> Result<host::HeartbeatResponse, Status> {
    let (vcpus, mem, disk) = check_resources(&req.capacity)?;
    let set = check_settings(
        &req.physical,
        req.vcpu_overcommit,
        req.memory_overcommit,
        (vcpus, mem),
    )?;
    if req.agent_version.len() > 255 {
        return Err(Status::invalid_argument("agent_version too long"));
    }
    check_host_text(&req.problems, &[("agent_version", &req.agent_version)])?;
    let interval = api.config().heartbeat_interval;
    let name = name.to_owned();
    let jobs = api.jobs_config().clone();
    let summaries = crate::reconciler::host_sandboxes(
        host_id,
        req.sandboxes.iter().map(|s| {
            (
                s.sandbox_id.clone(),
                s.state,
                s.expires_unix_ns,
                String::new(),
            )
        }),
    );
    let draining = api.db().tx(move |tx| {
        let prev = tx
            .query_opt("SELECT status FROM hosts WHERE id = $1 FOR UPDATE", &[&host_id])
            .map_err(pg_err)?
            .ok_or_else(|| Status::unauthenticated("host no longer registered"))?;
        let prev: String = prev.get(0);
        tx.execute(
            "UPDATE hosts SET last_heartbeat_at = now(), capacity_vcpus = $2, capacity_memory_mib = $3, \
                capacity_disk_mib = $4, can_host = $5, problems = $6, agent_version = $7, \
                physical_vcpus = $8, physical_memory_mib = $9, vcpu_overcommit = $10, \
                memory_overcommit = $11, \
                status = CASE WHEN status = 'unreachable' THEN 'online' ELSE status END WHERE id = $1",
            &[&host_id, &vcpus, &mem, &disk, &req.can_host_sandboxes, &problems_json(&req.problems), &req.agent_version,
              &set.physical_vcpus, &set.physical_memory_mib, &set.vcpu_overcommit, &set.memory_overcommit],
        )
        .map_err(pg_err)?;
        // Drift between the summaries and the database is recorded on the host row, for
        // whichever replica's jobs take it (reconciler::check_heartbeats).
        crate::reconciler::note_heartbeat_drift(tx, host_id, &summaries, &jobs)?;
        if prev == "unreachable" {
            crate::service::audit_write(tx, audit_entry(
                None,
                &Actor::Host { id: host_id, name },
                "host",
                id::format(Kind::Host, host_id),
                "host.online",
                serde_json::json!({"from": "unreachable"}),
            ))?;
        }
        Ok(prev == "draining")
    })?;
    Ok(host::HeartbeatResponse {
        heartbeat_interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        draining,
    })
}

/// ReportState: a change the agent made on its own. Idempotent; stale reports are ignored.
pub fn report_state(
    api: &Api,
    host_id: Uuid,
    name: &str,
    req: host::ReportStateRequest,
) -> Result<host::ReportStateResponse, Status> {
    let sb = id::parse(Kind::Sandbox, &req.sandbox_id)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let state =
        State::from_wire(req.state).ok_or_else(|| Status::invalid_argument("unknown state"))?;
    if state == State::Pending {
        return Err(Status::invalid_argument("an agent never reports pending"));
    }
    if req.message.len() > 4096 {
        return Err(Status::invalid_argument("message too long"));
    }
    crate::db::check_text("message", &req.message)?;
    let changed =
        (req.changed_unix_ns > 0).then(|| crate::service::time_from_ns(req.changed_unix_ns));
    let name = name.to_owned();
    api.db().tx(move |tx| {
        let row = tx
            .query_opt(
                "SELECT team_id, state, updated_at, timeout_s FROM sandboxes WHERE id = $1 AND host_id = $2 FOR UPDATE",
                &[&sb, &host_id],
            )
            .map_err(pg_err)?
            .ok_or_else(|| Status::not_found("sandbox not found on this host"))?;
        let team: Uuid = row.get(0);
        let cur = State::from_name(row.get(1)).unwrap_or(State::Error);
        let updated: SystemTime = row.get(2);
        if cur == state || cur == State::Stopped {
            return Ok(()); // repeated report, or nothing left to change
        }
        if changed.is_some_and(|c| c < updated) {
            return Ok(()); // older than what ctl holds
        }
        let timeout_s: i64 = row.get(3);
        let exp = if state == State::Running {
            Some(Some(SystemTime::now() + std::time::Duration::from_secs(timeout_s.max(1) as u64)))
        } else {
            Some(None)
        };
        let reason = if req.message.is_empty() { reason_text(req.reason).to_owned() } else { req.message.clone() };
        scheduler::set_state(tx, sb, state, &reason, exp)?;
        crate::service::audit_write(tx, audit_entry(
            Some(team),
            &Actor::Host { id: host_id, name },
            "sandbox",
            id::format(Kind::Sandbox, sb),
            "sandbox.state",
            serde_json::json!({"from": cur.name(), "to": state.name(), "reason": reason_text(req.reason)}),
        ))?;
        Ok(())
    })?;
    Ok(host::ReportStateResponse {})
}

fn reason_text(v: i32) -> &'static str {
    match host::StateChangeReason::try_from(v) {
        Ok(host::StateChangeReason::Timeout) => "timeout",
        Ok(host::StateChangeReason::VmExited) => "vm exited",
        Ok(host::StateChangeReason::AdoptionFailed) => "adoption failed",
        Ok(host::StateChangeReason::PageServerFailed) => "page server failed",
        Ok(host::StateChangeReason::Other) => "other",
        _ => "unspecified",
    }
}

/// Refusal for calls a registering connection may not make.
pub fn registering_only() -> Status {
    Status::new(
        Code::PermissionDenied,
        "a connection without a host token may only call Register",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_resources_are_checked() {
        for ok in ["10.0.0.5:7710", "agent.local:1", "[::1]:7710"] {
            assert!(check_address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.5",
            ":7710",
            "h:0",
            "h:70000",
            "h:x",
            "a b:1",
            &format!("{}:1", "h".repeat(300)),
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
        assert!(check_resources(&None).is_err());
        let r = |v, m, d| {
            Some(agent::Resources {
                vcpus: v,
                memory_mib: m,
                disk_mib: d,
            })
        };
        assert!(check_resources(&r(4, 4096, 1000)).is_ok());
        assert!(check_resources(&r(u32::MAX, 1, 1)).is_err());
        assert!(check_resources(&r(1, u64::MAX, 1)).is_err());
        assert!(check_resources(&r(1, 1, u64::MAX)).is_err());
    }
}

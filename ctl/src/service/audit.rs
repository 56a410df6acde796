//! The audit trail: one row per mutating call, written in the caller's transaction.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres::GenericClient;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self, Kind, Uuid};
use proto::Status;

use super::{page_size, paginate, Api, AuthCtx};
use crate::db::pg_err;
use crate::limits::AUDIT_METADATA_LEN_MAX;

/// Who did something, as recorded in audit rows.
#[derive(Clone, Debug)]
pub enum Actor {
    ApiKey { id: Uuid, name: String },
    Host { id: Uuid, name: String },
    System,
}

impl Actor {
    /// The call's API key; the system when ctl acts on its own for a team (the nil key id,
    /// which no key has: e.g. a traffic proxy request resuming an `auto_resume` sandbox).
    pub fn key(ctx: &AuthCtx) -> Actor {
        if ctx.key_id == Uuid::nil() {
            return Actor::System;
        }
        Actor::ApiKey {
            id: ctx.key_id,
            name: ctx.key_name.clone(),
        }
    }

    fn parts(&self) -> (&'static str, String, String) {
        match self {
            Actor::ApiKey { id, name } => ("api_key", id::format(Kind::Key, *id), name.clone()),
            Actor::Host { id, name } => ("host", id::format(Kind::Host, *id), name.clone()),
            Actor::System => ("system", String::new(), "wrenn-ctl".to_owned()),
        }
    }
}

/// One audit entry to write.
#[derive(Clone, Debug)]
pub struct Entry<'a> {
    pub team: Option<Uuid>,
    pub actor: &'a Actor,
    pub resource_type: &'a str,
    pub resource_id: String,
    pub action: &'a str,
    pub success: bool,
    pub metadata: serde_json::Value,
}

/// Writes one audit row with `c` (the caller's transaction).
pub fn write(c: &mut impl GenericClient, e: Entry<'_>) -> Result<(), Status> {
    insert(c, e).map(|_| ())
}

/// Metadata of a failed call: its status code and message (bounded).
pub fn failure_meta(s: &Status) -> serde_json::Value {
    let message: String = crate::db::storable(&s.message).chars().take(512).collect();
    serde_json::json!({"code": s.code.name(), "message": message})
}

/// Marks the audit row `row` (written when the call's first step committed) as failed,
/// with the failure's code and message merged into its metadata: a call whose later step
/// (the agent's) failed is then recorded as the failure it was.
pub fn mark_failed(c: &mut impl GenericClient, row: Uuid, s: &Status) -> Result<(), Status> {
    c.execute(
        "UPDATE audit_logs SET status = 'failure', metadata = metadata || $2 WHERE id = $1",
        &[&row, &failure_meta(s)],
    )
    .map_err(pg_err)?;
    Ok(())
}

/// Writes one audit row with `c`; returns its id.
pub fn insert(c: &mut impl GenericClient, e: Entry<'_>) -> Result<Uuid, Status> {
    let (actor_type, actor_id, actor_name) = e.actor.parts();
    let mut meta = e.metadata;
    if meta.to_string().len() > AUDIT_METADATA_LEN_MAX {
        meta = serde_json::json!({"truncated": true});
    }
    let id = new_uuid()?;
    c.execute(
        "INSERT INTO audit_logs (id, team_id, actor_type, actor_id, actor_name, resource_type, \
            resource_id, action, status, metadata) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
        &[
            &id,
            &e.team,
            &actor_type,
            &actor_id,
            &actor_name,
            &e.resource_type,
            &e.resource_id,
            &e.action,
            &if e.success { "success" } else { "failure" },
            &meta,
        ],
    )
    .map_err(pg_err)?;
    Ok(id)
}

/// A random (v4) UUID for a new entity.
pub fn new_uuid() -> Result<Uuid, Status> {
    let mut b = [0u8; 16];
    crate::random::fill(&mut b).map_err(|e| Status::internal(format!("getrandom: {e}")))?;
    Ok(uuid_v4(b))
}

fn uuid_v4(mut b: [u8; 16]) -> Uuid {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Uuid::from_bytes(b)
}

/// ns since the epoch of a stored time (0 for none).
pub fn ns(t: Option<SystemTime>) -> i64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A time from ns since the epoch (negative → the epoch).
pub fn from_ns(v: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(v).unwrap_or(0))
}

/// Keyset page token: the (time, id) of the last row returned, as "<µs>.<uuid>".
pub fn page_token(t: SystemTime, id: Uuid) -> String {
    let us = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{us}.{}", id.hyphenated())
}

/// Parses [`page_token`]; "" = first page.
pub fn parse_page_token(s: &str) -> Result<Option<(SystemTime, Uuid)>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("malformed page_token");
    let (us, id) = s.split_once('.').ok_or_else(bad)?;
    if us.len() > 20 || !us.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let us: u64 = us.parse().map_err(|_| bad())?;
    let id = id::parse_uuid_strict(id).ok_or_else(bad)?;
    Ok(Some((UNIX_EPOCH + Duration::from_micros(us), id)))
}

impl Api {
    /// Entries of the caller's team (every team for a platform admin), newest first, keyset
    /// pages.
    pub fn list_audit_logs(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListAuditLogsRequest,
    ) -> Result<ctl::ListAuditLogsResponse, Status> {
        let after = parse_page_token(&req.page_token)?;
        let limit = page_size(req.page_size);
        for (name, v) in [
            ("actor_id", &req.actor_id),
            ("resource_type", &req.resource_type),
            ("resource_id", &req.resource_id),
            ("action", &req.action),
        ] {
            if v.len() > 128 {
                return Err(Status::invalid_argument(format!("{name} too long")));
            }
            crate::db::check_text(name, v)?;
        }
        let team: Option<Uuid> = if ctx.platform_admin {
            None
        } else {
            Some(ctx.team_id)
        };
        let since = (req.since_unix_ns > 0).then(|| from_ns(req.since_unix_ns));
        let until = (req.until_unix_ns > 0).then(|| from_ns(req.until_unix_ns));
        let (after_t, after_id) = match after {
            Some((t, i)) => (Some(t), Some(i)),
            None => (None, None),
        };
        let rows = self.inner.db.run(move |c| {
            c.query(
                "SELECT id, team_id, actor_type, actor_id, actor_name, resource_type, resource_id, \
                    action, status, metadata::text, created_at FROM audit_logs \
                 WHERE ($1::uuid IS NULL OR team_id = $1) \
                   AND ($2 = '' OR actor_id = $2) AND ($3 = '' OR resource_type = $3) \
                   AND ($4 = '' OR resource_id = $4) AND ($5 = '' OR action = $5) \
                   AND ($6::timestamptz IS NULL OR created_at >= $6) \
                   AND ($7::timestamptz IS NULL OR created_at < $7) \
                   AND ($8::timestamptz IS NULL OR (created_at, id) < ($8, $9::uuid)) \
                 ORDER BY created_at DESC, id DESC LIMIT $10",
                &[
                    &team,
                    &req.actor_id,
                    &req.resource_type,
                    &req.resource_id,
                    &req.action,
                    &since,
                    &until,
                    &after_t,
                    &after_id,
                    &(limit + 1),
                ],
            )
            .map_err(pg_err)
        })?;
        let (entries, next) = paginate(
            &rows,
            limit,
            |r| (r.get(10), r.get(0)),
            |r| {
                let t: SystemTime = r.get(10);
                ctl::AuditLog {
                    id: id::format(Kind::Log, r.get(0)),
                    team_id: r
                        .get::<_, Option<Uuid>>(1)
                        .map(|t| id::format(Kind::Team, t))
                        .unwrap_or_default(),
                    actor_type: r.get(2),
                    actor_id: r.get(3),
                    actor_name: r.get(4),
                    resource_type: r.get(5),
                    resource_id: r.get(6),
                    action: r.get(7),
                    status: r.get(8),
                    metadata_json: r.get(9),
                    created_unix_ns: ns(Some(t)),
                }
            },
        );
        Ok(ctl::ListAuditLogsResponse {
            entries,
            next_page_token: next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let id = uuid_v4([7; 16]);
        let tok = page_token(t, id);
        assert_eq!(parse_page_token(&tok).unwrap(), Some((t, id)));
        assert_eq!(parse_page_token("").unwrap(), None);
        for bad in [
            "x",
            "1.",
            ".abc",
            "-1.00000000-0000-0000-0000-000000000000",
            "1.ZZ",
            "99999999999999999999999.x",
        ] {
            assert!(parse_page_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uuids_are_v4() {
        let u = new_uuid().unwrap();
        assert_eq!(u.get_version_num(), 4);
    }
}

//! Sandboxes: create, list, get, destroy, ping, set timeout, pause, resume.
//!
//! Lifecycle calls change the state in PostgreSQL first (one transaction with the audit row
//! and the capacity ledger), then call the host's agent with a long deadline, then record
//! the outcome. A sandbox left in a transition by a crash or a lost agent is finished by
//! the reconciler.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use postgres::types::Type;
use postgres::GenericClient;
use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self, Kind, Uuid};
use proto::sandbox::{SandboxSpec, TemplateKind, TimeoutPolicy};
use proto::{Code, Status};

use super::audit::{self, Actor, Entry};
use super::convert::{self, SANDBOX_COLS};
use super::{page_size, paginate, parse_id, parse_opt_id, Api, AuthCtx, PLATFORM_TEAM};
use crate::db::pg_err;
use crate::limits::{
    BACKGROUND_CREATES_MAX, MAP_ENTRIES_MAX, SANDBOX_DISK_MIB_MAX, SANDBOX_MEMORY_MIB_MAX,
    SANDBOX_TIMEOUT_DEFAULT_S, SANDBOX_TIMEOUT_MAX_S, SANDBOX_VCPUS_MAX,
};
use crate::scheduler::{self, Need, State};

/// State reasons of a forced Destroy that did not reach the agent.
const FORCED_UNREACHABLE: &str = "force-destroyed: host unreachable";
const FORCED_NO_ANSWER: &str = "force-destroyed: host did not answer";

/// What an agent Create needs, kept from the insert to the call.
struct Pending {
    req: SandboxSpec,
    host: Uuid,
    id: Uuid,
}

static LIST_SQL: OnceLock<String> = OnceLock::new();
static FETCH_SQL: OnceLock<String> = OnceLock::new();
static RUNNING_SQL: OnceLock<String> = OnceLock::new();

/// A query text built once (from the column list) with a `'static` lifetime, so it can key
/// the prepared-statement cache.
fn static_sql(cell: &'static OnceLock<String>, make: impl FnOnce() -> String) -> &'static str {
    cell.get_or_init(make).as_str()
}

/// The statement that records a created sandbox as running once its agent answered (only
/// one still starting: a destroy may have raced). Parameters: sandbox id, expiry. Public so
/// the benchmark can run the same SQL bare.
///
/// Its transaction commits without waiting for the WAL flush (`synchronous_commit = off`
/// for this transaction only, set inside the statement so it costs no round trip): the
/// durable fact of a create is the reservation statement's commit (the sandbox row, its
/// host's capacity and its audit row), which is synchronous and happens before any VM
/// exists. `running` is the agent's word, which the reconciler re-reads: if PostgreSQL
/// crashes within its WAL writer's delay (3 × `wal_writer_delay`, 600 ms by default) of this
/// commit, the row comes back `starting` and the reconciler settles it from the agent's
/// list once it is older than the new-sandbox grace (`reconciler::settle_starting`). Nothing
/// is lost that the system cannot re-derive, and a create waits for one fsync, not two.
pub fn running_sql() -> String {
    format!(
        "UPDATE sandboxes s SET state = 'running', state_reason = '', updated_at = now(), \
            expires_at = $2 FROM (SELECT set_config('synchronous_commit', 'off', true)) relaxed \
            WHERE s.id = $1 AND s.state = 'starting' RETURNING {SANDBOX_COLS}"
    )
}

/// The query of Sandboxes.List (public so the benchmark can run the same SQL bare).
/// Parameters: team, all-but-stopped, states, template, metadata, after time, after id,
/// limit.
pub fn list_sql() -> String {
    format!(
        "SELECT {SANDBOX_COLS} FROM sandboxes s WHERE s.team_id = $1 \
           AND (CASE WHEN $2 THEN s.state <> 'stopped' ELSE s.state = ANY($3) END) \
           AND ($4::uuid IS NULL OR s.template_id = $4) \
           AND s.metadata @> $5 \
           AND ($6::timestamptz IS NULL OR (s.created_at, s.id) < ($6, $7::uuid)) \
         ORDER BY s.created_at DESC, s.id DESC LIMIT $8"
    )
}

/// How a create names its template: by wire ID or by name (the caller's team's first, then
/// the platform's), as [`super::templates::resolve`] does.
enum TplRef {
    Id(Uuid),
    Name(String),
}

impl TplRef {
    /// Checks `r` as `templates::resolve` would before any SQL.
    fn parse(r: &str) -> Result<TplRef, Status> {
        if r.starts_with("tpl-") {
            return Ok(TplRef::Id(parse_id(Kind::Template, r)?));
        }
        if r.len() > crate::limits::NAME_LEN_MAX {
            return Err(Status::invalid_argument("template name too long"));
        }
        crate::db::check_text("template", r)?;
        Ok(TplRef::Name(r.to_owned()))
    }
}

/// What [`insert_reserved`] inserts. A size of 0 means the template's own; a snapshot
/// template's size always wins (its memory image fixes it).
struct Insert<'a> {
    id: Uuid,
    team: Uuid,
    template: &'a TplRef,
    vcpus: i32,
    memory_mib: i32,
    disk_mib: i64,
    timeout_s: i64,
    policy: &'static str,
    metadata: &'a serde_json::Value,
    /// The create's env (a JSON object), merged over the template's.
    env: &'a serde_json::Value,
    /// Its network policy (JSON), if one was given.
    network: Option<&'a serde_json::Value>,
    traffic_token: &'a str,
    allow_public_traffic: bool,
    auto_resume: bool,
    audit_id: Uuid,
    ctx: &'a AuthCtx,
}

/// What [`insert_reserved`] placed.
struct Placed {
    /// The sandbox row ([`SANDBOX_COLS`]).
    row: postgres::Row,
    template: Uuid,
    snapshot: bool,
    size: Need,
    /// What the sandbox's processes get unless a call says otherwise: the template's user
    /// and directory, its env merged with the create's.
    defaults: Defaults,
}

/// Process defaults sent in the spec (envd applies them; a call's own values win).
struct Defaults {
    user: String,
    cwd: String,
    env: HashMap<String, String>,
}

static INSERT_BY_ID_SQL: OnceLock<String> = OnceLock::new();
static INSERT_BY_NAME_SQL: OnceLock<String> = OnceLock::new();

/// The create statement (public so the benchmark can run the same SQL bare). Parameters:
/// $1 team, $2 platform team, $3 template (id or name), $4..$6 requested vCPUs, memory,
/// disk (0: the template's), $7 sandbox id, $8 timeout, $9 policy, $10 metadata, $11 audit
/// row id, $12 key wire id, $13 key name, $14 sandbox wire id, $15 the create's env (a JSON
/// object). Columns: [`SANDBOX_COLS`] (NULL when nothing was inserted), then template id,
/// snapshot?, vCPUs, memory, disk, pinned host, disk request valid?, the template's default
/// user and directory, the env to send (the template's merged with $15, $15 winning per
/// key), merged env within [`MAP_ENTRIES_MAX`]?. No row: no such template visible to the
/// team. The sandbox row records the template's defaults (not $15: it may hold secrets).
///
/// CTEs: `t` resolves the template, `n` derives the size and the pinned host, `p` picks
/// the host with the most free memory, `h` reserves on it — re-checking the fit on the row
/// version it locks, so a concurrent create that took the capacity makes it update (and
/// insert) nothing — `s` inserts the sandbox, `a` its audit row.
pub fn create_sql(by_id: bool) -> String {
    let tpl_match = if by_id { "id = $3" } else { "name = $3" };
    format!(
        "WITH t AS ( \
            SELECT id, kind = 'snapshot' AS snap, vcpus, memory_mib, disk_mib, host_id, \
                default_user, default_cwd, env FROM templates \
            WHERE {tpl_match} AND team_id IN ($1, $2) ORDER BY (team_id = $2) LIMIT 1), \
         n AS ( \
            SELECT t.id AS tpl, t.snap, t.default_user, t.default_cwd, t.env AS tpl_env, \
                t.env || $15 AS env, \
                (SELECT count(*) FROM jsonb_object_keys(t.env || $15)) <= {MAP_ENTRIES_MAX} AS env_ok, \
                CASE WHEN t.snap OR $4 = 0 THEN t.vcpus ELSE $4 END AS vcpus, \
                CASE WHEN t.snap OR $5 = 0 THEN t.memory_mib ELSE $5 END AS memory_mib, \
                CASE WHEN t.snap OR $6 = 0 THEN t.disk_mib ELSE $6 END AS disk_mib, \
                CASE WHEN t.snap THEN t.host_id END AS pinned, \
                (t.snap OR $6 = 0 OR $6 >= t.disk_mib) AS disk_ok \
            FROM t), \
         p AS ( \
            SELECT c.id FROM hosts c, n WHERE n.disk_ok AND n.env_ok AND c.status = 'online' AND c.can_host \
                AND (n.pinned IS NULL OR c.id = n.pinned) AND c.used_vcpus + n.vcpus <= c.capacity_vcpus \
                AND c.used_memory_mib + n.memory_mib <= c.capacity_memory_mib \
                AND c.used_disk_mib + n.disk_mib <= c.capacity_disk_mib \
            ORDER BY c.capacity_memory_mib - c.used_memory_mib DESC, c.id LIMIT 1), \
         h AS ( \
            UPDATE hosts SET used_vcpus = hosts.used_vcpus + n.vcpus, \
                used_memory_mib = hosts.used_memory_mib + n.memory_mib, \
                used_disk_mib = hosts.used_disk_mib + n.disk_mib \
            FROM n, p \
            WHERE hosts.id = p.id AND hosts.status = 'online' AND hosts.can_host \
                AND hosts.used_vcpus + n.vcpus <= hosts.capacity_vcpus \
                AND hosts.used_memory_mib + n.memory_mib <= hosts.capacity_memory_mib \
                AND hosts.used_disk_mib + n.disk_mib <= hosts.capacity_disk_mib \
            RETURNING hosts.id), \
         s AS ( \
            INSERT INTO sandboxes (id, team_id, host_id, template_id, state, vcpus, memory_mib, disk_mib, \
                held_vcpus, held_memory_mib, held_disk_mib, timeout_s, on_timeout, metadata, \
                default_user, default_cwd, env, network, traffic_token, allow_public_traffic, auto_resume) \
            SELECT $7, $1, h.id, n.tpl, 'starting', n.vcpus, n.memory_mib, n.disk_mib, \
                n.vcpus, n.memory_mib, n.disk_mib, $8, $9, $10, \
                n.default_user, n.default_cwd, n.tpl_env, $16, $17, $18, $19 FROM h, n \
            RETURNING *), \
         a AS ( \
            INSERT INTO audit_logs (id, team_id, actor_type, actor_id, actor_name, resource_type, \
                resource_id, action, status, metadata) \
            SELECT $11, $1, 'api_key', $12, $13, 'sandbox', $14, 'sandbox.create', 'success', \
                jsonb_build_object('template', 'tpl-' || n.tpl::text, 'host', 'host-' || s.host_id::text, \
                    'vcpus', n.vcpus, 'memory_mib', n.memory_mib) FROM s, n) \
         SELECT {SANDBOX_COLS}, n.tpl, n.snap, n.vcpus, n.memory_mib, n.disk_mib, n.pinned, n.disk_ok, \
            n.default_user, n.default_cwd, n.env, n.env_ok \
         FROM n LEFT JOIN s ON true"
    )
}

/// Parameter types of [`create_sql`]: $3 is the template's id or its name; $16 the network
/// policy (JSON, NULL for none), $17 the traffic token, $18 whether its ports are public,
/// $19 whether a proxied request resumes it when paused.
pub fn create_types(by_id: bool) -> [Type; 19] {
    let key = if by_id { Type::UUID } else { Type::TEXT };
    [
        Type::UUID,
        Type::UUID,
        key,
        Type::INT4,
        Type::INT4,
        Type::INT8,
        Type::UUID,
        Type::INT8,
        Type::TEXT,
        Type::JSONB,
        Type::UUID,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::JSONB,
        Type::JSONB,
        Type::TEXT,
        Type::BOOL,
        Type::BOOL,
    ]
}

/// Resolves the template, reserves a host, inserts the sandbox (STARTING, holding its size)
/// and its audit row: one statement, so one round trip, and atomic without an explicit
/// transaction. When a concurrent create took the chosen host's capacity, the statement
/// inserts nothing and is retried while some host still fits.
fn insert_reserved(c: &mut postgres::Client, i: &Insert<'_>) -> Result<Placed, Status> {
    let (sql, by_id) = match i.template {
        TplRef::Id(_) => (static_sql(&INSERT_BY_ID_SQL, || create_sql(true)), true),
        TplRef::Name(_) => (static_sql(&INSERT_BY_NAME_SQL, || create_sql(false)), false),
    };
    let st = crate::db::prepared(c, sql, &create_types(by_id))?;
    let key: &(dyn postgres::types::ToSql + Sync) = match i.template {
        TplRef::Id(u) => u,
        TplRef::Name(n) => n,
    };
    let key_id = id::format(Kind::Key, i.ctx.key_id);
    let sb_id = id::format(Kind::Sandbox, i.id);
    let n = SANDBOX_COLS.split(',').count();
    let mut pinned: Option<Uuid> = None;
    for _ in 0..8 {
        let row = c
            .query_opt(
                &st,
                &[
                    &i.team,
                    &PLATFORM_TEAM,
                    key,
                    &i.vcpus,
                    &i.memory_mib,
                    &i.disk_mib,
                    &i.id,
                    &i.timeout_s,
                    &i.policy,
                    i.metadata,
                    &i.audit_id,
                    &key_id,
                    &i.ctx.key_name,
                    &sb_id,
                    i.env,
                    &i.network,
                    &i.traffic_token,
                    &i.allow_public_traffic,
                    &i.auto_resume,
                ],
            )
            .map_err(pg_err)?
            .ok_or_else(|| Status::not_found("template not found"))?;
        let size = Need {
            vcpus: row.get(n + 2),
            memory_mib: i64::from(row.get::<_, i32>(n + 3)),
            disk_mib: row.get(n + 4),
        };
        pinned = row.get(n + 5);
        if !row.get::<_, bool>(n + 6) {
            return Err(Status::invalid_argument(
                "disk_mib may only grow the template's disk",
            ));
        }
        if !row.get::<_, bool>(n + 10) {
            return Err(Status::invalid_argument(format!(
                "env: with the template's defaults more than {MAP_ENTRIES_MAX} entries"
            )));
        }
        if row.get::<_, Option<Uuid>>(0).is_some() {
            return Ok(Placed {
                template: row.get(n),
                snapshot: row.get(n + 1),
                size,
                defaults: Defaults {
                    user: row.get(n + 7),
                    cwd: row.get(n + 8),
                    env: convert::json_to_map(&row.get::<_, serde_json::Value>(n + 9)),
                },
                row,
            });
        }
        let any: bool = c
            .query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM hosts WHERE status = 'online' AND can_host \
                    AND ($4::uuid IS NULL OR id = $4) AND used_vcpus + $1 <= capacity_vcpus \
                    AND used_memory_mib + $2 <= capacity_memory_mib AND used_disk_mib + $3 <= capacity_disk_mib)",
                &[(&size.vcpus, Type::INT4), (&size.memory_mib, Type::INT8), (&size.disk_mib, Type::INT8), (&pinned, Type::UUID)],
            )
            .map_err(pg_err)?
            .get(0);
        if !any {
            break;
        }
    }
    crate::metrics::SCHEDULE_EXHAUSTED.inc();
    // When no online host can run sandboxes at all, say why in the hosts' own words (a
    // missing Firecracker, kernel or rootfs), instead of blaming capacity.
    let capable: bool = c
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM hosts WHERE status = 'online' AND can_host \
                AND ($1::uuid IS NULL OR id = $1))",
            &[(&pinned, Type::UUID)],
        )
        .map_err(pg_err)?
        .get(0);
    if !capable {
        let rows = c
            .query_typed(
                "SELECT id, problems FROM hosts WHERE status = 'online' AND NOT can_host \
                    AND ($1::uuid IS NULL OR id = $1) ORDER BY created_at LIMIT 5",
                &[(&pinned, Type::UUID)],
            )
            .map_err(pg_err)?;
        let reasons: Vec<String> = rows
            .iter()
            .map(|r| {
                let problems: serde_json::Value = r.get(1);
                let list: Vec<&str> = problems
                    .as_array()
                    .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
                    .unwrap_or_default();
                format!("{}: {}", proto::id::format_host(r.get(0)), list.join(", "))
            })
            .collect();
        if !reasons.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no host can run sandboxes: {}",
                reasons.join("; ")
            )));
        }
    }
    if pinned.is_none() {
        let (registered, online): (i64, i64) = c
            .query_typed_one(
                "SELECT count(*), count(*) FILTER (WHERE status = 'online') FROM hosts",
                &[],
            )
            .map(|r| (r.get(0), r.get(1)))
            .map_err(pg_err)?;
        if registered == 0 {
            return Err(Status::failed_precondition(
                "no host is registered: register an agent with a registration token first",
            ));
        }
        if online == 0 {
            return Err(Status::unavailable(format!(
                "no host is online ({registered} registered, all unreachable or draining)"
            )));
        }
    }
    Err(match pinned {
        Some(_) => {
            Status::resource_exhausted("the host this sandbox must run on has no free capacity")
        }
        None => Status::resource_exhausted("no host has free capacity for this sandbox"),
    })
}

/// Reads one sandbox of `team` (`not_found` for other teams' and unknown ids).
pub(crate) fn fetch(
    c: &mut impl GenericClient,
    team: Uuid,
    id: Uuid,
) -> Result<ctl::Sandbox, Status> {
    let st = crate::db::prepared(
        c,
        static_sql(&FETCH_SQL, || {
            format!("SELECT {SANDBOX_COLS} FROM sandboxes s WHERE s.id = $1 AND s.team_id = $2")
        }),
        &[Type::UUID, Type::UUID],
    )?;
    let row = c.query_opt(&st, &[&id, &team]).map_err(pg_err)?;
    row.map(|r| convert::sandbox(&r))
        .ok_or_else(|| Status::not_found("sandbox not found"))
}

/// State and host of a sandbox of `team`, locked for update.
fn lock_owned(
    c: &mut impl GenericClient,
    team: Uuid,
    id: Uuid,
) -> Result<scheduler::Locked, Status> {
    let owned = c
        .query_opt(
            "SELECT 1 FROM sandboxes WHERE id = $1 AND team_id = $2",
            &[&id, &team],
        )
        .map_err(pg_err)?;
    if owned.is_none() {
        return Err(Status::not_found("sandbox not found"));
    }
    scheduler::lock(c, id)?.ok_or_else(|| Status::not_found("sandbox not found"))
}

/// Prefix of a sandbox traffic token (recognizable in logs and secret scanners).
pub const TRAFFIC_TOKEN_PREFIX: &str = "wtt_";

/// A new traffic token: the prefix and 32 random bytes in hex.
fn new_traffic_token() -> Result<String, Status> {
    proto::random::token(TRAFFIC_TOKEN_PREFIX)
        .map_err(|e| Status::internal(format!("getrandom: {e}")))
}

/// The stored traffic token of sandbox `id` ("" when it has none).
fn traffic_token_of(c: &mut impl GenericClient, id: Uuid) -> Result<String, Status> {
    let row = c
        .query_opt("SELECT traffic_token FROM sandboxes WHERE id = $1", &[&id])
        .map_err(pg_err)?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .unwrap_or_default())
}

fn check_timeout(t: u64) -> Result<(), Status> {
    if t > SANDBOX_TIMEOUT_MAX_S {
        return Err(Status::invalid_argument(format!(
            "timeout_s must be at most {SANDBOX_TIMEOUT_MAX_S}"
        )));
    }
    Ok(())
}

fn expiry(info_ns: i64, timeout_s: u64) -> SystemTime {
    if info_ns > 0 {
        audit::from_ns(info_ns)
    } else {
        SystemTime::now() + Duration::from_secs(timeout_s)
    }
}

/// Writes a sandbox call's audit row; returns its id.
fn audit_sb(
    c: &mut impl GenericClient,
    ctx: &AuthCtx,
    id: Uuid,
    action: &str,
    metadata: serde_json::Value,
) -> Result<Uuid, Status> {
    audit::insert(
        c,
        Entry {
            team: Some(ctx.team_id),
            actor: &Actor::key(ctx),
            resource_type: "sandbox",
            resource_id: id::format(Kind::Sandbox, id),
            action,
            success: true,
            metadata,
        },
    )
}

impl Api {
    /// Create (see `create_sandbox`); `row` receives the audit row once it is committed.
    pub(super) fn create_sandbox_inner(
        &self,
        ctx: &AuthCtx,
        row: &mut Option<Uuid>,
        req: ctl::CreateSandboxRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let start = Instant::now();
        if req.vcpus > SANDBOX_VCPUS_MAX
            || req.memory_mib > SANDBOX_MEMORY_MIB_MAX
            || req.disk_mib > SANDBOX_DISK_MIB_MAX
        {
            return Err(Status::invalid_argument(
                "vcpus, memory_mib or disk_mib out of range",
            ));
        }
        check_timeout(req.timeout_s)?;
        let mut spec = convert::spec_from_create(&req);
        let policy = TimeoutPolicy::from_wire(spec.on_timeout)?.unwrap_or(TimeoutPolicy::Destroy);
        spec.on_timeout = policy as i32;
        let metadata = convert::check_map("metadata", &spec.metadata)?;
        let env = convert::check_map("env", &spec.env)?;
        convert::check_network(req.network.as_ref())?;
        let network = req.network.as_ref().map(convert::network_json);
        let network_out = req.network.clone();
        let traffic_token = new_traffic_token()?;
        let token_out = traffic_token.clone();
        let public = req.allow_public_traffic;
        if spec.timeout_s == 0 {
            spec.timeout_s = SANDBOX_TIMEOUT_DEFAULT_S;
        }
        let wait = req.wait.unwrap_or(true);
        if !wait && self.inner.background_creates.load(Ordering::Relaxed) >= BACKGROUND_CREATES_MAX
        {
            return Err(Status::resource_exhausted(
                "too many creates finishing in the background",
            ));
        }
        let id = audit::new_uuid()?;
        let team = ctx.team_id;
        let ctx2 = ctx.clone();
        let tpl_ref = if req.template.is_empty() {
            "minimal".to_owned()
        } else {
            req.template.clone()
        };
        let audit_id = audit::new_uuid()?;
        let tpl_ref = TplRef::parse(&tpl_ref)?;
        let (sb, pending) = self.inner.db.run(move |c| {
            let placed = insert_reserved(
                c,
                &Insert {
                    id,
                    team,
                    template: &tpl_ref,
                    // Lossless: bounded by the SANDBOX_*_MAX check above.
                    vcpus: spec.vcpus as i32,
                    memory_mib: spec.memory_mib as i32,
                    disk_mib: spec.disk_mib as i64,
                    timeout_s: spec.timeout_s as i64,
                    policy: policy.name(),
                    metadata: &metadata,
                    env: &env,
                    network: network.as_ref(),
                    traffic_token: &traffic_token,
                    allow_public_traffic: public,
                    auto_resume: req.auto_resume,
                    audit_id,
                    ctx: &ctx2,
                },
            )?;
            let (row, snapshot, size) = (&placed.row, placed.snapshot, placed.size);
            let mut sb = convert::sandbox(row);
            sb.network = network_out;
            sb.traffic_token = traffic_token;
            let host: Uuid = row.get(2);
            // The spec as placed: ids, the template's kind and the size it reserved.
            let areq = SandboxSpec {
                sandbox_id: id::format(Kind::Sandbox, id),
                team_id: id::format(Kind::Team, team),
                template_id: id::format(Kind::Template, placed.template),
                template_kind: if snapshot {
                    TemplateKind::Snapshot as i32
                } else {
                    TemplateKind::Base as i32
                },
                vcpus: size.vcpus as u32,
                memory_mib: size.memory_mib as u32,
                disk_mib: size.disk_mib as u64,
                env: placed.defaults.env.clone(),
                default_user: placed.defaults.user.clone(),
                default_cwd: placed.defaults.cwd.clone(),
                ..spec
            };
            Ok((
                sb,
                Pending {
                    req: areq,
                    host,
                    id,
                },
            ))
        })?;
        // The create's audit row (written with the insert) now exists: a failure from here
        // on marks it.
        *row = Some(audit_id);
        crate::metrics::SANDBOXES_CREATED.inc();
        if !wait {
            let api = self.clone();
            let ctx_bg = ctx.clone();
            self.inner
                .background_creates
                .fetch_add(1, Ordering::Relaxed);
            crate::metrics::BACKGROUND_CREATES.add(1);
            let spawned = std::thread::Builder::new()
                .name("ctl-create".into())
                .spawn(move || {
                    if let Err(e) = api.finish_create(team, pending) {
                        api.record_failure(
                            &ctx_bg,
                            "sandbox",
                            String::new(),
                            "sandbox.create",
                            Some(audit_id),
                            &e,
                        );
                    }
                    api.inner.background_creates.fetch_sub(1, Ordering::Relaxed);
                    crate::metrics::BACKGROUND_CREATES.add(-1);
                });
            if let Err(e) = spawned {
                self.inner
                    .background_creates
                    .fetch_sub(1, Ordering::Relaxed);
                crate::metrics::BACKGROUND_CREATES.add(-1);
                let _ = self.fail_sandbox(id, "could not start the create");
                return Err(Status::internal(format!("spawn create thread: {e}")));
            }
            return Ok(sb);
        }
        // Create answers the token to its caller (the team), like Get.
        let r = self.finish_create(team, pending).map(|mut s| {
            s.traffic_token = token_out;
            s
        });
        crate::metrics::SANDBOX_CREATE_SECONDS.observe(start.elapsed());
        r
    }

    /// Calls the agent's Create and records the outcome.
    fn finish_create(&self, team: Uuid, p: Pending) -> Result<ctl::Sandbox, Status> {
        let r: Result<agent::SandboxInfo, Status> = self.inner.agents.unary_timeout(
            p.host,
            agent::sandboxes_methods::CREATE,
            &p.req,
            self.inner.cfg.agent_lifecycle_timeout,
        );
        let id = p.id;
        match r {
            Ok(info) => {
                let exp = expiry(info.expires_unix_ns, p.req.timeout_s);
                // STARTING and RUNNING hold the same resources, so no ledger change: one
                // statement. Only a sandbox still starting becomes running (a destroy may
                // have raced us).
                self.inner.db.run(move |c| {
                    let st = crate::db::prepared(
                        c,
                        static_sql(&RUNNING_SQL, running_sql),
                        &[Type::UUID, Type::TIMESTAMPTZ],
                    )?;
                    let row = c.query_opt(&st, &[&id, &exp]).map_err(pg_err)?;
                    match row {
                        Some(r) => Ok(convert::sandbox(&r)),
                        None => fetch(c, team, id),
                    }
                })
            }
            Err(e) => {
                log::warn!(
                    "sandbox create failed sandbox={} code={} message={}",
                    id::format(Kind::Sandbox, id),
                    e.code,
                    e.message
                );
                let _ = self.fail_sandbox(id, &format!("create failed: {}", e.message));
                Err(e)
            }
        }
    }

    fn fail_sandbox(&self, id: Uuid, reason: &str) -> Result<(), Status> {
        let reason = reason.to_owned();
        let r = self.inner.db.tx(move |tx| {
            let cur =
                scheduler::lock(tx, id)?.ok_or_else(|| Status::not_found("sandbox not found"))?;
            if cur.state != State::Stopped {
                scheduler::set_state(tx, id, State::Error, &reason, Some(None))?;
            }
            Ok(())
        });
        // Committed: the proxy's copy of its traffic row goes at once on this replica (the
        // others hear the trigger's NOTIFY).
        self.inner.traffic.forget(id);
        r
    }

    /// The caller's team's sandboxes, newest first (keyset pages).
    pub fn list_sandboxes(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListSandboxesRequest,
    ) -> Result<ctl::ListSandboxesResponse, Status> {
        let mut states = Vec::with_capacity(req.states.len());
        for s in &req.states {
            let st = State::from_wire(*s)
                .ok_or_else(|| Status::invalid_argument(format!("unknown state {s}")))?;
            states.push(st.name().to_owned());
        }
        let all_but_stopped = states.is_empty();
        let template = parse_opt_id(Kind::Template, &req.template_id)?;
        let meta = convert::check_map("metadata", &req.metadata)?;
        let after = audit::parse_page_token(&req.page_token)?;
        let (after_t, after_id) = (after.map(|a| a.0), after.map(|a| a.1));
        let limit = page_size(req.page_size);
        let team = ctx.team_id;
        let rows = self.inner.db.run(move |c| {
            let st = crate::db::prepared(
                c,
                static_sql(&LIST_SQL, list_sql),
                &[
                    Type::UUID,
                    Type::BOOL,
                    Type::TEXT_ARRAY,
                    Type::UUID,
                    Type::JSONB,
                    Type::TIMESTAMPTZ,
                    Type::UUID,
                    Type::INT8,
                ],
            )?;
            c.query(
                &st,
                &[
                    &team,
                    &all_but_stopped,
                    &states,
                    &template,
                    &meta,
                    &after_t,
                    &after_id,
                    &(limit + 1),
                ],
            )
            .map_err(pg_err)
        })?;
        let (sandboxes, next_page_token) =
            paginate(&rows, limit, |r| (r.get(12), r.get(0)), convert::sandbox);
        Ok(ctl::ListSandboxesResponse {
            sandboxes,
            next_page_token,
        })
    }

    /// One sandbox of the caller's team.
    pub fn get_sandbox(
        &self,
        ctx: &AuthCtx,
        req: ctl::GetSandboxRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let id = parse_id(Kind::Sandbox, &req.sandbox_id)?;
        let team = ctx.team_id;
        self.inner.db.run(move |c| {
            let mut sb = fetch(c, team, id)?;
            sb.traffic_token = traffic_token_of(c, id)?;
            Ok(sb)
        })
    }

    /// Replaces a sandbox's traffic token (any state but stopped): the old one stops
    /// working at the next proxied request, which reads the stored token.
    pub(super) fn rotate_traffic_token_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::RotateTrafficTokenRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let id = parse_id(Kind::Sandbox, &req.sandbox_id)?;
        let token = new_traffic_token()?;
        let team = ctx.team_id;
        let ctx = ctx.clone();
        let r = self.inner.db.tx(move |tx| {
            let n = tx
                .execute(
                    "UPDATE sandboxes SET traffic_token = $3, updated_at = now() \
                     WHERE id = $1 AND team_id = $2 AND state <> 'stopped'",
                    &[&id, &team, &token],
                )
                .map_err(pg_err)?;
            if n == 0 {
                // Unknown, another team's, or stopped: the first two look the same.
                let sb = fetch(tx, team, id)?;
                return Err(Status::failed_precondition(format!(
                    "sandbox is {}: its token cannot change",
                    State::from_wire(sb.state).map_or("stopped", |s| s.name())
                )));
            }
            audit_sb(
                tx,
                &ctx,
                id,
                "sandbox.rotate_traffic_token",
                serde_json::json!({}),
            )?;
            let mut sb = fetch(tx, team, id)?;
            sb.traffic_token = token;
            Ok(sb)
        });
        self.inner.traffic.forget(id);
        r
    }

    /// Destroys a sandbox (idempotent for one already stopped).
    pub(super) fn destroy_sandbox_inner(
        &self,
        ctx: &AuthCtx,
        row: &mut Option<Uuid>,
        req: ctl::DestroySandboxRequest,
    ) -> Result<ctl::DestroySandboxResponse, Status> {
        let id = parse_id(Kind::Sandbox, &req.sandbox_id)?;
        let team = ctx.team_id;
        let ctx2 = ctx.clone();
        let force = req.force;
        let destroyed = self.inner.db.tx(move |tx| {
            let cur = lock_owned(tx, team, id)?;
            if cur.state == State::Stopped {
                return Ok((None, None));
            }
            let unreachable = match cur.host {
                Some(h) => tx
                    .query_opt("SELECT status FROM hosts WHERE id = $1", &[&h])
                    .map_err(pg_err)?
                    .is_none_or(|r| r.get::<_, &str>(0) == "unreachable"),
                None => false,
            };
            let a = audit_sb(
                tx,
                &ctx2,
                id,
                "sandbox.destroy",
                serde_json::json!({"from": cur.state.name(), "force": force}),
            )?;
            match cur.host {
                None => {
                    scheduler::set_state(tx, id, State::Stopped, "destroyed", Some(None))?;
                    Ok((None, Some(a)))
                }
                Some(_) if force && unreachable => {
                    // Nobody to ask: recorded stopped now; the reconciler destroys it on the
                    // host if the host comes back (a stopped sandbox still there).
                    scheduler::set_state(tx, id, State::Stopped, FORCED_UNREACHABLE, Some(None))?;
                    Ok((None, Some(a)))
                }
                Some(h) => {
                    scheduler::set_state(tx, id, State::Stopping, "destroy requested", Some(None))?;
                    Ok((Some(h), Some(a)))
                }
            }
        });
        self.inner.traffic.forget(id);
        let (host, audit_row) = destroyed?;
        *row = audit_row;
        if let Some(host) = host {
            match self.agent_destroy(host, id) {
                Ok(()) => {}
                Err(e) if force && matches!(e.code, Code::Unavailable | Code::DeadlineExceeded) => {
                    log::warn!(
                        "force-destroy without the agent sandbox={} host={} agent_error={}",
                        id::format(Kind::Sandbox, id),
                        id::format(Kind::Host, host),
                        e.message
                    );
                    self.inner.db.tx(move |tx| {
                        scheduler::set_state(tx, id, State::Stopped, FORCED_NO_ANSWER, Some(None))
                            .map(|_| ())
                    })?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(ctl::DestroySandboxResponse {})
    }

    /// Asks the agent to destroy `id` and records STOPPED (an unknown sandbox on the agent
    /// counts as destroyed). Used by Destroy and the reconciler.
    pub(crate) fn agent_destroy(&self, host: Uuid, id: Uuid) -> Result<(), Status> {
        let r: Result<agent::DestroySandboxResponse, Status> = self.inner.agents.unary_timeout(
            host,
            agent::sandboxes_methods::DESTROY,
            &agent::DestroySandboxRequest {
                sandbox_id: id::format(Kind::Sandbox, id),
            },
            self.inner.cfg.agent_lifecycle_timeout,
        );
        match r {
            // The agent keeps the destroyed VM's samples a while: store them (usage.rs).
            Ok(_) => self.store_samples_logged(host, id),
            Err(e) if e.code == Code::NotFound => {}
            Err(e) => return Err(e),
        }
        self.inner.db.tx(move |tx| {
            scheduler::set_state(tx, id, State::Stopped, "destroyed", Some(None))?;
            Ok(())
        })
    }

    /// Keeps a running sandbox alive: expiry becomes now + its timeout.
    pub(super) fn ping_sandbox_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::PingSandboxRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let id = parse_id(Kind::Sandbox, &req.sandbox_id)?;
        let host = self.running_host(ctx, id)?;
        let info: agent::SandboxInfo = self.inner.agents.unary(
            host,
            agent::sandboxes_methods::PING,
            &agent::PingSandboxRequest {
                sandbox_id: req.sandbox_id.clone(),
            },
        )?;
        let team = ctx.team_id;
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            let t: i64 = tx
                .query_one("SELECT timeout_s FROM sandboxes WHERE id = $1", &[&id])
                .map_err(pg_err)?
                .get(0);
            let exp = expiry(info.expires_unix_ns, t as u64);
            tx.execute(
                "UPDATE sandboxes SET expires_at = $2, updated_at = now() WHERE id = $1",
                &[&id, &exp],
            )
            .map_err(pg_err)?;
            audit_sb(tx, &ctx2, id, "sandbox.ping", serde_json::json!({}))?;
            fetch(tx, team, id)
        })
    }

    /// Changes the timeout (and optionally the policy).
    pub(super) fn set_sandbox_timeout_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::SetTimeoutRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let id = parse_id(Kind::Sandbox, &req.sandbox_id)?;
        if req.timeout_s == 0 {
            return Err(Status::invalid_argument("timeout_s must be > 0"));
        }
        check_timeout(req.timeout_s)?;
        let policy = TimeoutPolicy::from_wire(req.on_timeout)?.map(TimeoutPolicy::name);
        let team = ctx.team_id;
        let cur = self.inner.db.run(move |c| fetch(c, team, id))?;
        let running = cur.state == State::Running as i32;
        let mut exp = None;
        if running {
            let host = parse_id(Kind::Host, &cur.host_id)?;
            let info: agent::SandboxInfo = self.inner.agents.unary(
                host,
                agent::sandboxes_methods::SET_TIMEOUT,
                &agent::SetTimeoutRequest {
                    sandbox_id: req.sandbox_id.clone(),
                    timeout_s: req.timeout_s,
                    on_timeout: req.on_timeout,
                },
            )?;
            exp = Some(expiry(info.expires_unix_ns, req.timeout_s));
        } else if cur.state == State::Stopped as i32 || cur.state == State::Error as i32 {
            return Err(Status::failed_precondition(
                "sandbox is not running or paused",
            ));
        }
        let ctx2 = ctx.clone();
        let timeout = req.timeout_s as i64;
        self.inner.db.tx(move |tx| {
            tx.execute(
                "UPDATE sandboxes SET timeout_s = $2, on_timeout = COALESCE($3, on_timeout), \
                    expires_at = COALESCE($4, expires_at), updated_at = now() WHERE id = $1",
                &[&id, &timeout, &policy, &exp],
            )
            .map_err(pg_err)?;
            audit_sb(
                tx,
                &ctx2,
                id,
                "sandbox.set_timeout",
                serde_json::json!({"timeout_s": timeout, "on_timeout": policy}),
            )?;
            fetch(tx, team, id)
        })
    }

    /// Replaces a running or paused sandbox's network policy: checked here, applied by its
    /// agent (at once when running, at resume when paused), then stored with its audit row.
    pub(super) fn update_network_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::UpdateNetworkRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let id = parse_id(Kind::Sandbox, &req.sandbox_id)?;
        convert::check_network(req.network.as_ref())?;
        let team = ctx.team_id;
        let cur = self.inner.db.run(move |c| fetch(c, team, id))?;
        if cur.state != State::Running as i32 && cur.state != State::Paused as i32 {
            let state = State::try_from(cur.state)
                .map(State::name)
                .unwrap_or("unknown");
            return Err(Status::failed_precondition(format!(
                "sandbox is {state}: the network policy changes on running or paused sandboxes"
            )));
        }
        let host = parse_id(Kind::Host, &cur.host_id)?;
        let _: agent::SandboxInfo = self.inner.agents.unary(
            host,
            agent::sandboxes_methods::UPDATE_NETWORK,
            &agent::UpdateNetworkRequest {
                sandbox_id: id::format(Kind::Sandbox, id),
                network: req.network.as_ref().map(convert::network_to_shared),
            },
        )?;
        let ctx2 = ctx.clone();
        let stored = req.network.as_ref().map(convert::network_json);
        self.inner.db.tx(move |tx| {
            tx.execute(
                "UPDATE sandboxes SET network = $2, updated_at = now() WHERE id = $1",
                &[&id, &stored],
            )
            .map_err(pg_err)?;
            audit_sb(
                tx,
                &ctx2,
                id,
                "sandbox.update_network",
                serde_json::json!({ "network": stored }),
            )?;
            fetch(tx, team, id)
        })
    }

    /// Pauses a running sandbox; answers PAUSED.
    pub(super) fn pause_sandbox_inner(
        &self,
        ctx: &AuthCtx,
        row: &mut Option<Uuid>,
        req: ctl::PauseSandboxRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let id = parse_id(Kind::Sandbox, &req.sandbox_id)?;
        let paused = self.transition(
            ctx,
            row,
            id,
            State::Running,
            State::Pausing,
            "sandbox.pause",
            |api, host| {
                api.inner.agents.unary_timeout(
                    host,
                    agent::sandboxes_methods::PAUSE,
                    &agent::PauseSandboxRequest {
                        sandbox_id: id::format(Kind::Sandbox, id),
                    },
                    api.inner.cfg.agent_lifecycle_timeout,
                )
            },
        )?;
        // The agent froze the VM's samples: store them (usage.rs).
        if let Ok(host) = parse_id(Kind::Host, &paused.host_id) {
            self.store_samples_logged(host, id);
        }
        Ok(paused)
    }

    /// Resumes a paused sandbox on its own host; answers RUNNING.
    pub(super) fn resume_sandbox_inner(
        &self,
        ctx: &AuthCtx,
        row: &mut Option<Uuid>,
        req: ctl::ResumeSandboxRequest,
    ) -> Result<ctl::Sandbox, Status> {
        let id = parse_id(Kind::Sandbox, &req.sandbox_id)?;
        check_timeout(req.timeout_s)?;
        // The agent is always told the timeout ctl holds (it may have been changed with
        // SetTimeout while the sandbox was paused, which only the database saw).
        let team = ctx.team_id;
        let req_t = req.timeout_s as i64;
        let timeout_s = self.inner.db.run(move |c| {
            let row = c
                .query_opt(
                    "UPDATE sandboxes SET timeout_s = CASE WHEN $3::bigint > 0 AND state = 'paused' \
                        THEN $3 ELSE timeout_s END WHERE id = $1 AND team_id = $2 RETURNING timeout_s",
                    &[&id, &team, &req_t],
                )
                .map_err(pg_err)?
                .ok_or_else(|| Status::not_found("sandbox not found"))?;
            Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(1))
        })?;
        self.transition(
            ctx,
            row,
            id,
            State::Paused,
            State::Resuming,
            "sandbox.resume",
            move |api, host| {
                api.inner.agents.unary_timeout(
                    host,
                    agent::sandboxes_methods::RESUME,
                    &agent::ResumeSandboxRequest {
                        sandbox_id: id::format(Kind::Sandbox, id),
                        timeout_s,
                    },
                    api.inner.cfg.agent_lifecycle_timeout,
                )
            },
        )
    }

    /// from → via (audited) → agent call → the state the agent reports.
    #[allow(clippy::too_many_arguments)] // each is one fact of the transition
    fn transition(
        &self,
        ctx: &AuthCtx,
        row: &mut Option<Uuid>,
        id: Uuid,
        from: State,
        via: State,
        action: &'static str,
        call: impl FnOnce(&Api, Uuid) -> Result<agent::SandboxInfo, Status>,
    ) -> Result<ctl::Sandbox, Status> {
        let team = ctx.team_id;
        let ctx2 = ctx.clone();
        let moved = self.inner.db.tx(move |tx| {
            let cur = lock_owned(tx, team, id)?;
            if cur.state != from {
                return Err(Status::failed_precondition(format!(
                    "sandbox is {}, not {}",
                    cur.state.name(),
                    from.name()
                )));
            }
            let host = cur
                .host
                .ok_or_else(|| Status::internal("sandbox has no host"))?;
            scheduler::set_state(tx, id, via, "", None)?;
            let a = audit_sb(tx, &ctx2, id, action, serde_json::json!({}))?;
            Ok((host, a))
        });
        self.inner.traffic.forget(id);
        let host = moved?;
        let (host, a) = host;
        *row = Some(a);
        match call(self, host) {
            Ok(info) => self.apply_agent_state(team, id, &info),
            Err(e) => {
                // Take the agent's word for where the sandbox is now; without it go back.
                let back = self.inner.agents.unary::<_, agent::SandboxInfo>(
                    host,
                    agent::sandboxes_methods::GET,
                    &agent::GetSandboxRequest {
                        sandbox_id: id::format(Kind::Sandbox, id),
                    },
                );
                match back {
                    Ok(info) => {
                        let _ = self.apply_agent_state(team, id, &info);
                    }
                    Err(_) => {
                        let _ = self
                            .inner
                            .db
                            .tx(move |tx| scheduler::set_state(tx, id, from, "", None).map(|_| ()));
                    }
                }
                Err(e)
            }
        }
    }

    /// Records the state an agent reported (after a lifecycle call).
    pub(crate) fn apply_agent_state(
        &self,
        team: Uuid,
        id: Uuid,
        info: &agent::SandboxInfo,
    ) -> Result<ctl::Sandbox, Status> {
        let state = State::from_wire(info.state)
            .ok_or_else(|| Status::internal("agent sent an unknown state"))?;
        let exp =
            (state == State::Running).then(|| expiry(info.expires_unix_ns, info.timeout_s.max(1)));
        let reason = info.state_reason.clone();
        self.inner.db.tx(move |tx| {
            scheduler::set_state(tx, id, state, &reason, Some(exp))?;
            fetch(tx, team, id)
        })
    }

    /// The host of a RUNNING sandbox of the caller's team (`failed_precondition` otherwise).
    pub(crate) fn running_host(&self, ctx: &AuthCtx, id: Uuid) -> Result<Uuid, Status> {
        let team = ctx.team_id;
        let row = self.inner.db.run(move |c| {
            c.query_opt(
                "SELECT state, host_id FROM sandboxes WHERE id = $1 AND team_id = $2",
                &[&id, &team],
            )
            .map_err(pg_err)
        })?;
        let row = row.ok_or_else(|| Status::not_found("sandbox not found"))?;
        let state: String = row.get(0);
        if state != "running" {
            return Err(Status::failed_precondition(format!(
                "sandbox is {state}, not running"
            )));
        }
        row.get::<_, Option<Uuid>>(1)
            .ok_or_else(|| Status::internal("running sandbox has no host"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_refs_are_checked_before_any_sql() {
        let u = Uuid::from_u128(7);
        assert!(
            matches!(TplRef::parse(&id::format(Kind::Template, u)), Ok(TplRef::Id(x)) if x == u)
        );
        assert!(matches!(TplRef::parse("minimal"), Ok(TplRef::Name(n)) if n == "minimal"));
        for bad in [
            "tpl-BAD",
            "tpl-",
            "tpl-00000000-0000-0000-0000-00000000000Z",
        ] {
            let e = TplRef::parse(bad).err().map(|s| s.code);
            assert_eq!(e, Some(Code::InvalidArgument), "{bad}");
        }
        let long = "x".repeat(crate::limits::NAME_LEN_MAX + 1);
        assert_eq!(
            TplRef::parse(&long).err().map(|s| s.code),
            Some(Code::InvalidArgument)
        );
        assert!(TplRef::parse(&long[1..]).is_ok());
    }

    #[test]
    fn create_statement_shape() {
        for by_id in [true, false] {
            let sql = create_sql(by_id);
            // The row starts with the sandbox columns convert::sandbox reads by position.
            assert!(sql.contains(&format!("SELECT {SANDBOX_COLS}, n.tpl")));
            assert!(sql.contains(if by_id {
                "WHERE id = $3"
            } else {
                "WHERE name = $3"
            }));
            // Every parameter is used, none beyond the 19 declared.
            let n = create_types(by_id).len();
            assert_eq!(n, 19);
            for p in 1..=n {
                assert!(sql.contains(&format!("${p}")), "${p} unused");
            }
            assert!(!sql.contains(&format!("${}", n + 1)));
        }
        assert_eq!(SANDBOX_COLS.split(',').count(), 18);
    }
}

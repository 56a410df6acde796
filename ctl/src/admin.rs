//! `wrenn-ctl admin ...`: work done directly on the database (no server needed).

use std::fmt;

use postgres::{Client, NoTls};
use proto::id::{self, Kind};
use proto::Status;

use crate::migrate::{self, MigrateError};
use crate::service::{self, Actor, PLATFORM_TEAM};

/// Why an admin command failed.
#[derive(Debug)]
pub enum AdminError {
    Connect { source: postgres::Error },
    Migrate(MigrateError),
    Sql { source: postgres::Error },
    Call(Status),
    AlreadyInitialized,
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::Connect { .. } => f.write_str("connect to the database"),
            AdminError::Migrate(e) => write!(f, "{e}"),
            AdminError::Sql { .. } => f.write_str("database query"),
            AdminError::Call(s) => write!(f, "{}: {}", s.code, s.message),
            AdminError::AlreadyInitialized => f.write_str(
                "already initialized (a platform-admin key exists); add teams with \
                 `wrenn-ctl admin create-team` or Teams/Create with the platform-admin key",
            ),
        }
    }
}

impl std::error::Error for AdminError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AdminError::Connect { source } | AdminError::Sql { source } => Some(source),
            AdminError::Migrate(e) => std::error::Error::source(e),
            _ => None,
        }
    }
}

/// Connects and applies pending migrations.
pub fn connect(url: &str) -> Result<Client, AdminError> {
    let mut pg: postgres::Config = url
        .parse()
        .map_err(|source| AdminError::Connect { source })?;
    pg.connect_timeout(crate::limits::DB_CONNECT_TIMEOUT);
    let mut c = pg
        .connect(NoTls)
        .map_err(|source| AdminError::Connect { source })?;
    migrate::run(&mut c).map_err(AdminError::Migrate)?;
    Ok(c)
}

/// `admin migrate`: applies pending migrations; returns the versions applied.
pub fn migrate(url: &str) -> Result<Vec<i32>, AdminError> {
    let mut pg: postgres::Config = url
        .parse()
        .map_err(|source| AdminError::Connect { source })?;
    pg.connect_timeout(crate::limits::DB_CONNECT_TIMEOUT);
    let mut c = pg
        .connect(NoTls)
        .map_err(|source| AdminError::Connect { source })?;
    migrate::run(&mut c).map_err(AdminError::Migrate)
}

/// What `admin init` made (the plaintexts are shown once).
#[derive(Debug, Clone)]
pub struct Init {
    pub team_id: String,
    pub user_id: String,
    pub team_key_id: String,
    pub team_key: String,
    pub admin_key_id: String,
    pub admin_key: String,
}

/// `admin init`: the first team, its owner, a team key and a platform-admin key.
pub fn init(url: &str, team: &str, email: &str, name: &str) -> Result<Init, AdminError> {
    let mut c = connect(url)?;
    let mut tx = c
        .transaction()
        .map_err(|source| AdminError::Sql { source })?;
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM api_keys WHERE platform_admin AND revoked_at IS NULL)",
            &[],
        )
        .map_err(|source| AdminError::Sql { source })?
        .get(0);
    if exists {
        return Err(AdminError::AlreadyInitialized);
    }
    let (team_id, user_id, key_id, key) =
        service::create_team_with_owner(&mut tx, team, email, name).map_err(AdminError::Call)?;
    let (admin_id, admin_key) =
        service::insert_key(&mut tx, PLATFORM_TEAM, "platform-admin", None, true)
            .map_err(AdminError::Call)?;
    service::audit_write(
        &mut tx,
        service::audit_entry(
            Some(PLATFORM_TEAM),
            &Actor::System,
            "api_key",
            id::format(Kind::Key, admin_id),
            "api_key.create",
            serde_json::json!({"platform_admin": true, "by": "wrenn-ctl admin init"}),
        ),
    )
    .map_err(AdminError::Call)?;
    tx.commit().map_err(|source| AdminError::Sql { source })?;
    Ok(Init {
        team_id: id::format(Kind::Team, team_id),
        user_id: id::format(Kind::User, user_id),
        team_key_id: id::format(Kind::Key, key_id),
        team_key: key,
        admin_key_id: id::format(Kind::Key, admin_id),
        admin_key,
    })
}

/// What `admin create-team` made (the key's plaintext is shown once).
#[derive(Debug, Clone)]
pub struct NewTeam {
    pub team_id: String,
    pub user_id: String,
    pub key_id: String,
    pub key: String,
}

/// `admin create-team`: another team with its owner and a first key (as Teams/Create).
pub fn create_team(url: &str, team: &str, email: &str, name: &str) -> Result<NewTeam, AdminError> {
    let mut c = connect(url)?;
    let mut tx = c
        .transaction()
        .map_err(|source| AdminError::Sql { source })?;
    let (team_id, user_id, key_id, key) =
        service::create_team_with_owner(&mut tx, team, email, name).map_err(AdminError::Call)?;
    tx.commit().map_err(|source| AdminError::Sql { source })?;
    Ok(NewTeam {
        team_id: id::format(Kind::Team, team_id),
        user_id: id::format(Kind::User, user_id),
        key_id: id::format(Kind::Key, key_id),
        key,
    })
}

/// `admin create-registration-token`: a one-time token for an agent; (token, expiry ns).
pub fn create_registration_token(url: &str, ttl_s: u64) -> Result<(String, i64), AdminError> {
    let mut c = connect(url)?;
    let mut tx = c
        .transaction()
        .map_err(|source| AdminError::Sql { source })?;
    let (tok, exp) =
        service::insert_registration_token(&mut tx, ttl_s, None).map_err(AdminError::Call)?;
    service::audit_write(
        &mut tx,
        service::audit_entry(
            None,
            &Actor::System,
            "host",
            String::new(),
            "host.create_registration_token",
            serde_json::json!({"ttl_s": ttl_s, "by": "wrenn-ctl admin"}),
        ),
    )
    .map_err(AdminError::Call)?;
    tx.commit().map_err(|source| AdminError::Sql { source })?;
    Ok((tok, crate::service::audit_ns(Some(exp))))
}

/// `admin revoke-host --host HOST_ID`: revokes the host's certificates (current and the one a
/// renewal replaced) on every replica at once; its open connections close and its hellos
/// are refused until it is deleted and registered again. Returns the serials revoked.
pub fn revoke_host(url: &str, host_id: &str) -> Result<usize, AdminError> {
    let h = id::parse(Kind::Host, host_id)
        .map_err(|e| AdminError::Call(Status::invalid_argument(e.to_string())))?;
    let mut c = connect(url)?;
    let mut tx = c
        .transaction()
        .map_err(|source| AdminError::Sql { source })?;
    let exists = tx
        .query_opt("SELECT 1 FROM hosts WHERE id = $1 FOR UPDATE", &[&h])
        .map_err(|source| AdminError::Sql { source })?
        .is_some();
    if !exists {
        return Err(AdminError::Call(Status::not_found("host not found")));
    }
    let serials = crate::revocation::revoke_host_certs(&mut tx, h).map_err(AdminError::Call)?;
    service::audit_write(
        &mut tx,
        service::audit_entry(
            None,
            &Actor::System,
            "host",
            id::format(Kind::Host, h),
            "host.revoke_certificate",
            serde_json::json!({"serials": serials.len(), "by": "wrenn-ctl admin"}),
        ),
    )
    .map_err(AdminError::Call)?;
    tx.commit().map_err(|source| AdminError::Sql { source })?;
    Ok(serials.len())
}

/// What `admin adopt-template` records: a snapshot template whose files an agent already
/// has (made by that agent outside this database: an earlier deployment, a test's cached
/// template), with the sizes of its `template.conf`.
#[derive(Clone, Debug)]
pub struct AdoptTemplate<'a> {
    /// The host holding the files, "host-...".
    pub host_id: &'a str,
    /// The agent's template id, "tpl-...".
    pub template_id: &'a str,
    /// The platform template's name.
    pub name: &'a str,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
}

/// `admin adopt-template`: records an existing snapshot template of a registered host as a
/// platform template (visible to every team, like `minimal`). ctl cannot see the files: the
/// operator vouches for them (a create from a template the host lacks fails with the
/// agent's NOT_FOUND). Refuses an unknown host, a taken name or id, and sizes beyond the
/// sandbox bounds.
pub fn adopt_template(url: &str, t: &AdoptTemplate<'_>) -> Result<(), AdminError> {
    let bad = |m: String| AdminError::Call(Status::invalid_argument(m));
    let host = id::parse(Kind::Host, t.host_id).map_err(|e| bad(e.to_string()))?;
    let tpl = id::parse(Kind::Template, t.template_id).map_err(|e| bad(e.to_string()))?;
    service::check_template_name(t.name).map_err(AdminError::Call)?;
    if !(1..=proto::sandbox_limits::VCPUS_MAX).contains(&t.vcpus) {
        return Err(bad(format!("--vcpus {} is out of range", t.vcpus)));
    }
    if !(1..=proto::sandbox_limits::MEMORY_MIB_MAX).contains(&t.memory_mib) {
        return Err(bad(format!(
            "--memory-mib {} is out of range",
            t.memory_mib
        )));
    }
    if !(1..=proto::sandbox_limits::DISK_MIB_MAX).contains(&t.disk_mib) {
        return Err(bad(format!("--disk-mib {} is out of range", t.disk_mib)));
    }
    let mut c = connect(url)?;
    let mut tx = c
        .transaction()
        .map_err(|source| AdminError::Sql { source })?;
    let exists = tx
        .query_opt("SELECT 1 FROM hosts WHERE id = $1", &[&host])
        .map_err(|source| AdminError::Sql { source })?
        .is_some();
    if !exists {
        return Err(AdminError::Call(Status::not_found("host not found")));
    }
    let taken = tx
        .query_opt(
            "SELECT 1 FROM templates WHERE id = $1 OR (team_id = $2 AND name = $3)",
            &[&tpl, &PLATFORM_TEAM, &t.name],
        )
        .map_err(|source| AdminError::Sql { source })?
        .is_some();
    if taken {
        return Err(AdminError::Call(Status::already_exists(
            "a template with this id or name exists",
        )));
    }
    tx.execute(
        "INSERT INTO templates (id, team_id, name, kind, vcpus, memory_mib, disk_mib, host_id) \
         VALUES ($1, $2, $3, 'snapshot', $4, $5, $6, $7)",
        &[
            &tpl,
            &PLATFORM_TEAM,
            &t.name,
            &(t.vcpus as i32),
            &(t.memory_mib as i32),
            &(t.disk_mib as i64),
            &host,
        ],
    )
    .map_err(|source| AdminError::Sql { source })?;
    service::audit_write(
        &mut tx,
        service::audit_entry(
            None,
            &Actor::System,
            "template",
            id::format(Kind::Template, tpl),
            "template.adopt",
            serde_json::json!({"host": t.host_id, "name": t.name, "by": "wrenn-ctl admin"}),
        ),
    )
    .map_err(AdminError::Call)?;
    tx.commit().map_err(|source| AdminError::Sql { source })?;
    Ok(())
}

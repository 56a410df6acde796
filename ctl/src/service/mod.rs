//! The service layer: every `wrenn.ctl.v1` call as a plain blocking method of [`Api`].
//!
//! Both transports call these same methods: the protobuf server ([`crate::server`]) and the
//! HTTP/JSON gateway ([`crate::http`]). Each method takes the caller's [`AuthCtx`] (made
//! once per connection or request by [`Api::authenticate`]) and the prost request type of
//! `wrenn.ctl.v1`, and returns the prost response or a [`Status`]. Process and file calls
//! (all the streaming ones) go through one forwarding path, [`Api::forward`], over a
//! `proto::rpc::forward::Downstream` that the transport implements. Methods block (SQL through [`crate::db`], calls to agents): transports run
//! them on worker threads, never on an event loop.
//!
//! Architecture invariant: every query is scoped to `ctx.team_id` (platform templates are
//! readable by all); a resource of another team is `not_found`, never `permission_denied`,
//! so IDs of other teams leak nothing. Every mutating call writes one audit row with its
//! outcome: in the same transaction as its change when it succeeds, after the failed attempt
//! when it fails (`outcome.rs`).

pub mod audit;
pub mod builds;
mod convert;
mod hosts;
mod outcome;
pub mod ports;
mod processes;
pub mod sandboxes;
mod teams;
mod templates;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use proto::id::{self, Kind, Uuid};
use proto::Status;

use crate::agents::Agents;
use crate::auth::LastUsed;
use crate::config::ApiConfig;
use crate::db::Db;

pub use audit::{
    from_ns as time_from_ns, new_uuid, ns as audit_ns, write as audit_write, Actor,
    Entry as AuditEntry,
};
pub use hosts::insert_registration_token;
pub use teams::{create_team_with_owner, insert_key};

/// Who is calling: the team an API key acts for. Made by [`Api::authenticate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthCtx {
    /// The team the key belongs to (and acts for).
    pub team_id: Uuid,
    /// The key itself.
    pub key_id: Uuid,
    /// The key's display name (recorded in audit rows).
    pub key_name: String,
    /// A platform-admin key (platform team only): manages hosts and platform templates.
    pub platform_admin: bool,
}

impl AuthCtx {
    /// Fails with `permission_denied` unless this is a platform-admin key.
    pub fn require_admin(&self) -> Result<(), Status> {
        if self.platform_admin {
            Ok(())
        } else {
            Err(Status::permission_denied("platform admin key required"))
        }
    }
}

/// The service layer. Cheap to clone (one `Arc`); share one per process.
#[derive(Clone)]
pub struct Api {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub db: Db,
    pub agents: Arc<Agents>,
    pub cfg: ApiConfig,
    pub last_used: LastUsed,
    pub background_creates: AtomicUsize,
    /// The reconciler's graces: a heartbeat's drift is judged with the same decisions.
    pub jobs: crate::config::JobsConfig,
    /// Keys and host certificates this replica heard were revoked (LISTEN/NOTIFY,
    /// [`crate::revocation`]).
    pub revocations: crate::revocation::Revocations,
    /// Port streams open on this replica, per team and per sandbox.
    pub ports: ports::PortBudget,
    /// Running sandboxes' traffic rows for the proxy (dropped on NOTIFY or change).
    pub traffic: Arc<ports::TrafficCache>,
}

impl Api {
    /// Builds the service layer over a DB pool; starts the `last_used` flusher thread.
    /// `jobs` gives the reconciler's graces, which heartbeats' drift checks use too.
    pub fn new(db: Db, cfg: ApiConfig, jobs: crate::config::JobsConfig) -> Api {
        let revocations = crate::revocation::Revocations::new();
        let agents = Arc::new(Agents::new(
            db.clone(),
            cfg.agent_call_timeout,
            cfg.issuer.clone(),
            revocations.clone(),
        ));
        let last_used = LastUsed::start(db.clone(), cfg.last_used_flush);
        let traffic = Arc::new(ports::TrafficCache::default());
        let forget = traffic.clone();
        revocations.on_sandbox_traffic(move |id| forget.forget(id));
        Api {
            inner: Arc::new(Inner {
                db,
                agents,
                cfg,
                last_used,
                background_creates: AtomicUsize::new(0),
                jobs,
                revocations,
                ports: ports::PortBudget::default(),
                traffic,
            }),
        }
    }

    /// The reconciler's settings (graces) in force.
    pub fn jobs_config(&self) -> &crate::config::JobsConfig {
        &self.inner.jobs
    }

    /// The DB pool (background jobs and the host service share it).
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Revoked keys as this replica knows them (its listener is started by `server::start`).
    pub fn revocations(&self) -> &crate::revocation::Revocations {
        &self.inner.revocations
    }

    /// The pool of agent clients.
    pub fn agents(&self) -> &Agents {
        &self.inner.agents
    }

    /// The pool of agent clients, weakly (for hooks the pool itself outlives).
    pub fn agents_weak(&self) -> std::sync::Weak<Agents> {
        Arc::downgrade(&self.inner.agents)
    }

    /// Settings in force.
    pub fn config(&self) -> &ApiConfig {
        &self.inner.cfg
    }

    /// Checks an API key (from the hello or `X-API-Key`): `unauthenticated` when unknown or
    /// revoked (in the database, or as this replica heard). One indexed SELECT; `last_used`
    /// is recorded in batches off this path.
    pub fn authenticate(&self, api_key: &str) -> Result<AuthCtx, Status> {
        crate::auth::authenticate(self, api_key)
    }

    /// Health: `Ok` when the database answers.
    pub fn health(&self) -> Result<(), Status> {
        self.inner.db.run(|c| {
            c.simple_query("SELECT 1").map_err(crate::db::pg_err)?;
            Ok(())
        })
    }

    /// Writes pending `last_used` stamps now (tests, shutdown).
    pub fn flush_last_used(&self) -> Result<(), Status> {
        self.inner.last_used.flush_now()
    }
}

/// Parses a wire ID of `kind` at the API boundary (`invalid_argument` when malformed).
pub fn parse_id(kind: Kind, s: &str) -> Result<Uuid, Status> {
    id::parse(kind, s).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Like [`parse_id`] but "" means `None`.
pub fn parse_opt_id(kind: Kind, s: &str) -> Result<Option<Uuid>, Status> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_id(kind, s).map(Some)
    }
}

/// Page size in force for a request value (0 = default, capped).
pub fn page_size(n: u32) -> i64 {
    let n = if n == 0 {
        crate::limits::PAGE_SIZE_DEFAULT
    } else {
        n
    };
    i64::from(n.min(crate::limits::PAGE_SIZE_MAX))
}

/// Turns `limit + 1` fetched rows into one page and its next token (the (time, id) of the
/// last row kept when more rows exist).
pub(crate) fn paginate<T>(
    rows: &[postgres::Row],
    limit: i64,
    key: impl Fn(&postgres::Row) -> (std::time::SystemTime, Uuid),
    map: impl Fn(&postgres::Row) -> T,
) -> (Vec<T>, String) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let page = &rows[..rows.len().min(limit)];
    let next = if rows.len() > limit {
        page.last().map(|r| {
            let (t, id) = key(r);
            audit::page_token(t, id)
        })
    } else {
        None
    };
    (page.iter().map(map).collect(), next.unwrap_or_default())
}

/// An audit entry (for the host service and background jobs).
pub fn audit_entry<'a>(
    team: Option<Uuid>,
    actor: &'a Actor,
    resource_type: &'a str,
    resource_id: String,
    action: &'a str,
    metadata: serde_json::Value,
) -> AuditEntry<'a> {
    AuditEntry {
        team,
        actor,
        resource_type,
        resource_id,
        action,
        success: true,
        metadata,
    }
}

/// The all-zeros UUID: the platform team and the `minimal` template.
pub const PLATFORM_TEAM: Uuid = Uuid::nil();
/// The seeded `minimal` base template.
pub const MINIMAL_TEMPLATE: Uuid = Uuid::nil();

/// A template name as every path that names templates takes it (not an id's look).
pub fn check_template_name(name: &str) -> Result<(), Status> {
    convert::check_name("name", name)?;
    if name.starts_with("tpl-") {
        return Err(Status::invalid_argument(
            "template names must not look like ids (tpl-...)",
        ));
    }
    Ok(())
}

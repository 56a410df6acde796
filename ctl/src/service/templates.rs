//! Templates: snapshot templates made from sandboxes, plus the platform's base templates.
//! Visible: the caller's team's and the platform team's. Platform ones are managed by
//! platform admins only.

use std::collections::BTreeMap;

use postgres::types::Type;
use postgres::GenericClient;
use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self, Kind, Uuid};
use proto::{Code, Status};

use super::audit::{self, Actor, Entry};
use super::convert::{self, TEMPLATE_COLS};
use super::{page_size, parse_id, Api, AuthCtx, PLATFORM_TEAM};
use crate::db::pg_err;
use crate::scheduler::{self, State};

/// What Get and Delete need of a resolved template (Create resolves its template inside
/// its one statement, `sandboxes::create_sql`, with the same rules).
#[derive(Clone, Debug)]
pub(crate) struct Tpl {
    pub id: Uuid,
    pub team: Uuid,
    pub kind: String,
    pub host: Option<Uuid>,
}

/// Finds a template visible to `team` by id ("tpl-...") or name (team first, then platform).
pub(crate) fn resolve(c: &mut impl GenericClient, team: Uuid, r: &str) -> Result<Tpl, Status> {
    let row = if r.starts_with("tpl-") {
        let id = parse_id(Kind::Template, r)?;
        let st = crate::db::prepared(
            c,
            "SELECT id, team_id, kind, host_id FROM templates \
             WHERE id = $1 AND team_id IN ($2, $3)",
            &[Type::UUID, Type::UUID, Type::UUID],
        )?;
        c.query_opt(&st, &[&id, &team, &PLATFORM_TEAM])
    } else {
        if r.len() > crate::limits::NAME_LEN_MAX {
            return Err(Status::invalid_argument("template name too long"));
        }
        crate::db::check_text("template", r)?;
        let st = crate::db::prepared(
            c,
            "SELECT id, team_id, kind, host_id FROM templates \
             WHERE name = $1 AND team_id IN ($2, $3) ORDER BY (team_id = $3) LIMIT 1",
            &[Type::TEXT, Type::UUID, Type::UUID],
        )?;
        c.query_opt(&st, &[&r, &team, &PLATFORM_TEAM])
    }
    .map_err(pg_err)?;
    let row = row.ok_or_else(|| Status::not_found("template not found"))?;
    Ok(Tpl {
        id: row.get(0),
        team: row.get(1),
        kind: row.get(2),
        host: row.get(3),
    })
}

fn parse_tpl_token(s: &str) -> Result<Option<(bool, std::time::SystemTime, Uuid)>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    let (p, rest) = s.split_at(
        s.find('.')
            .ok_or_else(|| Status::invalid_argument("malformed page_token"))?,
    );
    let plat = match p {
        "0" => false,
        "1" => true,
        _ => return Err(Status::invalid_argument("malformed page_token")),
    };
    let (t, id) = audit::parse_page_token(&rest[1..])?
        .ok_or_else(|| Status::invalid_argument("malformed page_token"))?;
    Ok(Some((plat, t, id)))
}

/// Process defaults a build sets over its sandbox's (a recipe's final USER, WORKDIR, ENV).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub user: Option<String>,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
}

impl Api {
    /// Makes a snapshot template from a running or paused sandbox; the sandbox ends PAUSED.
    /// The template keeps the sandbox's process defaults (those of its own template), with
    /// `over` on top for a build.
    pub(super) fn create_template_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateTemplateRequest,
        over: Option<&Overrides>,
    ) -> Result<ctl::Template, Status> {
        let sb = parse_id(Kind::Sandbox, &req.sandbox_id)?;
        convert::check_name("name", &req.name)?;
        if req.name.starts_with("tpl-") {
            return Err(Status::invalid_argument(
                "template names must not look like ids (tpl-...)",
            ));
        }
        if req.platform {
            ctx.require_admin()?;
        }
        let owner = if req.platform {
            PLATFORM_TEAM
        } else {
            ctx.team_id
        };
        let team = ctx.team_id;
        let name = req.name.clone();
        let (host, state, defaults) = self.inner.db.run(move |c| {
            let row = c
                .query_opt(
                    "SELECT host_id, state, default_user, default_cwd, env FROM sandboxes \
                     WHERE id = $1 AND team_id = $2",
                    &[&sb, &team],
                )
                .map_err(pg_err)?
                .ok_or_else(|| Status::not_found("sandbox not found"))?;
            let taken = c
                .query_opt(
                    "SELECT 1 FROM templates WHERE team_id = $1 AND name = $2",
                    &[&owner, &name],
                )
                .map_err(pg_err)?;
            if taken.is_some() {
                return Err(Status::new(
                    Code::AlreadyExists,
                    "a template with this name exists",
                ));
            }
            let defaults: (String, String, serde_json::Value) =
                (row.get(2), row.get(3), row.get(4));
            Ok((
                row.get::<_, Option<Uuid>>(0),
                row.get::<_, String>(1),
                defaults,
            ))
        })?;
        let (mut user, mut cwd, mut env) = defaults;
        if let Some(o) = over {
            if let Some(u) = &o.user {
                user = u.clone();
            }
            if let Some(d) = &o.cwd {
                cwd = d.clone();
            }
            let mut m = convert::json_to_map(&env);
            m.extend(o.env.iter().map(|(k, v)| (k.clone(), v.clone())));
            env = convert::check_map("env", &m)?;
        }
        if state != "running" && state != "paused" {
            return Err(Status::failed_precondition(format!(
                "sandbox is {state}, not running or paused"
            )));
        }
        let host = host.ok_or_else(|| Status::internal("sandbox has no host"))?;
        let tid = audit::new_uuid()?;
        let info: agent::TemplateInfo = self.inner.agents.unary_timeout(
            host,
            agent::templates_methods::CREATE,
            &agent::CreateTemplateRequest {
                sandbox_id: req.sandbox_id.clone(),
                template_id: id::format(Kind::Template, tid),
            },
            self.inner.cfg.agent_lifecycle_timeout,
        )?;
        let ctx2 = ctx.clone();
        let name = req.name.clone();
        let r = self.inner.db.tx(move |tx| {
            let cur = scheduler::lock(tx, sb)?.ok_or_else(|| Status::not_found("sandbox not found"))?;
            tx.execute(
                "INSERT INTO templates (id, team_id, name, kind, vcpus, memory_mib, disk_mib, size_bytes, \
                    host_id, source_sandbox_id, default_user, default_cwd, env) \
                    VALUES ($1,$2,$3,'snapshot',$4,$5,$6,$7,$8,$9,$10,$11,$12)",
                &[
                    &tid, &owner, &name,
                    &(if info.vcpus > 0 { info.vcpus as i32 } else { cur.size.vcpus }),
                    &(if info.memory_mib > 0 { info.memory_mib as i32 } else { cur.size.memory_mib as i32 }),
                    &(if info.disk_mib > 0 { info.disk_mib as i64 } else { cur.size.disk_mib }),
                    &(info.size_bytes.min(i64::MAX as u64) as i64),
                    &host, &sb, &user, &cwd, &env,
                ],
            )
            .map_err(|e| {
                if crate::db::is_unique_violation(&e) {
                    Status::new(Code::AlreadyExists, "a template with this name exists")
                } else {
                    pg_err(e)
                }
            })?;
            if cur.state == State::Running {
                scheduler::set_state(tx, sb, State::Paused, "template created", Some(None))?;
            }
            audit::write(tx, Entry {
                team: Some(ctx2.team_id),
                actor: &Actor::key(&ctx2),
                resource_type: "template",
                resource_id: id::format(Kind::Template, tid),
                action: "template.create",
                success: true,
                metadata: serde_json::json!({"sandbox": id::format(Kind::Sandbox, sb), "platform": owner == PLATFORM_TEAM}),
            })?;
            let row = tx
                .query_one(&format!("SELECT {TEMPLATE_COLS} FROM templates t WHERE t.id = $1"), &[&tid])
                .map_err(pg_err)?;
            Ok(convert::template(&row))
        });
        if r.is_err() {
            // The files exist on the host but no row names them: remove them again.
            let _ = self.inner.agents.unary::<_, agent::DeleteTemplateResponse>(
                host,
                agent::templates_methods::DELETE,
                &agent::DeleteTemplateRequest {
                    template_id: id::format(Kind::Template, tid),
                },
            );
        }
        r
    }

    /// The caller's team's templates, then the platform ones.
    pub fn list_templates(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListTemplatesRequest,
    ) -> Result<ctl::ListTemplatesResponse, Status> {
        let after = parse_tpl_token(&req.page_token)?;
        let limit = page_size(req.page_size);
        let team = ctx.team_id;
        let team_only = req.team_only;
        let (ap, at, aid) = match after {
            Some((p, t, i)) => (Some(p), Some(t), Some(i)),
            None => (None, None, None),
        };
        let rows = self.inner.db.run(move |c| {
            c.query(
                &format!(
                    "SELECT {TEMPLATE_COLS}, (t.team_id = $2 AND $1 <> $2) AS plat FROM templates t \
                     WHERE (t.team_id = $1 OR (NOT $3 AND t.team_id = $2)) \
                       AND ($4::bool IS NULL OR ((t.team_id = $2 AND $1 <> $2), t.created_at, t.id) > ($4, $5, $6::uuid)) \
                     ORDER BY plat, t.created_at, t.id LIMIT $7"
                ),
                &[&team, &PLATFORM_TEAM, &team_only, &ap, &at, &aid, &(limit + 1)],
            )
            .map_err(pg_err)
        })?;
        let n = usize::try_from(limit).unwrap_or(usize::MAX);
        let templates = rows.iter().take(n).map(convert::template).collect();
        let next_page_token = if rows.len() > n {
            let r = &rows[n - 1];
            let plat: bool = r.get("plat");
            format!(
                "{}.{}",
                u8::from(plat),
                audit::page_token(r.get(10), r.get(0))
            )
        } else {
            String::new()
        };
        Ok(ctl::ListTemplatesResponse {
            templates,
            next_page_token,
        })
    }

    /// One template visible to the caller, by id or name.
    pub fn get_template(
        &self,
        ctx: &AuthCtx,
        req: ctl::GetTemplateRequest,
    ) -> Result<ctl::Template, Status> {
        if req.template.is_empty() {
            return Err(Status::invalid_argument("template is required"));
        }
        let team = ctx.team_id;
        self.inner.db.run(move |c| {
            let t = resolve(c, team, &req.template)?;
            let row = c
                .query_one(
                    &format!("SELECT {TEMPLATE_COLS} FROM templates t WHERE t.id = $1"),
                    &[&t.id],
                )
                .map_err(pg_err)?;
            Ok(convert::template(&row))
        })
    }

    /// Deletes a template and its files; platform ones need a platform-admin key.
    pub(super) fn delete_template_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::DeleteTemplateRequest,
    ) -> Result<ctl::DeleteTemplateResponse, Status> {
        let tid = parse_id(Kind::Template, &req.template_id)?;
        let team = ctx.team_id;
        let t = self
            .inner
            .db
            .run(move |c| resolve(c, team, &id::format(Kind::Template, tid)))?;
        if t.team == PLATFORM_TEAM {
            ctx.require_admin()?;
            if t.id == super::MINIMAL_TEMPLATE {
                return Err(Status::failed_precondition(
                    "the seeded minimal template cannot be deleted",
                ));
            }
        }
        if let (Some(host), "snapshot") = (t.host, t.kind.as_str()) {
            let r: Result<agent::DeleteTemplateResponse, Status> = self.inner.agents.unary(
                host,
                agent::templates_methods::DELETE,
                &agent::DeleteTemplateRequest {
                    template_id: req.template_id.clone(),
                },
            );
            match r {
                Ok(_) => {}
                Err(e) if e.code == Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            let n = tx
                .execute("DELETE FROM templates WHERE id = $1", &[&tid])
                .map_err(pg_err)?;
            if n == 0 {
                return Err(Status::not_found("template not found"));
            }
            audit::write(
                tx,
                Entry {
                    team: Some(ctx2.team_id),
                    actor: &Actor::key(&ctx2),
                    resource_type: "template",
                    resource_id: id::format(Kind::Template, tid),
                    action: "template.delete",
                    success: true,
                    metadata: serde_json::json!({}),
                },
            )?;
            Ok(ctl::DeleteTemplateResponse {})
        })
    }
}

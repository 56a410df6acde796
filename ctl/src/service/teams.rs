//! Teams and members, users, API keys.
//!
//! A key acts for its team: any key of a team may manage that team's members, users and
//! keys. Platform admins may also read other teams and every user.
//!
//! Each user belongs to the directory of the team that created it (`users.home_team_id`);
//! emails are unique within a directory, case-insensitively. A team sees, and may add as a
//! member, only its members and its directory's users: another team's user is `not_found`
//! like an unknown id, and creating a user never tells whether the email exists elsewhere.

use std::time::SystemTime;

use postgres::GenericClient;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self, Kind, Uuid};
use proto::{Code, Status};

use super::audit::{self, ns, Actor, Entry};
use super::{convert, page_size, paginate, parse_id, parse_opt_id, Api, AuthCtx, PLATFORM_TEAM};
use crate::auth;
use crate::db::{is_unique_violation, pg_err};
use crate::limits::EMAIL_LEN_MAX;

fn role_text(v: i32) -> Result<&'static str, Status> {
    match ctl::TeamRole::try_from(v) {
        Ok(ctl::TeamRole::Unspecified) | Ok(ctl::TeamRole::Member) => Ok("member"),
        Ok(ctl::TeamRole::Owner) => Ok("owner"),
        Ok(ctl::TeamRole::Admin) => Ok("admin"),
        Err(_) => Err(Status::invalid_argument(format!("unknown role {v}"))),
    }
}

fn role_wire(s: &str) -> i32 {
    match s {
        "owner" => ctl::TeamRole::Owner as i32,
        "admin" => ctl::TeamRole::Admin as i32,
        _ => ctl::TeamRole::Member as i32,
    }
}

fn user(r: &postgres::Row) -> ctl::User {
    ctl::User {
        id: id::format(Kind::User, r.get(0)),
        email: r.get(1),
        name: r.get(2),
        created_unix_ns: ns(Some(r.get(3))),
    }
}

fn key(r: &postgres::Row) -> ctl::ApiKey {
    ctl::ApiKey {
        id: id::format(Kind::Key, r.get(0)),
        team_id: id::format(Kind::Team, r.get(1)),
        name: r.get(2),
        prefix: r.get(3),
        created_by: r
            .get::<_, Option<Uuid>>(4)
            .map(|u| id::format(Kind::User, u))
            .unwrap_or_default(),
        created_unix_ns: ns(Some(r.get(5))),
        last_used_unix_ns: ns(r.get(6)),
        platform_admin: r.get(7),
    }
}

/// Users a key may see (`u` the users row, $2 its team, $3 whether it is a platform
/// admin): every user for a platform admin; else the team's members and the users of its
/// directory (those it created, members or not, so it can add them back).
const VISIBLE: &str = "($3 OR u.home_team_id = $2 \
    OR EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = u.id AND m.team_id = $2))";
/// [`VISIBLE`] with the team as $1 and the admin flag as $2.
const VISIBLE_1: &str = "($2 OR u.home_team_id = $1 \
    OR EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = u.id AND m.team_id = $1))";

const KEY_COLS: &str =
    "id, team_id, name, lookup, created_by, created_at, last_used_at, platform_admin";

fn check_email(e: &str) -> Result<(), Status> {
    crate::db::check_text("email", e)?;
    let ok = e.len() <= EMAIL_LEN_MAX
        && e.split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument("email must look like name@domain"))
    }
}

/// The team a request names ("" = the caller's): own team, or any for a platform admin;
/// another team is `not_found`.
fn target_team(ctx: &AuthCtx, s: &str) -> Result<Uuid, Status> {
    match parse_opt_id(Kind::Team, s)? {
        None => Ok(ctx.team_id),
        Some(t) if t == ctx.team_id || ctx.platform_admin => Ok(t),
        Some(_) => Err(Status::not_found("team not found")),
    }
}

fn audit_row(
    c: &mut impl GenericClient,
    ctx: &AuthCtx,
    team: Uuid,
    rtype: &str,
    rid: String,
    action: &str,
    meta: serde_json::Value,
) -> Result<(), Status> {
    audit::write(
        c,
        Entry {
            team: Some(team),
            actor: &Actor::key(ctx),
            resource_type: rtype,
            resource_id: rid,
            action,
            success: true,
            metadata: meta,
        },
    )
}

/// Creates a team with an owner and a first key (used by `wrenn-ctl admin init` and tests).
/// Returns (team, user, key id, key plaintext).
pub fn create_team_with_owner(
    c: &mut impl GenericClient,
    team_name: &str,
    email: &str,
    user_name: &str,
) -> Result<(Uuid, Uuid, Uuid, String), Status> {
    create_team_by(c, &Actor::System, team_name, email, user_name)
}

/// [`create_team_with_owner`] with its audit row naming `actor`.
fn create_team_by(
    c: &mut impl GenericClient,
    actor: &Actor,
    team_name: &str,
    email: &str,
    user_name: &str,
) -> Result<(Uuid, Uuid, Uuid, String), Status> {
    convert::check_name("team name", team_name)?;
    check_email(email)?;
    let team = audit::new_uuid()?;
    let user = audit::new_uuid()?;
    c.execute(
        "INSERT INTO teams (id, name) VALUES ($1, $2)",
        &[&team, &team_name],
    )
    .map_err(pg_err)?;
    c.execute(
        "INSERT INTO users (id, email, name, home_team_id) VALUES ($1, $2, $3, $4)",
        &[&user, &email, &user_name, &team],
    )
    .map_err(|e| {
        if is_unique_violation(&e) {
            Status::new(Code::AlreadyExists, "email taken")
        } else {
            pg_err(e)
        }
    })?;
    c.execute(
        "INSERT INTO memberships (team_id, user_id, role) VALUES ($1, $2, 'owner')",
        &[&team, &user],
    )
    .map_err(pg_err)?;
    let (kid, plain) = insert_key(c, team, "default", Some(user), false)?;
    audit::write(
        c,
        Entry {
            team: Some(team),
            actor,
            resource_type: "team",
            resource_id: id::format(Kind::Team, team),
            action: "team.create",
            success: true,
            metadata: serde_json::json!({"owner": id::format(Kind::User, user)}),
        },
    )?;
    Ok((team, user, kid, plain))
}

/// Inserts a new key; returns its id and plaintext.
pub fn insert_key(
    c: &mut impl GenericClient,
    team: Uuid,
    name: &str,
    created_by: Option<Uuid>,
    platform_admin: bool,
) -> Result<(Uuid, String), Status> {
    let s = auth::new_secret(auth::API_KEY_PREFIX)?;
    let id = audit::new_uuid()?;
    c.execute(
        "INSERT INTO api_keys (id, team_id, name, lookup, key_hash, created_by, platform_admin) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &id,
            &team,
            &name,
            &s.lookup,
            &s.hash,
            &created_by,
            &platform_admin,
        ],
    )
    .map_err(pg_err)?;
    Ok((id, s.plaintext))
}

impl Api {
    /// Creates a team with its owner and first key (platform admin only).
    pub(super) fn create_team_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateTeamRequest,
    ) -> Result<ctl::CreateTeamResponse, Status> {
        ctx.require_admin()?;
        convert::check_name("name", &req.name)?;
        check_email(&req.owner_email)?;
        if !req.owner_name.is_empty() {
            convert::check_name("owner_name", &req.owner_name)?;
        }
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            let (team, uid, kid, plaintext) = create_team_by(
                tx,
                &Actor::key(&ctx2),
                &req.name,
                &req.owner_email,
                &req.owner_name,
            )?;
            let t = tx
                .query_one("SELECT name, created_at FROM teams WHERE id = $1", &[&team])
                .map_err(pg_err)?;
            let u = tx
                .query_one(
                    "SELECT id, email, name, created_at FROM users WHERE id = $1",
                    &[&uid],
                )
                .map_err(pg_err)?;
            let k = tx
                .query_one(
                    &format!("SELECT {KEY_COLS} FROM api_keys WHERE id = $1"),
                    &[&kid],
                )
                .map_err(pg_err)?;
            Ok(ctl::CreateTeamResponse {
                team: Some(ctl::Team {
                    id: id::format(Kind::Team, team),
                    name: t.get(0),
                    platform: false,
                    created_unix_ns: ns(Some(t.get(1))),
                }),
                owner: Some(user(&u)),
                key: Some(key(&k)),
                key_plaintext: plaintext,
            })
        })
    }

    /// A team: the caller's own ("" id), or another for a platform admin.
    pub fn get_team(&self, ctx: &AuthCtx, req: ctl::GetTeamRequest) -> Result<ctl::Team, Status> {
        let team = target_team(ctx, &req.team_id)?;
        self.inner.db.run(move |c| {
            let r = c
                .query_opt(
                    "SELECT id, name, created_at FROM teams WHERE id = $1",
                    &[&team],
                )
                .map_err(pg_err)?
                .ok_or_else(|| Status::not_found("team not found"))?;
            let id: Uuid = r.get(0);
            Ok(ctl::Team {
                id: id::format(Kind::Team, id),
                name: r.get(1),
                platform: id == PLATFORM_TEAM,
                created_unix_ns: ns(Some(r.get(2))),
            })
        })
    }

    /// Adds an existing user to the team with a role.
    pub(super) fn add_member_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::AddMemberRequest,
    ) -> Result<ctl::Member, Status> {
        let team = target_team(ctx, &req.team_id)?;
        let user = parse_id(Kind::User, &req.user_id)?;
        let role = role_text(req.role)?;
        if team == PLATFORM_TEAM {
            return Err(Status::failed_precondition(
                "the platform team has no members",
            ));
        }
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            // Only a user the caller may see: any for a platform admin, else one of its
            // own directory or a member of its team. Another team's user is `not_found`,
            // like an unknown id, so nothing about it (its email) leaks.
            let u = tx
                .query_opt(
                    &format!("SELECT id, email, name, created_at FROM users u WHERE id = $1 AND {VISIBLE}"),
                    &[&user, &ctx2.team_id, &ctx2.platform_admin],
                )
                .map_err(pg_err)?
                .ok_or_else(|| Status::not_found("user not found"))?;
            let r = tx
                .query_one(
                    "INSERT INTO memberships (team_id, user_id, role) VALUES ($1, $2, $3) RETURNING created_at",
                    &[&team, &user, &role],
                )
                .map_err(|e| if is_unique_violation(&e) { Status::new(Code::AlreadyExists, "already a member") } else { pg_err(e) })?;
            audit_row(tx, &ctx2, team, "user", id::format(Kind::User, user), "team.add_member", serde_json::json!({"role": role}))?;
            Ok(ctl::Member { user: Some(user_msg(&u)), role: role_wire(role), added_unix_ns: ns(Some(r.get(0))) })
        })
    }

    /// Removes a member; refused when it would leave the team without an owner.
    pub(super) fn remove_member_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::RemoveMemberRequest,
    ) -> Result<ctl::RemoveMemberResponse, Status> {
        let team = target_team(ctx, &req.team_id)?;
        let user = parse_id(Kind::User, &req.user_id)?;
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            // Lock the team's memberships so two removals cannot both pass the owner check.
            let rows = tx
                .query(
                    "SELECT user_id, role FROM memberships WHERE team_id = $1 FOR UPDATE",
                    &[&team],
                )
                .map_err(pg_err)?;
            let me = rows
                .iter()
                .find(|r| r.get::<_, Uuid>(0) == user)
                .ok_or_else(|| Status::not_found("not a member"))?;
            let owners = rows
                .iter()
                .filter(|r| r.get::<_, String>(1) == "owner")
                .count();
            if me.get::<_, String>(1) == "owner" && owners == 1 {
                return Err(Status::failed_precondition("the team would have no owner"));
            }
            tx.execute(
                "DELETE FROM memberships WHERE team_id = $1 AND user_id = $2",
                &[&team, &user],
            )
            .map_err(pg_err)?;
            audit_row(
                tx,
                &ctx2,
                team,
                "user",
                id::format(Kind::User, user),
                "team.remove_member",
                serde_json::json!({}),
            )?;
            Ok(ctl::RemoveMemberResponse {})
        })
    }

    /// Members of a team, by join time.
    pub fn list_members(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListMembersRequest,
    ) -> Result<ctl::ListMembersResponse, Status> {
        let team = target_team(ctx, &req.team_id)?;
        let after = audit::parse_page_token(&req.page_token)?;
        let (at, aid) = (after.map(|a| a.0), after.map(|a| a.1));
        let limit = page_size(req.page_size);
        let rows = self.inner.db.run(move |c| {
            c.query(
                "SELECT u.id, u.email, u.name, u.created_at, m.role, m.created_at FROM memberships m \
                 JOIN users u ON u.id = m.user_id WHERE m.team_id = $1 \
                   AND ($2::timestamptz IS NULL OR (m.created_at, u.id) > ($2, $3::uuid)) \
                 ORDER BY m.created_at, u.id LIMIT $4",
                &[&team, &at, &aid, &(limit + 1)],
            )
            .map_err(pg_err)
        })?;
        let (members, next_page_token) = paginate(
            &rows,
            limit,
            |r| (r.get(5), r.get(0)),
            |r| ctl::Member {
                user: Some(user(r)),
                role: role_wire(r.get(4)),
                added_unix_ns: ns(Some(r.get::<_, SystemTime>(5))),
            },
        );
        Ok(ctl::ListMembersResponse {
            members,
            next_page_token,
        })
    }

    /// Creates a user and makes it a member of the caller's team (platform admins: no
    /// membership, the platform team has none).
    pub(super) fn create_user_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateUserRequest,
    ) -> Result<ctl::User, Status> {
        check_email(&req.email)?;
        if !req.name.is_empty() {
            convert::check_name("name", &req.name)?;
        }
        let role = role_text(req.role)?;
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            let uid = audit::new_uuid()?;
            let r = tx
                .query_one(
                    "INSERT INTO users (id, email, name, home_team_id) VALUES ($1, $2, $3, $4) \
                     RETURNING id, email, name, created_at",
                    &[&uid, &req.email, &req.name, &ctx2.team_id],
                )
                .map_err(|e| {
                    // Unique per directory (this team's), case-insensitively: says nothing
                    // about other teams' users.
                    if is_unique_violation(&e) {
                        Status::new(
                            Code::AlreadyExists,
                            "a user with this email exists in this team",
                        )
                    } else {
                        pg_err(e)
                    }
                })?;
            if ctx2.team_id != PLATFORM_TEAM {
                tx.execute(
                    "INSERT INTO memberships (team_id, user_id, role) VALUES ($1, $2, $3)",
                    &[&ctx2.team_id, &uid, &role],
                )
                .map_err(pg_err)?;
            }
            audit_row(
                tx,
                &ctx2,
                ctx2.team_id,
                "user",
                id::format(Kind::User, uid),
                "user.create",
                serde_json::json!({"role": role}),
            )?;
            Ok(user(&r))
        })
    }

    /// A user who is a member of the caller's team (any user for a platform admin).
    pub fn get_user(&self, ctx: &AuthCtx, req: ctl::GetUserRequest) -> Result<ctl::User, Status> {
        let uid = parse_id(Kind::User, &req.user_id)?;
        let team = ctx.team_id;
        let admin = ctx.platform_admin;
        self.inner.db.run(move |c| {
            let r = c
                .query_opt(
                    &format!("SELECT u.id, u.email, u.name, u.created_at FROM users u WHERE u.id = $1 AND {VISIBLE}"),
                    &[&uid, &team, &admin],
                )
                .map_err(pg_err)?
                .ok_or_else(|| Status::not_found("user not found"))?;
            Ok(user(&r))
        })
    }

    /// Members of the caller's team (every user for a platform admin).
    pub fn list_users(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListUsersRequest,
    ) -> Result<ctl::ListUsersResponse, Status> {
        let after = audit::parse_page_token(&req.page_token)?;
        let (at, aid) = (after.map(|a| a.0), after.map(|a| a.1));
        let limit = page_size(req.page_size);
        let team = ctx.team_id;
        let admin = ctx.platform_admin;
        let rows = self.inner.db.run(move |c| {
            c.query(
                &format!(
                    "SELECT u.id, u.email, u.name, u.created_at FROM users u WHERE {VISIBLE_1} \
                     AND ($3::timestamptz IS NULL OR (u.created_at, u.id) > ($3, $4::uuid)) \
                     ORDER BY u.created_at, u.id LIMIT $5"
                ),
                &[&team, &admin, &at, &aid, &(limit + 1)],
            )
            .map_err(pg_err)
        })?;
        let (users, next_page_token) = paginate(&rows, limit, |r| (r.get(3), r.get(0)), user);
        Ok(ctl::ListUsersResponse {
            users,
            next_page_token,
        })
    }

    /// Creates a key for the caller's team; the plaintext is shown only here.
    pub(super) fn create_api_key_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateApiKeyRequest,
    ) -> Result<ctl::CreateApiKeyResponse, Status> {
        convert::check_name("name", &req.name)?;
        if req.platform_admin {
            ctx.require_admin()?;
        }
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            let (kid, plaintext) =
                insert_key(tx, ctx2.team_id, &req.name, None, req.platform_admin)?;
            audit_row(
                tx,
                &ctx2,
                ctx2.team_id,
                "api_key",
                id::format(Kind::Key, kid),
                "api_key.create",
                serde_json::json!({"platform_admin": req.platform_admin}),
            )?;
            let r = tx
                .query_one(
                    &format!("SELECT {KEY_COLS} FROM api_keys WHERE id = $1"),
                    &[&kid],
                )
                .map_err(pg_err)?;
            Ok(ctl::CreateApiKeyResponse {
                key: Some(key(&r)),
                plaintext,
            })
        })
    }

    /// Keys of the caller's team (not revoked), newest first.
    pub fn list_api_keys(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListApiKeysRequest,
    ) -> Result<ctl::ListApiKeysResponse, Status> {
        let after = audit::parse_page_token(&req.page_token)?;
        let (at, aid) = (after.map(|a| a.0), after.map(|a| a.1));
        let limit = page_size(req.page_size);
        let team = ctx.team_id;
        let rows = self.inner.db.run(move |c| {
            c.query(
                &format!(
                    "SELECT {KEY_COLS} FROM api_keys WHERE team_id = $1 AND revoked_at IS NULL \
                     AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid)) \
                     ORDER BY created_at DESC, id DESC LIMIT $4"
                ),
                &[&team, &at, &aid, &(limit + 1)],
            )
            .map_err(pg_err)
        })?;
        let (keys, next_page_token) = paginate(&rows, limit, |r| (r.get(5), r.get(0)), key);
        Ok(ctl::ListApiKeysResponse {
            keys,
            next_page_token,
        })
    }

    /// Revokes a key of the caller's team at once.
    pub(super) fn revoke_api_key_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::RevokeApiKeyRequest,
    ) -> Result<ctl::RevokeApiKeyResponse, Status> {
        let kid = parse_id(Kind::Key, &req.key_id)?;
        let ctx2 = ctx.clone();
        self.inner.db.tx(move |tx| {
            let n = tx
                .execute(
                    "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND team_id = $2 AND revoked_at IS NULL",
                    &[&kid, &ctx2.team_id],
                )
                .map_err(pg_err)?;
            if n == 0 {
                return Err(Status::not_found("api key not found"));
            }
            audit_row(tx, &ctx2, ctx2.team_id, "api_key", id::format(Kind::Key, kid), "api_key.revoke", serde_json::json!({}))?;
            // Every replica hears of it at commit and closes the key's connections.
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&crate::revocation::CHANNEL, &kid.hyphenated().to_string()],
            )
            .map_err(pg_err)?;
            Ok(ctl::RevokeApiKeyResponse {})
        })?;
        // This replica need not wait for its own notification.
        self.revocations().revoked(kid);
        Ok(ctl::RevokeApiKeyResponse {})
    }
}

fn user_msg(r: &postgres::Row) -> ctl::User {
    user(r)
}

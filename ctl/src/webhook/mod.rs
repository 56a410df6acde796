//! Signed event webhooks: `Webhooks/Create|List|Delete|Deliveries` ([`Api`] methods here),
//! the delivery job ([`deliver`]) and where deliveries may go ([`target`]).
//!
//! Events are raised by triggers of migration 4 in the transaction of the change itself
//! (a sandbox's state, a template created or deleted, a host going up or down), whoever
//! makes it: API calls, heartbeats, the reconciler, TTL reports. Each event becomes one row
//! of `webhook_events` (the outbox) and one `webhook_deliveries` row per matching webhook
//! of its team, so an event committed is delivered at least once even when ctl dies right
//! after the change. The delivery job ([`deliver::Delivery`]) runs on every replica and
//! claims due deliveries under an advisory lock with a lease; it never runs on an API
//! worker, so a slow or dead endpoint never delays an API call.
//!
//! Each delivery is a POST of
//! `{"id":"evt-…","type":"sandbox.paused","created_unix_ns":…,"team_id":"team-…","data":{…}}`
//! with `Wrenn-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//! ([`proto::hmac`]). 2xx is success; anything else is retried with backoff up to
//! [`WEBHOOK_ATTEMPTS_MAX`] attempts; redirects are never followed.

pub mod deliver;
pub mod target;

use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self, Kind};
use proto::Status;

use crate::db::{check_text, pg_err};
use crate::limits::{WEBHOOKS_PER_TEAM_MAX, WEBHOOK_ATTEMPTS_MAX};
use crate::service::{
    audit_entry, audit_ns, audit_write, new_uuid, page_size, parse_id, Actor, Api, AuthCtx,
};

/// Every event type a webhook may ask for.
pub const EVENT_TYPES: &[&str] = &[
    "sandbox.created",
    "sandbox.running",
    "sandbox.paused",
    "sandbox.resumed",
    "sandbox.destroyed",
    "sandbox.error",
    "template.created",
    "template.deleted",
    "host.up",
    "host.down",
    "build.finished",
];

fn webhook(r: &postgres::Row) -> ctl::Webhook {
    ctl::Webhook {
        id: id::format(Kind::Webhook, r.get(0)),
        url: r.get(1),
        events: r.get(2),
        created_unix_ns: audit_ns(Some(r.get(3))),
    }
}

impl Api {
    /// `Webhooks/Create`.
    pub fn create_webhook(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateWebhookRequest,
    ) -> Result<ctl::CreateWebhookResponse, Status> {
        self.audited(ctx, "webhook", String::new(), "webhook.create", |_| {
            self.create_webhook_inner(ctx, req)
        })
    }

    fn create_webhook_inner(
        &self,
        ctx: &AuthCtx,
        req: ctl::CreateWebhookRequest,
    ) -> Result<ctl::CreateWebhookResponse, Status> {
        check_text("url", &req.url)?;
        let url = target::parse_url(&req.url).map_err(|e| match e {
            target::UrlError::Https => Status::failed_precondition(e.to_string()),
            e => Status::invalid_argument(e.to_string()),
        })?;
        // An IP literal is checked now too (a name is checked at every delivery, where it
        // resolves); the operator's flag allows private targets.
        if !self.inner.cfg.webhooks.allow_private {
            if let Ok(ip) = url.host.parse::<std::net::IpAddr>() {
                if let Some(why) = target::forbidden(ip) {
                    return Err(Status::invalid_argument(format!(
                        "url: {ip} is a {why} address; webhooks may not target it"
                    )));
                }
            }
        }
        let mut events = req.events.clone();
        events.sort();
        events.dedup();
        for e in &events {
            if !EVENT_TYPES.contains(&e.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "events: unknown event type {e:?} (known: {})",
                    EVENT_TYPES.join(", ")
                )));
            }
        }
        let secret = crate::random::token("whsec_")
            .map_err(|e| Status::internal(format!("getrandom: {e}")))?;
        let id = new_uuid()?;
        let team = ctx.team_id;
        let ctx2 = ctx.clone();
        let url_s = req.url.clone();
        let secret2 = secret.clone();
        let w = self.inner.db.tx(move |tx| {
            // Serializes creates of one team, so the count holds.
            tx.execute("SELECT 1 FROM teams WHERE id = $1 FOR UPDATE", &[&team])
                .map_err(pg_err)?;
            let n: i64 = tx
                .query_one("SELECT count(*) FROM webhooks WHERE team_id = $1", &[&team])
                .map_err(pg_err)?
                .get(0);
            if n >= WEBHOOKS_PER_TEAM_MAX {
                return Err(Status::resource_exhausted(format!(
                    "a team has at most {WEBHOOKS_PER_TEAM_MAX} webhooks"
                )));
            }
            let r = tx
                .query_one(
                    "INSERT INTO webhooks (id, team_id, url, events, secret) VALUES ($1, $2, $3, $4, $5) \
                     RETURNING id, url, events, created_at",
                    &[&id, &team, &url_s, &events, &secret2],
                )
                .map_err(pg_err)?;
            audit_write(
                tx,
                audit_entry(
                    Some(team),
                    &Actor::key(&ctx2),
                    "webhook",
                    id::format(Kind::Webhook, id),
                    "webhook.create",
                    serde_json::json!({"url": url_s, "events": events}),
                ),
            )?;
            Ok(webhook(&r))
        })?;
        Ok(ctl::CreateWebhookResponse {
            webhook: Some(w),
            secret,
        })
    }

    /// `Webhooks/List`.
    pub fn list_webhooks(
        &self,
        ctx: &AuthCtx,
        _req: ctl::ListWebhooksRequest,
    ) -> Result<ctl::ListWebhooksResponse, Status> {
        let team = ctx.team_id;
        self.inner.db.run(move |c| {
            let rows = c
                .query(
                    "SELECT id, url, events, created_at FROM webhooks WHERE team_id = $1 \
                     ORDER BY created_at, id",
                    &[&team],
                )
                .map_err(pg_err)?;
            Ok(ctl::ListWebhooksResponse {
                webhooks: rows.iter().map(webhook).collect(),
            })
        })
    }

    /// `Webhooks/Delete`: the webhook and its deliveries (pending ones are dropped).
    pub fn delete_webhook(
        &self,
        ctx: &AuthCtx,
        req: ctl::DeleteWebhookRequest,
    ) -> Result<ctl::DeleteWebhookResponse, Status> {
        let rid = id::parse(Kind::Webhook, &req.webhook_id)
            .map(|u| id::format(Kind::Webhook, u))
            .unwrap_or_default();
        self.audited(ctx, "webhook", rid, "webhook.delete", |_| {
            let wid = parse_id(Kind::Webhook, &req.webhook_id)?;
            let team = ctx.team_id;
            let ctx2 = ctx.clone();
            self.inner.db.tx(move |tx| {
                let n = tx
                    .execute(
                        "DELETE FROM webhooks WHERE id = $1 AND team_id = $2",
                        &[&wid, &team],
                    )
                    .map_err(pg_err)?;
                if n == 0 {
                    return Err(Status::not_found("webhook not found"));
                }
                audit_write(
                    tx,
                    audit_entry(
                        Some(team),
                        &Actor::key(&ctx2),
                        "webhook",
                        id::format(Kind::Webhook, wid),
                        "webhook.delete",
                        serde_json::json!({}),
                    ),
                )?;
                Ok(ctl::DeleteWebhookResponse {})
            })
        })
    }

    /// `Webhooks/Deliveries`: newest first, keyset-paged.
    pub fn list_deliveries(
        &self,
        ctx: &AuthCtx,
        req: ctl::ListDeliveriesRequest,
    ) -> Result<ctl::ListDeliveriesResponse, Status> {
        let wid = parse_id(Kind::Webhook, &req.webhook_id)?;
        let limit = page_size(req.page_size);
        let after = crate::service::audit::parse_page_token(&req.page_token)?;
        let team = ctx.team_id;
        self.inner.db.run(move |c| {
            let owned = c
                .query_opt(
                    "SELECT 1 FROM webhooks WHERE id = $1 AND team_id = $2",
                    &[&wid, &team],
                )
                .map_err(pg_err)?;
            if owned.is_none() {
                return Err(Status::not_found("webhook not found"));
            }
            let (t, e) = match after {
                Some((t, e)) => (Some(t), Some(e)),
                None => (None, None),
            };
            let rows = c
                .query(
                    "SELECT d.event_id, e.type, d.status, d.attempts, d.last_http_status, \
                        d.last_error, d.created_at, d.next_attempt_at, d.delivered_at \
                     FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id \
                     WHERE d.webhook_id = $1 \
                       AND ($2::timestamptz IS NULL OR (d.created_at, d.event_id) < ($2, $3)) \
                     ORDER BY d.created_at DESC, d.event_id DESC LIMIT $4",
                    &[&wid, &t, &e, &(limit + 1)],
                )
                .map_err(pg_err)?;
            let (deliveries, next) = crate::service::paginate(
                &rows,
                limit,
                |r| (r.get(6), r.get(0)),
                |r| {
                    let status: String = r.get(2);
                    ctl::Delivery {
                        event_id: id::format(Kind::Event, r.get(0)),
                        event_type: r.get(1),
                        attempts: u32::try_from(r.get::<_, i32>(3)).unwrap_or(0),
                        last_http_status: u32::try_from(r.get::<_, i32>(4)).unwrap_or(0),
                        last_error: r.get(5),
                        created_unix_ns: audit_ns(Some(r.get(6))),
                        next_attempt_unix_ns: if status == "pending" {
                            audit_ns(Some(r.get(7)))
                        } else {
                            0
                        },
                        delivered_unix_ns: audit_ns(r.get(8)),
                        status,
                    }
                },
            );
            Ok(ctl::ListDeliveriesResponse {
                deliveries,
                next_page_token: next,
            })
        })
    }
}

const _: () = assert!(WEBHOOK_ATTEMPTS_MAX >= 1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_bound_in_sql_is_the_limit() {
        let sql = crate::migrate::MIGRATIONS
            .iter()
            .find(|m| m.name == "0004_usage_and_webhooks")
            .unwrap()
            .sql;
        let n = crate::limits::WEBHOOK_QUEUE_MAX;
        assert!(
            sql.contains(&format!("LIMIT {n})")),
            "queue bound in wrenn_raise_event"
        );
        assert_eq!(sql.matches(&format!(">= {n}")).count(), 2);
    }

    #[test]
    fn event_types_match_the_triggers_and_the_schema() {
        let sql: String = crate::migrate::MIGRATIONS.iter().map(|m| m.sql).collect();
        let schema = include_str!("../../../proto/schema/wrenn/ctl/v1/ctl.proto");
        for t in EVENT_TYPES {
            assert!(schema.contains(t), "{t} not documented in ctl.proto");
            assert!(sql.contains(&format!("'{t}'")), "{t} never raised");
        }
    }
}

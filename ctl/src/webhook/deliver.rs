//! The delivery job: claims due deliveries, POSTs them signed, records the outcome.
//!
//! Each round, in one transaction under an advisory lock (so replicas take turns claiming),
//! up to [`WEBHOOK_WORKERS`] due deliveries are claimed, at most
//! [`WEBHOOK_PER_ENDPOINT_MAX`] per webhook, and leased: their `next_attempt_at` moves to
//! the end of the lease and `attempts` counts the attempt. The attempts then run in
//! parallel, outside any transaction, each within its timeout; each outcome is one UPDATE.
//! A replica that dies mid-attempt leaves its claims to become due again when the lease
//! ends, so every event is delivered at least once (receivers dedupe by `Wrenn-Delivery`).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::id::{self, Kind, Uuid};
use proto::Status;

use super::target::{self, parse_url};
use crate::config::WebhookConfig;
use crate::db::pg_err;
use crate::limits::{
    WEBHOOK_ATTEMPTS_MAX, WEBHOOK_ERROR_LEN_MAX, WEBHOOK_PER_ENDPOINT_MAX,
    WEBHOOK_RESPONSE_BODY_MAX, WEBHOOK_RESPONSE_HEAD_MAX, WEBHOOK_WORKERS,
};
use crate::service::{audit_ns, Api};

/// Advisory lock key of the delivery claims ("wrenn-wh").
pub const WEBHOOK_LOCK: i64 = 0x7772_656e_6e2d_7768;

/// One claimed delivery.
#[derive(Clone, Debug)]
pub struct Claim {
    pub webhook: Uuid,
    pub event: Uuid,
    pub url: String,
    pub secret: String,
    pub attempt: i32,
    pub event_type: String,
    pub body: Vec<u8>,
}

/// The outcome of one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// HTTP status of the answer (0: none).
    pub http_status: u16,
    /// "" on success.
    pub error: String,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.error.is_empty()
    }
}

/// Backoff after failed attempt `n` (1-based).
pub fn backoff(cfg: &WebhookConfig, n: i32) -> Duration {
    let shift = u32::try_from(n.saturating_sub(1)).unwrap_or(0).min(20);
    cfg.backoff_base
        .saturating_mul(1u32 << shift)
        .min(cfg.backoff_max)
}

/// Claims due deliveries (none when another replica holds the lock this instant).
pub fn claim(api: &Api) -> Result<Vec<Claim>, Status> {
    let lease = api.config().webhooks.lease.as_secs_f64();
    let workers = i64::try_from(WEBHOOK_WORKERS).unwrap_or(8);
    api.db().tx(move |tx| {
        let got: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&WEBHOOK_LOCK])
            .map_err(pg_err)?
            .get(0);
        if !got {
            return Ok(Vec::new());
        }
        let rows = tx
            .query(
                "WITH due AS ( \
                    SELECT webhook_id, event_id FROM ( \
                        SELECT webhook_id, event_id, next_attempt_at, row_number() OVER \
                            (PARTITION BY webhook_id ORDER BY next_attempt_at, event_id) AS n \
                        FROM webhook_deliveries \
                        WHERE status = 'pending' AND next_attempt_at <= clock_timestamp()) d \
                    WHERE n <= $2 ORDER BY next_attempt_at LIMIT $3) \
                 UPDATE webhook_deliveries w \
                    SET attempts = w.attempts + 1, \
                        next_attempt_at = clock_timestamp() + make_interval(secs => $1) \
                 FROM due, webhooks h, webhook_events e \
                 WHERE w.webhook_id = due.webhook_id AND w.event_id = due.event_id \
                   AND h.id = w.webhook_id AND e.id = w.event_id \
                 RETURNING w.webhook_id, w.event_id, h.url, h.secret, w.attempts, e.type, \
                    e.created_at, e.team_id, e.data",
                &[&lease, &WEBHOOK_PER_ENDPOINT_MAX, &workers],
            )
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| {
                let event: Uuid = r.get(1);
                let team: Uuid = r.get(7);
                let data: serde_json::Value = r.get(8);
                let event_type: String = r.get(5);
                let body = serde_json::json!({
                    "id": id::format(Kind::Event, event),
                    "type": event_type,
                    "created_unix_ns": audit_ns(Some(r.get::<_, SystemTime>(6))),
                    "team_id": id::format(Kind::Team, team),
                    "data": data,
                });
                Claim {
                    webhook: r.get(0),
                    event,
                    url: r.get(2),
                    secret: r.get(3),
                    attempt: r.get(4),
                    event_type,
                    body: body.to_string().into_bytes(),
                }
            })
            .collect())
    })
}

fn cut(mut s: String) -> String {
    if s.len() > WEBHOOK_ERROR_LEN_MAX {
        let mut n = WEBHOOK_ERROR_LEN_MAX;
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s.truncate(n);
    }
    s
}

/// One attempt: connect (address checked), POST, read the status line.
pub fn attempt(c: &Claim, cfg: &WebhookConfig) -> Outcome {
    let fail = |http_status: u16, e: String| Outcome {
        http_status,
        error: cut(e),
    };
    let url = match parse_url(&c.url) {
        Ok(u) => u,
        Err(e) => return fail(0, e.to_string()),
    };
    let deadline = Instant::now() + cfg.attempt_timeout;
    let stream = match target::connect(&url, cfg.allow_private, deadline) {
        Ok(s) => s,
        Err(e) => return fail(0, e.to_string()),
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let _ = stream.set_read_timeout(Some(left));
    let _ = stream.set_write_timeout(Some(left));
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let sig = proto::hmac::webhook_signature(&c.secret, unix, &c.body);
    let host = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let delivery = id::format(Kind::Event, c.event);
    let attempt = c.attempt.to_string();
    let head = match proto::http::request_head(
        "POST",
        &url.target,
        &[
            ("Host", &host),
            ("User-Agent", "wrenn-webhook/1"),
            ("Content-Type", "application/json"),
            ("Wrenn-Signature", &sig),
            ("Wrenn-Event", &c.event_type),
            ("Wrenn-Delivery", &delivery),
            ("Wrenn-Attempt", &attempt),
            ("Connection", "close"),
        ],
        Some(c.body.len() as u64),
    ) {
        Ok(h) => h,
        Err(e) => return fail(0, format!("request: {e}")),
    };
    let mut w = &stream;
    if let Err(e) = w.write_all(&head).and_then(|()| w.write_all(&c.body)) {
        return fail(0, format!("send: {e}"));
    }
    let mut wire = proto::http::Wire::new(&stream, Vec::new());
    match proto::http::read_response(
        &mut wire,
        WEBHOOK_RESPONSE_HEAD_MAX,
        WEBHOOK_RESPONSE_BODY_MAX,
        false,
    ) {
        Ok(r) => {
            let s = r.head.status;
            if (200..300).contains(&s) {
                Outcome {
                    http_status: s,
                    error: String::new(),
                }
            } else if (300..400).contains(&s) {
                let to = r.head.header("location").unwrap_or("").to_owned();
                fail(
                    s,
                    format!("HTTP {s}: redirects are not followed (location {to:?})"),
                )
            } else {
                fail(s, format!("HTTP {s}"))
            }
        }
        Err(e) if e.is_timeout() => fail(0, "no answer within the attempt timeout".into()),
        Err(e) => fail(0, format!("{e}")),
    }
}

/// Records an attempt's outcome: delivered, pending again after the backoff, or failed.
pub fn record(api: &Api, c: &Claim, o: &Outcome) -> Result<(), Status> {
    let (w, e, attempt) = (c.webhook, c.event, c.attempt);
    let http = i32::from(o.http_status);
    let err = o.error.clone();
    let ok = o.ok();
    let wait = backoff(&api.config().webhooks, attempt).as_secs_f64();
    api.db().run(move |db| {
        if ok {
            db.execute(
                "UPDATE webhook_deliveries SET status = 'delivered', delivered_at = clock_timestamp(), \
                    last_http_status = $3, last_error = '' WHERE webhook_id = $1 AND event_id = $2",
                &[&w, &e, &http],
            )
        } else {
            db.execute(
                "UPDATE webhook_deliveries SET last_http_status = $3, last_error = $4, \
                    status = CASE WHEN attempts >= $5 THEN 'failed' ELSE 'pending' END, \
                    next_attempt_at = clock_timestamp() + make_interval(secs => $6) \
                 WHERE webhook_id = $1 AND event_id = $2 AND status = 'pending'",
                &[&w, &e, &http, &err, &WEBHOOK_ATTEMPTS_MAX, &wait],
            )
        }
        .map_err(pg_err)?;
        Ok(())
    })
}

/// One round: claim, attempt in parallel, record. Returns the attempts made.
pub fn run_once(api: &Api) -> Result<usize, Status> {
    let claims = claim(api)?;
    let cfg = api.config().webhooks.clone();
    let n = claims.len();
    std::thread::scope(|s| {
        for c in &claims {
            let cfg = &cfg;
            s.spawn(move || {
                let o = attempt(c, cfg);
                if o.ok() {
                    crate::metrics::WEBHOOK_DELIVERED.inc();
                } else {
                    crate::metrics::WEBHOOK_FAILED_ATTEMPTS.inc();
                    log::info!(
                        "webhook attempt failed webhook={} event={} attempt={} error={}",
                        id::format(Kind::Webhook, c.webhook),
                        id::format(Kind::Event, c.event),
                        c.attempt,
                        o.error
                    );
                }
                if let Err(e) = record(api, c, &o) {
                    // The lease ends and the delivery is attempted again: at least once.
                    log::warn!("webhook outcome not recorded error={}", e.message);
                }
            });
        }
    });
    Ok(n)
}

/// The delivery thread of one replica.
pub struct Delivery {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl Delivery {
    pub fn start(api: Api) -> std::io::Result<Delivery> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let join = std::thread::Builder::new()
            .name("ctl-webhooks".into())
            .spawn(move || {
                let poll = api.config().webhooks.poll;
                while !s2.load(Ordering::Relaxed) {
                    match run_once(&api) {
                        // Work was there: look again at once (more may be due).
                        Ok(n) if n > 0 => continue,
                        Ok(_) => {}
                        Err(e) => log::warn!("webhook delivery round failed: {}", e.message),
                    }
                    std::thread::sleep(poll);
                }
            })?;
        Ok(Delivery {
            stop,
            join: Some(join),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cfg = WebhookConfig::default();
        assert_eq!(backoff(&cfg, 1), Duration::from_secs(5));
        assert_eq!(backoff(&cfg, 2), Duration::from_secs(10));
        assert_eq!(backoff(&cfg, 7), Duration::from_secs(320));
        assert_eq!(backoff(&cfg, 8), Duration::from_secs(600));
        assert_eq!(backoff(&cfg, 1000), Duration::from_secs(600));
    }
}

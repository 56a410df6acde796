//! Background jobs and the host monitor.
//!
//! Jobs run on every replica's timer but do their work only when they win a PostgreSQL
//! advisory lock *and* the job's period has passed since any replica last ran it
//! (`background_jobs.last_run_at`), so N replicas run each job once per period.
//!
//! The host monitor marks hosts whose heartbeats stopped `unreachable` (audited); the next
//! heartbeat brings a host back `online` (audited in the host service).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::GenericClient;
use proto::id::{self, Kind, Uuid};
use proto::Status;

use crate::config::JobsConfig;
use crate::db::pg_err;
use crate::service::{audit_entry, audit_write, Actor, Api};

/// Advisory lock key of the monitor ("wrenn-mo").
pub const MONITOR_LOCK: i64 = 0x7772_656e_6e2d_6d6f;
/// Advisory lock key of the reconciler's claim ("wrenn-rc").
pub const RECONCILE_LOCK: i64 = 0x7772_656e_6e2d_7263;

/// Claims one run of job `name` for this period: true when this replica should run it now.
/// Call inside a transaction (the lock is transaction-scoped).
pub fn claim(
    tx: &mut impl GenericClient,
    lock: i64,
    name: &str,
    period: Duration,
) -> Result<bool, Status> {
    let got: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&lock])
        .map_err(pg_err)?
        .get(0);
    if !got {
        return Ok(false);
    }
    // A little slack so a replica whose timer fires just early still takes its turn.
    let secs = (period.as_secs_f64() * 0.9).max(0.0);
    let n = tx
        .execute(
            "UPDATE background_jobs SET last_run_at = now() WHERE name = $1 \
             AND last_run_at <= now() - make_interval(secs => $2)",
            &[&name, &secs],
        )
        .map_err(pg_err)?;
    Ok(n == 1)
}

/// One monitor pass: hosts online whose last heartbeat is older than `timeout` become
/// unreachable. Returns the hosts marked. Skips (empty) when another replica holds the lock.
pub fn check_hosts(api: &Api, timeout: Duration) -> Result<Vec<Uuid>, Status> {
    let secs = timeout.as_secs_f64();
    api.db().tx(move |tx| {
        let got: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&MONITOR_LOCK])
            .map_err(pg_err)?
            .get(0);
        if !got {
            return Ok(Vec::new());
        }
        let rows = tx
            .query(
                "UPDATE hosts SET status = 'unreachable' WHERE status = 'online' \
                 AND (last_heartbeat_at IS NULL OR last_heartbeat_at < now() - make_interval(secs => $1)) \
                 RETURNING id, hostname",
                &[&secs],
            )
            .map_err(pg_err)?;
        let mut marked = Vec::with_capacity(rows.len());
        for r in rows {
            let id: Uuid = r.get(0);
            let name: String = r.get(1);
            log::warn!("host missed heartbeats host={} hostname={name}", id::format(Kind::Host, id));
            audit_write(tx, audit_entry(
                None,
                &Actor::System,
                "host",
                id::format(Kind::Host, id),
                "host.unreachable",
                serde_json::json!({"timeout_s": secs}),
            ))?;
            crate::metrics::HOSTS_UNREACHABLE_MARKED.inc();
            marked.push(id);
        }
        Ok(marked)
    })
}

/// Runs the monitor and the reconciler on a timer until the handle is dropped or stopped.
pub struct Jobs {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
    /// Webhook deliveries: a thread of their own, so a slow endpoint never delays the
    /// monitor (`webhook/deliver.rs`).
    webhooks: Option<crate::webhook::deliver::Delivery>,
}

impl Jobs {
    pub fn start(api: Api, cfg: JobsConfig) -> std::io::Result<Jobs> {
        let webhooks = Some(crate::webhook::deliver::Delivery::start(api.clone())?);
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let join = std::thread::Builder::new()
            .name("ctl-jobs".into())
            .spawn(move || {
                let monitor_every = (cfg.heartbeat_timeout / 3).max(Duration::from_millis(200));
                let mut next_monitor = Instant::now();
                let mut next_reconcile = Instant::now() + cfg.reconcile_interval / 2;
                let mut next_drift = Instant::now();
                let mut next_usage = Instant::now() + crate::limits::USAGE_FLUSH_INTERVAL / 2;
                while !s2.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now >= next_monitor {
                        if let Err(e) = check_hosts(&api, cfg.heartbeat_timeout) {
                            log::warn!("host monitor failed: {}", e.message);
                        }
                        next_monitor = now + monitor_every;
                    }
                    if now >= next_drift {
                        crate::reconciler::check_heartbeats(&api, &cfg);
                        next_drift = now + crate::limits::DRIFT_CHECK_INTERVAL;
                    }
                    if now >= next_usage {
                        // On a thread of its own: it calls agents, which must never delay
                        // the host monitor; one pass at a time.
                        crate::usage::spawn_flush(&api);
                        next_usage = now + crate::limits::USAGE_FLUSH_INTERVAL;
                    }
                    if now >= next_reconcile {
                        if let Err(e) = crate::reconciler::run_if_due(&api, &cfg) {
                            log::warn!("reconciler failed: {}", e.message);
                        }
                        next_reconcile = now + cfg.reconcile_interval;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })?;
        Ok(Jobs {
            stop,
            join: Some(join),
            webhooks,
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        if let Some(mut w) = self.webhooks.take() {
            w.stop();
        }
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        self.stop();
    }
}

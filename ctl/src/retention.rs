//! How long the history that grows with use is kept, and its pruning: stored samples, state
//! transitions and finished webhook deliveries. Runs with the usage flush (once per period
//! across replicas, in the transaction that claimed it); each statement deletes at most
//! [`RETENTION_BATCH`] rows, so a backlog is worked off over several periods instead of
//! one long statement.

use postgres::GenericClient;
use proto::Status;

use crate::db::pg_err;
use crate::limits::{RETENTION_BATCH, USAGE_RETENTION, WEBHOOK_RETENTION};

/// Rows deleted, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub samples: u64,
    pub transitions: u64,
    pub deliveries: u64,
    pub events: u64,
}

pub fn prune(tx: &mut impl GenericClient) -> Result<Pruned, Status> {
    let usage_s = USAGE_RETENTION.as_secs_f64();
    let hook_s = WEBHOOK_RETENTION.as_secs_f64();
    let batch = RETENTION_BATCH;
    let samples = tx
        .execute(
            "DELETE FROM sandbox_samples WHERE ctid IN (SELECT ctid FROM sandbox_samples \
             WHERE end_at < now() - make_interval(secs => $1) LIMIT $2)",
            &[&usage_s, &batch],
        )
        .map_err(pg_err)?;
    // A transition older than the retention is needed only while it is the last one before
    // the cut (it says what the sandbox was doing when the kept history starts), and not
    // even then when that state is stopped.
    let transitions = tx
        .execute(
            "DELETE FROM sandbox_transitions WHERE ctid IN (SELECT t.ctid FROM sandbox_transitions t \
             WHERE t.at < now() - make_interval(secs => $1) \
               AND (t.state = 'stopped' OR EXISTS (SELECT 1 FROM sandbox_transitions n \
                    WHERE n.sandbox_id = t.sandbox_id AND n.seq > t.seq \
                      AND n.at < now() - make_interval(secs => $1))) \
             LIMIT $2)",
            &[&usage_s, &batch],
        )
        .map_err(pg_err)?;
    let deliveries = tx
        .execute(
            "DELETE FROM webhook_deliveries WHERE ctid IN (SELECT ctid FROM webhook_deliveries \
             WHERE status <> 'pending' AND created_at < now() - make_interval(secs => $1) LIMIT $2)",
            &[&hook_s, &batch],
        )
        .map_err(pg_err)?;
    let events = tx
        .execute(
            "DELETE FROM webhook_events WHERE ctid IN (SELECT e.ctid FROM webhook_events e \
             WHERE e.created_at < now() - make_interval(secs => $1) \
               AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id) LIMIT $2)",
            &[&hook_s, &batch],
        )
        .map_err(pg_err)?;
    Ok(Pruned {
        samples,
        transitions,
        deliveries,
        events,
    })
}

//! Per-sandbox metrics (`Sandboxes/Metrics`) and usage per team per day (`Teams/Usage`).
//!
//! The agent samples each running VM once a second into ring tiers (agent `samples.rs`) and
//! serves them with `Sandboxes/Samples`. ctl stores them in `sandbox_samples`:
//! - right after a pause or destroy it made (the agent freezes the tiers of a VM that is
//!   gone and keeps them an hour), on the first Metrics read of a sandbox paused or stopped
//!   by someone else (the TTL, a VM that died), and every [`USAGE_FLUSH_INTERVAL`] for
//!   running sandboxes (the `usage_flush` job, under an advisory lock);
//! - the 30-s tier is the usage series; the 1-s tier's last ten minutes are kept for
//!   Metrics only.
//!
//! While a sandbox has a VM, Metrics asks its agent; once paused or stopped, the database.
//!
//! Usage ([`compute_usage`], a pure function) comes from the state transitions, which
//! PostgreSQL always has (`sandbox_transitions`, written by a trigger with every state
//! change), and from the stored samples: sandbox-seconds are the seconds in state
//! `running`; CPU-seconds and memory MiB-seconds are the samples' where samples cover the
//! running time, and for running time without samples (an agent crash, a force-destroy, a
//! flush that failed) the sandbox's vCPUs and memory size in full — an upper bound, and
//! `unsampled_seconds` says how much of the day it is.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::id::{self, Kind, Uuid};
use proto::Status;

use crate::db::pg_err;
use crate::limits::{
    METRICS_COARSE_STEP_S, METRICS_FINE_RANGE_S, METRICS_MID_RANGE_S, METRICS_MID_STEP_S,
    METRICS_RANGE_DEFAULT_S, METRICS_RANGE_MAX_S, SAMPLES_CALL_TIMEOUT, USAGE_DAYS_DEFAULT,
    USAGE_DAYS_MAX, USAGE_FLUSH_INTERVAL, USAGE_ROWS_MAX,
};
use crate::service::{parse_id, parse_opt_id, time_from_ns, Api, AuthCtx};

/// Advisory lock key of the usage flush ("wrenn-uf").
pub const USAGE_FLUSH_LOCK: i64 = 0x7772_656e_6e2d_7566;

const DAY_S: i64 = 86_400;
const MIB: f64 = 1024.0 * 1024.0;

/// The step `Sandboxes/Metrics` answers with for a range.
pub fn step_for_range(range_s: u32) -> u32 {
    if range_s <= METRICS_FINE_RANGE_S {
        1
    } else if range_s <= METRICS_MID_RANGE_S {
        METRICS_MID_STEP_S
    } else {
        METRICS_COARSE_STEP_S
    }
}

fn to_ctl(s: &agent::UsageSample) -> ctl::UsageSample {
    ctl::UsageSample {
        unix_ns: s.unix_ns,
        step_s: s.step_s,
        cpu_usec: s.cpu_usec,
        memory_bytes: s.memory_bytes,
        disk_bytes: s.disk_bytes,
        net_rx_bytes: s.net_rx_bytes,
        net_tx_bytes: s.net_tx_bytes,
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Api {
    /// Stores what `host`'s agent holds of sandbox `id` that the database does not have yet
    /// (the 30-s tier, and the 1-s tier's last ten minutes). Returns the samples stored.
    pub fn store_samples(&self, host: Uuid, id: Uuid) -> Result<usize, Status> {
        let mut stored = 0;
        for step in [METRICS_MID_STEP_S, 1] {
            let step_i = i32::try_from(step).unwrap_or(i32::MAX);
            let since: Option<SystemTime> = self.inner.db.run(move |c| {
                Ok(c.query_one(
                    "SELECT max(end_at) FROM sandbox_samples WHERE sandbox_id = $1 AND step_s = $2",
                    &[&id, &step_i],
                )
                .map_err(pg_err)?
                .get(0))
            })?;
            let r: agent::SandboxSamplesResponse = self.inner.agents.unary_timeout(
                host,
                agent::sandboxes_methods::SAMPLES,
                &agent::SandboxSamplesRequest {
                    sandbox_id: id::format(Kind::Sandbox, id),
                    // PostgreSQL keeps microseconds: a stored end is up to 999 ns before the
                    // agent's, so the sample it came from is not asked for again.
                    since_unix_ns: since.map_or(0, |t| crate::service::audit_ns(Some(t)) + 999),
                    step_s: step,
                },
                SAMPLES_CALL_TIMEOUT,
            )?;
            if r.samples.is_empty() {
                continue;
            }
            let mut end = Vec::with_capacity(r.samples.len());
            let mut cov = Vec::with_capacity(r.samples.len());
            let (mut cpu, mut mem, mut disk, mut rx, mut tx) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for s in &r.samples {
                end.push(time_from_ns(s.unix_ns));
                cov.push(i32::try_from(s.step_s.max(1)).unwrap_or(i32::MAX));
                cpu.push(i64_of(s.cpu_usec));
                mem.push(i64_of(s.memory_bytes));
                disk.push(i64_of(s.disk_bytes));
                rx.push(i64_of(s.net_rx_bytes));
                tx.push(i64_of(s.net_tx_bytes));
            }
            stored += self.inner.db.tx(move |tx_| {
                let n = tx_.execute(
                    "INSERT INTO sandbox_samples (sandbox_id, step_s, team_id, end_at, covered_s, \
                        cpu_usec, memory_bytes, disk_bytes, net_rx_bytes, net_tx_bytes) \
                     SELECT $1, $2, s.team_id, u.* FROM sandboxes s, unnest($3::timestamptz[], \
                        $4::int[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], \
                        $9::bigint[]) u WHERE s.id = $1 \
                     ON CONFLICT DO NOTHING",
                    &[&id, &step_i, &end, &cov, &cpu, &mem, &disk, &rx, &tx],
                )
                .map_err(pg_err)?;
                if step_i == 1 {
                    // The 1-s tier is for Metrics' last ten minutes only.
                    let keep = f64::from(METRICS_FINE_RANGE_S);
                    tx_.execute(
                        "DELETE FROM sandbox_samples WHERE sandbox_id = $1 AND step_s = 1 \
                         AND end_at < (SELECT max(end_at) FROM sandbox_samples \
                            WHERE sandbox_id = $1 AND step_s = 1) - make_interval(secs => $2)",
                        &[&id, &keep],
                    )
                    .map_err(pg_err)?;
                }
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            })?;
        }
        Ok(stored)
    }

    /// [`Api::store_samples`] where a failure only costs precision (usage then falls back
    /// to the transitions): logged, not returned.
    pub(crate) fn store_samples_logged(&self, host: Uuid, id: Uuid) {
        if let Err(e) = self.store_samples(host, id) {
            log::info!(
                "samples not stored sandbox={} host={} code={} error={}",
                id::format(Kind::Sandbox, id),
                id::format(Kind::Host, host),
                e.code,
                e.message
            );
        }
    }

    /// `Sandboxes/Metrics`.
    pub fn sandbox_metrics(
        &self,
        ctx: &AuthCtx,
        req: ctl::SandboxMetricsRequest,
    ) -> Result<ctl::SandboxMetricsResponse, Status> {
        let id = parse_id(Kind::Sandbox, &req.sandbox_id)?;
        let range_s = match req.range_s {
            0 => METRICS_RANGE_DEFAULT_S,
            n if n > METRICS_RANGE_MAX_S => {
                return Err(Status::invalid_argument(format!(
                    "range_s={n} is above {METRICS_RANGE_MAX_S} (24 h: what agents keep)"
                )))
            }
            n => n,
        };
        let step = step_for_range(range_s);
        let team = ctx.team_id;
        let (state, host): (String, Option<Uuid>) = self.inner.db.run(move |c| {
            let r = c
                .query_opt(
                    "SELECT state, host_id FROM sandboxes WHERE id = $1 AND team_id = $2",
                    &[&id, &team],
                )
                .map_err(pg_err)?
                .ok_or_else(|| Status::not_found("sandbox not found"))?;
            Ok((r.get(0), r.get(1)))
        })?;
        if let (Some(host), true) = (host, state == "running") {
            let since = SystemTime::now() - Duration::from_secs(u64::from(range_s));
            let r: agent::SandboxSamplesResponse = self.inner.agents.unary_timeout(
                host,
                agent::sandboxes_methods::SAMPLES,
                &agent::SandboxSamplesRequest {
                    sandbox_id: id::format(Kind::Sandbox, id),
                    since_unix_ns: crate::service::audit_ns(Some(since)),
                    step_s: step,
                },
                SAMPLES_CALL_TIMEOUT,
            )?;
            return Ok(ctl::SandboxMetricsResponse {
                samples: r.samples.iter().map(to_ctl).collect(),
                step_s: r.step_s,
                source: "agent".into(),
            });
        }
        // Paused or stopped by someone else (TTL, a VM that died): what the agent still
        // holds is stored first, so this answer and usage both have it.
        if let Some(host) = host {
            self.store_samples_logged(host, id);
        }
        let samples = self
            .inner
            .db
            .run(move |c| db_samples(c, id, step, range_s))?;
        Ok(ctl::SandboxMetricsResponse {
            samples,
            step_s: step,
            source: "database".into(),
        })
    }

    /// `Teams/Usage`.
    pub fn team_usage(
        &self,
        ctx: &AuthCtx,
        req: ctl::TeamUsageRequest,
    ) -> Result<ctl::TeamUsageResponse, Status> {
        let team = match parse_opt_id(Kind::Team, &req.team_id)? {
            None => ctx.team_id,
            Some(t) if t == ctx.team_id || ctx.platform_admin => t,
            Some(_) => return Err(Status::not_found("team not found")),
        };
        let days = match req.days {
            0 => USAGE_DAYS_DEFAULT,
            n if n > USAGE_DAYS_MAX => {
                return Err(Status::invalid_argument(format!(
                    "days={n} is above {USAGE_DAYS_MAX}"
                )))
            }
            n => n,
        };
        let now = unix_s(SystemTime::now());
        let start = (now.div_euclid(DAY_S) - i64::from(days) + 1) * DAY_S;
        let start_t = UNIX_EPOCH + Duration::from_secs(u64::try_from(start).unwrap_or(0));
        let (transitions, samples) = self.inner.db.run(move |c| {
            let lim = USAGE_ROWS_MAX + 1;
            let tr = c
                .query(
                    "(SELECT sandbox_id, state, vcpus, memory_mib, at, seq FROM sandbox_transitions \
                        WHERE team_id = $1 AND at >= $2 LIMIT $3) \
                     UNION ALL \
                     (SELECT DISTINCT ON (sandbox_id) sandbox_id, state, vcpus, memory_mib, at, seq \
                        FROM sandbox_transitions WHERE team_id = $1 AND at < $2 \
                        ORDER BY sandbox_id, at DESC, seq DESC)",
                    &[&team, &start_t, &lim],
                )
                .map_err(pg_err)?;
            let sa = c
                .query(
                    "SELECT sandbox_id, end_at, covered_s, cpu_usec, memory_bytes \
                     FROM sandbox_samples WHERE team_id = $1 AND step_s = 30 AND end_at > $2 \
                     LIMIT $3",
                    &[&team, &start_t, &lim],
                )
                .map_err(pg_err)?;
            if tr.len() as i64 > USAGE_ROWS_MAX || sa.len() as i64 > USAGE_ROWS_MAX {
                return Err(Status::resource_exhausted(format!(
                    "usage over {days} days reads more than {USAGE_ROWS_MAX} rows; ask for fewer days"
                )));
            }
            let tr: Vec<Transition> = tr
                .iter()
                .map(|r| Transition {
                    sandbox: r.get(0),
                    running: r.get::<_, &str>(1) == "running",
                    vcpus: r.get(2),
                    memory_mib: r.get(3),
                    at_s: unix_s_f(r.get(4)),
                    seq: r.get(5),
                })
                .collect();
            let sa: Vec<StoredSample> = sa
                .iter()
                .map(|r| StoredSample {
                    sandbox: r.get(0),
                    end_s: unix_s_f(r.get(1)),
                    covered_s: f64::from(r.get::<_, i32>(2)),
                    cpu_usec: r.get(3),
                    memory_bytes: r.get(4),
                })
                .collect();
            Ok((tr, sa))
        })?;
        let now_f = unix_s_f(SystemTime::now());
        Ok(ctl::TeamUsageResponse {
            days: compute_usage(&transitions, &samples, start, days, now_f),
        })
    }

    /// One pass of the usage flush: stores running sandboxes' samples and prunes old
    /// history ([`crate::retention`]), at most once per [`USAGE_FLUSH_INTERVAL`] across
    /// replicas (advisory lock + `background_jobs`).
    /// Returns the sandboxes flushed (None when another replica has the turn).
    pub fn flush_running_samples(&self) -> Result<Option<usize>, Status> {
        let targets: Option<Vec<(Uuid, Uuid)>> = self.inner.db.tx(move |tx| {
            if !crate::monitor::claim(tx, USAGE_FLUSH_LOCK, "usage_flush", USAGE_FLUSH_INTERVAL)? {
                return Ok(None);
            }
            // History past its retention goes with the same turn (retention.rs).
            let pruned = crate::retention::prune(tx)?;
            if pruned != crate::retention::Pruned::default() {
                log::info!("pruned history {pruned:?}");
            }
            let rows = tx
                .query(
                    "SELECT s.host_id, s.id FROM sandboxes s JOIN hosts h ON h.id = s.host_id \
                     WHERE s.state = 'running' AND h.status = 'online'",
                    &[],
                )
                .map_err(pg_err)?;
            Ok(Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
        })?;
        let Some(targets) = targets else {
            return Ok(None);
        };
        for (host, id) in &targets {
            self.store_samples_logged(*host, *id);
        }
        Ok(Some(targets.len()))
    }
}

/// Runs one [`Api::flush_running_samples`] pass on its own thread unless one still runs.
pub fn spawn_flush(api: &Api) {
    static RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if RUNNING.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    let api = api.clone();
    let spawned = std::thread::Builder::new()
        .name("ctl-usage-flush".into())
        .spawn(move || {
            match api.flush_running_samples() {
                Ok(Some(n)) => log::debug!("usage flush sandboxes={n}"),
                Ok(None) => {}
                Err(e) => log::warn!("usage flush failed: {}", e.message),
            }
            RUNNING.store(false, std::sync::atomic::Ordering::Release);
        });
    if let Err(e) = spawned {
        log::warn!("usage flush not started: {e}");
        RUNNING.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Samples of `id` from the database: the `range_s` before its last stored sample, at
/// `step` (the 5-minute step is summed from the 30-s rows).
fn db_samples(
    c: &mut postgres::Client,
    id: Uuid,
    step: u32,
    range_s: u32,
) -> Result<Vec<ctl::UsageSample>, Status> {
    let range = f64::from(range_s);
    let rows = if step == METRICS_COARSE_STEP_S {
        c.query(
            "WITH s AS (SELECT * FROM sandbox_samples WHERE sandbox_id = $1 AND step_s = 30 \
                AND end_at > (SELECT max(end_at) FROM sandbox_samples WHERE sandbox_id = $1 \
                    AND step_s = 30) - make_interval(secs => $2)) \
             SELECT date_bin('5 minutes', end_at - interval '1 microsecond', 'epoch') \
                    + interval '5 minutes' AS b, sum(covered_s)::int, sum(cpu_usec)::bigint, \
                    (sum(memory_bytes * covered_s) / sum(covered_s))::bigint, max(disk_bytes), \
                    sum(net_rx_bytes)::bigint, sum(net_tx_bytes)::bigint \
             FROM s GROUP BY b ORDER BY b",
            &[&id, &range],
        )
    } else {
        let step_i = i32::try_from(step).unwrap_or(i32::MAX);
        c.query(
            "SELECT end_at, covered_s, cpu_usec, memory_bytes, disk_bytes, net_rx_bytes, net_tx_bytes \
             FROM sandbox_samples WHERE sandbox_id = $1 AND step_s = $3 \
                AND end_at > (SELECT max(end_at) FROM sandbox_samples WHERE sandbox_id = $1 \
                    AND step_s = $3) - make_interval(secs => $2) \
             ORDER BY end_at",
            &[&id, &range, &step_i],
        )
    }
    .map_err(pg_err)?;
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(rows
        .iter()
        .map(|r| ctl::UsageSample {
            unix_ns: crate::service::audit_ns(Some(r.get(0))),
            step_s: u32::try_from(r.get::<_, i32>(1)).unwrap_or(0),
            cpu_usec: u(r.get(2)),
            memory_bytes: u(r.get(3)),
            disk_bytes: u(r.get(4)),
            net_rx_bytes: u(r.get(5)),
            net_tx_bytes: u(r.get(6)),
        })
        .collect())
}

fn unix_s(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn unix_s_f(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A state a sandbox entered.
#[derive(Clone, Debug)]
pub struct Transition {
    pub sandbox: Uuid,
    /// Whether the state entered is `running`.
    pub running: bool,
    pub vcpus: i32,
    pub memory_mib: i32,
    pub at_s: f64,
    /// Order of transitions at the same instant.
    pub seq: i64,
}

/// A stored 30-s sample.
#[derive(Clone, Debug)]
pub struct StoredSample {
    pub sandbox: Uuid,
    pub end_s: f64,
    pub covered_s: f64,
    pub cpu_usec: i64,
    pub memory_bytes: i64,
}

#[derive(Default, Clone, Copy)]
struct Cell {
    running_s: f64,
    alloc_cpu_s: f64,
    alloc_mem_mib_s: f64,
    covered_s: f64,
    cpu_s: f64,
    mem_mib_s: f64,
}

/// Usage per UTC day from `start_s` (a day boundary) for `days` days, up to `now_s`.
///
/// Per sandbox and day: running seconds from the transitions (each running interval ends at
/// the sandbox's next transition, or now); samples (assigned to the day their interval ends
/// in) give CPU and memory for the seconds they cover; the running seconds they do not
/// cover count the sandbox's vCPUs and memory in full.
pub fn compute_usage(
    transitions: &[Transition],
    samples: &[StoredSample],
    start_s: i64,
    days: u32,
    now_s: f64,
) -> Vec<ctl::DailyUsage> {
    let n = days as usize;
    let day_of = |t: f64| -> Option<usize> {
        let d = ((t - start_s as f64) / DAY_S as f64).floor();
        (d >= 0.0 && (d as usize) < n).then_some(d as usize)
    };
    let mut by_sb: HashMap<Uuid, Vec<&Transition>> = HashMap::new();
    for t in transitions {
        by_sb.entry(t.sandbox).or_default().push(t);
    }
    let mut cells: HashMap<(Uuid, usize), Cell> = HashMap::new();
    for (sb, mut ts) in by_sb {
        ts.sort_by(|a, b| a.at_s.total_cmp(&b.at_s).then(a.seq.cmp(&b.seq)));
        for (i, t) in ts.iter().enumerate() {
            if !t.running {
                continue;
            }
            let end = ts.get(i + 1).map_or(now_s, |n| n.at_s).min(now_s);
            let mut from = t.at_s.max(start_s as f64);
            // Split at day boundaries.
            while from < end {
                let Some(d) = day_of(from) else { break };
                let day_end = (start_s + (d as i64 + 1) * DAY_S) as f64;
                let to = end.min(day_end);
                let secs = to - from;
                let c = cells.entry((sb, d)).or_default();
                c.running_s += secs;
                c.alloc_cpu_s += secs * f64::from(t.vcpus);
                c.alloc_mem_mib_s += secs * f64::from(t.memory_mib);
                from = to;
            }
        }
    }
    for s in samples {
        let Some(d) = day_of(s.end_s - 1e-9) else {
            continue;
        };
        let c = cells.entry((s.sandbox, d)).or_default();
        c.covered_s += s.covered_s;
        c.cpu_s += s.cpu_usec as f64 / 1e6;
        c.mem_mib_s += s.memory_bytes as f64 * s.covered_s / MIB;
    }
    let mut out: Vec<ctl::DailyUsage> = (0..n)
        .map(|d| ctl::DailyUsage {
            day: day_name(start_s + d as i64 * DAY_S),
            ..Default::default()
        })
        .collect();
    for ((_, d), c) in cells {
        let uncovered = (c.running_s - c.covered_s).max(0.0);
        let share = if c.running_s > 0.0 {
            uncovered / c.running_s
        } else {
            0.0
        };
        let u = &mut out[d];
        u.sandbox_seconds += c.running_s;
        u.unsampled_seconds += uncovered;
        u.cpu_seconds += c.cpu_s + c.alloc_cpu_s * share;
        u.memory_mib_seconds += c.mem_mib_s + c.alloc_mem_mib_s * share;
    }
    out
}

/// "YYYY-MM-DD" of a Unix time (UTC), by the civil-from-days algorithm.
pub fn day_name(unix_s: i64) -> String {
    let z = unix_s.div_euclid(DAY_S) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const D0: i64 = 1_764_979_200; // 2025-12-06 00:00:00 UTC

    fn tr(sb: u128, running: bool, at: f64, seq: i64) -> Transition {
        Transition {
            sandbox: Uuid::from_u128(sb),
            running,
            vcpus: 2,
            memory_mib: 1024,
            at_s: at,
            seq,
        }
    }

    #[test]
    fn day_names() {
        assert_eq!(day_name(D0), "2025-12-06");
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(day_name(951_782_400), "2000-02-29");
        assert_eq!(day_name(D0 - 1), "2025-12-05");
    }

    #[test]
    fn steps_follow_the_range() {
        assert_eq!(step_for_range(600), 1);
        assert_eq!(step_for_range(601), 30);
        assert_eq!(step_for_range(7200), 30);
        assert_eq!(step_for_range(7201), 300);
    }

    #[test]
    fn usage_across_pause_and_resume_without_samples() {
        let d = D0 as f64;
        // Running 100 s, paused 1000 s, running 50 s, destroyed.
        let t = [
            tr(1, false, d + 10.0, 1), // pending
            tr(1, true, d + 20.0, 2),
            tr(1, false, d + 120.0, 3),  // pausing
            tr(1, false, d + 121.0, 4),  // paused
            tr(1, false, d + 1120.0, 5), // resuming
            tr(1, true, d + 1121.0, 6),
            tr(1, false, d + 1171.0, 7), // stopped
        ];
        let u = compute_usage(&t, &[], D0, 2, d + 5000.0);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].day, "2025-12-06");
        assert_eq!(u[0].sandbox_seconds, 150.0);
        assert_eq!(u[0].unsampled_seconds, 150.0);
        assert_eq!(u[0].cpu_seconds, 300.0, "2 vCPUs in full without samples");
        assert_eq!(u[0].memory_mib_seconds, 150.0 * 1024.0);
        assert_eq!(u[1].sandbox_seconds, 0.0);
    }

    #[test]
    fn samples_replace_the_allocation_where_they_cover() {
        let d = D0 as f64;
        let t = [tr(1, true, d + 0.0, 1), tr(1, false, d + 120.0, 2)];
        // Samples cover 60 of the 120 s: 0.5 CPU-s per s, 256 MiB.
        let s: Vec<StoredSample> = (1..=2)
            .map(|i| StoredSample {
                sandbox: Uuid::from_u128(1),
                end_s: d + 30.0 * f64::from(i),
                covered_s: 30.0,
                cpu_usec: 15_000_000,
                memory_bytes: 256 << 20,
            })
            .collect();
        let u = compute_usage(&t, &s, D0, 1, d + 500.0);
        assert_eq!(u[0].sandbox_seconds, 120.0);
        assert_eq!(u[0].unsampled_seconds, 60.0);
        // 30 CPU-s sampled + half the allocation (2 vCPUs × 120 s / 2).
        assert_eq!(u[0].cpu_seconds, 30.0 + 120.0);
        assert_eq!(u[0].memory_mib_seconds, 60.0 * 256.0 + 1024.0 * 60.0);
    }

    #[test]
    fn running_across_midnight_splits_and_still_running_counts_to_now() {
        let d = D0 as f64;
        // Entered running before the window: counted from the window's start.
        let t = [
            tr(1, true, d - 500.0, 1),
            tr(2, true, d + DAY_S as f64 - 100.0, 1),
        ];
        let now = d + DAY_S as f64 + 50.0;
        let u = compute_usage(&t, &[], D0, 2, now);
        assert_eq!(u[0].sandbox_seconds, DAY_S as f64 + 100.0);
        assert_eq!(u[1].sandbox_seconds, 50.0 + 50.0);
        assert_eq!(u[1].day, "2025-12-07");
    }
}

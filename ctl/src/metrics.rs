//! ctl's Prometheus metrics (`wrenn_ctl_*`); the HTTP side serves [`render`] at `/metrics`.

use proto::metrics::{family, sample, Counter, Gauge, Histogram};

pub static API_CALLS: Counter = Counter::new();
pub static API_ERRORS: Counter = Counter::new();
pub static API_CALL_SECONDS: Histogram = Histogram::new();
pub static AUTH_FAILURES: Counter = Counter::new();
/// Proxied requests checked against this replica's copy of the sandbox's traffic row.
pub static TRAFFIC_CACHE_HITS: Counter = Counter::new();
pub static HOST_CALLS: Counter = Counter::new();
pub static DB_JOBS: Counter = Counter::new();
pub static DB_JOB_SECONDS: Histogram = Histogram::new();
pub static DB_QUEUE_FULL: Counter = Counter::new();
pub static DB_UNAVAILABLE: Counter = Counter::new();
pub static AGENT_CALLS: Counter = Counter::new();
pub static AGENT_ERRORS: Counter = Counter::new();
pub static SANDBOXES_CREATED: Counter = Counter::new();
pub static SANDBOX_CREATE_SECONDS: Histogram = Histogram::new();
pub static SCHEDULE_EXHAUSTED: Counter = Counter::new();
pub static RECONCILE_RUNS: Counter = Counter::new();
pub static RECONCILE_ACTIONS: Counter = Counter::new();
pub static RECONCILE_EARLY: Counter = Counter::new();
pub static HOSTS_UNREACHABLE_MARKED: Counter = Counter::new();
pub static BACKGROUND_CREATES: Gauge = Gauge::new();
pub static WEBHOOK_DELIVERED: Counter = Counter::new();
pub static WEBHOOK_FAILED_ATTEMPTS: Counter = Counter::new();

/// Prometheus text of every ctl metric.
pub fn render() -> String {
    let mut out = String::new();
    let counters: [(&str, &str, &Counter); 18] = [
        (
            "wrenn_ctl_webhook_deliveries_total",
            "Webhook deliveries answered 2xx.",
            &WEBHOOK_DELIVERED,
        ),
        (
            "wrenn_ctl_webhook_failed_attempts_total",
            "Webhook delivery attempts that failed (each is retried until attempts run out).",
            &WEBHOOK_FAILED_ATTEMPTS,
        ),
        (
            "wrenn_ctl_api_calls_total",
            "Public API calls served (both transports).",
            &API_CALLS,
        ),
        (
            "wrenn_ctl_api_errors_total",
            "Public API calls that failed.",
            &API_ERRORS,
        ),
        (
            "wrenn_ctl_auth_failures_total",
            "Refused credentials.",
            &AUTH_FAILURES,
        ),
        (
            "wrenn_ctl_traffic_cache_hits_total",
            "Proxied requests checked against this replica's copy of the sandbox's traffic row (no database read).",
            &TRAFFIC_CACHE_HITS,
        ),
        (
            "wrenn_ctl_host_calls_total",
            "wrenn.host.v1 calls served.",
            &HOST_CALLS,
        ),
        (
            "wrenn_ctl_db_queue_full_total",
            "DB jobs refused because the queue was full.",
            &DB_QUEUE_FULL,
        ),
        (
            "wrenn_ctl_db_unavailable_total",
            "DB jobs failed as unavailable.",
            &DB_UNAVAILABLE,
        ),
        (
            "wrenn_ctl_agent_calls_total",
            "Calls made to agents.",
            &AGENT_CALLS,
        ),
        (
            "wrenn_ctl_agent_errors_total",
            "Calls to agents that failed.",
            &AGENT_ERRORS,
        ),
        (
            "wrenn_ctl_sandboxes_created_total",
            "Sandboxes created.",
            &SANDBOXES_CREATED,
        ),
        (
            "wrenn_ctl_schedule_exhausted_total",
            "Creates refused: no host had capacity.",
            &SCHEDULE_EXHAUSTED,
        ),
        (
            "wrenn_ctl_reconcile_runs_total",
            "Reconciler passes run by this replica.",
            &RECONCILE_RUNS,
        ),
        (
            "wrenn_ctl_reconcile_actions_total",
            "Corrections the reconciler applied.",
            &RECONCILE_ACTIONS,
        ),
        (
            "wrenn_ctl_reconcile_early_total",
            "Hosts reconciled at once because their heartbeat showed drift.",
            &RECONCILE_EARLY,
        ),
        (
            "wrenn_ctl_hosts_unreachable_total",
            "Hosts marked unreachable by this replica.",
            &HOSTS_UNREACHABLE_MARKED,
        ),
        ("wrenn_ctl_db_jobs_total", "DB jobs run.", &DB_JOBS),
    ];
    for (name, help, c) in counters {
        proto_counter(&mut out, name, help, c.get());
    }
    gauge(
        &mut out,
        "wrenn_ctl_background_creates",
        "Creates finishing in the background.",
        BACKGROUND_CREATES.get(),
    );
    let hists: [(&str, &str, &Histogram); 3] = [
        (
            "wrenn_ctl_api_call_duration_seconds",
            "Public API call latency.",
            &API_CALL_SECONDS,
        ),
        (
            "wrenn_ctl_db_job_duration_seconds",
            "DB job latency (queue + run).",
            &DB_JOB_SECONDS,
        ),
        (
            "wrenn_ctl_sandbox_create_duration_seconds",
            "Sandbox create latency.",
            &SANDBOX_CREATE_SECONDS,
        ),
    ];
    for (name, help, h) in hists {
        family(&mut out, name, "histogram", help);
        h.render(&mut out, name, "");
    }
    proto::rpc::admission::render_metrics(&mut out);
    out
}

fn proto_counter(out: &mut String, name: &str, help: &str, v: u64) {
    family(out, name, "counter", help);
    sample(out, name, "", v);
}

fn gauge(out: &mut String, name: &str, help: &str, v: i64) {
    family(out, name, "gauge", help);
    sample(out, name, "", v);
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_every_family_once() {
        super::API_CALLS.inc();
        let text = super::render();
        assert!(text.contains("wrenn_ctl_api_calls_total "));
        assert!(text.contains("wrenn_ctl_api_call_duration_seconds_bucket{le=\"+Inf\"}"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split(' ').nth(2).unwrap();
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
        }
    }
}

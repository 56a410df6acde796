//! The agent's metrics: static counters and histograms rendered as Prometheus text
//! (`/metrics`) and as samples (Host.Metrics).

use proto::metrics::{family, sample, Counter, Histogram};
use vmm_glue::net::resolver::stats as dns;

pub static TRANSITIONS: Counter = Counter::new();
pub static EXPIRED: Counter = Counter::new();
pub static RPC_CALLS: Counter = Counter::new();
pub static RPC_REFUSED: Counter = Counter::new();
pub static REPORTS_SENT: Counter = Counter::new();
pub static REPORTS_DROPPED: Counter = Counter::new();
pub static HEARTBEATS_FAILED: Counter = Counter::new();
/// Ports.Connect streams opened to guests.
pub static PORT_STREAMS: Counter = Counter::new();
/// Their relay halves on a thread and parked (idle, no thread).
pub static PORT_RELAYS: proto::rpc::park::ParkGauges = proto::rpc::park::ParkGauges::new();
pub static CREATE_SECONDS: Histogram = Histogram::new();
pub static PAUSE_SECONDS: Histogram = Histogram::new();
pub static RESUME_SECONDS: Histogram = Histogram::new();
/// Restores through wrenn-uffd whose page server gave its final report
/// ([`crate::restore_stats`]), and the sums of their counters.
pub static RESTORES_SETTLED: Counter = Counter::new();
pub static RESTORE_FAULTS: Counter = Counter::new();
pub static RESTORE_PAGES_PREFETCHED: Counter = Counter::new();
pub static RESTORE_PAGES_FILLED: Counter = Counter::new();
/// From the handshake until every page was resident.
pub static RESTORE_RESIDENT_SECONDS: Histogram = Histogram::new();
/// From the handshake to the first page fault.
pub static RESTORE_FIRST_FAULT_SECONDS: Histogram = Histogram::new();

/// A gauge sample computed at scrape time.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// Counters as samples (histograms are exported as their counts).
pub fn counters() -> Vec<Sample> {
    let c = |name, v: u64| Sample {
        name,
        labels: Vec::new(),
        value: v as f64,
    };
    vec![
        c("wrenn_agent_transitions_total", TRANSITIONS.get()),
        c("wrenn_agent_expired_total", EXPIRED.get()),
        c("wrenn_agent_rpc_calls_total", RPC_CALLS.get()),
        c("wrenn_agent_rpc_refused_total", RPC_REFUSED.get()),
        c("wrenn_agent_reports_sent_total", REPORTS_SENT.get()),
        c("wrenn_agent_reports_dropped_total", REPORTS_DROPPED.get()),
        c(
            "wrenn_agent_heartbeats_failed_total",
            HEARTBEATS_FAILED.get(),
        ),
        c("wrenn_agent_dns_queries_total", dns::QUERIES.get()),
        c(
            "wrenn_agent_dns_rate_dropped_total",
            dns::RATE_DROPPED.get(),
        ),
        c("wrenn_agent_dns_refused_total", dns::REFUSED.get()),
        c("wrenn_agent_dns_forwarded_total", dns::FORWARDED.get()),
        c("wrenn_agent_dns_servfail_total", dns::SERVFAIL.get()),
        c(
            "wrenn_agent_dns_addresses_added_total",
            dns::ADDRESSES_ADDED.get(),
        ),
        c(
            "wrenn_agent_dns_never_out_dropped_total",
            dns::NEVER_OUT_DROPPED.get(),
        ),
        c(
            "wrenn_agent_dns_tcp_accepted_total",
            dns::TCP_ACCEPTED.get(),
        ),
        c(
            "wrenn_agent_dns_tcp_over_limit_total",
            dns::TCP_OVER_LIMIT.get(),
        ),
        c(
            "wrenn_agent_dns_tcp_idle_closed_total",
            dns::TCP_IDLE_CLOSED.get(),
        ),
        c("wrenn_agent_port_streams_total", PORT_STREAMS.get()),
        c("wrenn_agent_restores_settled_total", RESTORES_SETTLED.get()),
        c("wrenn_agent_restore_faults_total", RESTORE_FAULTS.get()),
        c(
            "wrenn_agent_restore_pages_prefetched_total",
            RESTORE_PAGES_PREFETCHED.get(),
        ),
        c(
            "wrenn_agent_restore_pages_filled_total",
            RESTORE_PAGES_FILLED.get(),
        ),
        c("wrenn_agent_create_seconds_count", CREATE_SECONDS.count()),
        c("wrenn_agent_pause_seconds_count", PAUSE_SECONDS.count()),
        c("wrenn_agent_resume_seconds_count", RESUME_SECONDS.count()),
    ]
}

/// Prometheus text of every metric plus the given gauges.
pub fn render(gauges: &[Sample]) -> String {
    let mut out = String::new();
    for s in counters() {
        if s.name.ends_with("_count") {
            continue;
        }
        family(&mut out, s.name, "counter", s.name);
        sample(&mut out, s.name, "", s.value);
    }
    for (name, h) in [
        ("wrenn_agent_create_seconds", &CREATE_SECONDS),
        ("wrenn_agent_pause_seconds", &PAUSE_SECONDS),
        ("wrenn_agent_resume_seconds", &RESUME_SECONDS),
        (
            "wrenn_agent_restore_resident_seconds",
            &RESTORE_RESIDENT_SECONDS,
        ),
        (
            "wrenn_agent_restore_first_fault_seconds",
            &RESTORE_FIRST_FAULT_SECONDS,
        ),
    ] {
        family(&mut out, name, "histogram", name);
        h.render(&mut out, name, "");
    }
    let mut last = "";
    for g in gauges {
        if g.name != last {
            family(&mut out, g.name, "gauge", g.name);
            last = g.name;
        }
        let labels: Vec<String> = g
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", proto::metrics::escape_label(v)))
            .collect();
        sample(&mut out, g.name, &labels.join(","), g.value);
    }
    family(
        &mut out,
        "wrenn_agent_port_relays",
        "gauge",
        "Relay halves of Ports.Connect streams (two per stream): running on a thread, or \
         parked while their side is idle (no thread).",
    );
    for (state, g) in [
        ("running", &PORT_RELAYS.running),
        ("parked", &PORT_RELAYS.parked),
    ] {
        sample(
            &mut out,
            "wrenn_agent_port_relays",
            &format!("state=\"{state}\""),
            g.get(),
        );
    }
    proto::rpc::admission::render_metrics(&mut out);
    out
}

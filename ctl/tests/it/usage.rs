//! Per-sandbox metrics and usage per team (issue 17 §2): live samples from the agent,
//! samples stored at pause and destroy, the flush job, state history from the trigger, and
//! usage from transitions with and without samples, against a real PostgreSQL.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as c;
use proto::rpc::Client;

use crate::harness::Ctl;

const T: Option<Duration> = Some(Duration::from_secs(30));

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn create(cl: &Client) -> c::Sandbox {
    cl.unary(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            vcpus: 2,
            memory_mib: 1024,
            ..Default::default()
        },
        T,
    )
    .unwrap()
}

fn metrics(cl: &Client, id: &str, range_s: u32) -> c::SandboxMetricsResponse {
    cl.unary(
        c::sandboxes_methods::METRICS,
        &c::SandboxMetricsRequest {
            sandbox_id: id.into(),
            range_s,
        },
        T,
    )
    .unwrap()
}

fn usage(cl: &Client) -> c::TeamUsageResponse {
    cl.unary(
        c::teams_methods::USAGE,
        &c::TeamUsageRequest {
            team_id: String::new(),
            days: 2,
        },
        T,
    )
    .unwrap()
}

/// What a fake agent's tiers hold: `n30` 30-s samples (0.5 CPU-s a second, 256 MiB) and
/// ten 1-s samples, all ending before now.
fn fake_samples(n30: i64) -> Vec<agent::UsageSample> {
    let now = now_ns();
    let s = 1_000_000_000i64;
    let mut v: Vec<agent::UsageSample> = (0..n30)
        .map(|i| agent::UsageSample {
            unix_ns: now - (n30 - i) * 30 * s,
            step_s: 30,
            cpu_usec: 15_000_000,
            memory_bytes: 256 << 20,
            disk_bytes: 4096,
            net_rx_bytes: 100,
            net_tx_bytes: 200,
        })
        .collect();
    v.extend((0..10).map(|i| agent::UsageSample {
        unix_ns: now - (10 - i) * s,
        step_s: 1,
        cpu_usec: 500_000,
        memory_bytes: 256 << 20,
        disk_bytes: 4096,
        net_rx_bytes: 1,
        net_tx_bytes: 2,
    }));
    v
}

#[test]
fn metrics_come_live_from_the_agent_then_from_the_database_after_pause() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    let sb = create(&cl);
    fa.state
        .lock()
        .unwrap()
        .samples
        .insert(sb.id.clone(), fake_samples(4));

    let live = metrics(&cl, &sb.id, 0);
    assert_eq!((live.source.as_str(), live.step_s), ("agent", 1));
    assert_eq!(live.samples.len(), 10);
    let live = metrics(&cl, &sb.id, 3600);
    assert_eq!(live.step_s, 30);
    assert_eq!(live.samples.len(), 4);

    crate::harness::pause(&cl, &sb.id);
    // Stored at the pause: the agent's tiers may be gone now, the database answers.
    fa.state.lock().unwrap().samples.clear();
    let calls_before = fa.state.lock().unwrap().samples_calls;
    let stored = metrics(&cl, &sb.id, 0);
    assert_eq!((stored.source.as_str(), stored.step_s), ("database", 1));
    assert_eq!(stored.samples.len(), 10);
    assert!(stored.samples.iter().all(|s| s.cpu_usec == 500_000));
    let stored = metrics(&cl, &sb.id, 3600);
    assert_eq!(stored.samples.len(), 4);
    assert_eq!(stored.samples[0].memory_bytes, 256 << 20);
    let coarse = metrics(&cl, &sb.id, 86_400);
    assert_eq!(coarse.step_s, 300);
    let cpu: u64 = coarse.samples.iter().map(|s| s.cpu_usec).sum();
    assert_eq!(cpu, 60_000_000, "5-minute buckets sum the 30-s rows");
    // The database read tried the agent once per tier for what it may still hold.
    assert!(fa.state.lock().unwrap().samples_calls > calls_before);

    // Usage: 120 s of samples cover the (short) running time, so CPU is the samples'.
    let u = usage(&cl);
    let today = u.days.last().unwrap();
    assert!(
        today.sandbox_seconds > 0.0 && today.sandbox_seconds < 30.0,
        "{today:?}"
    );
    assert_eq!(today.unsampled_seconds, 0.0);
    assert_eq!(today.cpu_seconds, 60.0);
    assert_eq!(today.memory_mib_seconds, 120.0 * 256.0);

    // The state history the trigger wrote.
    let mut pg = postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap();
    let uuid = proto::id::parse(proto::id::Kind::Sandbox, &sb.id).unwrap();
    let states: Vec<String> = pg
        .query(
            "SELECT state FROM sandbox_transitions WHERE sandbox_id = $1 ORDER BY seq",
            &[&uuid],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        states,
        ["starting", "running", "pausing", "paused"],
        "every transition, in order (a sandbox is inserted starting)"
    );
    let bad = cl.unary::<_, c::SandboxMetricsResponse>(
        c::sandboxes_methods::METRICS,
        &c::SandboxMetricsRequest {
            sandbox_id: sb.id.clone(),
            range_s: 86_401,
        },
        T,
    );
    assert_eq!(crate::harness::code(bad), proto::Code::InvalidArgument);
}

#[test]
fn usage_falls_back_to_transitions_without_samples_and_is_team_scoped() {
    let Some(ctl) = Ctl::start() else { return };
    let (_fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    let sb = create(&cl);
    // No samples on the agent (an agent that lost them). Make it look like it has been
    // running for 100 s, then destroy it.
    let mut pg = postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap();
    let uuid = proto::id::parse(proto::id::Kind::Sandbox, &sb.id).unwrap();
    pg.execute(
        "UPDATE sandbox_transitions SET at = at - interval '100 seconds' WHERE sandbox_id = $1",
        &[&uuid],
    )
    .unwrap();
    let _: c::DestroySandboxResponse = cl
        .unary(
            c::sandboxes_methods::DESTROY,
            &c::DestroySandboxRequest {
                sandbox_id: sb.id.clone(),
                force: false,
            },
            T,
        )
        .unwrap();
    let u = usage(&cl);
    assert_eq!(u.days.len(), 2);
    let today = u.days.last().unwrap();
    assert!((100.0..110.0).contains(&today.sandbox_seconds), "{today:?}");
    assert_eq!(today.unsampled_seconds, today.sandbox_seconds);
    assert_eq!(
        today.cpu_seconds,
        2.0 * today.sandbox_seconds,
        "2 vCPUs in full"
    );
    assert_eq!(today.memory_mib_seconds, 1024.0 * today.sandbox_seconds);
    // Another team sees none of it, and cannot ask for this team's usage.
    let (_other_team, other_key) = ctl.other_team("team-b", "b@example.com");
    let other = ctl.client(&other_key);
    assert_eq!(usage(&other).days.last().unwrap().sandbox_seconds, 0.0);
    let r = other.unary::<_, c::TeamUsageResponse>(
        c::teams_methods::USAGE,
        &c::TeamUsageRequest {
            team_id: ctl.team_id.clone(),
            days: 1,
        },
        T,
    );
    assert_eq!(crate::harness::code(r), proto::Code::NotFound);
}

#[test]
fn the_flush_job_stores_running_sandboxes_once_per_period() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    let sb = create(&cl);
    fa.state
        .lock()
        .unwrap()
        .samples
        .insert(sb.id.clone(), fake_samples(3));
    let api = ctl.api();
    assert_eq!(api.flush_running_samples().unwrap(), Some(1));
    // The period has not passed: no replica runs it again.
    assert_eq!(api.flush_running_samples().unwrap(), None);
    let mut pg = postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap();
    let n: i64 = pg
        .query_one(
            "SELECT count(*) FROM sandbox_samples WHERE step_s = 30",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    // A second store takes only what is new.
    let host = proto::id::parse(proto::id::Kind::Host, &sb.host_id).unwrap();
    let id = proto::id::parse(proto::id::Kind::Sandbox, &sb.id).unwrap();
    assert_eq!(api.store_samples(host, id).unwrap(), 0);
}

#[test]
fn history_past_its_retention_is_pruned_with_the_flush() {
    let Some(ctl) = Ctl::start() else { return };
    let mut pg = postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap();
    let team = proto::id::parse(proto::id::Kind::Team, &ctl.team_id).unwrap();
    let (a, b) = (proto::id::Uuid::from_u128(1), proto::id::Uuid::from_u128(2));
    // Sandbox a: running 200 days ago, paused 150 days ago, running since 100 days ago.
    // Sandbox b: stopped 100 days ago. Samples 100 days and 1 day old.
    pg.batch_execute(&format!(
        "INSERT INTO sandbox_transitions (sandbox_id, team_id, state, vcpus, memory_mib, at) VALUES \
           ('{a}', '{team}', 'running', 1, 512, now() - interval '200 days'), \
           ('{a}', '{team}', 'paused', 1, 512, now() - interval '150 days'), \
           ('{a}', '{team}', 'running', 1, 512, now() - interval '100 days'), \
           ('{b}', '{team}', 'running', 1, 512, now() - interval '120 days'), \
           ('{b}', '{team}', 'stopped', 1, 512, now() - interval '100 days'); \
         INSERT INTO sandbox_samples (sandbox_id, step_s, end_at, team_id, covered_s, cpu_usec, \
            memory_bytes, disk_bytes, net_rx_bytes, net_tx_bytes) VALUES \
           ('{a}', 30, now() - interval '100 days', '{team}', 30, 1, 1, 1, 1, 1), \
           ('{a}', 30, now() - interval '1 day', '{team}', 30, 1, 1, 1, 1, 1);"
    ))
    .unwrap();
    // Webhook history: an old delivered delivery goes (and its event); an old pending one
    // stays (it is still to be delivered).
    let wh: c::CreateWebhookResponse = ctl
        .team()
        .unary(
            c::webhooks_methods::CREATE,
            &c::CreateWebhookRequest {
                url: "http://192.0.2.1/h".into(),
                events: vec![],
            },
            T,
        )
        .unwrap();
    let wid = proto::id::parse(proto::id::Kind::Webhook, &wh.webhook.unwrap().id).unwrap();
    let (e1, e2) = (
        proto::id::Uuid::from_u128(11),
        proto::id::Uuid::from_u128(12),
    );
    pg.batch_execute(&format!(
        "INSERT INTO webhook_events (id, team_id, type, data, created_at) VALUES \
           ('{e1}', '{team}', 'sandbox.error', '{{}}', now() - interval '8 days'), \
           ('{e2}', '{team}', 'sandbox.error', '{{}}', now() - interval '8 days'); \
         INSERT INTO webhook_deliveries (webhook_id, event_id, status, created_at) VALUES \
           ('{wid}', '{e1}', 'delivered', now() - interval '8 days'), \
           ('{wid}', '{e2}', 'pending', now() - interval '8 days');"
    ))
    .unwrap();
    assert_eq!(ctl.api().flush_running_samples().unwrap(), Some(0));
    let hooks: Vec<(String, i64)> = pg
        .query(
            "SELECT (SELECT string_agg(status, ',') FROM webhook_deliveries), \
                    (SELECT count(*) FROM webhook_events)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(hooks, [("pending".to_owned(), 1)]);
    let left: Vec<(proto::id::Uuid, String)> = pg
        .query(
            "SELECT sandbox_id, state FROM sandbox_transitions ORDER BY sandbox_id, seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // a keeps only its last transition before the cut (running since 100 days), which
    // usage needs; b, stopped before the cut, keeps nothing.
    assert_eq!(left, [(a, "running".to_owned())]);
    let n: i64 = pg
        .query_one("SELECT count(*) FROM sandbox_samples", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // Usage still counts a as running for the whole window.
    let u = usage(&ctl.team());
    assert!(u.days[0].sandbox_seconds >= 86_399.0, "{:?}", u.days[0]);
}

//! Background jobs and failure handling: the reconciler's decisions against a fake agent,
//! the host monitor, job claims across replicas, state reports, migrations, and recovery
//! after PostgreSQL restarts.

use std::time::{Duration, Instant};

use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as c;
use proto::gen::wrenn::host::v1 as host;
use proto::rpc::Client;
use proto::Code;

use crate::harness::{self, code, test_config, Cluster, Ctl};

const T: Option<Duration> = Some(Duration::from_secs(30));

fn create(cl: &Client) -> c::Sandbox {
    cl.unary(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest::default(),
        T,
    )
    .unwrap()
}

fn get(cl: &Client, id: &str) -> c::Sandbox {
    cl.unary(
        c::sandboxes_methods::GET,
        &c::GetSandboxRequest {
            sandbox_id: id.into(),
        },
        T,
    )
    .unwrap()
}

#[test]
fn reconciler_corrects_drift() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    let missing = create(&cl);
    let ttl_paused = create(&cl);
    let died = create(&cl);
    let fine = create(&cl);
    let stuck_stopping = create(&cl);
    let unknown = "sb-5a5a5a5a-0000-4000-8000-00000000abcd".to_owned();
    {
        let mut st = fa.state.lock().unwrap();
        st.sandboxes.remove(&missing.id);
        st.sandboxes.get_mut(&ttl_paused.id).unwrap().state =
            proto::sandbox::SandboxState::Paused as i32;
        let d = st.sandboxes.get_mut(&died.id).unwrap();
        d.state = proto::sandbox::SandboxState::Error as i32;
        d.state_reason = "firecracker exited".into();
        let mut u = st.sandboxes[&fine.id].clone();
        u.sandbox_id = unknown.clone();
        st.sandboxes.insert(unknown.clone(), u);
    }
    // A destroy that reached the database but not the agent.
    let mut pg = postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap();
    pg.execute(
        "UPDATE sandboxes SET state = 'stopping', updated_at = now() - interval '1 hour' WHERE id = $1",
        &[&proto::id::parse(proto::id::Kind::Sandbox, &stuck_stopping.id).unwrap()],
    )
    .unwrap();

    let cfg = test_config(&ctl.url).jobs;
    let done = ctl::reconciler::run_once(ctl.api(), &cfg).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1.len(), 5, "{:?}", done[0].1);

    assert_eq!(get(&cl, &missing.id).state, c::SandboxState::Error as i32);
    assert_eq!(get(&cl, &missing.id).state_reason, "missing on host");
    assert_eq!(
        get(&cl, &ttl_paused.id).state,
        c::SandboxState::Paused as i32
    );
    let d = get(&cl, &died.id);
    assert_eq!(
        (d.state, d.state_reason.as_str()),
        (c::SandboxState::Error as i32, "firecracker exited")
    );
    assert_eq!(get(&cl, &fine.id).state, c::SandboxState::Running as i32);
    assert_eq!(
        get(&cl, &stuck_stopping.id).state,
        c::SandboxState::Stopped as i32
    );
    assert!(
        fa.sandbox_state(&unknown).is_none(),
        "unknown sandbox destroyed"
    );
    assert!(
        fa.sandbox_state(&stuck_stopping.id).is_none(),
        "stopping sandbox destroyed on the host"
    );
    // The ledger follows: fine (1) + paused (disk only) are held.
    let h: c::Host = ctl
        .admin()
        .unary(
            c::hosts_methods::GET,
            &c::GetHostRequest {
                host_id: _h.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(h.usage.unwrap().vcpus, 1);
    // Audited as system actions.
    let a = harness::audit(&cl, "sandbox.reconcile");
    assert_eq!(a.len(), 3, "{a:?}");
    assert!(a.iter().all(|e| e.actor_type == "system"));
    assert_eq!(
        harness::audit(&cl, "sandbox.reconcile_destroy").len(),
        1,
        "the known sandbox's destroy is in its team's trail"
    );
    // A second pass finds nothing to do.
    let again = ctl::reconciler::run_once(ctl.api(), &cfg).unwrap();
    assert!(again[0].1.is_empty(), "{:?}", again[0].1);
}

#[test]
fn reconciler_runs_once_per_period_across_replicas() {
    let Some(ctl) = Ctl::start() else { return };
    let replica = ctl.replica();
    let mut cfg = test_config(&ctl.url).jobs;
    cfg.reconcile_interval = Duration::from_secs(3600);
    let (a1, a2) = (ctl.api().clone(), replica.api.clone());
    let (c1, c2) = (cfg.clone(), cfg.clone());
    let t1 = std::thread::spawn(move || ctl::reconciler::run_if_due(&a1, &c1).unwrap());
    let t2 = std::thread::spawn(move || ctl::reconciler::run_if_due(&a2, &c2).unwrap());
    let (r1, r2) = (t1.join().unwrap(), t2.join().unwrap());
    assert!(r1 ^ r2, "exactly one replica ran it: {r1} {r2}");
    assert!(
        !ctl::reconciler::run_if_due(ctl.api(), &cfg).unwrap(),
        "not again within the period"
    );
    replica.shutdown();
}

#[test]
fn monitor_marks_unreachable_and_heartbeat_brings_back() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, h) = ctl.add_host(2, 2048, 100_000);
    let hc = fa.host_client();
    let hb = |hc: &Client| {
        hc.unary::<_, host::HeartbeatResponse>(
            host::host_methods::HEARTBEAT,
            &host::HeartbeatRequest {
                capacity: Some(agent::Resources {
                    vcpus: 2,
                    memory_mib: 2048,
                    disk_mib: 100_000,
                }),
                can_host_sandboxes: true,
                ..Default::default()
            },
            T,
        )
    };
    let r = hb(&hc).unwrap();
    assert!(!r.draining && r.heartbeat_interval_ms > 0);
    assert!(
        ctl::monitor::check_hosts(ctl.api(), Duration::from_secs(60))
            .unwrap()
            .is_empty()
    );
    std::thread::sleep(Duration::from_millis(300));
    let marked = ctl::monitor::check_hosts(ctl.api(), Duration::from_millis(100)).unwrap();
    assert_eq!(marked.len(), 1);
    let admin = ctl.admin();
    let host: c::Host = admin
        .unary(
            c::hosts_methods::GET,
            &c::GetHostRequest { host_id: h.clone() },
            T,
        )
        .unwrap();
    assert_eq!(host.status, c::HostStatus::Unreachable as i32);
    assert_eq!(
        code(ctl.team().unary::<_, c::Sandbox>(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest::default(),
            T
        )),
        Code::Unavailable
    );
    hb(&hc).unwrap();
    let host: c::Host = admin
        .unary(
            c::hosts_methods::GET,
            &c::GetHostRequest { host_id: h.clone() },
            T,
        )
        .unwrap();
    assert_eq!(host.status, c::HostStatus::Online as i32);
    let a: c::ListAuditLogsResponse = admin
        .unary(
            c::audit_logs_methods::LIST,
            &c::ListAuditLogsRequest {
                resource_id: h.clone(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    let actions: Vec<&str> = a.entries.iter().map(|e| e.action.as_str()).collect();
    assert!(
        actions.contains(&"host.unreachable") && actions.contains(&"host.online"),
        "{actions:?}"
    );
    // Bad heartbeat input is a typed error; an unknown host token never gets in.
    let r = hc.unary::<_, host::HeartbeatResponse>(
        host::host_methods::HEARTBEAT,
        &host::HeartbeatRequest::default(),
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
    let r = crate::harness::connect(
        ctl.host_addr(),
        proto::rpc::Credential::host_token(format!("wrh_{}", "1".repeat(64))),
    )
    .and_then(|c2| hb(&c2));
    assert_eq!(code(r), Code::Unauthenticated);
}

#[test]
fn agent_state_reports_apply_ttl_transitions() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(2, 2048, 100_000);
    let cl = ctl.team();
    let sb = create(&cl);
    let hc = fa.host_client();
    let report = |state: proto::sandbox::SandboxState, ns: i64| {
        hc.unary::<_, host::ReportStateResponse>(
            host::host_methods::REPORT_STATE,
            &host::ReportStateRequest {
                sandbox_id: sb.id.clone(),
                state: state as i32,
                previous_state: proto::sandbox::SandboxState::Running as i32,
                reason: host::StateChangeReason::Timeout as i32,
                message: String::new(),
                changed_unix_ns: ns,
            },
            T,
        )
    };
    let now = ctl::service::audit_ns(Some(std::time::SystemTime::now()));
    report(proto::sandbox::SandboxState::Paused, now).unwrap();
    report(proto::sandbox::SandboxState::Paused, now).unwrap(); // idempotent
    let g = get(&cl, &sb.id);
    assert_eq!(
        (g.state, g.state_reason.as_str()),
        (c::SandboxState::Paused as i32, "timeout")
    );
    // A report older than what ctl holds is ignored.
    report(proto::sandbox::SandboxState::Stopped, 1).unwrap();
    assert_eq!(get(&cl, &sb.id).state, c::SandboxState::Paused as i32);
    // Unknown sandbox, bad id, bad state.
    let r = hc.unary::<_, host::ReportStateResponse>(
        host::host_methods::REPORT_STATE,
        &host::ReportStateRequest {
            sandbox_id: "sb-00000000-0000-4000-8000-000000000000".into(),
            state: 8,
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(r), Code::NotFound);
    let r = hc.unary::<_, host::ReportStateResponse>(
        host::host_methods::REPORT_STATE,
        &host::ReportStateRequest {
            sandbox_id: "nope".into(),
            state: 8,
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
    let r = hc.unary::<_, host::ReportStateResponse>(
        host::host_methods::REPORT_STATE,
        &host::ReportStateRequest {
            sandbox_id: sb.id.clone(),
            state: 99,
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
}

#[test]
fn migrations_refuse_edits_and_run_once_concurrently() {
    let Some(url) = harness::fresh_db() else {
        return;
    };
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                ctl::migrate::run(&mut c).unwrap()
            })
        })
        .collect();
    let applied: Vec<Vec<i32>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        applied.iter().filter(|a| !a.is_empty()).count(),
        1,
        "{applied:?}"
    );
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    assert!(ctl::migrate::is_current(&mut c).unwrap());
    // The seed: platform team and `minimal`.
    let r = c.query_one("SELECT name, vcpus, memory_mib, disk_mib FROM templates WHERE id = '00000000-0000-0000-0000-000000000000'", &[]).unwrap();
    assert_eq!(
        (
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, i32>(2),
            r.get::<_, i64>(3)
        ),
        ("minimal".into(), 1, 512, 5120)
    );
    let mut edited = ctl::migrate::MIGRATIONS.to_vec();
    let sql = format!("{}\n-- edited", edited[0].sql);
    edited[0].sql = Box::leak(sql.into_boxed_str());
    match ctl::migrate::run_list(&mut c, &edited) {
        Err(ctl::migrate::MigrateError::Edited { version: 1, .. }) => {}
        other => panic!("expected Edited, got {other:?}"),
    }
    match ctl::migrate::run_list(&mut c, &[]) {
        Err(ctl::migrate::MigrateError::Unknown { version: 1, .. }) => {}
        other => panic!("expected Unknown, got {other:?}"),
    }
    // A replica refuses to start on an edited schema record.
    c.execute(
        "UPDATE schema_migrations SET checksum = 'x' WHERE version = 1",
        &[],
    )
    .unwrap();
    assert!(matches!(
        ctl::server::start(
            &test_config(&url),
            ctl::server::StartOpts {
                jobs: false,
                http: false
            }
        ),
        Err(ctl::server::StartError::Migrate(
            ctl::migrate::MigrateError::Edited { .. }
        ))
    ));
    // admin init works once.
    c.execute(
        "UPDATE schema_migrations SET checksum = $1 WHERE version = 1",
        &[&ctl::migrate::checksum(ctl::migrate::MIGRATIONS[0].sql)],
    )
    .unwrap();
    ctl::admin::init(&url, "t", "x@example.com", "").unwrap();
    assert!(matches!(
        ctl::admin::init(&url, "t2", "y@example.com", ""),
        Err(ctl::admin::AdminError::AlreadyInitialized)
    ));
}

#[test]
fn recovers_after_postgres_restart() {
    if std::env::var("DATABASE_URL").is_ok() {
        proto::skip::note(
            "recovers_after_postgres_restart",
            "DATABASE_URL is set; this test needs a cluster it can restart",
        );
        return;
    }
    let cluster = match Cluster::start() {
        Ok(c) => c,
        Err(e) => {
            harness::skip(&e);
            return;
        }
    };
    let url = cluster.url("postgres");
    let init = ctl::admin::init(&url, "team-r", "r@example.com", "").unwrap();
    let running = ctl::server::start(
        &test_config(&url),
        ctl::server::StartOpts {
            jobs: false,
            http: false,
        },
    )
    .unwrap();
    let cl = crate::harness::connect(
        running.addr.to_string(),
        proto::rpc::Credential::api_key(&init.team_key),
    )
    .unwrap();
    let list = |cl: &Client| {
        cl.unary::<_, c::ListSandboxesResponse>(
            c::sandboxes_methods::LIST,
            &c::ListSandboxesRequest::default(),
            T,
        )
    };
    list(&cl).unwrap();
    cluster.stop().unwrap();
    let r = list(&cl);
    assert_eq!(
        code(r),
        Code::Unavailable,
        "database down: unavailable, not a hang"
    );
    cluster.start_again().unwrap();
    let start = Instant::now();
    loop {
        match list(&cl) {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code, Code::Unavailable, "{e:?}");
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "no recovery within 30 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    println!(
        "recovered {} ms after PostgreSQL came back",
        start.elapsed().as_millis()
    );
    // New connections (fresh auth) work too.
    let cl2 = crate::harness::connect(
        running.addr.to_string(),
        proto::rpc::Credential::api_key(&init.team_key),
    )
    .unwrap();
    // Every worker is usable again: many calls in a row all succeed.
    for _ in 0..40 {
        list(&cl2).unwrap();
        list(&cl).unwrap();
    }
    running.shutdown();
}

#[test]
fn register_checks_its_input() {
    let Some(ctl) = Ctl::start() else { return };
    let admin = ctl.admin();
    let tok = |ttl_s| -> String {
        admin
            .unary::<_, c::CreateRegistrationTokenResponse>(
                c::hosts_methods::CREATE_REGISTRATION_TOKEN,
                &c::CreateRegistrationTokenRequest { ttl_s },
                T,
            )
            .unwrap()
            .token
    };
    let reg = |req: host::RegisterRequest| {
        let rc = crate::harness::connect(ctl.host_addr(), proto::rpc::Credential::host_token(""))
            .unwrap();
        rc.unary::<_, host::RegisterResponse>(host::host_methods::REGISTER, &req, T)
    };
    let good = |t: String| host::RegisterRequest {
        registration_token: t,
        agent_address: "127.0.0.1:7710".into(),
        capacity: Some(agent::Resources {
            vcpus: 1,
            memory_mib: 1,
            disk_mib: 1,
        }),
        ..Default::default()
    };
    let t = tok(60);
    assert_eq!(
        code(reg(host::RegisterRequest {
            agent_address: "nope".into(),
            ..good(t.clone())
        })),
        Code::InvalidArgument
    );
    assert_eq!(
        code(reg(host::RegisterRequest {
            capacity: None,
            ..good(t.clone())
        })),
        Code::InvalidArgument
    );
    // Refused input does not use the token up.
    reg(good(t.clone())).unwrap();
    assert_eq!(code(reg(good(t))), Code::Unauthenticated);
    let r = admin.unary::<_, c::CreateRegistrationTokenResponse>(
        c::hosts_methods::CREATE_REGISTRATION_TOKEN,
        &c::CreateRegistrationTokenRequest {
            ttl_s: 10 * 24 * 3600,
        },
        T,
    );
    assert_eq!(code(r), Code::InvalidArgument);
    // An expired token is refused.
    let t = tok(1);
    let mut pg = postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap();
    pg.execute("UPDATE registration_tokens SET expires_at = now() - interval '1 second' WHERE used_at IS NULL", &[]).unwrap();
    assert_eq!(code(reg(good(t))), Code::Unauthenticated);
    // Registering with a team key's connection is not possible: host methods need a host token.
    let r = ctl.team().unary::<_, host::RegisterResponse>(
        host::host_methods::REGISTER,
        &good("x".into()),
        T,
    );
    assert_eq!(code(r), Code::PermissionDenied);
}

/// Drift seen in a heartbeat's summaries is reconciled at once, not at the next pass; a
/// heartbeat that agrees with the database (or whose drift is within a grace) changes nothing.
#[test]
fn heartbeat_drift_is_reconciled_before_the_next_pass() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let cl = ctl.team();
    let paused_by_ttl = create(&cl);
    let fine = create(&cl);
    // The next pass is an hour away: only the heartbeat path can correct anything here.
    let mut cfg = test_config(&ctl.url).jobs;
    cfg.reconcile_interval = Duration::from_secs(3600);
    let _jobs = ctl::monitor::Jobs::start(ctl.api().clone(), cfg).unwrap();
    let hc = fa.host_client();
    let heartbeat = |states: &[(&str, proto::sandbox::SandboxState)]| {
        let _: host::HeartbeatResponse = hc
            .unary(
                host::host_methods::HEARTBEAT,
                &host::HeartbeatRequest {
                    capacity: Some(agent::Resources {
                        vcpus: 8,
                        memory_mib: 8192,
                        disk_mib: 1_000_000,
                    }),
                    can_host_sandboxes: true,
                    sandboxes: states
                        .iter()
                        .map(|(id, st)| host::SandboxSummary {
                            sandbox_id: (*id).to_owned(),
                            state: *st as i32,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
                T,
            )
            .unwrap();
    };
    let reconciled = |cl: &Client| harness::audit(cl, "sandbox.reconcile").len();
    let running = proto::sandbox::SandboxState::Running;
    heartbeat(&[(&paused_by_ttl.id, running), (&fine.id, running)]);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(reconciled(&cl), 0, "no drift, nothing done");

    // The agent paused a sandbox on its own and its report was lost.
    fa.state
        .lock()
        .unwrap()
        .sandboxes
        .get_mut(&paused_by_ttl.id)
        .unwrap()
        .state = proto::sandbox::SandboxState::Paused as i32;
    heartbeat(&[
        (&paused_by_ttl.id, proto::sandbox::SandboxState::Paused),
        (&fine.id, running),
    ]);
    let t0 = Instant::now();
    while get(&cl, &paused_by_ttl.id).state != c::SandboxState::Paused as i32 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "heartbeat drift not reconciled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&cl, &fine.id).state, c::SandboxState::Running as i32);
    assert_eq!(reconciled(&cl), 1);

    // A heartbeat can be stale: the agent's own list decides. Here it still says running.
    heartbeat(&[
        (&paused_by_ttl.id, proto::sandbox::SandboxState::Paused),
        (&fine.id, proto::sandbox::SandboxState::Paused),
    ]);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(get(&cl, &fine.id).state, c::SandboxState::Running as i32);
    assert_eq!(reconciled(&cl), 1);
}

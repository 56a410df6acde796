//! Regressions of the outside acceptance run (issue 12): credentials and teams, hosts that
//! die, truth in the audit log and errors. Each test failed before its fix.

use std::io::{Read, Write};
use std::time::Duration;

use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as c;
use proto::gen::wrenn::host::v1 as host;
use proto::rpc::Client;
use proto::Code;

use crate::harness::Ctl;

const T: Option<Duration> = Some(Duration::from_secs(30));

fn create(cl: &Client, req: c::CreateSandboxRequest) -> Result<c::Sandbox, proto::Status> {
    cl.unary(c::sandboxes_methods::CREATE, &req, T)
}

fn create_min(cl: &Client) -> Result<c::Sandbox, proto::Status> {
    create(cl, c::CreateSandboxRequest::default())
}

fn destroy(cl: &Client, id: &str) -> Result<c::DestroySandboxResponse, proto::Status> {
    cl.unary(
        c::sandboxes_methods::DESTROY,
        &c::DestroySandboxRequest {
            sandbox_id: id.into(),
            force: false,
        },
        T,
    )
}

fn get(cl: &Client, id: &str) -> c::Sandbox {
    cl.unary(
        c::sandboxes_methods::GET,
        &c::GetSandboxRequest {
            sandbox_id: id.into(),
        },
        T,
    )
    .expect("get sandbox")
}

/// One HTTP/1.1 request to the gateway; returns (status, body).
fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: &str,
) -> (u16, String) {
    // Over TLS, as the replicas of the suite serve it.
    let client = tls::ClientTls::from_ca_file(
        &crate::harness::test_tls().files.ca_cert,
        tls::ClientOptions {
            alpn: vec![tls::ALPN_HTTP.to_vec()],
            ..Default::default()
        },
    )
    .unwrap();
    let mut s = client
        .connect_blocking(addr, "127.0.0.1", Duration::from_secs(30))
        .expect("connect to the gateway");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

// ---- item 11: NUL characters and the real cause of database errors ----

#[test]
fn nul_characters_are_refused_naming_the_field() {
    let Some(mut ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (fa, _) = ctl.add_host(4, 8192, 100_000);
    let mut req = c::CreateSandboxRequest::default();
    req.metadata.insert("owner".into(), "a\0b".into());
    let e = create(&cl, req).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert!(
        e.message.contains("metadata") && e.message.contains("owner"),
        "{e}"
    );
    let mut req = c::CreateSandboxRequest::default();
    req.metadata.insert("o\0".into(), "v".into());
    assert_eq!(create(&cl, req).unwrap_err().code, Code::InvalidArgument);

    // A heartbeat's problem text.
    let e = fa
        .host_client()
        .unary::<_, host::HeartbeatResponse>(
            host::host_methods::HEARTBEAT,
            &host::HeartbeatRequest {
                capacity: Some(agent::Resources {
                    vcpus: 4,
                    memory_mib: 8192,
                    disk_mib: 100_000,
                }),
                problems: vec!["kvm\0missing".into()],
                ..Default::default()
            },
            T,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert!(e.message.contains("problems"), "{e}");

    // Names and audit filters.
    let e = cl
        .unary::<_, c::CreateApiKeyResponse>(
            c::api_keys_methods::CREATE,
            &c::CreateApiKeyRequest {
                name: "k\0".into(),
                ..Default::default()
            },
            T,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    let e = cl
        .unary::<_, c::ListAuditLogsResponse>(
            c::audit_logs_methods::LIST,
            &c::ListAuditLogsRequest {
                action: "x\0".into(),
                ..Default::default()
            },
            T,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert!(e.message.contains("action"), "{e}");

    // JSON `\u0000` through the HTTP gateway: 400 naming the field, not 500.
    let url = ctl.url.clone();
    let key = ctl.team_key.clone();
    if let Some(r) = ctl.running.take() {
        r.shutdown();
    }
    let running = ctl::server::start(
        &crate::harness::test_config(&url),
        ctl::server::StartOpts {
            jobs: false,
            http: true,
        },
    )
    .expect("start ctl with http");
    let (status, body) = http(
        running.http_addr.expect("http addr"),
        "POST",
        "/v1/sandboxes",
        &key,
        r#"{"metadata":{"owner":"a\u0000b"}}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("metadata"), "{body}");
    running.shutdown();
}

#[test]
fn database_errors_name_their_cause() {
    // A statement PostgreSQL refuses (NUL in text is the case the issue saw) must log the
    // server's code and message, not the driver's "db error".
    let Some(url) = crate::harness::fresh_db() else {
        return;
    };
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let e = c.query("SELECT 1/0", &[]).unwrap_err();
    let logged = ctl::db::describe(&e);
    assert!(logged.contains("22012"), "{logged}");
    assert!(logged.contains("division by zero"), "{logged}");
}

// ---- item 12: no host registered ----

#[test]
fn create_without_any_host_says_so() {
    let Some(ctl) = Ctl::start() else { return };
    let e = create_min(&ctl.team()).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e}");
    assert!(e.message.contains("no host is registered"), "{e}");
    // With a host that is full, it is capacity.
    let _h = ctl.add_host(1, 512, 100_000);
    create_min(&ctl.team()).expect("first fits");
    let e = create_min(&ctl.team()).unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted, "{e}");
}

// ---- item 8: freeing never needs capacity ----

#[test]
fn destroying_a_paused_sandbox_on_a_full_host_needs_no_capacity() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let _h = ctl.add_host(1, 512, 100_000);
    let a = create_min(&cl).expect("create a");
    let p: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::PAUSE,
            &c::PauseSandboxRequest {
                sandbox_id: a.id.clone(),
            },
            T,
        )
        .expect("pause a");
    assert_eq!(p.state, c::SandboxState::Paused as i32);
    let b = create_min(&cl).expect("b takes the host's only vCPU");
    destroy(&cl, &a.id).expect("destroy the paused sandbox on a full host");
    assert_eq!(get(&cl, &a.id).state, c::SandboxState::Stopped as i32);
    destroy(&cl, &b.id).expect("destroy b");
}

// ---- item 5: a team sees and adds only what it may ----

fn create_user(cl: &Client, email: &str) -> Result<c::User, proto::Status> {
    cl.unary(
        c::users_methods::CREATE,
        &c::CreateUserRequest {
            email: email.into(),
            ..Default::default()
        },
        T,
    )
}

fn add_member(cl: &Client, user: &str) -> Result<c::Member, proto::Status> {
    cl.unary(
        c::teams_methods::ADD_MEMBER,
        &c::AddMemberRequest {
            user_id: user.into(),
            ..Default::default()
        },
        T,
    )
}

#[test]
fn teams_neither_add_nor_probe_other_teams_users() {
    let Some(ctl) = Ctl::start() else { return };
    let a = ctl.team();
    let (_, key_b) = ctl.other_team("team-b", "b@example.com");
    let b = ctl.client(&key_b);

    // Team b cannot add team a's owner, and the answer does not carry its email.
    let e = add_member(&b, &ctl.user_id).unwrap_err();
    assert_eq!(e.code, Code::NotFound, "{e}");
    assert!(!e.message.contains("a@example.com"), "{e}");
    // Nor read it.
    let e = b
        .unary::<_, c::User>(
            c::users_methods::GET,
            &c::GetUserRequest {
                user_id: ctl.user_id.clone(),
            },
            T,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::NotFound);

    // Creating a user whose email exists in team a tells team b nothing: it succeeds, as it
    // does for an unused email.
    let u = create_user(&b, "a@example.com").expect("an email of another team is not probed");
    assert_ne!(u.id, ctl.user_id);

    // Within one team, email uniqueness ignores case.
    let e = create_user(&a, "A@Example.COM").unwrap_err();
    assert_eq!(e.code, Code::AlreadyExists, "{e}");

    // A team may add back a user of its own directory after removing it.
    let v = create_user(&a, "v@example.com").unwrap();
    a.unary::<_, c::RemoveMemberResponse>(
        c::teams_methods::REMOVE_MEMBER,
        &c::RemoveMemberRequest {
            user_id: v.id.clone(),
            ..Default::default()
        },
        T,
    )
    .unwrap();
    let m = add_member(&a, &v.id).expect("re-add own user");
    assert_eq!(m.user.unwrap().email, "v@example.com");
    // The platform admin may add anyone anywhere.
    let admin = ctl.admin();
    admin
        .unary::<_, c::Member>(
            c::teams_methods::ADD_MEMBER,
            &c::AddMemberRequest {
                team_id: ctl.team_id.clone(),
                user_id: u.id.clone(),
                ..Default::default()
            },
            T,
        )
        .expect("platform admin adds across teams");
}

#[test]
fn email_migration_keeps_existing_case_duplicates() {
    let Some(url) = crate::harness::fresh_db() else {
        return;
    };
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    ctl::migrate::run_list(&mut c, &ctl::migrate::MIGRATIONS[..1]).unwrap();
    c.batch_execute(
        "INSERT INTO teams (id, name) VALUES ('00000000-0000-0000-0000-000000000007', 't');
         INSERT INTO users (id, email, created_at) VALUES
            ('00000000-0000-0000-0000-000000000001', 'X@y.example', now() - interval '1 day'),
            ('00000000-0000-0000-0000-000000000002', 'x@y.example', now());
         INSERT INTO memberships (team_id, user_id, role) VALUES
            ('00000000-0000-0000-0000-000000000007', '00000000-0000-0000-0000-000000000001', 'owner'),
            ('00000000-0000-0000-0000-000000000007', '00000000-0000-0000-0000-000000000002', 'member');",
    )
    .unwrap();
    let done = ctl::migrate::run(&mut c).expect("migration with case duplicates");
    assert!(done.contains(&2), "{done:?}");
    let n: i64 = c
        .query_one("SELECT count(*) FROM users", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "nobody deleted");
    // A third spelling is refused in that directory.
    let e = c
        .execute(
            "INSERT INTO users (id, email, home_team_id) VALUES \
             ('00000000-0000-0000-0000-000000000003', 'X@Y.EXAMPLE', '00000000-0000-0000-0000-000000000007')",
            &[],
        )
        .unwrap_err();
    assert!(ctl::db::is_unique_violation(&e), "{e}");
}

// ---- item 10: every mutating call records its outcome ----

fn newest(cl: &Client, action: &str) -> c::AuditLog {
    crate::harness::audit(cl, action)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no audit row {action}"))
}

#[test]
fn failed_calls_are_audited_as_failures() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    // Refused before anything changed: a separate failure row.
    create_min(&cl).unwrap_err();
    let a = newest(&cl, "sandbox.create");
    assert_eq!(a.status, "failure", "{a:?}");
    assert!(a.metadata_json.contains("failed_precondition"), "{a:?}");

    // The agent refuses the create: the create's own row says failure.
    let (fa, _) = ctl.add_host(4, 8192, 100_000);
    fa.state.lock().unwrap().fail_create = Some(proto::Status::internal("boom"));
    let e = create_min(&cl).unwrap_err();
    assert_eq!(e.code, Code::Internal);
    let rows = crate::harness::audit(&cl, "sandbox.create");
    assert_eq!(rows.len(), 2, "one row per call: {rows:?}");
    assert_eq!(rows[0].status, "failure", "{rows:?}");
    assert!(rows[0].resource_id.starts_with("sb-"), "{rows:?}");
    assert!(rows[0].metadata_json.contains("boom"), "{rows:?}");
    fa.state.lock().unwrap().fail_create = None;

    // A destroy whose agent is gone answers unavailable and is recorded so.
    let sb = create_min(&cl).expect("create");
    assert_eq!(newest(&cl, "sandbox.create").status, "success");
    fa.stop();
    let e = destroy(&cl, &sb.id).unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    let d = newest(&cl, "sandbox.destroy");
    assert_eq!(d.status, "failure", "{d:?}");
    assert!(d.metadata_json.contains("unavailable"), "{d:?}");
    assert_eq!(crate::harness::audit(&cl, "sandbox.destroy").len(), 1);

    // Calls of one transaction: the failure row comes after the rollback.
    let e = cl
        .unary::<_, c::RevokeApiKeyResponse>(
            c::api_keys_methods::REVOKE,
            &c::RevokeApiKeyRequest {
                key_id: "key-00000000-0000-4000-8000-000000000000".into(),
            },
            T,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::NotFound);
    let r = newest(&cl, "api_key.revoke");
    assert_eq!(r.status, "failure");
    assert_eq!(r.resource_id, "key-00000000-0000-4000-8000-000000000000");
    // Process calls on a sandbox that does not run.
    let e = cl
        .unary::<_, c::ExecResponse>(
            c::processes_methods::EXEC,
            &c::ExecRequest {
                sandbox_id: sb.id.clone(),
                process: Some(Default::default()),
                ..Default::default()
            },
            T,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e}");
    assert_eq!(newest(&cl, "sandbox.exec").status, "failure");
}

// ---- item 9: creates cut off by a ctl crash ----

fn sql(ctl: &Ctl) -> postgres::Client {
    postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap()
}

fn uuid_of(wire: &str) -> proto::id::Uuid {
    proto::id::parse_uuid_strict(wire.split_once('-').unwrap().1).unwrap()
}

#[test]
fn creates_cut_off_by_a_crash_do_not_stay_starting() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (fa, host_id) = ctl.add_host(4, 8192, 100_000);
    // Two sandboxes as a crashed ctl leaves them: `starting` two minutes ago (well inside
    // the old 11-minute transition grace). The agent never got the first; it finished the
    // second.
    let a = create_min(&cl).unwrap();
    let b = create_min(&cl).unwrap();
    fa.state.lock().unwrap().sandboxes.remove(&a.id);
    let mut db = sql(&ctl);
    db.execute(
        "UPDATE sandboxes SET state = 'starting', updated_at = now() - interval '2 minutes'",
        &[],
    )
    .unwrap();
    ctl::reconciler::run_once(ctl.api(), &crate::harness::test_config(&ctl.url).jobs).unwrap();
    assert_eq!(get(&cl, &a.id).state, c::SandboxState::Error as i32);
    assert_eq!(get(&cl, &b.id).state, c::SandboxState::Running as i32);

    // On a host that no longer answers: after the create's deadline plus the grace.
    db.execute(
        "UPDATE sandboxes SET state = 'starting', updated_at = now() - interval '2 minutes', \
            held_vcpus = vcpus, held_memory_mib = memory_mib, held_disk_mib = disk_mib WHERE id = $1",
        &[&uuid_of(&b.id)],
    )
    .unwrap();
    db.execute("UPDATE hosts SET status = 'unreachable'", &[])
        .unwrap();
    let cfg = crate::harness::test_config(&ctl.url).jobs;
    assert_eq!(
        ctl::reconciler::settle_cut_off_creates(ctl.api(), &cfg).unwrap(),
        1
    );
    assert_eq!(get(&cl, &b.id).state, c::SandboxState::Error as i32);
    let used: i32 = db
        .query_one(
            "SELECT used_vcpus FROM hosts WHERE id = $1",
            &[&uuid_of(&host_id)],
        )
        .unwrap()
        .get(0);
    assert_eq!(used, 0, "the cut-off creates gave their capacity back");
}

// ---- item 6: Teams/Create ----

#[test]
fn platform_admin_creates_teams() {
    let Some(ctl) = Ctl::start() else { return };
    let req = c::CreateTeamRequest {
        name: "team-c".into(),
        owner_email: "c@example.com".into(),
        owner_name: "Cee".into(),
    };
    let e = ctl
        .team()
        .unary::<_, c::CreateTeamResponse>(c::teams_methods::CREATE, &req, T)
        .unwrap_err();
    assert_eq!(e.code, Code::PermissionDenied, "only the platform admin");
    let r: c::CreateTeamResponse = ctl
        .admin()
        .unary(c::teams_methods::CREATE, &req, T)
        .expect("create team");
    let team = r.team.unwrap();
    assert_eq!(team.name, "team-c");
    assert_eq!(r.owner.unwrap().email, "c@example.com");
    // The new team's key works and acts for that team.
    let t: c::Team = ctl
        .client(&r.key_plaintext)
        .unary(c::teams_methods::GET, &c::GetTeamRequest::default(), T)
        .unwrap();
    assert_eq!(t.id, team.id);
    let a = newest(&ctl.admin(), "team.create");
    assert_eq!(
        (a.status.as_str(), a.actor_type.as_str()),
        ("success", "api_key")
    );
}

// ---- item 7: hosts that die ----

fn admin_call<Req: prost::Message, Resp: prost::Message + Default>(
    ctl: &Ctl,
    m: &str,
    r: &Req,
) -> Result<Resp, proto::Status> {
    ctl.admin().unary(m, r, T)
}

#[test]
fn sandboxes_of_a_dead_host_can_be_forced_and_come_back_destroyed() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (fa, host_id) = ctl.add_host(4, 8192, 100_000);
    let a = create_min(&cl).unwrap();
    let b = create_min(&cl).unwrap();
    // The host stops answering; the monitor marks it unreachable.
    let mut db = sql(&ctl);
    db.execute("UPDATE hosts SET status = 'unreachable'", &[])
        .unwrap();
    // A plain destroy cannot finish; a forced one records the sandbox stopped.
    let force = |id: &str| {
        cl.unary::<_, c::DestroySandboxResponse>(
            c::sandboxes_methods::DESTROY,
            &c::DestroySandboxRequest {
                sandbox_id: id.into(),
                force: true,
            },
            T,
        )
    };
    force(&a.id).expect("forced destroy");
    let got = get(&cl, &a.id);
    assert_eq!(got.state, c::SandboxState::Stopped as i32, "{got:?}");
    assert_eq!(
        fa.sandbox_state(&a.id),
        Some(c::SandboxState::Running as i32),
        "the agent was not asked"
    );
    // The host comes back: the reconciler destroys what ctl recorded stopped.
    db.execute("UPDATE hosts SET status = 'online'", &[])
        .unwrap();
    let cfg = ctl::config::JobsConfig {
        destroy_unknown: false, // even when strangers are only reported
        ..crate::harness::test_config(&ctl.url).jobs
    };
    ctl::reconciler::run_once(ctl.api(), &cfg).unwrap();
    assert_ne!(
        fa.sandbox_state(&a.id),
        Some(c::SandboxState::Running as i32),
        "destroyed on the host"
    );
    assert_eq!(get(&cl, &b.id).state, c::SandboxState::Running as i32);

    // A host that is gone for good: delete refused without force, then forced.
    fa.stop();
    db.execute("UPDATE hosts SET status = 'unreachable'", &[])
        .unwrap();
    let del = |force: bool| {
        admin_call::<_, c::DeleteHostResponse>(
            &ctl,
            c::hosts_methods::DELETE,
            &c::DeleteHostRequest {
                host_id: host_id.clone(),
                force,
            },
        )
    };
    assert_eq!(del(false).unwrap_err().code, Code::FailedPrecondition);
    let r = del(true).expect("forced delete");
    assert_eq!(r.stopped_sandbox_ids, vec![b.id.clone()]);
    assert_eq!(get(&cl, &b.id).state, c::SandboxState::Stopped as i32);
    // The team sees why.
    assert_eq!(newest(&cl, "sandbox.force_stop").resource_id, b.id);
}

#[test]
fn force_destroy_when_the_agent_does_not_answer() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (fa, _) = ctl.add_host(4, 8192, 100_000);
    let a = create_min(&cl).unwrap();
    fa.stop(); // still "online" in the database: the agent just does not answer
    assert_eq!(destroy(&cl, &a.id).unwrap_err().code, Code::Unavailable);
    assert_eq!(get(&cl, &a.id).state, c::SandboxState::Stopping as i32);
    cl.unary::<_, c::DestroySandboxResponse>(
        c::sandboxes_methods::DESTROY,
        &c::DestroySandboxRequest {
            sandbox_id: a.id.clone(),
            force: true,
        },
        T,
    )
    .expect("forced");
    assert_eq!(get(&cl, &a.id).state, c::SandboxState::Stopped as i32);
}

#[test]
fn drained_hosts_can_be_undrained_and_online_hosts_not_force_deleted() {
    let Some(ctl) = Ctl::start() else { return };
    let (_fa, host_id) = ctl.add_host(4, 8192, 100_000);
    let undrain = || {
        admin_call::<_, c::Host>(
            &ctl,
            c::hosts_methods::UNDRAIN,
            &c::UndrainHostRequest {
                host_id: host_id.clone(),
            },
        )
    };
    assert_eq!(
        undrain().unwrap_err().code,
        Code::FailedPrecondition,
        "not draining"
    );
    admin_call::<_, c::DrainHostResponse>(
        &ctl,
        c::hosts_methods::DRAIN,
        &c::DrainHostRequest {
            host_id: host_id.clone(),
        },
    )
    .unwrap();
    assert_eq!(create_min(&ctl.team()).unwrap_err().code, Code::Unavailable);
    let h = undrain().expect("undrain");
    assert_eq!(h.status, c::HostStatus::Online as i32);
    create_min(&ctl.team()).expect("placed again");
    let e = admin_call::<_, c::DeleteHostResponse>(
        &ctl,
        c::hosts_methods::DELETE,
        &c::DeleteHostRequest {
            host_id: host_id.clone(),
            force: true,
        },
    )
    .unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e}");
}

// ---- item 4: revocation on every connection of every replica ----

fn team_get(cl: &Client) -> Result<c::Team, proto::Status> {
    cl.unary(c::teams_methods::GET, &c::GetTeamRequest::default(), T)
}

fn wait_listening(api: &ctl::service::Api) {
    let t = std::time::Instant::now();
    while !api.revocations().listening() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "listener never came up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn new_key(ctl: &Ctl) -> c::CreateApiKeyResponse {
    ctl.team()
        .unary(
            c::api_keys_methods::CREATE,
            &c::CreateApiKeyRequest {
                name: "short-lived".into(),
                ..Default::default()
            },
            T,
        )
        .unwrap()
}

/// Calls until one fails; returns how long that took (panics after `max`).
fn until_refused(cl: &Client, max: Duration) -> (Duration, proto::Status) {
    let t = std::time::Instant::now();
    loop {
        if let Err(e) = team_get(cl) {
            return (t.elapsed(), e);
        }
        assert!(t.elapsed() < max, "still accepted after {max:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn revocation_reaches_every_replica_at_once() {
    let Some(ctl) = Ctl::start() else { return };
    let replica = ctl.replica();
    wait_listening(ctl.api());
    wait_listening(&replica.api);
    let k = new_key(&ctl);
    let on_1 = ctl.client(&k.plaintext);
    let on_2 = crate::harness::connect(
        replica.addr.to_string(),
        proto::rpc::Credential::api_key(&k.plaintext),
    )
    .unwrap();
    team_get(&on_1).unwrap();
    team_get(&on_2).unwrap();
    ctl.team()
        .unary::<_, c::RevokeApiKeyResponse>(
            c::api_keys_methods::REVOKE,
            &c::RevokeApiKeyRequest {
                key_id: k.key.unwrap().id,
            },
            T,
        )
        .unwrap();
    // The revoking replica: the very next call.
    let e = team_get(&on_1).unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    // The other replica: as soon as the notification arrives (milliseconds; the old
    // periodic re-check took up to 10 s).
    let (took, e) = until_refused(&on_2, Duration::from_secs(1));
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    println!("revocation reached the other replica in {took:?}");
    let r = crate::harness::connect(
        replica.addr.to_string(),
        proto::rpc::Credential::api_key(&k.plaintext),
    )
    .and_then(|c| team_get(&c));
    assert_eq!(r.unwrap_err().code, Code::Unauthenticated);
    replica.shutdown();
}

#[test]
fn a_lost_listener_falls_back_to_the_database() {
    let Some(ctl) = Ctl::start() else { return };
    wait_listening(ctl.api());
    let k = new_key(&ctl);
    let cl = ctl.client(&k.plaintext);
    team_get(&cl).unwrap();
    let mut db = sql(&ctl);
    // The listener's connection dies, and a revocation happens that it cannot hear (no
    // NOTIFY): the open connection must still stop working.
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'wrenn-ctl-listen' AND datname = current_database()",
        &[],
    )
    .unwrap();
    db.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1",
        &[&uuid_of(&k.key.unwrap().id)],
    )
    .unwrap();
    let (_, e) = until_refused(&cl, Duration::from_secs(3));
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    // The listener comes back by itself.
    wait_listening(ctl.api());
}

// ---- item 2 (last clause): agents have their own listener ----

#[test]
fn agents_and_clients_have_separate_ports() {
    let Some(ctl) = Ctl::start() else { return };
    assert_ne!(ctl.addr(), ctl.host_addr());
    // A host token on the client port: refused, naming the host port.
    let e = crate::harness::connect(ctl.addr(), proto::rpc::Credential::host_token(""))
        .and_then(|c| {
            c.unary::<_, host::RegisterResponse>(
                host::host_methods::REGISTER,
                &host::RegisterRequest::default(),
                T,
            )
        })
        .unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    assert!(e.message.contains("7702"), "{e}");
    // An API key on the host port: refused, naming the client port.
    let e = crate::harness::connect(
        ctl.host_addr(),
        proto::rpc::Credential::api_key(&ctl.team_key),
    )
    .and_then(|c| team_get(&c))
    .unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    assert!(e.message.contains("7700"), "{e}");
    // Agents register and heartbeat on theirs.
    let (fa, _) = ctl.add_host(2, 2048, 100_000);
    fa.host_client()
        .unary::<_, host::HeartbeatResponse>(
            host::host_methods::HEARTBEAT,
            &host::HeartbeatRequest {
                capacity: Some(agent::Resources {
                    vcpus: 2,
                    memory_mib: 2048,
                    disk_mib: 100_000,
                }),
                ..Default::default()
            },
            T,
        )
        .expect("heartbeat on the host port");
}

// ---- issue 11 §3: the sandbox bounds ctl and the agent share ----

#[test]
fn ctl_refuses_what_the_agent_would_refuse_before_reserving() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    // A host big enough that capacity is not the reason.
    let _h = ctl.add_host(1024, 4 * 1024 * 1024, 1 << 30);
    use proto::sandbox_limits as sl;
    for (vcpus, memory_mib) in [
        (sl::VCPUS_MAX + 1, 0),
        (0, sl::MEMORY_MIB_MAX + 1),
        (64, 1024 * 1024),
    ] {
        let e = create(
            &cl,
            c::CreateSandboxRequest {
                vcpus,
                memory_mib,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument, "{vcpus} {memory_mib}: {e}");
    }
    let used: i32 = sql(&ctl)
        .query_one("SELECT used_vcpus FROM hosts", &[])
        .unwrap()
        .get(0);
    assert_eq!(used, 0, "nothing reserved for a refused create");
    // The largest the agent accepts is placed.
    create(
        &cl,
        c::CreateSandboxRequest {
            vcpus: sl::VCPUS_MAX,
            memory_mib: sl::MEMORY_MIB_MAX,
            ..Default::default()
        },
    )
    .expect("the shared maximum is accepted");
}

// ---- issue 11 §7: heartbeat drift lives in the database, its job under a lock ----

#[test]
fn heartbeat_drift_is_recorded_in_the_database_and_taken_once() {
    let Some(ctl) = Ctl::start() else { return };
    let replica = ctl.replica();
    let (fa, host_id) = ctl.add_host(4, 8192, 100_000);
    let cl = ctl.team();
    let sb = create_min(&cl).unwrap();
    // The agent paused it on its own and the report was lost; its heartbeat says so.
    fa.state
        .lock()
        .unwrap()
        .sandboxes
        .get_mut(&sb.id)
        .unwrap()
        .state = proto::sandbox::SandboxState::Paused as i32;
    fa.host_client()
        .unary::<_, host::HeartbeatResponse>(
            host::host_methods::HEARTBEAT,
            &host::HeartbeatRequest {
                capacity: Some(agent::Resources {
                    vcpus: 4,
                    memory_mib: 8192,
                    disk_mib: 100_000,
                }),
                can_host_sandboxes: true,
                sandboxes: vec![host::SandboxSummary {
                    sandbox_id: sb.id.clone(),
                    state: proto::sandbox::SandboxState::Paused as i32,
                    ..Default::default()
                }],
                ..Default::default()
            },
            T,
        )
        .unwrap();
    // The drift is on the host row, not in the memory of the replica that got the heartbeat.
    let mut db = sql(&ctl);
    let marked: bool = db
        .query_one(
            "SELECT drift_seen_at IS NOT NULL FROM hosts WHERE id = $1",
            &[&uuid_of(&host_id)],
        )
        .unwrap()
        .get(0);
    assert!(marked);
    // Any replica may take it (here the one that did not receive the heartbeat), once.
    let cfg = crate::harness::test_config(&ctl.url).jobs;
    let done = ctl::reconciler::check_heartbeats(&replica.api, &cfg);
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(ctl::reconciler::check_heartbeats(ctl.api(), &cfg).is_empty());
    assert_eq!(get(&cl, &sb.id).state, c::SandboxState::Paused as i32);
    // While another session holds the job's advisory lock, nobody takes a mark.
    db.execute("UPDATE hosts SET drift_seen_at = now()", &[])
        .unwrap();
    let mut tx = db.transaction().unwrap();
    tx.query(
        "SELECT pg_advisory_xact_lock($1)",
        &[&ctl::reconciler::DRIFT_LOCK],
    )
    .unwrap();
    assert!(ctl::reconciler::check_heartbeats(ctl.api(), &cfg).is_empty());
    tx.rollback().unwrap();
    assert_eq!(ctl::reconciler::check_heartbeats(ctl.api(), &cfg).len(), 1);
    replica.shutdown();
}

#[test]
fn forced_destroy_over_http() {
    let Some(mut ctl) = Ctl::start() else { return };
    if let Some(r) = ctl.running.take() {
        r.shutdown();
    }
    ctl.running = Some(
        ctl::server::start(
            &crate::harness::test_config(&ctl.url),
            ctl::server::StartOpts {
                jobs: false,
                http: true,
            },
        )
        .expect("start ctl with http"),
    );
    let http_addr = ctl.running().http_addr.unwrap();
    let cl = ctl.team();
    let (_fa, _) = ctl.add_host(4, 8192, 100_000);
    let sb = create_min(&cl).unwrap();
    sql(&ctl)
        .execute("UPDATE hosts SET status = 'unreachable'", &[])
        .unwrap();
    let (status, body) = http(
        http_addr,
        "DELETE",
        &format!("/v1/sandboxes/{}?force=true", sb.id),
        &ctl.team_key,
        "",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(&cl, &sb.id).state, c::SandboxState::Stopped as i32);
}

#[test]
fn registering_connections_cannot_fill_the_agents_port() {
    let Some(ctl) = Ctl::start() else { return };
    let reg = || {
        crate::harness::connect(ctl.host_addr(), proto::rpc::Credential::host_token("")).and_then(
            |c| {
                // Any call proves the hello was accepted (Register with a bad token fails
                // after the hello, with unauthenticated).
                let e = c
                    .unary::<_, host::RegisterResponse>(
                        host::host_methods::REGISTER,
                        &host::RegisterRequest::default(),
                        T,
                    )
                    .unwrap_err();
                if e.code == Code::ResourceExhausted {
                    Err(e)
                } else {
                    Ok(c)
                }
            },
        )
    };
    let (fa, _) = ctl.add_host(2, 2048, 100_000);
    let held: Vec<_> = (0..ctl::limits::REGISTERING_CONNECTIONS_MAX)
        .map(|_| reg().expect("within the budget"))
        .collect();
    let Err(e) = reg() else {
        panic!("a registering connection beyond the budget was accepted")
    };
    assert_eq!(e.code, Code::ResourceExhausted, "{e}");
    // Agents with their host token still get in.
    fa.host_client()
        .unary::<_, host::HeartbeatResponse>(
            host::host_methods::HEARTBEAT,
            &host::HeartbeatRequest {
                capacity: Some(agent::Resources {
                    vcpus: 2,
                    memory_mib: 2048,
                    disk_mib: 100_000,
                }),
                ..Default::default()
            },
            T,
        )
        .expect("a registered agent is not held up");
    drop(held);
    let t = std::time::Instant::now();
    while reg().is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "places not given back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 14: the host port speaks TLS like the client port; an agent talking plaintext to
/// it hears "server speaks TLS" and the flag that fixes it.
#[test]
fn the_host_port_speaks_tls() {
    let Some(ctl) = Ctl::start() else { return };
    let e =
        proto::rpc::Client::connect_tcp(ctl.host_addr(), proto::rpc::Credential::host_token(""))
            .unwrap_err();
    assert!(
        e.message.contains("server speaks TLS") && e.message.contains("--ctl-ca"),
        "{e}"
    );
    // Registration over TLS works (the fake agent registers through the harness).
    let (fa, _) = ctl.add_host(1, 1024, 10_000);
    fa.host_client()
        .unary::<_, host::HeartbeatResponse>(
            host::host_methods::HEARTBEAT,
            &host::HeartbeatRequest {
                capacity: Some(agent::Resources {
                    vcpus: 1,
                    memory_mib: 1024,
                    disk_mib: 10_000,
                }),
                ..Default::default()
            },
            T,
        )
        .unwrap();
}

/// Issue 14: at registration the agent sends a public key it made and a signature over the
/// token; ctl issues a certificate whose identity is the host id (never the name the agent
/// gave), chaining to ctl's CA, whose SHA-256 the token carries as its pin. A key without a
/// valid signature is refused and leaves the token unused.
#[test]
fn registration_issues_a_host_certificate_for_the_host_id() {
    let Some(ctl) = Ctl::start() else { return };
    let tok: c::CreateRegistrationTokenResponse = ctl
        .admin()
        .unary(
            c::hosts_methods::CREATE_REGISTRATION_TOKEN,
            &c::CreateRegistrationTokenRequest { ttl_s: 60 },
            T,
        )
        .unwrap();
    let (secret, pin) = tls::hostkey::split_pin(&tok.token).unwrap();
    let ca = &crate::harness::test_tls().authority;
    assert_eq!(
        pin,
        Some(tls::hostkey::cert_sha256(&ca.cert_der)),
        "the token pins ctl's CA"
    );
    let key = tls::HostKey::generate().unwrap();
    let reg = |sig: Vec<u8>| {
        let rc = crate::harness::connect(ctl.host_addr(), proto::rpc::Credential::host_token(""))
            .unwrap();
        rc.unary::<_, host::RegisterResponse>(
            host::host_methods::REGISTER,
            &host::RegisterRequest {
                registration_token: secret.to_owned(),
                agent_address: "127.0.0.1:1".into(),
                hostname: "ctl.example".into(),
                capacity: Some(agent::Resources {
                    vcpus: 1,
                    memory_mib: 1,
                    disk_mib: 1,
                }),
                host_public_key: key.public_key().to_vec().into(),
                token_signature: sig.into(),
                ..Default::default()
            },
            T,
        )
    };
    // A signature over another token: refused before the token is spent.
    let e = reg(key.sign_token("wrr_other")).unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated);
    assert!(e.message.contains("does not verify"), "{e}");
    let e = reg(vec![0; 10]).unwrap_err();
    assert!(e.message.contains("64"), "{e}");
    // The real proof: a certificate for the host id.
    let r = reg(key.sign_token(secret)).unwrap();
    assert!(r.host_id.starts_with("host-"));
    assert_eq!(r.ca_certificate_pem, ca.cert_pem);
    let leaf = tls::certs_from_pem(r.host_certificate_pem.as_bytes(), "host cert").unwrap();
    let ca_der = tls::CertificateDer::from(ca.cert_der.clone());
    tls::verify_server_cert(&ca_der, &leaf[0], &r.host_id).unwrap();
    let e = tls::verify_server_cert(&ca_der, &leaf[0], "ctl.example").unwrap_err();
    assert!(e.contains("not valid for name"), "{e}");
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let life = r.host_certificate_expires_unix_ns - now_ns;
    let want = ctl::limits::HOST_CERT_LIFETIME.as_nanos() as i64;
    assert!((want - 60_000_000_000..=want).contains(&life), "{life}");
    // The host row keeps the certificate's serial (what a revocation names) and expiry.
    let hid = proto::id::parse(proto::id::Kind::Host, &r.host_id).unwrap();
    let row = sql(&ctl)
        .query_one(
            "SELECT cert_serial, cert_expires_at FROM hosts WHERE id = $1",
            &[&hid],
        )
        .unwrap();
    let serial: Vec<u8> = row.get(0);
    let expires: std::time::SystemTime = row.get(1);
    assert_eq!(serial.len(), 16);
    let mut tlv = vec![0x02, 16];
    tlv.extend_from_slice(&serial);
    assert!(
        leaf[0]
            .as_ref()
            .windows(tlv.len())
            .any(|w| w == tlv.as_slice()),
        "the stored serial is the certificate's"
    );
    let exp_ns = expires
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    assert!(
        (exp_ns - r.host_certificate_expires_unix_ns).abs() < 1_000_000,
        "{exp_ns}"
    );
    // A host registered without a key has no certificate.
    let (_fa, plain) = ctl.add_host(1, 1024, 10_000);
    let hid = proto::id::parse(proto::id::Kind::Host, &plain).unwrap();
    let row = sql(&ctl)
        .query_one("SELECT cert_serial FROM hosts WHERE id = $1", &[&hid])
        .unwrap();
    assert_eq!(row.get::<_, Option<Vec<u8>>>(0), None);
}

/// Issue 14: ctl calls an agent that has its certificate over mutual TLS: it presents a
/// client certificate from its CA and requires the agent's certificate to name the host id
/// it dials. A client without ctl's certificate is refused by the agent; an agent serving
/// another host's certificate is refused by ctl.
#[test]
fn ctl_calls_agents_with_certificates_over_mutual_tls() {
    let Some(ctl) = Ctl::start() else { return };
    let api = &ctl.running.as_ref().unwrap().api;
    let (fa, r, key) = ctl.add_host_tls();
    let hid = proto::id::parse(proto::id::Kind::Host, &r.host_id).unwrap();
    let list = |h| {
        api.agents().unary::<_, agent::ListSandboxesResponse>(
            h,
            agent::sandboxes_methods::LIST,
            &agent::ListSandboxesRequest::default(),
        )
    };
    list(hid).unwrap();
    // The agent's port refuses a client without ctl's client certificate, and a
    // plaintext one.
    let ca = &crate::harness::test_tls().authority;
    let no_cert = tls::ClientTls::from_ca_pem(
        ca.cert_pem.as_bytes(),
        tls::ClientOptions {
            alpn: vec![tls::ALPN_WRENN.to_vec()],
            server_name: Some(r.host_id.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = proto::rpc::ClientConfig::default();
    let tok = fa.state.lock().unwrap().token.clone();
    let e = tls::connect(
        &fa.addr.to_string(),
        &no_cert,
        proto::rpc::Credential::agent_token(tok.clone()),
        &cfg,
    )
    .and_then(|c| {
        c.unary::<_, agent::ListSandboxesResponse>(
            agent::sandboxes_methods::LIST,
            &agent::ListSandboxesRequest::default(),
            T,
        )
    })
    .unwrap_err();
    assert!(e.message.to_lowercase().contains("certificate"), "{e}");
    assert!(
        proto::rpc::Client::connect_tcp(fa.addr, proto::rpc::Credential::agent_token(tok)).is_err()
    );
    // A second host whose agent serves the first host's certificate: ctl refuses it.
    let (fb, rb, _) = ctl.add_host_tls();
    fb.serve_tls(
        r.host_certificate_pem.as_bytes(),
        key.to_pem().as_bytes(),
        r.ca_certificate_pem.as_bytes(),
    );
    let hb = proto::id::parse(proto::id::Kind::Host, &rb.host_id).unwrap();
    let e = list(hb).unwrap_err();
    assert!(e.message.contains("not valid for name"), "{e}");
    // The first host is still served.
    list(hid).unwrap();
}

/// Issue 14: the host port requires a host's certificate once ctl issued it one: its host
/// token alone is refused with a message saying so, another host's certificate with the
/// token is refused, its own certificate is accepted; registration still needs none.
#[test]
fn the_host_port_requires_the_hosts_certificate() {
    let Some(ctl) = Ctl::start() else { return };
    // Registration (inside add_host_tls) connects without a client certificate.
    let (fa, ra, ka) = ctl.add_host_tls();
    let (_fb, rb, kb) = ctl.add_host_tls();
    let beat = |c: Result<Client, proto::Status>| c.and_then(|c| heartbeat(&c));
    let tok = |r: &host::RegisterResponse| proto::rpc::Credential::host_token(r.host_token.clone());
    // The token without the certificate.
    let e = beat(crate::harness::connect(ctl.host_addr(), tok(&ra))).unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    assert!(e.message.contains("requires it"), "{e}");
    // Host A's token with host B's certificate.
    let e = beat(crate::harness::connect_as(
        ctl.host_addr(),
        tok(&ra),
        &rb.host_certificate_pem,
        &kb.to_pem(),
    ))
    .unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    assert!(e.message.contains("does not name the host"), "{e}");
    // Its own certificate: served (and the fake agent's own client works too).
    beat(crate::harness::connect_as(
        ctl.host_addr(),
        tok(&ra),
        &ra.host_certificate_pem,
        &ka.to_pem(),
    ))
    .unwrap();
    beat(Ok(fa.host_client())).unwrap();
}

/// Issue 14: deleting a host on one replica revokes its certificate on every replica: the
/// other replica closes the host's open host-port connection and its own client connection
/// to the agent within a bounded time (LISTEN/NOTIFY, no polling), and the serial is
/// recorded in `revoked_certificates`.
#[test]
fn deleting_a_host_revokes_its_certificate_on_every_replica() {
    let Some(ctl) = Ctl::start() else { return };
    let replica = ctl.replica();
    wait_listening(ctl.api());
    wait_listening(&replica.api);
    let (_fa, r, key) = ctl.add_host_tls();
    let hid = proto::id::parse(proto::id::Kind::Host, &r.host_id).unwrap();
    let beat = |c: &Client| heartbeat(c);
    let on = |addr: String| {
        crate::harness::connect_as(
            addr,
            proto::rpc::Credential::host_token(r.host_token.clone()),
            &r.host_certificate_pem,
            &key.to_pem(),
        )
        .unwrap()
    };
    let on_a = on(ctl.host_addr());
    let on_b = on(replica.host_addr.to_string());
    beat(&on_a).unwrap();
    beat(&on_b).unwrap();
    // Replica B's own mutual-TLS client of the agent.
    let b_agent = replica.api.agents().client(hid).unwrap();
    b_agent
        .unary::<_, agent::ListSandboxesResponse>(
            agent::sandboxes_methods::LIST,
            &agent::ListSandboxesRequest::default(),
            T,
        )
        .unwrap();
    let t0 = std::time::Instant::now();
    ctl.admin()
        .unary::<_, c::DeleteHostResponse>(
            c::hosts_methods::DELETE,
            &c::DeleteHostRequest {
                host_id: r.host_id.clone(),
                force: false,
            },
            T,
        )
        .unwrap();
    let bound = Duration::from_secs(2);
    let wait_closed = |what: &str, closed: &dyn Fn() -> bool| {
        while !closed() {
            assert!(t0.elapsed() < bound, "{what} still open after {bound:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // A client notices a close on its next call (it has no reader thread); the call itself
    // fails anyway (the host row is gone): what counts is that the server closed it.
    let closed = |c: &Client| {
        let _ = beat(c);
        c.is_closed()
    };
    wait_closed("A's host-port connection", &|| closed(&on_a));
    wait_closed("B's host-port connection", &|| closed(&on_b));
    wait_closed("B's connection to the agent", &|| b_agent.is_closed());
    println!(
        "host deletion closed its connections on the other replica in {:?}",
        t0.elapsed()
    );
    assert!(beat(&on_b).is_err());
    let serial = tls::peer::cert_serial(
        &tls::certs_from_pem(r.host_certificate_pem.as_bytes(), "c").unwrap()[0],
    )
    .unwrap();
    let n: i64 = sql(&ctl)
        .query_one(
            "SELECT count(*) FROM revoked_certificates WHERE serial = $1 AND host_id = $2",
            &[&serial, &hid],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(replica.api.revocations().cert_revoked(&serial), Some(true));
    replica.shutdown();
}

/// Issue 14: `wrenn-ctl admin revoke-host` revokes a host's certificate without deleting the
/// host: its open connection closes, a new hello with the certificate is refused as
/// revoked (from the replica's memory), ctl no longer calls its agent; other hosts go on.
#[test]
fn a_revoked_certificate_is_refused_at_the_hello() {
    let Some(ctl) = Ctl::start() else { return };
    wait_listening(ctl.api());
    let (fa, r, _) = ctl.add_host_tls();
    let (fb, _, _) = ctl.add_host_tls();
    let hid = proto::id::parse(proto::id::Kind::Host, &r.host_id).unwrap();
    let beat = |c: &Client| heartbeat(c);
    let open = fa.host_client();
    beat(&open).unwrap();
    assert_eq!(ctl::admin::revoke_host(&ctl.url, &r.host_id).unwrap(), 1);
    let t0 = std::time::Instant::now();
    loop {
        let _ = beat(&open);
        if open.is_closed() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "still open");
        std::thread::sleep(Duration::from_millis(5));
    }
    let serial = tls::peer::cert_serial(
        &tls::certs_from_pem(r.host_certificate_pem.as_bytes(), "c").unwrap()[0],
    )
    .unwrap();
    assert_eq!(ctl.api().revocations().cert_revoked(&serial), Some(true));
    let e = crate::harness::connect_as(
        ctl.host_addr(),
        proto::rpc::Credential::host_token(r.host_token.clone()),
        &r.host_certificate_pem,
        &fa.host_identity_key(),
    )
    .and_then(|c| beat(&c))
    .unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    assert!(e.message.contains("was revoked"), "{e}");
    let e = ctl
        .api()
        .agents()
        .unary::<_, agent::ListSandboxesResponse>(
            hid,
            agent::sandboxes_methods::LIST,
            &agent::ListSandboxesRequest::default(),
        )
        .unwrap_err();
    assert!(e.message.contains("revoked"), "{e}");
    // The other host is untouched.
    beat(&fb.host_client()).unwrap();
}

/// Issue 14: a revocation this replica's listener cannot hear (its connection killed, the
/// row written without NOTIFY) is still refused at the next hello: from the database while
/// the listener is down, and from the set it reloads when it is back.
#[test]
fn a_revocation_missed_by_the_listener_is_still_refused() {
    let Some(ctl) = Ctl::start() else { return };
    wait_listening(ctl.api());
    let (fa, r, _) = ctl.add_host_tls();
    let hello = || {
        crate::harness::connect_as(
            ctl.host_addr(),
            proto::rpc::Credential::host_token(r.host_token.clone()),
            &r.host_certificate_pem,
            &fa.host_identity_key(),
        )
        .and_then(|c| heartbeat(&c))
    };
    hello().unwrap();
    let mut db = sql(&ctl);
    // The revocation is committed without a NOTIFY (as if the notification was lost) and
    // only then the listener's connection dies: its reconnect must find the row. (In the
    // other order a fast reconnect could reload before the row exists, and a row written
    // silently while the listener is up is never announced: not the case under test.)
    let hid = proto::id::parse(proto::id::Kind::Host, &r.host_id).unwrap();
    db.execute(
        "INSERT INTO revoked_certificates (serial, host_id, expires_at) \
         SELECT cert_serial, id, cert_expires_at FROM hosts WHERE id = $1",
        &[&hid],
    )
    .unwrap();
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'wrenn-ctl-listen' AND datname = current_database()",
        &[],
    )
    .unwrap();
    // Whichever path answers (database while down, the reloaded set once back), refused
    // as soon as the listener noticed its connection died (within its ping interval).
    let t0 = std::time::Instant::now();
    let e = loop {
        match hello() {
            Err(e) => break e,
            Ok(_) => assert!(
                // The ping interval, plus room for a loaded 2-core machine (a 7 s bound
                // failed once with a Firecracker guest and a build running).
                t0.elapsed() < 2 * ctl::limits::LISTEN_PING_INTERVAL + Duration::from_secs(10),
                "a revoked certificate still accepted"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(e.message.contains("was revoked"), "{e}");
    wait_listening(ctl.api());
    let e = hello().unwrap_err();
    assert!(e.message.contains("was revoked"), "{e}");
}

/// Issue 14: a host renews its certificate on its open host-port connection, which stays
/// open; its sandboxes are untouched. The replaced certificate stays valid until it expires
/// (a new connection with it is accepted), one replaced twice is refused; a renewal signed
/// by another key is refused. The certificates live as long as ctl is configured (here a
/// short test lifetime).
#[test]
fn a_host_renews_its_certificate_on_its_open_connection() {
    let lifetime = Duration::from_secs(120);
    let Some(ctl) = Ctl::start_with(|c| c.api.host_cert_lifetime = lifetime) else {
        return;
    };
    let (fa, r, key) = ctl.add_host_tls();
    let cl = ctl.team();
    let sb = create_min(&cl).unwrap();
    let beat = |c: &Client| heartbeat(c);
    let renew = |c: &Client, k: &tls::HostKey| {
        c.unary::<_, host::RenewCertificateResponse>(
            host::host_methods::RENEW_CERTIFICATE,
            &host::RenewCertificateRequest {
                host_public_key: key.public_key().to_vec().into(),
                key_signature: k.sign_renewal(&r.host_id).into(),
            },
            T,
        )
    };
    let with = |cert: &str| {
        crate::harness::connect_as(
            ctl.host_addr(),
            proto::rpc::Credential::host_token(r.host_token.clone()),
            cert,
            &key.to_pem(),
        )
        .and_then(|c| beat(&c))
    };
    let serial_of = |pem: &str| {
        tls::peer::cert_serial(&tls::certs_from_pem(pem.as_bytes(), "c").unwrap()[0]).unwrap()
    };
    let conn = fa.host_client();
    beat(&conn).unwrap();
    let e = renew(&conn, &tls::HostKey::generate().unwrap()).unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    let first = r.host_certificate_pem.clone();
    let second = renew(&conn, &key).unwrap();
    let cert = &tls::certs_from_pem(second.host_certificate_pem.as_bytes(), "c").unwrap()[0];
    tls::verify_server_cert(
        &tls::certs_from_pem(second.ca_certificate_pem.as_bytes(), "ca").unwrap()[0],
        cert,
        &r.host_id,
    )
    .unwrap();
    assert_ne!(serial_of(&second.host_certificate_pem), serial_of(&first));
    let (from, to) = tls::peer::cert_validity(cert).unwrap();
    assert!(
        to - from <= lifetime.as_secs() * 11 / 10 + 1,
        "{from}..{to}"
    );
    // The same connection goes on; the sandbox is untouched.
    beat(&conn).unwrap();
    assert_eq!(get(&cl, &sb.id).state, c::SandboxState::Running as i32);
    // New connections: the new certificate, and the replaced one until it expires.
    with(&second.host_certificate_pem).unwrap();
    with(&first).unwrap();
    let (db_now, db_prev): (Vec<u8>, Vec<u8>) = {
        let row = sql(&ctl)
            .query_one(
                "SELECT cert_serial, prev_cert_serial FROM hosts WHERE id = $1",
                &[&proto::id::parse(proto::id::Kind::Host, &r.host_id).unwrap()],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(db_now, serial_of(&second.host_certificate_pem));
    assert_eq!(db_prev, serial_of(&first));
    // Renewed again: the first one is no longer accepted.
    let third = renew(&conn, &key).unwrap();
    with(&third.host_certificate_pem).unwrap();
    with(&second.host_certificate_pem).unwrap();
    let e = with(&first).unwrap_err();
    assert!(e.message.contains("not one ctl issued"), "{e}");
    beat(&conn).unwrap();
}

/// Issue 14: the agent's own renewal (`agent::ctl::CtlLink::renew_if_due`, which its loop
/// runs after each heartbeat) against a real replica whose host certificates live 12 s: not
/// due before two thirds of the lifetime (`CERT_RENEW_AT_NUM/DEN`), then renewed on the open
/// connection, which goes on; `host.pem` replaced, the agent port's TLS replaced, the next
/// connection presents the new certificate.
#[test]
fn the_agent_renews_its_certificate_at_two_thirds_of_its_life() {
    let lifetime = Duration::from_secs(12);
    let Some(ctl) = Ctl::start_with(|c| c.api.host_cert_lifetime = lifetime) else {
        return;
    };
    let (_fa, r, key) = ctl.add_host_tls();
    let issued = std::time::Instant::now();
    let dir = std::env::temp_dir().join(format!(
        "wrenn-ctl-it-renew-{}-{}",
        std::process::id(),
        r.host_id
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |n: &str| dir.join(n);
    std::fs::write(path("host.key"), key.to_pem()).unwrap();
    std::fs::write(path("host.pem"), &r.host_certificate_pem).unwrap();
    std::fs::write(path("ctl-ca.pem"), &r.ca_certificate_pem).unwrap();
    let hid = proto::id::parse(proto::id::Kind::Host, &r.host_id).unwrap();
    let rpc_tls = std::sync::Arc::new(::agent::rpc_tls::RpcTls::default());
    let link = ::agent::ctl::CtlLink::new(
        ::agent::ctl::CtlConfig {
            addr: ctl.host_addr(),
            registration_token: None,
            agent_address: String::new(),
            identity_path: path("identity.conf"),
            host_key_path: path("host.key"),
            host_cert_path: path("host.pem"),
            ctl_ca_path: path("ctl-ca.pem"),
            ctl_ca_given: None,
            tls: Some(crate::harness::test_tls().client.clone()),
            rpc_tls: rpc_tls.clone(),
        },
        std::sync::Arc::new(::agent::host::IdentityCell::new(Some(
            ::agent::statedir::Identity {
                host_id: hid,
                host_token: r.host_token.clone(),
                agent_token: r.agent_token.clone(),
            },
        ))),
    );
    let beat = |c: &Client| heartbeat(c);
    // The link presents host.pem on its host-token connection (token alone is refused).
    let conn = link.connect_host().unwrap();
    beat(&conn).unwrap();
    assert!(
        !link.renew_if_due(&conn).unwrap(),
        "renewed before it was due"
    );
    assert!(!rpc_tls.is_tls());
    let renewed_at = loop {
        if link.renew_if_due(&conn).unwrap() {
            break issued.elapsed();
        }
        assert!(
            issued.elapsed() < lifetime,
            "not renewed within the lifetime"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("renewed {renewed_at:?} after issue (lifetime {lifetime:?})");
    // Due at two thirds of the validity (which starts up to 1.2 s of skew allowance before
    // issue; X.509 times are whole seconds, rounded down): about 6–7.6 s here, at the
    // earliest 5.8 s; never at once.
    assert!(
        renewed_at >= lifetime / 2 - Duration::from_secs(1),
        "{renewed_at:?}"
    );
    let pem = std::fs::read_to_string(path("host.pem")).unwrap();
    assert_ne!(pem, r.host_certificate_pem);
    let serial = tls::peer::cert_serial(&tls::certs_from_pem(pem.as_bytes(), "c").unwrap()[0]);
    let row: Vec<u8> = sql(&ctl)
        .query_one("SELECT cert_serial FROM hosts WHERE id = $1", &[&hid])
        .unwrap()
        .get(0);
    assert_eq!(serial, Some(row));
    assert!(rpc_tls.is_tls(), "the agent port took the new certificate");
    // The open connection goes on, a new one presents the new certificate, and after the
    // first certificate expired the renewed one still works; nothing more is due.
    beat(&conn).unwrap();
    std::thread::sleep(lifetime.saturating_sub(issued.elapsed()) + Duration::from_millis(200));
    beat(&link.connect_host().unwrap()).unwrap();
    beat(&conn).unwrap();
    assert!(!link.renew_if_due(&conn).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 14: ctl keeps its mutual-TLS connection to an agent, so sandbox creates on a warm
/// pool cost no handshake (prints the phase line the bench reports).
#[test]
fn sandbox_creates_on_a_warm_pool_cost_no_tls_handshake() {
    let Some(ctl) = Ctl::start() else { return };
    let (fa, _, _) = ctl.add_host_tls();
    let cl = ctl.team();
    let sb = create_min(&cl).unwrap();
    destroy(&cl, &sb.id).unwrap();
    let warm = fa.tls_accepts.load(std::sync::atomic::Ordering::SeqCst);
    assert!(warm >= 1, "the first create opened the TLS connection");
    const CREATES: usize = 10;
    for _ in 0..CREATES {
        let sb = create_min(&cl).unwrap();
        destroy(&cl, &sb.id).unwrap();
    }
    let extra = fa.tls_accepts.load(std::sync::atomic::Ordering::SeqCst) - warm;
    println!(
        "tls_handshake phase: {extra} handshakes for {CREATES} sandbox creates on a warm pool \
         ({:.2} per create; goal 0)",
        extra as f64 / CREATES as f64
    );
    assert_eq!(extra, 0);
    assert_eq!(
        fa.creates.load(std::sync::atomic::Ordering::SeqCst),
        CREATES + 1
    );
}

/// Issue 14: an agent presenting an expired host certificate is refused by ctl, with the
/// reason, and other hosts are still served.
#[test]
fn an_agent_with_an_expired_certificate_is_refused() {
    let Some(ctl) = Ctl::start() else { return };
    let api = &ctl.running.as_ref().unwrap().api;
    let (_fa, ra, _) = ctl.add_host_tls();
    let (fb, rb, key) = ctl.add_host_tls();
    let ca = &crate::harness::test_tls().authority;
    // The same host id and key, a certificate that ended when it was made.
    let expired = ca
        .issue_host(&rb.host_id, key.public_key(), Duration::ZERO)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    fb.serve_tls(
        expired.cert_pem.as_bytes(),
        key.to_pem().as_bytes(),
        ca.cert_pem.as_bytes(),
    );
    let list = |h: &str| {
        api.agents().unary::<_, agent::ListSandboxesResponse>(
            proto::id::parse(proto::id::Kind::Host, h).unwrap(),
            agent::sandboxes_methods::LIST,
            &agent::ListSandboxesRequest::default(),
        )
    };
    let e = list(&rb.host_id).unwrap_err();
    assert!(e.message.contains("expired"), "{e}");
    list(&ra.host_id).unwrap();
}

/// One heartbeat with a fixed capacity (4 vCPUs, 4 GiB, 100 GB) on a host connection.
fn heartbeat(c: &Client) -> Result<host::HeartbeatResponse, proto::Status> {
    c.unary::<_, host::HeartbeatResponse>(
        host::host_methods::HEARTBEAT,
        &host::HeartbeatRequest {
            capacity: Some(agent::Resources {
                vcpus: 4,
                memory_mib: 4096,
                disk_mib: 100_000,
            }),
            ..Default::default()
        },
        T,
    )
}

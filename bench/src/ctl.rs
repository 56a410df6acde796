//! ctl cases: each measured against bare PostgreSQL work in the same run (a prepared `SELECT`
//! of one row by primary key; for a create, an INSERT and its commit), on a throwaway
//! PostgreSQL 15 cluster.
//! - `ctl_auth`: `Api::authenticate` (the API-key check every connection/request does);
//! - `ctl_create`: `Api::create_sandbox` with an agent that answers at once, against one
//!   single-row INSERT committed on its own (the same kind of work: a write and a durable
//!   commit), goal <= 3x, on a cluster with PostgreSQL's default durability (fsync on, as in
//!   production; the other cases run with it off; a create waits for one WAL flush, its
//!   reservation's, since the running mark commits without waiting, see
//!   `ctl::service::sandboxes::running_sql`); its phase lines still give each part as a
//!   multiple of the SELECT and `ctl_create_phase_tls_handshakes` with
//!   `metric=ctl_create_tls_handshakes_per_create` count the TLS handshakes a create costs
//!   between ctl and the agent (issue 14: goal 0 on a warm pool);
//! - `ctl_list`: `Api::list_sandboxes` (a page of 100) of a team with 10,000 sandboxes,
//!   against the same SQL query run bare; compared at p99.
//!
//! - `proxy_http`: a small GET through ctl's traffic proxy (HTTP gateway → Ports.Connect on
//!   the agent connection → the agent's TCP connection to the server), against the same GET
//!   sent straight to the server; a new connection each, both ways (the proxy serves one
//!   request per connection); goal <= 3x (two extra hops on two cores);
//! - `proxy_stream`: a 1 GiB GET (16 MiB with --quick) the same two ways, as throughput;
//!   goal >= 0.5x. The agent is ctl's `InstantAgent`, whose Ports.Connect relays like the real
//!   agent's (a thread per direction) to a loopback server standing in for the guest's.
//!   Two info lines put the goal in context, each interleaved with the direct GET: the same
//!   GET through two minimal relays with the same hops (plain, TLS between them, plain:
//!   `proxy_stream_floor`) and through the same relays with plain TCP between them
//!   (`proxy_stream_floor_plain`).
//!
//! ctl has a CA (the same code as `wrenn-ctl admin tls init`), so the agent registers with a
//! host key, serves mutual TLS with the certificate registration issued, and ctl's pool
//! calls it over TLS, as in production.
//!
//! Ours and the baseline run alternately, one iteration each (`measure_interleaved`), so
//! both meet the same load on this shared machine. Note what that means: the baseline is a
//! round trip to a PostgreSQL backend that was idle a moment ago, not one in a hot loop
//! (measured back to back in a tight loop instead, ctl_auth came out at 2-3x on the same
//! machine, the difference being the two thread hand-offs of the DB worker pool).

use std::time::Duration;

use ctl::config::{ApiConfig, Config, JobsConfig};
use ctl::server::{Running, StartOpts};
use ctl::service::{Api, AuthCtx};
use ctl::testkit::{InstantAgent, PgCluster};
use postgres::types::Type;
use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as c;
use proto::gen::wrenn::host::v1 as host;

use crate::harness::{latency_line, measure_interleaved, Case, Goal, Opts, Samples};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "ctl_auth",
            run: ctl_auth,
        },
        Case {
            name: "ctl_create",
            run: ctl_create,
        },
        Case {
            name: "ctl_list",
            run: ctl_list,
        },
        Case {
            name: "proxy_http",
            run: proxy_http,
        },
        Case {
            name: "proxy_stream",
            run: proxy_stream,
        },
    ]
}

struct Env {
    running: Option<Running>,
    agent: InstantAgent,
    key: String,
    ctx: AuthCtx,
    bare: postgres::Client,
    key_id: proto::id::Uuid,
    url: String,
    /// The agent's host id and ctl's client TLS for it (mutual TLS, as ctl's pool dials).
    host_id: proto::id::Uuid,
    agent_tls: tls::ClientTls,
    // Dropped last: stops the cluster.
    _cluster: PgCluster,
}

impl Env {
    fn api(&self) -> &Api {
        &self.running.as_ref().expect("running").api
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
        }
    }
}

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

/// `Ok(None)` (after printing the skip) when PostgreSQL 15 is not installed, unless
/// WRENN_REQUIRE_E2E=1 demands it.
fn env_or_skip(name: &str) -> Result<Option<Env>, String> {
    env_or_skip_with(name, false)
}

fn env_or_skip_with(name: &str, durable: bool) -> Result<Option<Env>, String> {
    if !std::path::Path::new(ctl::testkit::PG_BIN)
        .join("initdb")
        .exists()
    {
        let why = format!("PostgreSQL 15 not found in {}", ctl::testkit::PG_BIN);
        if std::env::var("WRENN_REQUIRE_E2E").is_ok_and(|v| v == "1") {
            return Err(why);
        }
        println!("bench={name} skipped: {why}");
        return Ok(None);
    }
    env(durable).map(Some)
}

fn env(durable: bool) -> Result<Env, String> {
    let cluster = if durable {
        PgCluster::start_durable()?
    } else {
        PgCluster::start()?
    };
    let url = cluster.create_db("bench")?;
    // A CA as `wrenn-ctl admin tls init` makes: registration issues the agent its host
    // certificate and ctl calls it over mutual TLS, as in production.
    let (ca, _ca_key) = ctl::pki::Authority::generate().map_err(e("CA"))?;
    let ca = std::sync::Arc::new(ca);
    let init = ctl::admin::init(&url, "bench", "bench@example.com", "").map_err(e("admin init"))?;
    let cfg = Config {
        database_url: url.clone(),
        listen: "127.0.0.1:0".parse().map_err(e("addr"))?,
        http_listen: "127.0.0.1:0".parse().map_err(e("addr"))?,
        host_listen: "127.0.0.1:0".parse().map_err(e("addr"))?,
        db_workers: 4,
        api: ApiConfig {
            last_used_flush: Duration::from_secs(1),
            issuer: Some(ca.clone()),
            ..ApiConfig::default()
        },
        jobs: JobsConfig::default(),
        // The cases call the service layer, not the client port.
        tls: Default::default(),
        traffic_domain: None,
    };
    let running = ctl::server::start(
        &cfg,
        StartOpts {
            jobs: false,
            http: false,
        },
    )
    .map_err(e("start ctl"))?;
    let api = running.api.clone();
    let agent = InstantAgent::start().map_err(e("start agent"))?;
    let (tok, _) =
        ctl::admin::create_registration_token(&url, 600).map_err(e("registration token"))?;
    // The agent's key pair and its signature over the token, as a real agent registers.
    let host_key = tls::HostKey::generate().map_err(e("host key"))?;
    let (secret, _pin) = tls::hostkey::split_pin(&tok).map_err(e("registration token"))?;
    let token_signature = host_key.sign_token(secret).into();
    let reg = ctl::host_service::register(
        &api,
        host::RegisterRequest {
            registration_token: tok.clone(),
            token_signature,
            host_public_key: host_key.public_key().to_vec().into(),
            agent_address: agent.addr.to_string(),
            hostname: "bench".into(),
            capacity: Some(agent::Resources {
                vcpus: 1 << 20,
                memory_mib: 1 << 40,
                disk_mib: 1 << 40,
            }),
            can_host_sandboxes: true,
            ..Default::default()
        },
    )
    .map_err(|s| format!("register: {s:?}"))?;
    agent.set_token(&reg.agent_token);
    if reg.host_certificate_pem.is_empty() {
        return Err("registration issued no host certificate".into());
    }
    agent
        .serve_tls(
            reg.host_certificate_pem.as_bytes(),
            host_key.to_pem().as_bytes(),
            reg.ca_certificate_pem.as_bytes(),
        )
        .map_err(e("agent TLS"))?;
    let host_id = proto::id::parse(proto::id::Kind::Host, &reg.host_id).map_err(e("host id"))?;
    let agent_tls = ca
        .agent_client()
        .map_err(e("ctl client TLS"))?
        .with_server_name(reg.host_id.clone());
    let ctx = api
        .authenticate(&init.team_key)
        .map_err(|s| format!("auth: {s:?}"))?;
    let bare = postgres::Client::connect(&url, postgres::NoTls).map_err(e("connect"))?;
    Ok(Env {
        running: Some(running),
        agent,
        key: init.team_key,
        key_id: ctx.key_id,
        ctx,
        bare,
        url,
        host_id,
        agent_tls,
        _cluster: cluster,
    })
}

/// The baseline: one prepared SELECT of one row by primary key.
fn bare_round_trip(env: &mut Env) -> Result<impl FnMut() -> Result<(), String> + '_, String> {
    let stmt = env
        .bare
        .prepare_typed(
            "SELECT id, team_id, name, key_hash, platform_admin FROM api_keys WHERE id = $1",
            &[Type::UUID],
        )
        .map_err(e("prepare"))?;
    let id = env.key_id;
    let bare = &mut env.bare;
    Ok(move || {
        bare.query_one(&stmt, &[&id])
            .map(|_| ())
            .map_err(|err| err.to_string())
    })
}

/// The baseline of a create: one single-row INSERT committed on its own (autocommit), on
/// the same cluster with the same durability settings (the commit waits for its WAL fsync,
/// as a create's commits do). A create writes and commits too, so this is the same kind of
/// work; a SELECT is not.
fn bare_insert(env: &mut Env) -> Result<impl FnMut() -> Result<(), String> + '_, String> {
    env.bare
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS bench_insert (id bigint PRIMARY KEY, v text NOT NULL)",
        )
        .map_err(e("create bench_insert"))?;
    let stmt = env
        .bare
        .prepare_typed(
            "INSERT INTO bench_insert (id, v) VALUES ($1, 'x')",
            &[Type::INT8],
        )
        .map_err(e("prepare insert"))?;
    let bare = &mut env.bare;
    let mut n = bare
        .query_one("SELECT coalesce(max(id), 0) FROM bench_insert", &[])
        .map_err(e("max id"))?
        .get::<_, i64>(0);
    Ok(move || {
        n += 1;
        bare.execute(&stmt, &[&n])
            .map(|_| ())
            .map_err(|err| err.to_string())
    })
}

fn ctl_auth(o: &Opts) -> Result<(), String> {
    let Some(mut env) = env_or_skip("ctl_auth")? else {
        return Ok(());
    };
    let iters = o.iters(3000, 5);
    let api = env.api().clone();
    let key = env.key.clone();
    let (base, ours) = measure_interleaved(iters, bare_round_trip(&mut env)?, || {
        api.authenticate(&key).map(|_| ()).map_err(|s| s.message)
    })?;
    println!(
        "{}",
        latency_line("ctl_auth", &ours, "pg_select_pk", &base, Goal::AtMost(1.5))
    );
    Ok(())
}

fn ctl_create(o: &Opts) -> Result<(), String> {
    // Durable, as in production: a create is two commits, the reservation's waiting for its
    // WAL fsync (the running mark's does not: `running_sql`), and what they cost is the point
    // of the comparison.
    let Some(mut env) = env_or_skip_with("ctl_create", true)? else {
        return Ok(());
    };
    let iters = o.iters(1000, 3);
    let api = env.api().clone();
    let ctx = env.ctx.clone();
    let (base, ours) = measure_interleaved(iters, bare_insert(&mut env)?, || {
        api.create_sandbox(&ctx, c::CreateSandboxRequest::default())
            .map(|_| ())
            .map_err(|s| format!("{}: {}", s.code, s.message))
    })?;
    println!(
        "{}",
        latency_line(
            "ctl_create",
            &ours,
            "pg_insert_commit",
            &base,
            Goal::AtMost(3.0)
        )
    );
    handshake_phase(&env, o.iters(100, 3))?;
    create_phases(&mut env, iters)
}

/// Issue 14: how many TLS handshakes one sandbox create costs between ctl and the agent,
/// counted on the agent's listener (every connection it accepts over mutual TLS is one).
/// First a create on a cold pool (the host's pooled connections closed): it must count at
/// least one, or the counter measures nothing and the case fails. Then `creates` creates
/// on the now warm pool: goal 0 per create (ctl reuses its connection).
fn handshake_phase(env: &Env, creates: usize) -> Result<(), String> {
    let api = env.api().clone();
    let ctx = env.ctx.clone();
    let create = || {
        api.create_sandbox(&ctx, c::CreateSandboxRequest::default())
            .map(|_| ())
            .map_err(|s| format!("{}: {}", s.code, s.message))
    };
    api.agents().forget(env.host_id);
    let before = env.agent.tls_handshakes();
    create()?;
    let cold = env.agent.tls_handshakes() - before;
    if cold == 0 {
        return Err(
            "a create on a cold agent pool counted no TLS handshake: the counter \
                    measures nothing"
                .into(),
        );
    }
    let before = env.agent.tls_handshakes();
    let samples = crate::harness::measure(creates, 0, create)?;
    let warm = env.agent.tls_handshakes() - before;
    let per_create = warm as f64 / creates.max(1) as f64;
    println!(
        "{}",
        crate::harness::info_line(
            "ctl_create_phase_tls_handshakes",
            &samples,
            &format!(
                "cold_pool_create={cold} warm_pool={warm}/{} per_create={per_create:.3} goal=0",
                creates.max(1)
            )
        )
    );
    println!(
        "{}",
        crate::harness::metric_line(
            "ctl_create_tls_handshakes_per_create",
            per_create,
            "handshakes",
            Goal::AtMost(0.0)
        )
    );
    Ok(())
}

/// What a create is made of, each part timed interleaved with the same baseline and printed
/// as an info line with its multiple of the round trip: a hand-off to a DB worker with no
/// SQL, a hand-off running one prepared SELECT, the agent's Create over the RPC runtime (to
/// the same in-memory agent), and the create's two statements (reserve + insert + audit,
/// then mark running) run bare. A create costs two hand-offs, those two statements and one
/// agent call; these lines show which part to cut (on the machines measured so far the two
/// statements alone, server-side work of three tables' constraints, indexes and foreign
/// keys, come close to the whole create).
fn create_phases(env: &mut Env, iters: usize) -> Result<(), String> {
    let mut cfg = ctl::db::DbConfig::new(&env.url);
    cfg.workers = 4;
    let db = ctl::db::Db::start(&cfg).map_err(e("db pool"))?;
    let key = env.key_id;
    let token = env.agent.token.lock().map_err(e("token"))?.clone();
    let agent = tls::connect(
        &env.agent.addr.to_string(),
        &env.agent_tls,
        proto::rpc::Credential::agent_token(token),
        &proto::rpc::ClientConfig::default(),
    )
    .map_err(|s| format!("connect agent: {}", s.message))?;
    let mut n = 0u64;
    let mut agent_create = || {
        n += 1;
        let req = proto::sandbox::SandboxSpec {
            sandbox_id: proto::id::format_sandbox(proto::id::Uuid::from_u128(u128::from(n))),
            ..Default::default()
        };
        agent
            .unary::<_, agent::SandboxInfo>(
                agent::sandboxes_methods::CREATE,
                &req,
                Some(Duration::from_secs(10)),
            )
            .map(|_| ())
            .map_err(|s| s.message)
    };
    let phase = |name: &str, base: &Samples, ours: &Samples| {
        let note = format!(
            "ratio_to_round_trip={:.3}",
            ours.p50() as f64 / base.p50().max(1) as f64
        );
        println!("{}", crate::harness::info_line(name, ours, &note));
    };
    let (base, ours) = measure_interleaved(iters, bare_round_trip(env)?, || {
        db.run(|_| Ok(())).map_err(|s| s.message)
    })?;
    phase("ctl_create_phase_db_handoff", &base, &ours);
    let (base, ours) = measure_interleaved(iters, bare_round_trip(env)?, || {
        db.run(move |c| {
            let st = ctl::db::prepared(
                c,
                "SELECT id, team_id, name, key_hash, platform_admin FROM api_keys WHERE id = $1",
                &[Type::UUID],
            )?;
            c.query_one(&st, &[&key]).map_err(ctl::db::pg_err)?;
            Ok(())
        })
        .map_err(|s| s.message)
    })?;
    phase("ctl_create_phase_db_select", &base, &ours);
    let (base, ours) = measure_interleaved(iters, bare_round_trip(env)?, &mut agent_create)?;
    phase("ctl_create_phase_agent_create", &base, &ours);
    agent.close();
    // The create's two statements run bare on a connection of their own (no hand-off, no
    // agent): the floor of a create made of these statements.
    let mut sql = postgres::Client::connect(&env.url, postgres::NoTls).map_err(e("connect"))?;
    let create = sql
        .prepare_typed(
            &ctl::service::sandboxes::create_sql(false),
            &ctl::service::sandboxes::create_types(false),
        )
        .map_err(e("prepare create"))?;
    let running = sql
        .prepare_typed(
            &ctl::service::sandboxes::running_sql(),
            &[Type::UUID, Type::TIMESTAMPTZ],
        )
        .map_err(e("prepare running"))?;
    let team = env.ctx.team_id;
    let platform = proto::id::Uuid::nil();
    let meta = serde_json::json!({});
    let key_id = proto::id::format_key(env.key_id);
    let mut n = 0u128;
    let (base, ours) = measure_interleaved(iters, bare_round_trip(env)?, || {
        n += 1;
        // Ids no create of ctl makes (ctl's are random v4 UUIDs; these have version 0).
        let id = proto::id::Uuid::from_u128((0xbe_u128 << 120) | (n << 1));
        let audit = proto::id::Uuid::from_u128((0xbe_u128 << 120) | (n << 1) | 1);
        let sb = proto::id::format_sandbox(id);
        let row = sql
            .query_one(
                &create,
                &[
                    &team,
                    &platform,
                    &"minimal",
                    &0i32,
                    &0i32,
                    &0i64,
                    &id,
                    &300i64,
                    &"destroy",
                    &meta,
                    &audit,
                    &key_id,
                    &"bench",
                    &sb,
                    &meta,
                    &None::<serde_json::Value>,
                    &"0123456789abcdef0123456789abcdef",
                    &false,
                    &false,
                ],
            )
            .map_err(|err| err.to_string())?;
        if row.get::<_, Option<proto::id::Uuid>>(0).is_none() {
            return Err("bare create inserted nothing".into());
        }
        let exp = std::time::SystemTime::now() + Duration::from_secs(300);
        sql.query_one(&running, &[&id, &exp])
            .map(|_| ())
            .map_err(|err| err.to_string())
    })?;
    phase("ctl_create_phase_sql_bare", &base, &ours);
    Ok(())
}

fn ctl_list(o: &Opts) -> Result<(), String> {
    let Some(mut env) = env_or_skip("ctl_list")? else {
        return Ok(());
    };
    let n: i32 = if o.quick { 200 } else { 10_000 };
    let team = env.ctx.team_id;
    // 10,000 running sandboxes of the team, inserted directly (the ledger is irrelevant here).
    env.bare
        .execute(
            "INSERT INTO sandboxes (id, team_id, template_id, state, vcpus, memory_mib, disk_mib, timeout_s, \
                on_timeout, metadata, created_at) \
             SELECT gen_random_uuid(), $1, '00000000-0000-0000-0000-000000000000', 'running', 1, 512, 5120, \
                300, 'destroy', jsonb_build_object('i', i::text), now() - make_interval(secs => i) \
             FROM generate_series(1, $2) AS i",
            &[&team, &n],
        )
        .map_err(e("insert sandboxes"))?;
    env.bare
        .batch_execute("ANALYZE sandboxes")
        .map_err(e("analyze"))?;
    let iters = o.iters(1000, 3);
    // Baseline: the same SQL, prepared, run bare with the same parameters.
    let stmt = env
        .bare
        .prepare_typed(
            &ctl::service::sandboxes::list_sql(),
            &[
                Type::UUID,
                Type::BOOL,
                Type::TEXT_ARRAY,
                Type::UUID,
                Type::JSONB,
                Type::TIMESTAMPTZ,
                Type::UUID,
                Type::INT8,
            ],
        )
        .map_err(e("prepare list"))?;
    let empty: Vec<String> = Vec::new();
    let meta = serde_json::json!({});
    let none_uuid: Option<proto::id::Uuid> = None;
    let none_t: Option<std::time::SystemTime> = None;
    let limit: i64 = 101;
    let api = env.api().clone();
    let ctx = env.ctx.clone();
    let bare = &mut env.bare;
    let bare_list = || {
        let rows = bare
            .query(
                &stmt,
                &[
                    &team, &true, &empty, &none_uuid, &meta, &none_t, &none_uuid, &limit,
                ],
            )
            .map_err(|err| err.to_string())?;
        if rows.len() as i64 != limit.min(i64::from(n)) {
            return Err(format!("bare list returned {} rows", rows.len()));
        }
        Ok(())
    };
    let (base, ours) = measure_interleaved(iters, bare_list, || {
        let r = api
            .list_sandboxes(&ctx, c::ListSandboxesRequest::default())
            .map_err(|s| s.message)?;
        if r.sandboxes.len() as i64 != 100.min(i64::from(n)) {
            return Err(format!("list returned {}", r.sandboxes.len()));
        }
        Ok(())
    })?;
    // The goal is on p99 (tails); the baseline's own figures and the median ratio are
    // printed too, since one run's p99 on a shared machine is mostly scheduling noise.
    println!(
        "{}",
        crate::harness::info_line(
            "ctl_list_baseline",
            &base,
            &format!(
                "p50_ratio={:.3}",
                ours.p50() as f64 / base.p50().max(1) as f64
            )
        )
    );
    let ratio = ours.p99() as f64 / base.p99().max(1) as f64;
    let goal = Goal::AtMost(4.0);
    println!(
        "bench=ctl_list p50_ns={} p99_ns={} baseline=pg_list_query_p99 ratio={ratio:.3} goal={goal} ok={}",
        ours.p50(),
        ours.p99(),
        goal.holds(ratio)
    );
    let _ = &env.url;
    Ok(())
}

/// The stand-in for a server in a sandbox: a thread per connection; `GET /small` answers
/// `ok`, `GET /big?n=N` N bytes (Content-Length). Stops with the process (a bench run).
fn guest_server() -> Result<std::net::SocketAddr, String> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(e("bind guest"))?;
    let addr = l.local_addr().map_err(e("guest addr"))?;
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                let head = loop {
                    if let Ok(Some((h, _))) = proto::http::parse_request_head(&buf, 16384) {
                        break h;
                    }
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&b[..k]),
                    }
                };
                let n: usize = head
                    .query
                    .strip_prefix("n=")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2);
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
                let chunk = vec![b'x'; 256 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    if s.write_all(&chunk[..k]).is_err() {
                        return;
                    }
                    left -= k;
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// One GET on a new connection to `addr` with `extra` header lines; returns once the whole
/// body (by its Content-Length) arrived.
fn http_get(addr: std::net::SocketAddr, host: &str, path: &str, extra: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(e("connect"))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(e("timeout"))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").map_err(e("write"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut have = Vec::new();
    let (status, len, body_start) = loop {
        let k = s.read(&mut buf).map_err(e("read head"))?;
        if k == 0 {
            return Err("closed before the head".into());
        }
        have.extend_from_slice(&buf[..k]);
        if let Some((h, n)) = proto::http::parse_response_head(&have, 16384, false)
            .map_err(|err| format!("head: {err}"))?
        {
            let len = match h.framing {
                proto::http::Framing::Length(l) => l,
                _ => return Err("the answer has no Content-Length".into()),
            };
            break (h.status, len, have.len() - n);
        }
    };
    if status != 200 {
        return Err(format!("status {status}"));
    }
    let mut got = body_start as u64;
    while got < len {
        let k = s.read(&mut buf).map_err(e("read body"))?;
        if k == 0 {
            return Err(format!("closed after {got} of {len} bytes"));
        }
        got += k as u64;
    }
    Ok(())
}

/// ctl's HTTP gateway with a traffic domain, a running sandbox whose port reaches the guest
/// server, and the request's host name and token header.
fn proxy_env(
    env: &Env,
) -> Result<
    (
        std::net::SocketAddr,
        std::net::SocketAddr,
        String,
        String,
        ctl::http::HttpHandle,
    ),
    String,
> {
    let guest = guest_server()?;
    env.agent.set_port_target(guest);
    let (gw, handle, _join) = ctl::http::start_with(
        env.api().clone(),
        "127.0.0.1:0".parse().map_err(e("addr"))?,
        ctl::http::HttpConfig {
            traffic_domain: Some("sbx.bench".into()),
            ..Default::default()
        },
    )
    .map_err(e("start gateway"))?;
    let sb = env
        .api()
        .create_sandbox(&env.ctx, c::CreateSandboxRequest::default())
        .map_err(|s| format!("create: {s:?}"))?;
    let host = format!("8080-{}.sbx.bench", sb.id);
    let token = format!("wrenn-traffic-access-token: {}\r\n", sb.traffic_token);
    Ok((gw, guest, host, token, handle))
}

fn proxy_http(o: &Opts) -> Result<(), String> {
    let Some(env) = env_or_skip("proxy_http")? else {
        return Ok(());
    };
    let (gw, guest, host, token, handle) = proxy_env(&env)?;
    let iters = o.iters(2000, 20);
    let (base, ours) = measure_interleaved(
        iters,
        || http_get(guest, "guest", "/small", ""),
        || http_get(gw, &host, "/small", &token),
    )?;
    handle.shutdown();
    println!(
        "{}",
        latency_line(
            "proxy_http",
            &ours,
            "direct_tcp_get",
            &base,
            Goal::AtMost(3.0)
        )
    );
    println!(
        "{}",
        crate::harness::info_line(
            "proxy_http_direct",
            &base,
            "the_same_GET_straight_to_the_server"
        )
    );
    Ok(())
}

fn proxy_stream(o: &Opts) -> Result<(), String> {
    let Some(env) = env_or_skip("proxy_stream")? else {
        return Ok(());
    };
    let (gw, guest, host, token, handle) = proxy_env(&env)?;
    let n: usize = if o.quick { 16 << 20 } else { 1 << 30 };
    let path = format!("/big?n={n}");
    let iters = o.iters(8, 2);
    let (base, ours) = measure_interleaved(
        iters,
        || http_get(guest, "guest", &path, ""),
        || http_get(gw, &host, &path, &token),
    )?;
    // A reference point: the same GET over a Ports.Connect call of ctl's protobuf API
    // (client → ctl → agent → server: the same agent hop, protobuf instead of HTTP in front).
    let running = env.running.as_ref().ok_or("not running")?;
    let rpc = proto::rpc::Client::connect_tcp(
        running.addr,
        proto::rpc::Credential::api_key(env.key.clone()),
    )
    .map_err(|s| format!("connect: {s:?}"))?;
    let sb = env
        .api()
        .create_sandbox(&env.ctx, c::CreateSandboxRequest::default())
        .map_err(|s| format!("create: {s:?}"))?;
    let mut rpc_get = || -> Result<(), String> {
        use c::port_connect_request::Kind as Up;
        use c::port_connect_response::Kind as Down;
        let mut st = rpc
            .call(
                c::ports_methods::CONNECT,
                &c::PortConnectRequest {
                    kind: Some(Up::Open(c::PortOpen {
                        sandbox_id: sb.id.clone(),
                        port: 8080,
                    })),
                },
                proto::rpc::CallOpts {
                    timeout: Some(Duration::from_secs(60)),
                    end_stream: false,
                },
            )
            .map_err(|s| format!("open: {s:?}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: guest\r\n\r\n");
        st.send(&c::PortConnectRequest {
            kind: Some(Up::Data(req.into_bytes().into())),
        })
        .map_err(|s| format!("send: {s:?}"))?;
        let mut got = 0usize;
        while let Some(m) = st
            .recv::<c::PortConnectResponse>()
            .map_err(|s| format!("recv: {s:?}"))?
        {
            if let Some(Down::Data(d)) = m.kind {
                got += d.len();
            }
        }
        if got < n {
            return Err(format!("{got} bytes"));
        }
        Ok(())
    };
    let via_rpc = crate::harness::measure(iters, 1, &mut rpc_get)?;
    handle.shutdown();
    println!(
        "{}",
        crate::harness::throughput_line(
            "proxy_stream",
            &ours,
            "direct_tcp_get",
            &base,
            Goal::AtLeast(0.5)
        )
    );
    let mibs = |s: &Samples| (n as f64 / (1 << 20) as f64) / (s.p50() as f64 / 1e9);
    println!(
        "info=proxy_stream_mib_s ours={:.0} direct={:.0} ports_connect_rpc={:.0} bytes={n}",
        mibs(&ours),
        mibs(&base),
        mibs(&via_rpc)
    );
    // The same GET through two minimal relays with the proxy's hops (plain TCP in, TLS between
    // them, plain TCP to the server), then with plain TCP between them, each interleaved with
    // the direct GET again: what these hops cost with the simplest relays.
    for (with_tls, name, note) in [
        (
            true,
            "proxy_stream_floor",
            "two_minimal_relays_plain_tls_plain",
        ),
        (
            false,
            "proxy_stream_floor_plain",
            "the_same_relays_plain_tcp_between_them",
        ),
    ] {
        let relays = floor_chain(guest, with_tls)?;
        let (direct, chain) = measure_interleaved(
            iters,
            || http_get(guest, "guest", &path, ""),
            || http_get(relays, "guest", &path, ""),
        )?;
        println!(
            "info={name} ratio={:.3} floor_mib_s={:.0} direct_mib_s={:.0} note={note}",
            direct.p50() as f64 / chain.p50().max(1) as f64,
            mibs(&chain),
            mibs(&direct)
        );
    }
    Ok(())
}

/// Two relays that do only what the proxy's hops must: the first takes the client's plain TCP
/// and opens TLS (the bench's own CA, as ctl → agent is mutual TLS) to the second, which
/// opens plain TCP to the server. Each forwards the request head, then copies the answer in
/// 256 KiB reads until the server's end of stream: no HTTP parsing, no RPC framing, no
/// windows, no limits, one thread per relayed connection. `proxy_stream` is judged against the
/// direct GET; these relays say how much of the gap the hops themselves cost (a reference,
/// not a bound: a relay could copy less, e.g. `splice` where both sides are plain).
fn floor_chain(
    server: std::net::SocketAddr,
    with_tls: bool,
) -> Result<std::net::SocketAddr, String> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    const T: Duration = Duration::from_secs(30);
    const BUF: usize = 256 * 1024;
    /// Reads up to the end of a request head from `from` and writes it to `to`.
    fn head(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
        let mut h = Vec::new();
        let mut b = [0u8; 4096];
        while !h.windows(4).any(|w| w == b"\r\n\r\n") {
            let k = from.read(&mut b)?;
            if k == 0 || h.len() > 16384 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            h.extend_from_slice(&b[..k]);
        }
        to.write_all(&h)?;
        to.flush()
    }
    /// Copies `from` to `to` until `from` ends.
    fn copy(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
        let mut b = vec![0u8; BUF];
        loop {
            let k = from.read(&mut b)?;
            if k == 0 {
                return to.flush();
            }
            to.write_all(&b[..k])?;
        }
    }
    let (server_tls, client_tls) = crate::tls::tls_configs()?;
    let second = TcpListener::bind("127.0.0.1:0").map_err(e("bind relay"))?;
    let second_addr = second.local_addr().map_err(e("relay addr"))?;
    std::thread::spawn(move || {
        for s in second.incoming() {
            let Ok(s) = s else { continue };
            let server_tls = server_tls.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let _ = s.set_nodelay(true);
                let mut down = TcpStream::connect(server)?;
                let _ = down.set_nodelay(true);
                if !with_tls {
                    let mut up = s;
                    head(&mut up, &mut down)?;
                    copy(&mut down, &mut up)?;
                    return up.shutdown(std::net::Shutdown::Write);
                }
                let t = server_tls
                    .accept(proto::rpc::SocketTransport::new(s.into()))
                    .map_err(std::io::Error::other)?;
                let mut up = tls::BlockingStream::new(t, T)?;
                head(&mut up, &mut down)?;
                copy(&mut down, &mut up)?;
                proto::rpc::Transport::shutdown_write(up.transport());
                Ok(())
            });
        }
    });
    let first = TcpListener::bind("127.0.0.1:0").map_err(e("bind relay"))?;
    let first_addr = first.local_addr().map_err(e("relay addr"))?;
    std::thread::spawn(move || {
        for s in first.incoming() {
            let Ok(mut s) = s else { continue };
            let client_tls = client_tls.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let _ = s.set_nodelay(true);
                if !with_tls {
                    let mut up = TcpStream::connect(second_addr)?;
                    let _ = up.set_nodelay(true);
                    head(&mut s, &mut up)?;
                    return copy(&mut up, &mut s);
                }
                let mut up = client_tls.connect_blocking(second_addr, "127.0.0.1", T)?;
                head(&mut s, &mut up)?;
                copy(&mut up, &mut s)
            });
        }
    });
    Ok(first_addr)
}

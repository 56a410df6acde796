//! Signed event webhooks (issue 17 §3) against a local receiver on loopback: the signature
//! verifies, a 500 is retried, outcomes are listed, SSRF refusals, the bounded queue, host
//! events for the platform team only, and at-least-once delivery across a `kill -9` of the
//! `wrenn-ctl` binary in the middle of an attempt.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::gen::wrenn::ctl::v1 as c;
use proto::rpc::Client;
use proto::Code;

use crate::harness::{self, code, test_config, Ctl};

const T: Option<Duration> = Some(Duration::from_secs(30));
const BIN: &str = env!("CARGO_BIN_EXE_wrenn-ctl");

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    signature: String,
    event: String,
    delivery: String,
    body: Vec<u8>,
}

/// A webhook receiver on 127.0.0.1: answers each request with the next status of `script`
/// (then 200), or holds it unanswered while `hold` is set. Stops when dropped, and by
/// itself after a minute.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    hold: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
}

impl Receiver {
    fn start(script: Vec<u16>) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let hold = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (g, h, s, n) = (got.clone(), hold.clone(), stop.clone(), connections.clone());
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(60);
            let mut script = script.into_iter();
            let mut held: Vec<TcpStream> = Vec::new();
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                let Ok((mut conn, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                n.fetch_add(1, Ordering::Relaxed);
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let Some(req) = read_request(&mut conn) else {
                    continue;
                };
                g.lock().unwrap().push(req);
                if h.load(Ordering::Relaxed) {
                    held.push(conn);
                    continue;
                }
                let status = script.next().unwrap_or(200);
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    )
                    .as_bytes(),
                );
            }
        });
        Receiver {
            addr,
            got,
            hold,
            stop,
            connections,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn wait_for(&self, n: usize, within: Duration) -> Vec<Got> {
        let end = Instant::now() + within;
        while self.got().len() < n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.got()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_request(conn: &mut TcpStream) -> Option<Got> {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut b).ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let len: usize = header("content-length").parse().ok()?;
    while buf.len() < head_end + len {
        let n = conn.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    }
    Some(Got {
        signature: header("wrenn-signature"),
        event: header("wrenn-event"),
        delivery: header("wrenn-delivery"),
        body: buf[head_end..head_end + len].to_vec(),
    })
}

/// A replica that may deliver to loopback, with quick retries.
fn start(allow_private: bool) -> Option<Ctl> {
    let url = harness::fresh_db()?;
    let init = ctl::admin::init(&url, "team-a", "a@example.com", "Alice").expect("admin init");
    let mut cfg = test_config(&url);
    cfg.api.webhooks.allow_private = allow_private;
    cfg.api.webhooks.backoff_base = Duration::from_millis(200);
    cfg.api.webhooks.attempt_timeout = Duration::from_secs(3);
    let running = ctl::server::start(
        &cfg,
        ctl::server::StartOpts {
            jobs: false,
            http: false,
        },
    )
    .expect("start ctl");
    Some(Ctl {
        url,
        running: Some(running),
        team_key: init.team_key,
        admin_key: init.admin_key,
        team_id: init.team_id,
        user_id: init.user_id,
    })
}

fn create_webhook(
    cl: &Client,
    url: &str,
    events: &[&str],
) -> Result<c::CreateWebhookResponse, proto::Status> {
    cl.unary(
        c::webhooks_methods::CREATE,
        &c::CreateWebhookRequest {
            url: url.into(),
            events: events.iter().map(|s| (*s).to_owned()).collect(),
        },
        T,
    )
}

fn deliveries(cl: &Client, wh: &str) -> Vec<c::Delivery> {
    let r: c::ListDeliveriesResponse = cl
        .unary(
            c::webhooks_methods::DELIVERIES,
            &c::ListDeliveriesRequest {
                webhook_id: wh.into(),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    r.deliveries
}

fn create_sandbox(cl: &Client) -> c::Sandbox {
    cl.unary(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest::default(),
        T,
    )
    .unwrap()
}

#[test]
fn deliveries_are_signed_retried_after_500_and_listed() {
    let Some(ctl) = start(true) else { return };
    let (_fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let rx = Receiver::start(vec![500]);
    let cl = ctl.team();
    let wh = create_webhook(&cl, &rx.url(), &["sandbox.created", "sandbox.paused"]).unwrap();
    let w = wh.webhook.unwrap();
    assert!(wh.secret.starts_with("whsec_") && wh.secret.len() == 70);
    assert!(w.id.starts_with("wh-"));
    // The secret is not listed.
    let list: c::ListWebhooksResponse = cl
        .unary(c::webhooks_methods::LIST, &c::ListWebhooksRequest {}, T)
        .unwrap();
    assert_eq!(list.webhooks.len(), 1);
    assert!(!format!("{list:?}").contains(&wh.secret));

    let sb = create_sandbox(&cl);
    crate::harness::pause(&cl, &sb.id);
    // Two events subscribed (created, paused); running and pausing are not.
    let d = deliveries(&cl, &w.id);
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d.iter().all(|x| x.status == "pending" && x.attempts == 0));

    // First round: one answer 500, one 200.
    let api = ctl.api();
    assert_eq!(ctl::webhook::deliver::run_once(api).unwrap(), 2);
    let d = deliveries(&cl, &w.id);
    let failed: Vec<_> = d.iter().filter(|x| x.status == "pending").collect();
    assert_eq!(failed.len(), 1, "{d:?}");
    assert_eq!((failed[0].attempts, failed[0].last_http_status), (1, 500));
    assert_eq!(failed[0].last_error, "HTTP 500");
    assert!(failed[0].next_attempt_unix_ns > 0);
    // Not due before its backoff; then retried and delivered.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(ctl::webhook::deliver::run_once(api).unwrap(), 1);
    let d = deliveries(&cl, &w.id);
    assert!(
        d.iter()
            .all(|x| x.status == "delivered" && x.last_http_status == 200),
        "{d:?}"
    );
    assert!(d.iter().all(|x| x.delivered_unix_ns > 0));
    assert_eq!(
        ctl::webhook::deliver::run_once(api).unwrap(),
        0,
        "nothing left"
    );

    // Every request is signed: the signature verifies with the secret, and not with another.
    let got = rx.got();
    assert_eq!(got.len(), 3);
    for g in &got {
        let t = proto::hmac::verify_webhook_signature(&wh.secret, &g.signature, &g.body)
            .unwrap_or_else(|| panic!("bad signature {}", g.signature));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(t) < 60);
        assert!(
            proto::hmac::verify_webhook_signature("whsec_other", &g.signature, &g.body).is_none()
        );
        let v: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
        assert_eq!(v["type"], g.event.as_str());
        assert_eq!(v["id"], g.delivery.as_str());
        assert_eq!(v["team_id"], ctl.team_id.as_str());
        assert_eq!(v["data"]["sandbox_id"], sb.id.as_str());
    }
    let types: Vec<&str> = got.iter().map(|g| g.event.as_str()).collect();
    assert!(types.contains(&"sandbox.created") && types.contains(&"sandbox.paused"));

    // Delete: gone from the list, its deliveries with it; audited.
    let _: c::DeleteWebhookResponse = cl
        .unary(
            c::webhooks_methods::DELETE,
            &c::DeleteWebhookRequest {
                webhook_id: w.id.clone(),
            },
            T,
        )
        .unwrap();
    let r = cl.unary::<_, c::ListDeliveriesResponse>(
        c::webhooks_methods::DELIVERIES,
        &c::ListDeliveriesRequest {
            webhook_id: w.id.clone(),
            ..Default::default()
        },
        T,
    );
    assert_eq!(code(r), Code::NotFound);
    let actions: Vec<String> = harness::audit(&cl, "webhook.create")
        .into_iter()
        .chain(harness::audit(&cl, "webhook.delete"))
        .map(|a| a.action)
        .collect();
    assert_eq!(actions, ["webhook.create", "webhook.delete"]);
}

#[test]
fn ssrf_targets_are_refused_at_create_and_at_delivery() {
    let Some(ctl) = start(false) else { return };
    let cl = ctl.team();
    for url in [
        "http://127.0.0.1:9/x",
        "http://10.0.0.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x",
        "http://[::ffff:127.0.0.1]/x",
    ] {
        let e = create_webhook(&cl, url, &[]).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument, "{url}: {e:?}");
    }
    assert_eq!(
        create_webhook(&cl, "https://example.com/", &[])
            .unwrap_err()
            .code,
        Code::FailedPrecondition
    );
    assert_eq!(
        create_webhook(&cl, "http://example.com/", &["sandbox.exploded"])
            .unwrap_err()
            .code,
        Code::InvalidArgument
    );
    // A name is checked where it resolves, at every delivery: localhost is loopback.
    let rx = Receiver::start(vec![]);
    let url = format!("http://localhost:{}/hook", rx.addr.port());
    let wh = create_webhook(&cl, &url, &["sandbox.created"]).unwrap();
    let (_fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    create_sandbox(&cl);
    assert_eq!(ctl::webhook::deliver::run_once(ctl.api()).unwrap(), 1);
    let d = deliveries(&cl, &wh.webhook.unwrap().id);
    assert_eq!(d.len(), 1);
    assert!(d[0].last_error.contains("loopback"), "{d:?}");
    assert_eq!(d[0].status, "pending");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rx.connections.load(Ordering::Relaxed), 0, "never connected");
}

#[test]
fn the_queue_is_bounded_and_host_events_go_to_the_platform_team_only() {
    let Some(ctl) = start(true) else { return };
    let cl = ctl.team();
    let team_wh = create_webhook(&cl, "http://192.0.2.1/team", &[]).unwrap();
    let admin = ctl.admin();
    let platform_wh =
        create_webhook(&admin, "http://192.0.2.1/ops", &["host.up", "host.down"]).unwrap();
    let (_fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let pd = deliveries(&admin, &platform_wh.webhook.unwrap().id);
    let team_id = team_wh.webhook.unwrap().id;
    assert_eq!(pd.len(), 1, "{pd:?}");
    assert_eq!(pd[0].event_type, "host.up");
    assert!(
        deliveries(&cl, &team_id).is_empty(),
        "no host events for a team"
    );

    // 1000 pending, then the next is recorded dropped.
    let mut pg = postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap();
    let team = proto::id::parse(proto::id::Kind::Team, &ctl.team_id).unwrap();
    pg.execute(
        "SELECT wrenn_raise_event($1, 'sandbox.error', '{}'::jsonb) FROM generate_series(1, 1001)",
        &[&team],
    )
    .unwrap();
    let rows = pg
        .query(
            "SELECT status, count(*) FROM webhook_deliveries GROUP BY status ORDER BY status",
            &[],
        )
        .unwrap();
    let counts: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(counts.contains(&("dropped".into(), 1)), "{counts:?}");
    assert!(counts.contains(&("pending".into(), 1001)), "{counts:?}"); // 1000 team + host.up
    let d: c::ListDeliveriesResponse = cl
        .unary(
            c::webhooks_methods::DELIVERIES,
            &c::ListDeliveriesRequest {
                webhook_id: team_id,
                page_size: 1,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(d.deliveries[0].status, "dropped");
    assert!(d.deliveries[0].last_error.contains("queue full"));
    assert!(!d.next_page_token.is_empty());
}

#[test]
fn an_event_is_delivered_at_least_once_across_a_kill_9_mid_attempt() {
    let Some(ctl) = start(true) else { return };
    let (_fa, _h) = ctl.add_host(8, 8192, 1_000_000);
    let rx = Receiver::start(vec![]);
    rx.hold.store(true, Ordering::Relaxed);
    let cl = ctl.team();
    let wh = create_webhook(&cl, &rx.url(), &["sandbox.created"]).unwrap();
    let wid = wh.webhook.unwrap().id;
    // The change commits its event; this replica has no jobs, so nothing is delivered.
    let sb = create_sandbox(&cl);
    assert_eq!(deliveries(&cl, &wid)[0].attempts, 0);

    // A wrenn-ctl process takes the delivery and is killed while the receiver holds it.
    let port = |_: ()| {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--database-url",
            &ctl.url,
            "--listen",
            &port(()),
            "--http-listen",
            &port(()),
            "--host-listen",
            &port(()),
            "--webhook-allow-private",
            // Only its webhook job matters here; without TLS files or this, serve exits 2.
            "--plaintext",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let got = rx.wait_for(1, Duration::from_secs(20));
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
    let _ = child.wait();
    assert_eq!(got.len(), 1, "the binary attempted the delivery");
    let d = deliveries(&cl, &wid);
    assert_eq!(
        (d[0].status.as_str(), d[0].attempts),
        ("pending", 1),
        "{d:?}"
    );
    assert!(d[0].next_attempt_unix_ns > 0, "leased");

    // The lease (60 s for the binary) ends: fast-forwarded here in SQL. Another replica
    // delivers it.
    let mut pg = postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap();
    pg.execute("UPDATE webhook_deliveries SET next_attempt_at = now()", &[])
        .unwrap();
    rx.hold.store(false, Ordering::Relaxed);
    assert_eq!(ctl::webhook::deliver::run_once(ctl.api()).unwrap(), 1);
    let d = deliveries(&cl, &wid);
    assert_eq!(
        (d[0].status.as_str(), d[0].attempts),
        ("delivered", 2),
        "{d:?}"
    );
    let got = rx.got();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].delivery, got[1].delivery,
        "the same event, twice: at least once"
    );
    let v: serde_json::Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(v["data"]["sandbox_id"], sb.id.as_str());
}

#[test]
fn a_finished_build_raises_build_finished_and_the_build_tables_hold_their_bounds() {
    let Some(ctl) = start(true) else { return };
    let cl = ctl.team();
    let wh = create_webhook(&cl, "http://192.0.2.1/b", &["build.finished"]).unwrap();
    let wid = wh.webhook.unwrap().id;
    let mut pg = postgres::Client::connect(&ctl.url, postgres::NoTls).unwrap();
    let team = proto::id::parse(proto::id::Kind::Team, &ctl.team_id).unwrap();
    let build = proto::random::uuid_v4().unwrap();
    pg.execute(
        "INSERT INTO template_builds (id, team_id, name, recipe, status) \
         VALUES ($1, $2, 'web', 'RUN true', 'queued')",
        &[&build, &team],
    )
    .unwrap();
    pg.execute(
        "INSERT INTO template_build_steps (build_id, n, line, instruction, status) \
         VALUES ($1, 0, 1, 'RUN true', 'pending')",
        &[&build],
    )
    .unwrap();
    // A step log beyond the bound is refused by the table, not kept.
    let big = vec![b'x'; ctl::limits::BUILD_STEP_LOG_MAX + 1];
    assert!(pg
        .execute(
            "UPDATE template_build_steps SET log = $2 WHERE build_id = $1",
            &[&build, &big]
        )
        .is_err());
    // Finished without finished_at is refused; running raises nothing.
    assert!(pg
        .execute(
            "UPDATE template_builds SET status = 'failed' WHERE id = $1",
            &[&build]
        )
        .is_err());
    pg.execute(
        "UPDATE template_builds SET status = 'running', started_at = now() WHERE id = $1",
        &[&build],
    )
    .unwrap();
    assert!(deliveries(&cl, &wid).is_empty());
    pg.execute(
        "UPDATE template_builds SET status = 'failed', reason = 'step 1 (line 1) exited 2', \
            finished_at = now() WHERE id = $1",
        &[&build],
    )
    .unwrap();
    let d = deliveries(&cl, &wid);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].event_type, "build.finished");
    let data: serde_json::Value = pg
        .query_one("SELECT data FROM webhook_events", &[])
        .unwrap()
        .get(0);
    assert_eq!(data["status"], "failed");
    assert_eq!(data["reason"], "step 1 (line 1) exited 2");
}

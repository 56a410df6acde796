//! The traffic proxy end to end: ctl's HTTP gateway (with a traffic domain) → Ports.Connect
//! on the fake agent → a real HTTP server on loopback standing in for the guest's server.
//! Bounded: every socket has a timeout, every server thread stops with its test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ctl::http::HttpConfig;
use proto::gen::wrenn::ctl::v1 as c;
use proto::rpc::{Client, Credential};

use crate::harness::Ctl;

const T: Option<Duration> = Some(Duration::from_secs(30));
const DOMAIN: &str = "sbx.test";
const PORT: u32 = 3000;

/// Byte `i` of a generated body.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// The stand-in for a server in the sandbox: one thread per connection, one request each.
/// - `GET /big?n=N`: N pattern bytes (Content-Length); `HEAD /big?n=N` its head;
/// - `GET /chunked?n=N`: the same, chunked;
/// - `POST /echo`: the body back as it arrives (Content-Length), read and written in turn;
/// - `POST /sum`: the body's length and SHA-256 (hex), once it has all arrived;
/// - `GET /head`: the request head it got, with a `Set-Cookie` carrying a Domain;
/// - `GET /ws` with an upgrade: 101, then every byte echoed until the client closes;
/// - `GET /slow?n=N`: N pattern bytes, counting what it managed to write in `written`;
/// - `GET /bye?n=MS`: `bye`, then the connection closes after MS milliseconds.
///
/// A GET or HEAD (but `/ws`, `/slow`) on a kept-alive connection is followed by the next
/// request on it; anything else is the connection's last.
struct Guest {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    /// Requests whose heads arrived.
    heads: Arc<Mutex<Vec<String>>>,
}

impl Guest {
    fn start() -> Guest {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (st, wr, hd) = (stop.clone(), written.clone(), heads.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (wr, hd) = (wr.clone(), hd.clone());
                        std::thread::spawn(move || serve_one(s, &wr, &hd));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Guest {
            addr,
            stop,
            written,
            heads,
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_one(mut s: TcpStream, written: &AtomicU64, heads: &Mutex<Vec<String>>) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 16384];
    // Requests on one connection, one after another, while the client keeps it alive and
    // the request has no body (GET).
    loop {
        let (head, n) = loop {
            if let Ok(Some(h)) = proto::http::parse_request_head(&buf, 65536) {
                break h;
            }
            match s.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&b[..k]),
            }
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        heads.lock().unwrap().push(text.clone());
        let rest = buf[n..].to_vec();
        let q: u64 = head
            .query
            .strip_prefix("n=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = |w: &mut TcpStream, total: u64, count: Option<&AtomicU64>| {
            let mut sent = 0u64;
            let mut chunk = vec![0u8; 32 * 1024];
            while sent < total {
                let k = (total - sent).min(chunk.len() as u64) as usize;
                for (j, x) in chunk[..k].iter_mut().enumerate() {
                    *x = pattern(sent + j as u64);
                }
                if w.write_all(&chunk[..k]).is_err() {
                    return;
                }
                sent += k as u64;
                if let Some(c) = count {
                    c.store(sent, Ordering::Relaxed);
                }
            }
        };
        match (head.method.as_str(), head.path.as_str()) {
            ("GET", "/big") | ("GET", "/slow") => {
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {q}\r\n\r\n");
                let count = (head.path == "/slow").then_some(written);
                body(&mut s, q, count);
            }
            ("GET", "/bye") => {
                // Answered, then the server closes the connection after `n` ms of quiet.
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye");
                std::thread::sleep(Duration::from_millis(q));
                let _ = s.shutdown(std::net::Shutdown::Both);
                return;
            }
            ("HEAD", "/big") => {
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {q}\r\n\r\n");
            }
            ("GET", "/chunked") => {
                let _ = write!(s, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                let mut sent = 0u64;
                while sent < q {
                    let k = (q - sent).min(10_000);
                    let data: Vec<u8> = (sent..sent + k).map(pattern).collect();
                    let _ = write!(s, "{k:x}\r\n");
                    let _ = s.write_all(&data);
                    let _ = s.write_all(b"\r\n");
                    sent += k;
                }
                let _ = s.write_all(b"0\r\n\r\n");
            }
            ("POST", "/echo") => {
                let total = head.content_length.unwrap_or(0);
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n");
                let mut got = rest.len() as u64;
                if s.write_all(&rest).is_err() {
                    return;
                }
                while got < total {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => {
                            got += k as u64;
                            if s.write_all(&b[..k]).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            ("POST", "/sum") => {
                // The body counted and hashed as it arrives; the answer only after its end.
                let total = head.content_length.unwrap_or(0);
                let mut h = proto::sha256::Sha256::new();
                h.update(&rest);
                let mut got = rest.len() as u64;
                let mut big = vec![0u8; 256 * 1024];
                while got < total {
                    match s.read(&mut big) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => {
                            got += k as u64;
                            h.update(&big[..k]);
                        }
                    }
                }
                let out = format!("{got} {}", h.finish_hex());
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{out}",
                    out.len()
                );
            }
            ("GET", "/head") => {
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nSet-Cookie: sid=1; Domain=.{DOMAIN}; Path=/\r\n\
                 Content-Length: {}\r\n\r\n{text}",
                    text.len()
                );
            }
            ("GET", "/ws") => {
                let _ = s.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n",
                );
                let _ = s.write_all(&rest);
                loop {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => {
                            if s.write_all(&b[..k]).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            _ => {
                let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            }
        }
        let bodiless = head.method == "GET" || head.method == "HEAD";
        if head.keep_alive && bodiless && head.path != "/ws" && head.path != "/slow" {
            buf = rest;
            continue;
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        return;
    }
}

struct Setup {
    ctl: Ctl,
    cl: Client,
    gw: SocketAddr,
    handle: ctl::http::HttpHandle,
    guest: Guest,
    fa: Arc<crate::fake_agent::FakeAgent>,
}

fn setup() -> Option<Setup> {
    let ctl = Ctl::start()?;
    let cl = ctl.team();
    let (fa, _host) = ctl.add_host(8, 8192, 100_000);
    let guest = Guest::start();
    fa.state.lock().unwrap().tcp_ports.insert(PORT, guest.addr);
    let (gw, handle, _join) = ctl::http::start_with(
        ctl.api().clone(),
        "127.0.0.1:0".parse().unwrap(),
        HttpConfig {
            traffic_domain: Some(DOMAIN.into()),
            ..HttpConfig::default()
        },
    )
    .unwrap();
    Some(Setup {
        ctl,
        cl,
        gw,
        handle,
        guest,
        fa,
    })
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

fn create(cl: &Client, public: bool) -> c::Sandbox {
    cl.unary(
        c::sandboxes_methods::CREATE,
        &c::CreateSandboxRequest {
            allow_public_traffic: public,
            ..Default::default()
        },
        T,
    )
    .unwrap()
}

fn host(sb: &str, port: u32) -> String {
    format!("{port}-{sb}.{DOMAIN}")
}

fn connect(gw: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// A parsed answer: status, headers (lower-case names), body (to the close).
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, n: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a response head from `s`; returns it and the bytes after it.
fn read_head(s: &mut TcpStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    crate::harness::read_http_head(s).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends `head_lines` (without the final blank line) with `Connection: close` and `body`,
/// reads the answer to the close.
fn request(gw: SocketAddr, head_lines: &str, body: &[u8]) -> Answer {
    let mut s = connect(gw);
    s.write_all(format!("{head_lines}\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    s.write_all(body).unwrap();
    let (status, headers, mut rest) = read_head(&mut s);
    s.read_to_end(&mut rest).unwrap();
    Answer {
        status,
        headers,
        body: rest,
    }
}

fn get(gw: SocketAddr, host: &str, path: &str, extra: &str) -> Answer {
    request(
        gw,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}{extra}"),
        &[],
    )
}

fn token_header(t: &str) -> String {
    format!("\r\nwrenn-traffic-access-token: {t}")
}

fn check_pattern(body: &[u8], n: u64) {
    assert_eq!(body.len() as u64, n);
    if let Some(i) = body
        .iter()
        .enumerate()
        .position(|(i, b)| *b != pattern(i as u64))
    {
        panic!("byte {i} differs");
    }
}

/// GET of several MiB (Content-Length and chunked), a streamed POST echoed while it is sent,
/// a WebSocket echo after its 101, the path form, credentials stripped on the way in and
/// cookie domains on the way out, and every refusal: missing (401) or wrong (403) token,
/// another team's key (403), the owner's key (200), a public sandbox (200 without token), an
/// unknown sandbox (404), envd's port (403), a paused sandbox (409), nothing on the port (502).
#[test]
fn proxy_http_websocket_and_auth() {
    let Some(s) = setup() else { return };
    let sb = create(&s.cl, false);
    let tok = sb.traffic_token.clone();
    let h = host(&sb.id, PORT);
    let gw = s.gw;

    // GET, 8 MiB.
    let n = 8 << 20;
    let a = get(gw, &h, &format!("/big?n={n}"), &token_header(&tok));
    assert_eq!(
        a.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&a.body[..a.body.len().min(300)])
    );
    assert_eq!(a.header("connection"), Some("close"));
    check_pattern(&a.body, n);
    // Chunked answers pass as they are (the client decodes).
    let a = get(gw, &h, "/chunked?n=100000", &token_header(&tok));
    assert_eq!(a.status, 200);
    assert_eq!(a.header("transfer-encoding"), Some("chunked"));
    let mut dec = proto::http::BodyDecoder::new(proto::http::Framing::Chunked);
    let mut out = Vec::new();
    let mut at = 0;
    while !dec.is_done() {
        let p = dec.advance(&a.body[at..], usize::MAX).unwrap();
        out.extend_from_slice(&a.body[at..][p.data.clone()]);
        at += p.consumed;
    }
    check_pattern(&out, 100_000);

    // POST, 6 MiB, streamed: the echo is read while the body is still being sent.
    let total = 6usize << 20;
    let mut conn = connect(gw);
    conn.write_all(
        format!(
            "POST /echo HTTP/1.1\r\nHost: {h}\r\nwrenn-traffic-access-token: {tok}\r\n\
             Content-Length: {total}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut rd = conn.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let (status, _, mut rest) = read_head(&mut rd);
        rd.read_to_end(&mut rest).unwrap();
        (status, rest)
    });
    let body: Vec<u8> = (0..total as u64).map(|i| pattern(i * 7)).collect();
    for part in body.chunks(100_000) {
        conn.write_all(part).unwrap();
    }
    let (status, echoed) = reader.join().unwrap();
    assert_eq!(status, 200);
    assert!(echoed == body, "echo differs ({} bytes)", echoed.len());

    // WebSocket: 101 with the upgrade headers, then bytes both ways.
    let mut ws = connect(gw);
    ws.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {h}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\
             wrenn-traffic-access-token: {tok}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let (status, headers, rest) = read_head(&mut ws);
    assert_eq!(status, 101);
    assert!(
        headers.contains(&("upgrade".into(), "websocket".into())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("connection".into(), "Upgrade".into())),
        "{headers:?}"
    );
    assert!(rest.is_empty());
    for i in 0..20 {
        let msg = format!("frame {i} ").repeat(100 * (i + 1));
        ws.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        ws.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    ws.shutdown(std::net::Shutdown::Write).unwrap();
    let mut tail = Vec::new();
    ws.read_to_end(&mut tail).unwrap();
    assert!(tail.is_empty());

    // What the sandbox sees: no credential; the cookie comes back without its Domain.
    let a = get(
        gw,
        &h,
        "/head",
        &format!(
            "{}\r\nX-API-Key: {}\r\nX-Wrenn-Traffic-Token: {tok}",
            token_header(&tok),
            s.ctl.team_key
        ),
    );
    assert_eq!(a.status, 200);
    let seen = String::from_utf8_lossy(&a.body).to_ascii_lowercase();
    assert!(seen.starts_with("get /head http/1.1\r\n"), "{seen}");
    assert!(
        !seen.contains(&tok) && !seen.contains("x-api-key") && !seen.contains("traffic"),
        "{seen}"
    );
    assert!(seen.contains("connection: close"), "{seen}");
    assert_eq!(a.header("set-cookie"), Some("sid=1; Path=/"));

    // Path form: /v1/sandboxes/<id>/ports/P/<rest>, any Host, the token in the header.
    let a = request(
        gw,
        &format!(
            "GET /v1/sandboxes/{}/ports/{PORT}/big?n=1000 HTTP/1.1\r\nHost: api.example{}",
            sb.id,
            token_header(&tok)
        ),
        &[],
    );
    assert_eq!(a.status, 200);
    check_pattern(&a.body, 1000);

    // Refusals, each with a JSON error body naming the reason.
    let a = get(gw, &h, "/big?n=10", "");
    assert_eq!(a.status, 401, "{a:?}");
    assert!(String::from_utf8_lossy(&a.body).contains("traffic token"));
    let a = get(gw, &h, "/big?n=10", &token_header("wtt_wrong"));
    assert_eq!(a.status, 403);
    assert!(String::from_utf8_lossy(&a.body).contains("wrong traffic token"));
    let (_, other_key) = s.ctl.other_team("team-p", "p@example.com");
    let a = get(gw, &h, "/big?n=10", &format!("\r\nX-API-Key: {other_key}"));
    assert_eq!(a.status, 403, "{a:?}");
    let a = get(
        gw,
        &h,
        "/big?n=10",
        &format!("\r\nX-API-Key: {}", s.ctl.team_key),
    );
    assert_eq!(a.status, 200, "the owner's API key is enough");
    check_pattern(&a.body, 10);
    let unknown = "sb-00000000-0000-4000-8000-000000000001";
    assert_eq!(
        get(gw, &host(unknown, PORT), "/", &token_header(&tok)).status,
        404
    );
    assert_eq!(
        get(gw, &host(&sb.id, 49983), "/", &token_header(&tok)).status,
        403
    );
    // Nothing listens on port 1 (the fake agent's rule): 502.
    let a = get(gw, &host(&sb.id, 1), "/", &token_header(&tok));
    assert_eq!(a.status, 502, "{a:?}");
    // A body the proxy refused is not read; the answer still arrives.
    let a = request(
        gw,
        &format!("POST /echo HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5"),
        b"hello",
    );
    assert_eq!(a.status, 401);
    // Rotation: the old token stops working at once.
    let r: c::Sandbox =
        s.cl.unary(
            c::sandboxes_methods::ROTATE_TRAFFIC_TOKEN,
            &c::RotateTrafficTokenRequest {
                sandbox_id: sb.id.clone(),
            },
            T,
        )
        .unwrap();
    assert_eq!(get(gw, &h, "/big?n=1", &token_header(&tok)).status, 403);
    assert_eq!(
        get(gw, &h, "/big?n=1", &token_header(&r.traffic_token)).status,
        200
    );

    // A public sandbox needs nothing.
    let public = create(&s.cl, true);
    let a = get(gw, &host(&public.id, PORT), "/big?n=5000", "");
    assert_eq!(a.status, 200);
    check_pattern(&a.body, 5000);

    // Paused: 409 naming the state.
    let _: c::Sandbox =
        s.cl.unary(
            c::sandboxes_methods::PAUSE,
            &c::PauseSandboxRequest {
                sandbox_id: sb.id.clone(),
            },
            T,
        )
        .unwrap();
    let a = get(gw, &h, "/big?n=1", &token_header(&r.traffic_token));
    assert_eq!(a.status, 409);
    assert!(String::from_utf8_lossy(&a.body).contains("paused"));
    // Every guest connection was a request of this test (nothing leaked through).
    assert!(s.guest.heads.lock().unwrap().len() >= 9);
    let _ = &s.fa;
}

/// A browser's way in (host form): the token in the query answers a GET with a 302 to the
/// same URL without it that sets an HttpOnly, SameSite=Lax, host-only cookie; the cookie
/// then lets requests through, and neither the cookie nor the parameter reaches the
/// sandbox. A wrong token in the query is 403 and sets nothing; the path form takes the
/// header only.
#[test]
fn proxy_token_from_query_and_cookie() {
    let Some(s) = setup() else { return };
    let sb = create(&s.cl, false);
    let tok = sb.traffic_token.clone();
    let h = host(&sb.id, PORT);
    let gw = s.gw;

    let a = get(
        gw,
        &h,
        &format!("/head?a=1&wrenn_traffic_token={tok}&b=2"),
        "",
    );
    assert_eq!(a.status, 302, "{a:?}");
    assert_eq!(a.header("location"), Some("/head?a=1&b=2"));
    let cookie = a.header("set-cookie").expect("a cookie").to_owned();
    assert!(
        cookie.starts_with(&format!("wrenn_traffic_token={tok};")),
        "{cookie}"
    );
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(!cookie.to_ascii_lowercase().contains("domain"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    assert_eq!(
        s.guest.heads.lock().unwrap().len(),
        0,
        "a redirect reaches nothing"
    );
    // The only parameter: the location is the bare path.
    let a = get(gw, &h, &format!("/head?wrenn_traffic_token={tok}"), "");
    assert_eq!(a.header("location"), Some("/head"));

    // The cookie, among the page's own, is enough; the sandbox sees only its own.
    let a = get(
        gw,
        &h,
        "/head?a=1",
        &format!("\r\nCookie: theme=dark; wrenn_traffic_token={tok}; sid=7"),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let seen = String::from_utf8_lossy(&a.body).to_ascii_lowercase();
    assert!(seen.starts_with("get /head?a=1 http/1.1\r\n"), "{seen}");
    assert!(seen.contains("cookie: theme=dark; sid=7\r\n"), "{seen}");
    assert!(
        !seen.contains(&tok) && !seen.contains("wrenn_traffic"),
        "{seen}"
    );
    // Only our cookie: no Cookie header at all.
    let a = get(
        gw,
        &h,
        "/head",
        &format!("\r\nCookie: wrenn_traffic_token={tok}"),
    );
    assert_eq!(a.status, 200);
    let seen = String::from_utf8_lossy(&a.body).to_ascii_lowercase();
    assert!(!seen.contains("cookie"), "{seen}");

    // Another method with the token in the query: relayed, the parameter stripped.
    let a = request(
        gw,
        &format!(
            "POST /echo?x=1&wrenn_traffic_token={tok} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3"
        ),
        b"abc",
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body, b"abc");
    let heads = s.guest.heads.lock().unwrap().clone();
    let last = heads.last().unwrap();
    assert!(last.starts_with("POST /echo?x=1 HTTP/1.1\r\n"), "{last}");
    assert!(!last.contains(&tok), "{last}");

    // Wrong tokens: 403, no cookie set.
    let a = get(gw, &h, "/head?wrenn_traffic_token=wtt_wrong", "");
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.header("set-cookie").is_none());
    let a = get(gw, &h, "/head", "\r\nCookie: wrenn_traffic_token=wtt_wrong");
    assert_eq!(a.status, 403, "{a:?}");
    // The path form takes the header only.
    let a = request(
        gw,
        &format!(
            "GET /v1/sandboxes/{}/ports/{PORT}/head?wrenn_traffic_token={tok} HTTP/1.1\r\n\
             Host: api.example\r\nCookie: wrenn_traffic_token={tok}",
            sb.id
        ),
        &[],
    );
    assert_eq!(a.status, 401, "{a:?}");
}

/// Reads one answer framed by Content-Length or chunked from a kept-alive connection:
/// status, headers, decoded body; `carry` holds bytes read past it (the next answer's).
fn read_framed_as(s: &mut TcpStream, carry: &mut Vec<u8>, head_request: bool) -> Answer {
    let mut b = [0u8; 65536];
    let (h, n) = loop {
        if let Some(x) = proto::http::parse_response_head(carry, 65536, head_request).unwrap() {
            break x;
        }
        let k = s.read(&mut b).expect("read head");
        assert!(k > 0, "closed before a head");
        carry.extend_from_slice(&b[..k]);
    };
    carry.drain(..n);
    let mut dec = proto::http::BodyDecoder::new(h.framing);
    let mut body = Vec::new();
    loop {
        while !carry.is_empty() && !dec.is_done() {
            let p = dec.advance(carry, usize::MAX).unwrap();
            body.extend_from_slice(&carry[p.data.clone()]);
            carry.drain(..p.consumed);
        }
        if dec.is_done() {
            break;
        }
        let k = s.read(&mut b).expect("read body");
        assert!(k > 0, "closed inside a body");
        carry.extend_from_slice(&b[..k]);
    }
    Answer {
        status: h.status,
        headers: h
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_ascii_lowercase(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect(),
        body,
    }
}

fn read_framed(s: &mut TcpStream, carry: &mut Vec<u8>) -> Answer {
    read_framed_as(s, carry, false)
}

/// Keep-alive through the proxy: requests one after another on one client connection, each
/// answered (Content-Length, chunked, HEAD); a request for another sandbox, or with a
/// rotated token, ends the connection after the previous answer instead of being relayed;
/// `Connection: close` from the client is honoured both ways.
#[test]
fn proxy_keep_alive() {
    let Some(s) = setup() else { return };
    let sb = create(&s.cl, false);
    let tok = sb.traffic_token.clone();
    let h = host(&sb.id, PORT);
    let mut conn = connect(s.gw);
    let mut carry = Vec::new();
    let send = |conn: &mut TcpStream, method: &str, path: &str, extra: &str| {
        conn.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {h}\r\nwrenn-traffic-access-token: {tok}\r\n{extra}\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    };
    send(&mut conn, "GET", "/big?n=100000", "");
    let a = read_framed(&mut conn, &mut carry);
    assert_eq!(a.status, 200);
    assert_eq!(a.header("connection"), None, "kept alive: {:?}", a.headers);
    check_pattern(&a.body, 100_000);
    send(&mut conn, "GET", "/chunked?n=70000", "");
    let a = read_framed(&mut conn, &mut carry);
    assert_eq!(a.status, 200);
    check_pattern(&a.body, 70_000);
    send(&mut conn, "HEAD", "/big?n=5000", "");
    let a = read_framed_as(&mut conn, &mut carry, true);
    assert_eq!(a.header("content-length"), Some("5000"));
    assert_eq!((a.status, a.body.len()), (200, 0));
    // Two at once (pipelined): both answered, in order.
    conn.write_all(
        format!(
            "GET /big?n=10 HTTP/1.1\r\nHost: {h}\r\nwrenn-traffic-access-token: {tok}\r\n\r\n\
             GET /head HTTP/1.1\r\nHost: {h}\r\nwrenn-traffic-access-token: {tok}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    check_pattern(&read_framed(&mut conn, &mut carry).body, 10);
    let a = read_framed(&mut conn, &mut carry);
    let seen = String::from_utf8_lossy(&a.body).to_ascii_lowercase();
    assert!(seen.starts_with("get /head http/1.1\r\n"), "{seen}");
    assert!(
        !seen.contains(&tok) && !seen.contains("connection: close"),
        "{seen}"
    );
    // The client's Connection: close: the last answer says so and the connection ends.
    send(&mut conn, "GET", "/big?n=3", "Connection: close\r\n");
    let a = read_framed(&mut conn, &mut carry);
    assert_eq!(a.header("connection"), Some("close"));
    check_pattern(&a.body, 3);
    let mut tail = Vec::new();
    conn.read_to_end(&mut tail).unwrap();
    assert!(tail.is_empty() && carry.is_empty());

    // A later request for another sandbox is not relayed: the connection ends.
    let other = create(&s.cl, false);
    let mut conn = connect(s.gw);
    let mut carry = Vec::new();
    send(&mut conn, "GET", "/big?n=7", "");
    check_pattern(&read_framed(&mut conn, &mut carry).body, 7);
    let before = s.guest.heads.lock().unwrap().len();
    conn.write_all(
        format!(
            "GET /head HTTP/1.1\r\nHost: {}\r\nwrenn-traffic-access-token: {}\r\n\r\n",
            host(&other.id, PORT),
            other.traffic_token
        )
        .as_bytes(),
    )
    .unwrap();
    let mut tail = Vec::new();
    conn.read_to_end(&mut tail).unwrap();
    assert!(tail.is_empty(), "{}", String::from_utf8_lossy(&tail));
    assert_eq!(s.guest.heads.lock().unwrap().len(), before);

    // A token rotated while the connection is open stops working at the next request.
    let mut conn = connect(s.gw);
    let mut carry = Vec::new();
    send(&mut conn, "GET", "/big?n=7", "");
    check_pattern(&read_framed(&mut conn, &mut carry).body, 7);
    let _: c::Sandbox =
        s.cl.unary(
            c::sandboxes_methods::ROTATE_TRAFFIC_TOKEN,
            &c::RotateTrafficTokenRequest {
                sandbox_id: sb.id.clone(),
            },
            T,
        )
        .unwrap();
    send(&mut conn, "GET", "/big?n=7", "");
    let mut tail = Vec::new();
    conn.read_to_end(&mut tail).unwrap();
    assert!(tail.is_empty(), "{}", String::from_utf8_lossy(&tail));
}

/// A proxied request is checked against this replica's copy of the sandbox's traffic row
/// (no database read once it is there), and every change reaches that copy: a token rotated
/// through another replica (its trigger's NOTIFY), a token and a state written straight to
/// the database (as any other writer would), a pause on this replica (at once).
#[test]
fn proxy_traffic_rows_follow_every_change() {
    let Some(s) = setup() else { return };
    let sb = create(&s.cl, false);
    let h = host(&sb.id, PORT);
    let ok = |tok: &str| get(s.gw, &h, "/big?n=10", &token_header(tok)).status;
    let hits = || ctl::metrics::TRAFFIC_CACHE_HITS.get();
    // Within this bound a change made elsewhere reaches the copy (a NOTIFY is delivered at
    // its commit; the bound is for a loaded machine).
    let settles = |what: &str, tok: &str, want: u16| {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let got = ok(tok);
            if got == want {
                return;
            }
            assert!(Instant::now() < end, "{what}: {got}, want {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(ok(&sb.traffic_token), 200);
    let before = hits();
    assert_eq!(ok(&sb.traffic_token), 200);
    assert!(hits() > before, "the second request reads the copy");

    // Rotated through another replica: the old token stops working here.
    let other = s.ctl.replica();
    let cl2 = crate::harness::connect(other.addr.to_string(), Credential::api_key(&s.ctl.team_key))
        .unwrap();
    let rotated: c::Sandbox = cl2
        .unary(
            c::sandboxes_methods::ROTATE_TRAFFIC_TOKEN,
            &c::RotateTrafficTokenRequest {
                sandbox_id: sb.id.clone(),
            },
            T,
        )
        .unwrap();
    settles(
        "old token after another replica rotated it",
        &sb.traffic_token,
        403,
    );
    assert_eq!(ok(&rotated.traffic_token), 200);
    assert_eq!(ok(&rotated.traffic_token), 200);

    // Written straight to the database: a token, then a state.
    let id = proto::id::parse(proto::id::Kind::Sandbox, &sb.id).unwrap();
    let sql = |q: &'static str, v: &'static str| {
        s.ctl
            .api()
            .db()
            .run(move |c| {
                c.execute(q, &[&id, &v])
                    .map(|_| ())
                    .map_err(|e| proto::Status::internal(e.to_string()))
            })
            .unwrap()
    };
    sql(
        "UPDATE sandboxes SET traffic_token = $2 WHERE id = $1",
        "written-directly",
    );
    settles("token written to the database", &rotated.traffic_token, 403);
    assert_eq!(ok("written-directly"), 200);
    sql("UPDATE sandboxes SET state = $2 WHERE id = $1", "paused");
    settles("state written to the database", "written-directly", 409);
    sql("UPDATE sandboxes SET state = $2 WHERE id = $1", "running");
    settles("running again", "written-directly", 200);

    // Paused on this replica: refused at the next request, no wait.
    crate::harness::pause(&s.cl, &sb.id);
    assert_eq!(ok("written-directly"), 409);
}

/// An idle proxied connection holds no relay thread: a kept-alive connection between
/// requests and a quiet WebSocket park both halves (`PROXY_PARK_AFTER`) and resume when
/// either side has something: the next request, an echo, the client's close, the sandbox's
/// server closing on its own.
#[test]
fn proxy_idle_connections_park() {
    let Some(s) = setup() else { return };
    let sb = create(&s.cl, false);
    let tok = sb.traffic_token.clone();
    let h = host(&sb.id, PORT);
    // (relay halves on a thread, parked)
    let settles = |want: (usize, usize), within: Duration| {
        let end = Instant::now() + within;
        loop {
            let now = s.handle.proxy_relays();
            if now == want {
                return;
            }
            assert!(
                Instant::now() < end,
                "relays (running, parked) {now:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let send = |conn: &mut TcpStream, path: &str| {
        conn.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {h}\r\nwrenn-traffic-access-token: {tok}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    };
    let settle = Duration::from_secs(10);

    // A kept-alive connection after its answer: both halves park.
    let mut conn = connect(s.gw);
    let mut carry = Vec::new();
    send(&mut conn, "/big?n=100000");
    check_pattern(&read_framed(&mut conn, &mut carry).body, 100_000);
    settles((0, 2), settle);
    // The next request wakes them; answered in full, then they park again.
    send(&mut conn, "/chunked?n=70000");
    let a = read_framed(&mut conn, &mut carry);
    assert_eq!(a.status, 200);
    check_pattern(&a.body, 70_000);
    settles((0, 2), settle);

    // A quiet WebSocket parks too, and echoes when it is talked to again.
    let mut ws = connect(s.gw);
    ws.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {h}\r\nwrenn-traffic-access-token: {tok}\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let (status, _, rest) = read_head(&mut ws);
    assert_eq!((status, rest.len()), (101, 0));
    let echo = |ws: &mut TcpStream, msg: &[u8]| {
        ws.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        ws.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    };
    echo(&mut ws, b"first");
    settles((0, 4), settle);
    echo(&mut ws, b"after a quiet while");
    settles((0, 4), settle);

    // The client closes the parked kept-alive connection: its halves wake and end.
    drop(conn);
    settles((0, 2), settle);

    // The sandbox's server closes a parked connection: the client sees the close.
    let mut bye = connect(s.gw);
    let mut carry = Vec::new();
    send(&mut bye, "/bye?n=6000");
    assert_eq!(read_framed(&mut bye, &mut carry).body, b"bye");
    settles((0, 4), Duration::from_secs(5));
    let t = Instant::now();
    let mut tail = Vec::new();
    bye.read_to_end(&mut tail).unwrap();
    assert!(tail.is_empty() && carry.is_empty());
    assert!(t.elapsed() < Duration::from_secs(20));
    settles((0, 2), settle);

    drop(ws);
    settles((0, 0), settle);
}

/// A 100 MiB request body streamed through the proxy (Content-Length), hashed by the
/// sandbox's server as it arrives: every byte arrives, in order, and the answer follows.
#[test]
fn proxy_upload_100_mib_checksummed() {
    let Some(s) = setup() else { return };
    let sb = create(&s.cl, false);
    let total: u64 = 100 << 20;
    let mut conn = connect(s.gw);
    conn.write_all(
        format!(
            "POST /sum HTTP/1.1\r\nHost: {}\r\nwrenn-traffic-access-token: {}\r\n\
             Content-Length: {total}\r\n\r\n",
            host(&sb.id, PORT),
            sb.traffic_token
        )
        .as_bytes(),
    )
    .unwrap();
    let started = Instant::now();
    let mut want = proto::sha256::Sha256::new();
    let mut chunk = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < total {
        for (j, x) in chunk.iter_mut().enumerate() {
            *x = pattern((sent + j as u64) * 13 + 5);
        }
        want.update(&chunk);
        conn.write_all(&chunk).unwrap();
        sent += chunk.len() as u64;
    }
    let (status, _, mut rest) = read_head(&mut conn);
    conn.read_to_end(&mut rest).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&rest));
    assert_eq!(
        String::from_utf8_lossy(&rest),
        format!("{total} {}", want.finish_hex())
    );
    eprintln!(
        "100 MiB upload through the proxy in {:?}",
        started.elapsed()
    );
}

/// A client that stops reading a 128 MiB answer: the sandbox's server is held back (it
/// cannot write more than the windows and socket buffers on the way), other proxied requests,
/// API calls and /health are served meanwhile, and the reader gets every byte once it reads
/// again. Then the budgets: 16 connections to one sandbox are open, the 17th is 429.
#[test]
fn proxy_slow_reader_and_budgets() {
    let Some(s) = setup() else { return };
    let sb = create(&s.cl, false);
    let tok = sb.traffic_token.clone();
    let h = host(&sb.id, PORT);
    let gw = s.gw;

    let total: u64 = 128 << 20;
    let mut slow = connect(gw);
    slow.write_all(
        format!(
            "GET /slow?n={total} HTTP/1.1\r\nHost: {h}{}\r\n\r\n",
            token_header(&tok)
        )
        .as_bytes(),
    )
    .unwrap();
    let (status, _, first) = read_head(&mut slow);
    assert_eq!(status, 200);
    let mut got = first.len() as u64;
    // Stop reading; let the pipeline fill.
    std::thread::sleep(Duration::from_millis(1500));
    let stalled = s.guest.written.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    let stalled2 = s.guest.written.load(Ordering::Relaxed);
    println!("written while the client reads nothing: {stalled} then {stalled2} of {total}");
    assert!(
        stalled2 < 48 << 20,
        "the server wrote {stalled2} bytes to a client that reads nothing"
    );
    assert_eq!(stalled, stalled2, "the server is held back");
    // Meanwhile: another proxied request, an API call through the gateway, /health.
    let t0 = Instant::now();
    let a = get(gw, &h, "/big?n=1000000", &token_header(&tok));
    assert_eq!(a.status, 200);
    check_pattern(&a.body, 1_000_000);
    let a = get(
        gw,
        "api.example",
        &format!("/v1/sandboxes/{}", sb.id),
        &format!("\r\nX-API-Key: {}\r\nConnection: close", s.ctl.team_key),
    );
    assert_eq!(a.status, 200);
    let a = get(gw, "api.example", "/health", "\r\nConnection: close");
    assert_eq!(a.status, 200);
    assert!(t0.elapsed() < Duration::from_secs(10));
    // The slow reader reads again and gets everything, in order.
    let mut b = vec![0u8; 256 * 1024];
    loop {
        let k = slow.read(&mut b).unwrap_or_else(|e| {
            panic!(
                "read after {got} of {total} bytes ({e}); the server wrote {}",
                s.guest.written.load(Ordering::Relaxed)
            )
        });
        if k == 0 {
            break;
        }
        for (j, x) in b[..k].iter().enumerate() {
            assert_eq!(*x, pattern(got + j as u64), "byte {}", got + j as u64);
        }
        got += k as u64;
    }
    assert_eq!(got, total);

    // Budgets: 16 open WebSockets to one sandbox, the 17th answered 429 with Retry-After.
    let limit = ctl::limits::PORT_STREAMS_PER_SANDBOX_MAX;
    let open_ws = || {
        let mut ws = connect(gw);
        ws.write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: {h}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 wrenn-traffic-access-token: {tok}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let (status, headers, _) = read_head(&mut ws);
        (status, headers, ws)
    };
    // The earlier connections give their places back as their relays end (the slow one
    // lingers a moment for its client's close).
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = loop {
        let held: Vec<_> = (0..limit).map(|_| open_ws()).collect();
        if held.iter().all(|(st, _, _)| *st == 101) {
            break held;
        }
        let statuses: Vec<u16> = held.iter().map(|h| h.0).collect();
        assert!(Instant::now() < deadline, "{statuses:?}");
        drop(held);
        std::thread::sleep(Duration::from_millis(200));
    };
    let (status, headers, _) = open_ws();
    assert_eq!(status, 429);
    assert!(
        headers.iter().any(|(k, _)| k == "retry-after"),
        "{headers:?}"
    );
    // Another sandbox of the team is not affected; closing one frees a place.
    let other = create(&s.cl, true);
    assert_eq!(get(gw, &host(&other.id, PORT), "/big?n=1", "").status, 200);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, ws) = open_ws();
        if status == 101 {
            drop(ws);
            break;
        }
        assert!(Instant::now() < deadline, "places never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Over TLS (the gateway's certificate; the proxy relays on the TLS transport itself, reading
/// and writing on two threads): a 4 MiB GET and a WebSocket echo.
#[test]
fn proxy_over_tls() {
    let Some(ctl) = Ctl::start() else { return };
    let cl = ctl.team();
    let (fa, _host) = ctl.add_host(8, 8192, 100_000);
    let guest = Guest::start();
    fa.state.lock().unwrap().tcp_ports.insert(PORT, guest.addr);
    let files = &crate::harness::test_tls().files;
    let tls = ctl::config::TlsConfig {
        cert: Some((files.server_cert.clone(), files.server_key.clone())),
        allow_tls12: false,
        sandbox: None,
    }
    .http()
    .unwrap();
    let (gw, handle, _join) = ctl::http::start_with(
        ctl.api().clone(),
        "127.0.0.1:0".parse().unwrap(),
        HttpConfig {
            traffic_domain: Some(DOMAIN.into()),
            tls,
            ..HttpConfig::default()
        },
    )
    .unwrap();
    let sb = create(&cl, false);
    let h = host(&sb.id, PORT);
    let tok = &sb.traffic_token;
    let n = 4u64 << 20;
    let mut s = crate::http::Https::connect(gw);
    s.write_all(
        format!(
            "GET /big?n={n} HTTP/1.1\r\nHost: {h}\r\nwrenn-traffic-access-token: {tok}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut all = Vec::new();
    let mut b = vec![0u8; 65536];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(k) => all.extend_from_slice(&b[..k]),
        }
    }
    let p = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(
        all.starts_with(b"HTTP/1.1 200 "),
        "{:?}",
        String::from_utf8_lossy(&all[..p])
    );
    check_pattern(&all[p + 4..], n);

    // Over TLS the token cookie is Secure.
    let mut s = crate::http::Https::connect(gw);
    s.write_all(
        format!("GET /big?wrenn_traffic_token={tok} HTTP/1.1\r\nHost: {h}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut all = Vec::new();
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(k) => all.extend_from_slice(&b[..k]),
        }
    }
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 302 "), "{text}");
    assert!(
        text.contains(&format!(
            "Set-Cookie: wrenn_traffic_token={tok}; Path=/; HttpOnly; SameSite=Lax; Secure\r\n"
        )),
        "{text}"
    );

    let mut ws = crate::http::Https::connect(gw);
    ws.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {h}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             wrenn-traffic-access-token: {tok}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut one = [0u8; 1];
        assert_eq!(ws.read(&mut one).unwrap(), 1);
        head.push(one[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    for i in 0..16u64 {
        let msg: Vec<u8> = (0..65536).map(|j| pattern(i * 65536 + j)).collect();
        ws.write_all(&msg).unwrap();
        let mut got = Vec::new();
        while got.len() < msg.len() {
            let k = ws.read(&mut b[..msg.len() - got.len()]).unwrap();
            assert!(k > 0);
            got.extend_from_slice(&b[..k]);
        }
        assert!(got == msg, "message {i} differs");
    }
    handle.shutdown();
}

/// Issue 16 (optional part): a sandbox created with `auto_resume` that is paused is resumed
/// by proxied requests that pass the token check: four at once during a slow resume make one
/// resume between them (audited with the system as actor) and are all served; a wrong token
/// resumes nothing; raw TCP through Ports.Connect does not resume; without `auto_resume` the
/// answer stays 409 (`proxy_http_websocket_and_auth`).
#[test]
fn proxy_auto_resume() {
    let Some(s) = setup() else { return };
    let sb: c::Sandbox =
        s.cl.unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                auto_resume: true,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(sb.auto_resume);
    let state = |cl: &Client| crate::harness::get_sandbox(cl, &sb.id).state;
    let pause = |cl: &Client| {
        crate::harness::pause(cl, &sb.id);
    };
    pause(&s.cl);
    let paused = c::SandboxState::Paused as i32;
    let running = c::SandboxState::Running as i32;
    assert_eq!(state(&s.cl), paused);
    let h = host(&sb.id, PORT);
    let gw = s.gw;

    // A wrong token and no token resume nothing.
    assert_eq!(
        get(gw, &h, "/big?n=1", &token_header("wtt_wrong")).status,
        403
    );
    assert_eq!(get(gw, &h, "/big?n=1", "").status, 401);
    assert_eq!(state(&s.cl), paused);
    assert_eq!(s.fa.state.lock().unwrap().resumes, 0);

    // Four requests while the resume takes 500 ms: one resume, four answers.
    s.fa.state.lock().unwrap().resume_delay = Duration::from_millis(500);
    let tok = sb.traffic_token.clone();
    let reqs: Vec<_> = (0..4u64)
        .map(|i| {
            let (h, tok) = (h.clone(), tok.clone());
            std::thread::spawn(move || {
                let n = 1000 + i;
                let a = get(gw, &h, &format!("/big?n={n}"), &token_header(&tok));
                (a, n)
            })
        })
        .collect();
    for r in reqs {
        let (a, n) = r.join().unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        check_pattern(&a.body, n);
    }
    assert_eq!(s.fa.state.lock().unwrap().resumes, 1, "one resume for all");
    assert_eq!(state(&s.cl), running);
    let rows = crate::harness::audit(&s.cl, "sandbox.resume");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].actor_type.as_str(), rows[0].status.as_str()),
        ("system", "success"),
        "{rows:?}"
    );
    assert_eq!(rows[0].resource_id, sb.id);

    // Raw TCP through Ports.Connect answers FAILED_PRECONDITION and resumes nothing.
    s.fa.state.lock().unwrap().resume_delay = Duration::ZERO;
    pause(&s.cl);
    let e =
        s.cl.call(
            c::ports_methods::CONNECT,
            &c::PortConnectRequest {
                kind: Some(c::port_connect_request::Kind::Open(c::PortOpen {
                    sandbox_id: sb.id.clone(),
                    port: PORT,
                })),
            },
            proto::rpc::CallOpts {
                timeout: Some(Duration::from_secs(30)),
                end_stream: false,
            },
        )
        .and_then(|mut st| st.recv::<c::PortConnectResponse>().map(|_| ()))
        .unwrap_err();
    assert_eq!(e.code, proto::Code::FailedPrecondition, "{e}");
    assert_eq!(state(&s.cl), paused);
    assert_eq!(s.fa.state.lock().unwrap().resumes, 1);
    // The path form resumes too.
    let a = get(
        gw,
        "anything",
        &format!("/v1/sandboxes/{}/ports/{PORT}/big?n=77", sb.id),
        &token_header(&tok),
    );
    assert_eq!(a.status, 200, "{a:?}");
    check_pattern(&a.body, 77);
    assert_eq!(state(&s.cl), running);
}

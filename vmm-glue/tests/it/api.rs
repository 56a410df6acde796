//! The API client against a scripted server on a Unix socket: exact request bytes, canned
//! answers, errors, a closed connection, a slow answer past the deadline, oversized answers.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_glue::api::{ApiClient, ApiError, ApiRequest, Method};
use vmm_glue::limits::{API_RESPONSE_BODY_LEN_MAX, API_RESPONSE_HEAD_LEN_MAX};
use vmm_glue::request::{Action, MachineConfig, VmState};

/// What the server does with one request.
enum Step {
    /// Expect exactly these request bytes, then write this answer.
    Answer(Vec<u8>, Vec<u8>),
    /// Expect the request, then write the answer in pieces with a pause between them.
    Trickle(Vec<u8>, Vec<u8>, Duration),
    /// Expect the request, wait, then answer.
    Slow(Vec<u8>, Duration, Vec<u8>),
    /// Expect the request, then close the connection without answering.
    Close(Vec<u8>),
}

/// One connection's script.
type Script = Vec<Step>;

struct Server {
    path: PathBuf,
    _dir: TempDir,
    thread: Option<JoinHandle<Result<(), String>>>,
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "vmm-glue-it-{tag}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        let p = PathBuf::from(p.to_string_lossy().replace([' ', '{', '}', ':'], ""));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads one HTTP request (head plus Content-Length body) from `s`.
fn read_request(s: &mut UnixStream) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => return Err(format!("eof after {} bytes", buf.len())),
            Ok(_) => buf.push(b[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .ok_or("no Content-Length")?
        .trim()
        .parse()
        .map_err(|_| "bad Content-Length")?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    buf.extend_from_slice(&body);
    Ok(buf)
}

fn expect(s: &mut UnixStream, want: &[u8]) -> Result<(), String> {
    let got = read_request(s)?;
    if got != want {
        return Err(format!(
            "request bytes differ:\n got {:?}\nwant {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want)
        ));
    }
    Ok(())
}

impl Server {
    /// Serves each script on its own accepted connection, in order.
    fn start(scripts: Vec<Script>) -> Server {
        let dir = TempDir::new("api");
        let path = dir.0.join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || -> Result<(), String> {
            for script in scripts {
                let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                for step in script {
                    match step {
                        Step::Answer(req, resp) => {
                            expect(&mut s, &req)?;
                            s.write_all(&resp).map_err(|e| e.to_string())?;
                        }
                        Step::Trickle(req, resp, pause) => {
                            expect(&mut s, &req)?;
                            for piece in resp.chunks(7) {
                                s.write_all(piece).map_err(|e| e.to_string())?;
                                std::thread::sleep(pause);
                            }
                        }
                        Step::Slow(req, pause, resp) => {
                            expect(&mut s, &req)?;
                            std::thread::sleep(pause);
                            // The client may be gone by now.
                            let _ = s.write_all(&resp);
                        }
                        Step::Close(req) => {
                            expect(&mut s, &req)?;
                            drop(s);
                            break;
                        }
                    }
                }
            }
            Ok(())
        });
        Server {
            path,
            _dir: dir,
            thread: Some(thread),
        }
    }

    /// Waits for the script to finish and fails the test on a mismatch.
    fn finish(mut self) {
        let r = self.thread.take().unwrap().join().expect("server thread");
        if let Err(e) = r {
            panic!("scripted server: {e}");
        }
    }
}

const NO_CONTENT: &[u8] =
    b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";

fn json_response(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn put_bytes(path: &str, body: &str) -> Vec<u8> {
    format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const GET_ROOT: &[u8] =
    b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Length: 0\r\n\r\n";

const INFO: &str =
    r#"{"id":"sb1","state":"Not started","vmm_version":"1.16.1","app_name":"Firecracker"}"#;

#[test]
fn exact_bytes_and_keep_alive() {
    let mc = put_bytes("/machine-config", r#"{"mem_size_mib":256,"vcpu_count":1}"#);
    let start = put_bytes("/actions", r#"{"action_type":"InstanceStart"}"#);
    let pause = b"PATCH /vm HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
Content-Type: application/json\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}"
        .to_vec();
    // One connection serves all four calls: the client keeps it alive.
    let srv = Server::start(vec![vec![
        Step::Answer(mc, NO_CONTENT.to_vec()),
        Step::Answer(GET_ROOT.to_vec(), json_response(200, INFO)),
        Step::Answer(start, NO_CONTENT.to_vec()),
        Step::Trickle(pause, NO_CONTENT.to_vec(), Duration::from_millis(2)),
    ]]);
    let mut c = ApiClient::new(&srv.path);
    let r = c.call(&MachineConfig::new(1, 256)).unwrap();
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let info = c.describe_instance().unwrap();
    assert_eq!(info.id, "sb1");
    assert_eq!(info.state, "Not started");
    assert_eq!(info.vmm_version, "1.16.1");
    c.call(&Action::InstanceStart).unwrap();
    c.call(&VmState::Paused).unwrap();
    assert!(c.is_connected());
    srv.finish();
}

#[test]
fn faults_in_both_shapes() {
    let mc = put_bytes("/machine-config", r#"{"mem_size_mib":256,"vcpu_count":1}"#);
    let srv = Server::start(vec![vec![
        Step::Answer(
            mc.clone(),
            json_response(400, r#"{"fault_message":"unknown field `foo`"}"#),
        ),
        Step::Answer(mc.clone(), json_response(500, r#"{"error":"boom"}"#)),
        Step::Answer(mc, json_response(404, "not json")),
    ]]);
    let mut c = ApiClient::new(&srv.path);
    let req = MachineConfig::new(1, 256);
    match c.call(&req) {
        Err(ApiError::Fault {
            status, message, ..
        }) => {
            assert_eq!(status, 400);
            assert_eq!(message, "unknown field `foo`");
        }
        other => panic!("{other:?}"),
    }
    // An error answer is a complete response: the connection stays usable.
    match c.call(&req) {
        Err(ApiError::Fault {
            status, message, ..
        }) => {
            assert_eq!(status, 500);
            assert_eq!(message, "boom");
        }
        other => panic!("{other:?}"),
    }
    match c.call(&req) {
        Err(e @ ApiError::Fault { status: 404, .. }) => {
            assert!(e.to_string().contains("not json"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    srv.finish();
}

#[test]
fn closed_connection_then_reconnect() {
    let srv = Server::start(vec![
        vec![Step::Close(GET_ROOT.to_vec())],
        vec![Step::Answer(GET_ROOT.to_vec(), json_response(200, INFO))],
    ]);
    let mut c = ApiClient::new(&srv.path);
    match c.describe_instance() {
        Err(ApiError::Closed { op }) => assert_eq!(op, "GET /"),
        other => panic!("{other:?}"),
    }
    assert!(!c.is_connected());
    // The next call opens a new connection.
    assert_eq!(c.describe_instance().unwrap().id, "sb1");
    srv.finish();
}

#[test]
fn slow_answer_past_the_deadline() {
    let srv = Server::start(vec![
        vec![Step::Slow(
            GET_ROOT.to_vec(),
            Duration::from_millis(600),
            json_response(200, INFO),
        )],
        vec![Step::Answer(GET_ROOT.to_vec(), json_response(200, INFO))],
    ]);
    let mut c = ApiClient::new(&srv.path);
    let mut req = ApiRequest::get("/");
    req.timeout = Duration::from_millis(150);
    let t0 = Instant::now();
    match c.send(&req) {
        Err(ApiError::Timeout { timeout, .. }) => assert_eq!(timeout, req.timeout),
        other => panic!("{other:?}"),
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(140), "{took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    // The late answer must not be taken for the next call's: the connection was dropped.
    assert!(!c.is_connected());
    assert_eq!(c.describe_instance().unwrap().id, "sb1");
    srv.finish();
}

#[test]
fn trickled_head_past_the_deadline() {
    // A server that keeps sending a byte at a time must not extend the deadline.
    let slow_head = json_response(200, INFO);
    let srv = Server::start(vec![vec![Step::Trickle(
        GET_ROOT.to_vec(),
        slow_head,
        Duration::from_millis(40),
    )]]);
    let mut c = ApiClient::new(&srv.path);
    let mut req = ApiRequest::get("/");
    req.timeout = Duration::from_millis(200);
    let t0 = Instant::now();
    assert!(matches!(c.send(&req), Err(ApiError::Timeout { .. })));
    assert!(t0.elapsed() < Duration::from_millis(500));
    drop(c);
    // The server's writes fail once the client is gone; that is expected.
    let _ = srv.thread.map(|t| t.join());
}

#[test]
fn body_over_the_limit() {
    let big = format!(
        "HTTP/1.1 200 \r\nContent-Length: {}\r\n\r\n",
        API_RESPONSE_BODY_LEN_MAX + 1
    );
    let srv = Server::start(vec![vec![Step::Answer(
        GET_ROOT.to_vec(),
        big.into_bytes(),
    )]]);
    let mut c = ApiClient::new(&srv.path);
    match c.describe_instance() {
        Err(ApiError::ResponseBodyTooLarge { len, .. }) => {
            assert_eq!(len, API_RESPONSE_BODY_LEN_MAX as u64 + 1)
        }
        other => panic!("{other:?}"),
    }
    assert!(!c.is_connected());
    srv.finish();
}

#[test]
fn body_at_the_limit() {
    let body = format!(
        r#"{{"id":"sb1","state":"Running","vmm_version":"{}"}}"#,
        "v".repeat(API_RESPONSE_BODY_LEN_MAX - 47)
    );
    assert_eq!(body.len(), API_RESPONSE_BODY_LEN_MAX);
    let srv = Server::start(vec![vec![Step::Answer(
        GET_ROOT.to_vec(),
        json_response(200, &body),
    )]]);
    let mut c = ApiClient::new(&srv.path);
    assert_eq!(c.describe_instance().unwrap().state, "Running");
    srv.finish();
}

#[test]
fn head_over_the_limit() {
    let head = format!(
        "HTTP/1.1 200 \r\nX-Pad: {}\r\nContent-Length: 0\r\n\r\n",
        "p".repeat(API_RESPONSE_HEAD_LEN_MAX)
    );
    let srv = Server::start(vec![vec![Step::Answer(
        GET_ROOT.to_vec(),
        head.into_bytes(),
    )]]);
    let mut c = ApiClient::new(&srv.path);
    assert!(matches!(
        c.describe_instance(),
        Err(ApiError::ResponseHeadTooLarge { .. })
    ));
    srv.finish();
}

#[test]
fn garbage_and_extra_bytes() {
    let mut extra = json_response(200, INFO);
    extra.extend_from_slice(b"HTTP/1.1 204 \r\n\r\n");
    let srv = Server::start(vec![
        vec![Step::Answer(
            GET_ROOT.to_vec(),
            b"SSH-2.0-nope\r\n\r\n".to_vec(),
        )],
        vec![Step::Answer(GET_ROOT.to_vec(), extra)],
        vec![Step::Answer(GET_ROOT.to_vec(), json_response(200, "[1]"))],
    ]);
    let mut c = ApiClient::new(&srv.path);
    assert!(matches!(
        c.describe_instance(),
        Err(ApiError::Malformed { .. })
    ));
    // The unsolicited second response could arrive in the same read or just after; either the
    // client sees it (Malformed) or the response is accepted and the next call sees junk.
    match c.describe_instance() {
        Err(ApiError::Malformed { .. }) => {}
        Ok(_) => {}
        other => panic!("{other:?}"),
    }
    c.disconnect();
    assert!(matches!(
        c.describe_instance(),
        Err(ApiError::UnexpectedBody { .. })
    ));
    srv.finish();
}

#[test]
fn no_socket() {
    let dir = TempDir::new("nosock");
    let mut c = ApiClient::new(dir.0.join("absent.sock"));
    match c.describe_instance() {
        Err(e @ ApiError::Connect { .. }) => {
            assert!(std::error::Error::source(&e).is_some());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_request_is_not_sent() {
    let dir = TempDir::new("invalid");
    let mut c = ApiClient::new(dir.0.join("absent.sock"));
    let req = ApiRequest {
        method: Method::Put,
        path: "/a b".into(),
        body: None,
        timeout: Duration::from_secs(1),
    };
    assert!(matches!(c.send(&req), Err(ApiError::InvalidPath { .. })));
    assert!(matches!(
        c.call(&MachineConfig::new(3, 1)),
        Err(ApiError::InvalidRequest(_))
    ));
}

#[test]
fn chunked_answer_is_decoded_by_the_shared_codec() {
    let mut resp = b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in INFO.as_bytes().chunks(10) {
        proto::http::write_chunk(&mut resp, piece).unwrap();
    }
    proto::http::write_last_chunk(&mut resp).unwrap();
    let srv = Server::start(vec![vec![Step::Answer(GET_ROOT.to_vec(), resp)]]);
    let mut c = ApiClient::new(&srv.path);
    assert_eq!(c.describe_instance().unwrap().state, "Not started");
    assert!(c.is_connected(), "a chunked answer keeps the connection");
    srv.finish();
}

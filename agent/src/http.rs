//! The metrics/health listener: `GET /health` and `GET /metrics` (Prometheus text), nothing
//! else. A scraper and a probe are its only clients, so one thread accepts and each
//! connection gets a short-lived thread, at most [`HTTP_CONNECTIONS_MAX`] at once (more are
//! answered 503 and closed); every read and write has a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::host::Host;
use crate::limits::{HTTP_CONNECTIONS_MAX, HTTP_REQUEST_LEN_MAX, HTTP_TIMEOUT};

/// A running listener.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(addr: SocketAddr, host: Arc<Host>) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("agent-http".into())
            .spawn(move || accept_loop(listener, host, stop2))?;
        Ok(HttpServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, host: Arc<Host>, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(HTTP_TIMEOUT));
        let _ = conn.set_write_timeout(Some(HTTP_TIMEOUT));
        if active.fetch_add(1, Ordering::SeqCst) >= HTTP_CONNECTIONS_MAX {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = respond(&mut conn, 503, "text/plain", "busy\n");
            continue;
        }
        let host = host.clone();
        let active2 = active.clone();
        let spawned = std::thread::Builder::new()
            .name("agent-http-conn".into())
            .spawn(move || {
                serve(&mut conn, &host);
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads one request head and answers it; the connection closes after.
fn serve(conn: &mut TcpStream, host: &Host) {
    let mut buf = vec![0u8; HTTP_REQUEST_LEN_MAX];
    let mut len = 0;
    let path = loop {
        if len == buf.len() {
            let _ = respond(conn, 431, "text/plain", "request too large\n");
            return;
        }
        match conn.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                if req.method != Some("GET") && req.method != Some("HEAD") {
                    let _ = respond(conn, 405, "text/plain", "only GET\n");
                    return;
                }
                break req.path.unwrap_or("/").to_owned();
            }
            Ok(httparse::Status::Partial) => continue,
            Err(_) => {
                let _ = respond(conn, 400, "text/plain", "bad request\n");
                return;
            }
        }
    };
    let _ = match path.split('?').next().unwrap_or("") {
        "/health" => {
            let problems = host.problems();
            let body = if problems.is_empty() {
                "ok\n".to_owned()
            } else {
                format!("ok (cannot host sandboxes: {})\n", problems.join("; "))
            };
            respond(conn, 200, "text/plain", &body)
        }
        "/metrics" => respond(conn, 200, "text/plain; version=0.0.4", &host.prometheus()),
        _ => respond(conn, 404, "text/plain", "not found\n"),
    };
}

fn respond(conn: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

//! Serves one request on a blocking connection: routing, `X-API-Key` auth, building the
//! request message from path, query and body, calling the [`Backend`], and writing the
//! answer (JSON, newline-delimited JSON, raw bytes). Runs on a worker thread.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use prost::Message;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::gen::wrenn::envd::v1 as envd;
use proto::metrics::{family, sample, Counter, Gauge, Histogram};
use proto::rpc::park::ParkGauges;
use proto::rpc::Peer;
use proto::{Code, Status};
use serde_json::{Map, Value};

use super::backend::Backend;
use super::json::Json;
use super::limits::{DRAIN_MAX, FORM_FIELD_MAX, IO_TIMEOUT, JSON_BODY_MAX, UPLOAD_CHUNK};
use super::openapi;
use super::request::{
    body, multipart_boundary, parse_query, Head, Multipart, MultipartError, Wire,
};
use super::response::{start_stream, write_response, Chunked, Response};
use super::routes::{match_route, param_kind, Call, Input, Match, Method, Route, ROUTES};

/// The gateway's own metrics (the service layer's come from the backend).
pub struct HttpMetrics {
    pub connections_open: Gauge,
    pub connections_refused: Counter,
    /// Connections closed before their first request to make room for a newcomer.
    pub connections_evicted: Counter,
    pub workers_busy: Gauge,
    /// Requests (and key checks) waiting for a worker.
    pub queued: Gauge,
    /// Request bytes held by the event loop.
    pub buffered: Gauge,
    /// Connections relayed by the traffic proxy now.
    pub proxied: Gauge,
    /// Their relay halves on a thread now, and parked (idle, no thread).
    pub relays: ParkGauges,
    pub latency: Histogram,
    /// (operation, HTTP status) -> count; both sets are fixed, so the map stays small.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

pub static METRICS: HttpMetrics = HttpMetrics {
    connections_open: Gauge::new(),
    connections_refused: Counter::new(),
    connections_evicted: Counter::new(),
    workers_busy: Gauge::new(),
    queued: Gauge::new(),
    buffered: Gauge::new(),
    proxied: Gauge::new(),
    relays: ParkGauges::new(),
    latency: Histogram::new(),
    requests: Mutex::new(BTreeMap::new()),
};

impl HttpMetrics {
    fn count(&self, op: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((op, status)).or_insert(0) += 1;
        }
    }

    /// Counts an answer the event loop gave itself (401 without a key, 408, 413, 503 ...).
    pub fn count_gateway(&self, status: u16) {
        self.count("gateway", status);
    }

    pub fn render(&self, out: &mut String) {
        family(
            out,
            "wrenn_http_requests_total",
            "counter",
            "HTTP requests by operation and status.",
        );
        if let Ok(m) = self.requests.lock() {
            for ((op, status), n) in m.iter() {
                sample(
                    out,
                    "wrenn_http_requests_total",
                    &format!("operation=\"{op}\",status=\"{status}\""),
                    n,
                );
            }
        }
        family(
            out,
            "wrenn_http_request_duration_seconds",
            "histogram",
            "HTTP request latency.",
        );
        self.latency
            .render(out, "wrenn_http_request_duration_seconds", "");
        family(
            out,
            "wrenn_http_connections_open",
            "gauge",
            "Open HTTP connections.",
        );
        sample(
            out,
            "wrenn_http_connections_open",
            "",
            self.connections_open.get(),
        );
        family(
            out,
            "wrenn_http_connections_refused_total",
            "counter",
            "Connections refused at the bound.",
        );
        sample(
            out,
            "wrenn_http_connections_refused_total",
            "",
            self.connections_refused.get(),
        );
        family(
            out,
            "wrenn_http_connections_evicted_total",
            "counter",
            "Connections closed before their first request to make room for a newcomer.",
        );
        sample(
            out,
            "wrenn_http_connections_evicted_total",
            "",
            self.connections_evicted.get(),
        );
        family(
            out,
            "wrenn_http_workers_busy",
            "gauge",
            "Requests being served.",
        );
        sample(out, "wrenn_http_workers_busy", "", self.workers_busy.get());
        family(
            out,
            "wrenn_http_requests_queued",
            "gauge",
            "Complete requests and key checks waiting for a worker.",
        );
        sample(out, "wrenn_http_requests_queued", "", self.queued.get());
        family(
            out,
            "wrenn_http_buffered_bytes",
            "gauge",
            "Request bytes (heads, bodies) held by the event loop.",
        );
        sample(out, "wrenn_http_buffered_bytes", "", self.buffered.get());
        family(
            out,
            "wrenn_http_proxied_connections",
            "gauge",
            "Connections the traffic proxy relays to sandbox ports now.",
        );
        sample(
            out,
            "wrenn_http_proxied_connections",
            "",
            self.proxied.get(),
        );
        family(
            out,
            "wrenn_http_proxy_relays",
            "gauge",
            "Relay halves (two per proxied connection) by where they are: on a thread \
             moving bytes, or parked while their side is idle (no thread).",
        );
        sample(
            out,
            "wrenn_http_proxy_relays",
            "state=\"running\"",
            self.relays.running.get(),
        );
        sample(
            out,
            "wrenn_http_proxy_relays",
            "state=\"parked\"",
            self.relays.parked.get(),
        );
    }
}

/// The request-serving half of the gateway.
pub struct Gateway {
    pub backend: Arc<dyn Backend>,
    /// Read deadline of a streamed body after the hand-off (limits::IO_TIMEOUT), for the
    /// 408 message.
    pub io_timeout: std::time::Duration,
    /// The listener speaks TLS (the traffic token cookie is then `Secure`).
    pub tls: bool,
}

/// What the caller does with the connection afterwards.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    KeepAlive,
    Close,
    /// Close while request body bytes may still be arriving (close gracefully: lingering).
    CloseUnread,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyState {
    /// Not touched: skipped (bounded) before the next request.
    Unread,
    /// Read to its end.
    Consumed,
    /// Read in part: the connection cannot carry another request.
    Partial,
}

struct Ctx<'a, S: Read + Write> {
    head: &'a Head,
    wire: &'a mut Wire<S>,
    /// How far the request body has been read.
    body: BodyState,
    keep: bool,
    sent_continue: bool,
    /// Authenticated before the body was read (by the event loop's auth step).
    peer: Option<Peer>,
    io_timeout: std::time::Duration,
}

impl<S: Read + Write> Ctx<'_, S> {
    fn send(&mut self, r: &Response) -> After {
        let head_only = self.head.method == "HEAD";
        if write_response(&mut self.wire.stream, r, self.keep, head_only).is_err() {
            return After::Close;
        }
        if self.keep {
            After::KeepAlive
        } else {
            After::Close
        }
    }

    fn continue_100(&mut self) -> std::io::Result<()> {
        if self.head.expect_continue && !self.sent_continue {
            self.sent_continue = true;
            self.wire
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            self.wire.stream.flush()?;
        }
        Ok(())
    }
}

impl Gateway {
    pub fn new(backend: Arc<dyn Backend>) -> Gateway {
        Gateway {
            backend,
            io_timeout: IO_TIMEOUT,
            tls: false,
        }
    }

    /// Serves the request whose head was parsed; its body (if any) is next on `wire` (the
    /// event loop has buffered it whole, or its first bytes for a streamed upload). `peer`:
    /// the key was already checked (requests with a body are authenticated before it is
    /// read); `None`: the handler checks it.
    pub fn serve<S: Read + Write>(
        &self,
        head: &Head,
        peer: Option<Peer>,
        wire: &mut Wire<S>,
    ) -> After {
        let start = Instant::now();
        METRICS.workers_busy.add(1);
        let mut ctx = Ctx {
            head,
            wire,
            body: BodyState::Unread,
            keep: head.keep_alive,
            sent_continue: false,
            peer,
            io_timeout: self.io_timeout,
        };
        let (op, status, after) = self.dispatch(&mut ctx);
        METRICS.workers_busy.add(-1);
        METRICS.latency.observe(start.elapsed());
        METRICS.count(op, status);
        log::debug!(
            "http request method={} path={} op={op} status={status} ms={}",
            head.method,
            head.path,
            start.elapsed().as_millis()
        );
        let unread = head.has_body() && ctx.body != BodyState::Consumed;
        let close = if unread {
            After::CloseUnread
        } else {
            After::Close
        };
        if after != After::KeepAlive || !ctx.keep {
            return close;
        }
        // The next request starts right after this body: skip it if it was not read.
        match ctx.body {
            BodyState::Consumed => After::KeepAlive,
            BodyState::Partial => close,
            BodyState::Unread if !head.has_body() => After::KeepAlive,
            // The client waits for 100 Continue before sending it: it never will.
            BodyState::Unread if head.expect_continue && !ctx.sent_continue => After::Close,
            BodyState::Unread => {
                let mut body = body(ctx.wire, head, u64::MAX);
                if body.drain(DRAIN_MAX) {
                    After::KeepAlive
                } else {
                    close
                }
            }
        }
    }

    fn dispatch<S: Read + Write>(&self, ctx: &mut Ctx<'_, S>) -> (&'static str, u16, After) {
        let path = ctx.head.path.as_str();
        let is_get = matches!(ctx.head.method.as_str(), "GET" | "HEAD");
        let fixed = match path {
            "/health" => Some(("health", self.health())),
            "/metrics" => Some(("metrics", self.metrics())),
            "/openapi.yaml" => Some((
                "openapi",
                Response::text(
                    200,
                    "application/yaml; charset=utf-8",
                    openapi::yaml().as_bytes().to_vec(),
                ),
            )),
            "/docs" | "/docs/" => Some((
                "docs",
                Response::text(
                    200,
                    "text/html; charset=utf-8",
                    openapi::docs_html().as_bytes().to_vec(),
                ),
            )),
            _ => None,
        };
        if let Some((op, resp)) = fixed {
            let resp = if is_get {
                resp
            } else {
                let mut r = Response::error(405, "method_not_allowed", "only GET is allowed here");
                r.extra.push(("Allow", "GET, HEAD".into()));
                r
            };
            let status = resp.status;
            return (op, status, ctx.send(&resp));
        }
        let Some(method) = Method::parse(&ctx.head.method) else {
            let r = Response::error(405, "method_not_allowed", "unsupported method");
            return ("unknown", 405, ctx.send(&r));
        };
        let (route, params) = match match_route(&ROUTES, method, path) {
            Match::Found { route, params } => (route, params),
            Match::MethodNotAllowed(allowed) => {
                let list: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
                let mut r = Response::error(
                    405,
                    "method_not_allowed",
                    &format!(
                        "{} is not allowed on {path}; allowed: {}",
                        ctx.head.method,
                        list.join(", ")
                    ),
                );
                r.extra.push(("Allow", list.join(", ")));
                return ("unknown", 405, ctx.send(&r));
            }
            Match::NotFound => {
                let r = Response::error(404, "not_found", &format!("no route for {path}"));
                return ("unknown", 404, ctx.send(&r));
            }
        };
        let op = route.operation;
        let result = self.call(ctx, route, &params);
        match result {
            Ok((status, after)) => (op, status, after),
            Err(resp) => {
                let status = resp.status;
                (op, status, ctx.send(&resp))
            }
        }
    }

    fn health(&self) -> Response {
        match self.backend.health() {
            Ok(()) => Response::json(200, &serde_json::json!({"status": "ok"})),
            Err(why) => Response::json(
                503,
                &serde_json::json!({"status": "unavailable", "reason": why}),
            ),
        }
    }

    fn metrics(&self) -> Response {
        let mut out = String::new();
        self.backend.render_metrics(&mut out);
        METRICS.render(&mut out);
        Response::text(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            out.into_bytes(),
        )
    }

    /// Runs a routed call. `Ok` once the answer is written; `Err` is an answer not yet sent.
    fn call<S: Read + Write>(
        &self,
        ctx: &mut Ctx<'_, S>,
        route: &Route,
        params: &[(&'static str, String)],
    ) -> Result<(u16, After), Response> {
        let peer = match ctx.peer.take() {
            Some(p) => p,
            None => {
                let key = api_key(ctx.head).ok_or_else(missing_key)?;
                self.backend
                    .authenticate(key)
                    .map_err(|s| Response::from_status(&s))?
            }
        };
        for (name, value) in params {
            if let Some(kind) = param_kind(route, name, value) {
                proto::id::parse(kind, value).map_err(|e| {
                    Response::error(400, Code::InvalidArgument.name(), &format!("{name}: {e}"))
                })?;
            }
        }
        match route.call {
            Call::Upload { multipart } => return self.upload(ctx, route, params, &peer, multipart),
            Call::Stdin => return self.stdin(ctx, route, params, &peer),
            Call::Unary { .. } | Call::Ndjson { .. } | Call::ListDir | Call::Download => {}
        }
        let input = match route.input {
            Input::Query => query_object(ctx.head, route.input_schema)?,
            Input::Body | Input::None => {
                if route.input == Input::None && !ctx.head.has_body() {
                    Value::Object(Map::new())
                } else {
                    read_json(ctx)?
                }
            }
        };
        if route.input != Input::Query && !ctx.head.query.is_empty() {
            return Err(bad_request(&format!(
                "{} takes no query parameters",
                route.operation
            )));
        }
        let request = assemble(route, params, input)?;
        let encoded = (route.encode)(&request).map_err(|e| bad_request(&e.to_string()))?;
        match route.call {
            Call::Unary { resp } => {
                let reply = self
                    .backend
                    .unary(&peer, route.rpc, encoded)
                    .map_err(|s| Response::from_status(&s))?;
                let v = resp(&reply).map_err(|s| Response::from_status(&s))?;
                let r = Response::json(route.status, &v);
                Ok((route.status, ctx.send(&r)))
            }
            Call::Ndjson { item } => self.ndjson(ctx, route, &peer, encoded, item),
            Call::ListDir => self.list_dir(ctx, route, &peer, encoded),
            Call::Download => self.download(ctx, route, &peer, encoded),
            Call::Upload { .. } | Call::Stdin => Err(Response::error(
                500,
                "internal",
                "unreachable streaming-body arm",
            )),
        }
    }

    fn ndjson<S: Read + Write>(
        &self,
        ctx: &mut Ctx<'_, S>,
        route: &Route,
        peer: &Peer,
        encoded: Vec<u8>,
        item: super::routes::DecodeFn,
    ) -> Result<(u16, After), Response> {
        // An HTTP/1.0 client gets a close-delimited body.
        let http11 = ctx.head.version == 1;
        let keep = ctx.keep && http11;
        ctx.keep = keep;
        let mut out: Option<Chunked<&mut S>> = None;
        let stream = &mut ctx.wire.stream;
        let mut stream_slot = Some(stream);
        let result = self
            .backend
            .server_stream(peer, route.rpc, encoded, &mut |msg| {
                let v = item(&msg)?;
                let mut line =
                    serde_json::to_vec(&v).map_err(|e| Status::internal(e.to_string()))?;
                line.push(b'\n');
                if out.is_none() {
                    let s = stream_slot
                        .take()
                        .ok_or_else(|| Status::internal("stream taken"))?;
                    out = Some(
                        start_stream(s, 200, "application/x-ndjson", http11, keep, &[]).map_err(
                            |e| Status::new(Code::Cancelled, format!("client gone: {e}")),
                        )?,
                    );
                }
                match out.as_mut() {
                    Some(c) => c
                        .write_chunk(&line)
                        .map_err(|e| Status::new(Code::Cancelled, format!("client gone: {e}"))),
                    None => Err(Status::internal("no writer")),
                }
            });
        match (result, out) {
            (Err(s), None) => Err(Response::from_status(&s)),
            (Ok(()), None) => {
                let Some(s) = stream_slot.take() else {
                    return Ok((200, After::Close));
                };
                let ok = start_stream(s, 200, "application/x-ndjson", http11, keep, &[])
                    .and_then(|mut c| c.finish())
                    .is_ok();
                Ok((200, if ok { After::KeepAlive } else { After::Close }))
            }
            (Ok(()), Some(mut c)) => {
                let ok = c.finish().is_ok();
                Ok((200, if ok { After::KeepAlive } else { After::Close }))
            }
            (Err(s), Some(mut c)) => {
                // After the first line the status is sent: report the failure as a last line.
                let mut line =
                    serde_json::to_vec(&super::response::error_body(s.code.name(), &s.message))
                        .unwrap_or_default();
                line.push(b'\n');
                let ok = c.write_chunk(&line).is_ok() && c.finish().is_ok();
                Ok((200, if ok { After::KeepAlive } else { After::Close }))
            }
        }
    }

    fn list_dir<S: Read + Write>(
        &self,
        ctx: &mut Ctx<'_, S>,
        route: &Route,
        peer: &Peer,
        encoded: Vec<u8>,
    ) -> Result<(u16, After), Response> {
        // An HTTP/1.0 client gets a close-delimited body.
        let http11 = ctx.head.version == 1;
        let keep = ctx.keep && http11;
        ctx.keep = keep;
        let mut out: Option<Chunked<&mut S>> = None;
        let mut slot = Some(&mut ctx.wire.stream);
        let mut first = true;
        let result = self
            .backend
            .server_stream(peer, route.rpc, encoded, &mut |msg| {
                let batch = envd::ListDirResponse::decode(msg.as_slice())
                    .map_err(|e| Status::internal(format!("decode reply: {e}")))?;
                let gone =
                    |e: std::io::Error| Status::new(Code::Cancelled, format!("client gone: {e}"));
                if out.is_none() {
                    let s = slot
                        .take()
                        .ok_or_else(|| Status::internal("stream taken"))?;
                    let mut c = start_stream(s, 200, "application/json", http11, keep, &[])
                        .map_err(gone)?;
                    c.write_chunk(b"{\"entries\":[").map_err(gone)?;
                    out = Some(c);
                }
                let mut text = Vec::new();
                for e in &batch.entries {
                    if !first {
                        text.push(b',');
                    }
                    first = false;
                    text.extend(serde_json::to_vec(&e.to_json()).unwrap_or_default());
                }
                match out.as_mut() {
                    Some(c) => c.write_chunk(&text).map_err(gone),
                    None => Err(Status::internal("no writer")),
                }
            });
        match (result, out) {
            (Err(s), None) => Err(Response::from_status(&s)),
            (Ok(()), None) => {
                let r = Response::json(200, &envd::ListDirResponse::default().to_json());
                Ok((200, ctx.send(&r)))
            }
            (Ok(()), Some(mut c)) => {
                let ok = c.write_chunk(b"]}\n").is_ok() && c.finish().is_ok();
                Ok((200, if ok { After::KeepAlive } else { After::Close }))
            }
            // The status line is out: end the connection without the last chunk, so the
            // client sees a truncated body instead of a complete, wrong listing.
            (Err(s), Some(_)) => {
                log::warn!(
                    "http list failed mid-stream code={} message={}",
                    s.code,
                    s.message
                );
                Ok((200, After::Close))
            }
        }
    }

    fn download<S: Read + Write>(
        &self,
        ctx: &mut Ctx<'_, S>,
        route: &Route,
        peer: &Peer,
        encoded: Vec<u8>,
    ) -> Result<(u16, After), Response> {
        // An HTTP/1.0 client gets a close-delimited body.
        let http11 = ctx.head.version == 1;
        let keep = ctx.keep && http11;
        ctx.keep = keep;
        let mut out: Option<Chunked<&mut S>> = None;
        let mut slot = Some(&mut ctx.wire.stream);
        // The gateway is the receiver of envd's end-to-end checksum: a mismatch ends the
        // body without its last chunk, so the client sees a broken transfer, never a
        // complete-looking wrong file.
        let mut crc = crc32fast::Hasher::new();
        let result = self
            .backend
            .server_stream(peer, route.rpc, encoded, &mut |msg| {
                let m = envd::ReadResponse::decode(msg.as_slice())
                    .map_err(|e| Status::internal(format!("decode reply: {e}")))?;
                if let Some(want) = m.crc32 {
                    let got = crc.clone().finalize();
                    if got != want {
                        return Err(Status::new(
                            Code::DataLoss,
                            format!("download checksum mismatch: received CRC-32 {got:08x}, envd sent {want:08x}"),
                        ));
                    }
                }
                crc.update(&m.data);
                let gone =
                    |e: std::io::Error| Status::new(Code::Cancelled, format!("client gone: {e}"));
                if out.is_none() {
                    let s = slot
                        .take()
                        .ok_or_else(|| Status::internal("stream taken"))?;
                    let mut extra = Vec::new();
                    if let Some(e) = &m.entry {
                        extra.push(("X-Wrenn-File-Size", e.size.to_string()));
                        extra.push(("X-Wrenn-File-Mode", format!("{:o}", e.mode)));
                    }
                    out = Some(
                        start_stream(s, 200, "application/octet-stream", http11, keep, &extra)
                            .map_err(gone)?,
                    );
                }
                match out.as_mut() {
                    Some(c) => c.write_chunk(&m.data).map_err(gone),
                    None => Err(Status::internal("no writer")),
                }
            });
        match (result, out) {
            (Err(s), None) => Err(Response::from_status(&s)),
            (Ok(()), None) => {
                let r = Response::text(200, "application/octet-stream", Vec::new());
                Ok((200, ctx.send(&r)))
            }
            (Ok(()), Some(mut c)) => {
                let ok = c.finish().is_ok();
                Ok((200, if ok { After::KeepAlive } else { After::Close }))
            }
            (Err(s), Some(_)) => {
                log::warn!(
                    "http download failed mid-stream code={} message={}",
                    s.code,
                    s.message
                );
                Ok((200, After::Close))
            }
        }
    }

    fn upload<S: Read + Write>(
        &self,
        ctx: &mut Ctx<'_, S>,
        route: &Route,
        params: &[(&'static str, String)],
        peer: &Peer,
        multipart: bool,
    ) -> Result<(u16, After), Response> {
        let mut header = query_object(ctx.head, route.input_schema)?;
        let boundary = if multipart {
            let ct = ctx.head.header("content-type").unwrap_or("");
            Some(multipart_boundary(ct).ok_or_else(|| {
                Response::error(
                    415,
                    "unsupported_media_type",
                    "expected multipart/form-data with a boundary",
                )
            })?)
        } else {
            None
        };
        // An optional end-to-end checksum of the body, passed to envd after the last byte.
        let mut crc = match ctx.head.header(CRC32_HEADER) {
            None => None,
            Some(v) => Some(parse_crc32(v).ok_or_else(|| {
                bad_request(&format!(
                    "{CRC32_HEADER}: expected the body's CRC-32 as 8 hexadecimal digits"
                ))
            })?),
        };
        ctx.continue_100()
            .map_err(|_| Response::error(499, "cancelled", "client gone"))?;
        ctx.body = BodyState::Partial;
        let head = ctx.head;
        let io_timeout = ctx.io_timeout;
        let mut body = body(ctx.wire, head, u64::MAX);
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        let mut stalled = false;
        let result;
        let mut header_sent = false;
        if let Some(boundary) = boundary {
            let mut mp = Multipart::new(&mut body, &boundary);
            let mut in_file = false;
            let mut file_done = false;
            let schema = route.input_schema;
            result = self.backend.client_stream(peer, route.rpc, &mut || {
                if !header_sent {
                    // Form fields before the file part are header fields.
                    loop {
                        let part = mp.next_part().map_err(mp_status)?.ok_or_else(|| {
                            Status::invalid_argument("multipart body has no file part (a part named \"file\" or with a filename)")
                        })?;
                        if part.filename.is_some() || part.name == "file" {
                            in_file = true;
                            break;
                        }
                        let text = mp.read_text(FORM_FIELD_MAX).map_err(mp_status)?;
                        set_typed(&mut header, schema, &part.name, &text).map_err(|r| {
                            Status::invalid_argument(format!("form field {:?}: {}", part.name, error_message(&r)))
                        })?;
                    }
                    header_sent = true;
                    let msg = upload_header(route, params, &header)?;
                    return Ok(Some(msg));
                }
                if !in_file || file_done {
                    return Ok(None);
                }
                let n = mp.read_data(&mut buf).map_err(mp_status)?;
                if n == 0 {
                    file_done = true;
                    // Skip any parts after the file up to the closing delimiter.
                    while mp.next_part().map_err(mp_status)?.is_some() {}
                    return Ok(crc.take().map(upload_crc32));
                }
                Ok(Some(upload_data(&buf[..n])))
            });
        } else {
            result = self.backend.client_stream(peer, route.rpc, &mut || {
                if !header_sent {
                    header_sent = true;
                    return upload_header(route, params, &header).map(Some);
                }
                let n = body
                    .read(&mut buf)
                    .map_err(|e| body_status(e, &mut stalled))?;
                if n == 0 {
                    return Ok(crc.take().map(upload_crc32));
                }
                Ok(Some(upload_data(&buf[..n])))
            });
        }
        if body.is_done() {
            ctx.body = BodyState::Consumed;
        } else {
            ctx.keep = false;
        }
        if stalled {
            return Err(stalled_response(io_timeout));
        }
        let reply = result.map_err(|s| Response::from_status(&s))?;
        let v = envd::WriteResponse::decode(reply.as_slice())
            .map(|m| m.to_json())
            .map_err(|e| Response::error(500, "internal", &format!("decode reply: {e}")))?;
        let r = Response::json(route.status, &v);
        Ok((route.status, ctx.send(&r)))
    }
}

impl Gateway {
    /// Processes.SendInput with the raw request body as the bytes, streamed in chunks.
    fn stdin<S: Read + Write>(
        &self,
        ctx: &mut Ctx<'_, S>,
        route: &Route,
        params: &[(&'static str, String)],
        peer: &Peer,
    ) -> Result<(u16, After), Response> {
        let q = query_object(ctx.head, STDIN_PARAMS)?;
        let selector = match (q.get("pid"), q.get("tag")) {
            (Some(pid), None) => serde_json::json!({"pid": pid}),
            (None, Some(tag)) => serde_json::json!({"tag": tag}),
            _ => {
                return Err(bad_request(
                    "name the process with exactly one of pid or tag",
                ))
            }
        };
        let close = q.get("close").and_then(Value::as_bool).unwrap_or(false);
        let sandbox_id = params
            .iter()
            .find(|(n, _)| *n == "sandbox_id")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let first = ctl::SendInputRequest::from_json(&serde_json::json!({
            "sandbox_id": sandbox_id,
            "input": {"process": selector},
        }))
        .map_err(|e| bad_request(&e.to_string()))?;
        ctx.continue_100()
            .map_err(|_| Response::error(499, "cancelled", "client gone"))?;
        ctx.body = BodyState::Partial;
        let head = ctx.head;
        let io_timeout = ctx.io_timeout;
        let mut body = body(ctx.wire, head, u64::MAX);
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        let mut stalled = false;
        let mut state = 0u8; // 0: first message next, 1: data, 2: done
        let result = self
            .backend
            .client_stream(peer, route.rpc, &mut || match state {
                0 => {
                    state = 1;
                    Ok(Some(first.encode_to_vec()))
                }
                1 => {
                    let n = body
                        .read(&mut buf)
                        .map_err(|e| body_status(e, &mut stalled))?;
                    if n == 0 {
                        state = 2;
                        if !close {
                            return Ok(None);
                        }
                    }
                    let msg = ctl::SendInputRequest {
                        sandbox_id: String::new(),
                        input: Some(envd::SendInputRequest {
                            process: None,
                            data: prost::bytes::Bytes::copy_from_slice(&buf[..n]),
                            close: n == 0,
                        }),
                    };
                    Ok(Some(msg.encode_to_vec()))
                }
                _ => Ok(None),
            });
        if body.is_done() {
            ctx.body = BodyState::Consumed;
        } else {
            ctx.keep = false;
        }
        if stalled {
            return Err(stalled_response(io_timeout));
        }
        let reply = result.map_err(|s| Response::from_status(&s))?;
        let v = envd::SendInputResponse::decode(reply.as_slice())
            .map(|m| m.to_json())
            .map_err(|e| Response::error(500, "internal", &format!("decode reply: {e}")))?;
        let r = Response::json(route.status, &v);
        Ok((route.status, ctx.send(&r)))
    }
}

fn mp_status(e: MultipartError) -> Status {
    match e {
        MultipartError::Malformed(_) => Status::invalid_argument(e.to_string()),
        MultipartError::Io(_) => Status::new(Code::Cancelled, e.to_string()),
    }
}

/// The `X-API-Key` header, trimmed, when present and not empty.
pub fn api_key(head: &Head) -> Option<&str> {
    head.header("x-api-key")
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// 401 for a request without a key.
pub fn missing_key() -> Response {
    Response::error(
        401,
        Code::Unauthenticated.name(),
        "missing X-API-Key header",
    )
}

/// The status of a failed read of a streamed body; a read timeout sets `stalled`.
fn body_status(e: std::io::Error, stalled: &mut bool) -> Status {
    let e = super::request::BodyError::from(e);
    if e.is_timeout() {
        *stalled = true;
    }
    match e {
        super::request::BodyError::Io(io) => {
            Status::new(Code::Cancelled, format!("read request body: {io}"))
        }
        other => Status::invalid_argument(format!("request body: {other}")),
    }
}

/// 408 for a streamed body that stopped arriving after the hand-off to a worker.
fn stalled_response(io_timeout: std::time::Duration) -> Response {
    Response::error(
        408,
        "request_timeout",
        &format!(
            "request body stalled: no bytes within the {} s read deadline",
            io_timeout.as_secs_f64()
        ),
    )
}

fn error_message(r: &Response) -> String {
    serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn upload_header(
    route: &Route,
    params: &[(&'static str, String)],
    header: &Value,
) -> Result<Vec<u8>, Status> {
    let v = assemble(route, params, header.clone())
        .map_err(|r| Status::invalid_argument(error_message(&r)))?;
    let mut obj = v;
    // UploadRequest is a oneof: the header arm holds {sandbox_id, file}.
    let sandbox_id = obj.get("sandbox_id").cloned().unwrap_or(Value::Null);
    let file = obj
        .get_mut("header")
        .map(Value::take)
        .unwrap_or(Value::Null);
    let req = serde_json::json!({"header": {"sandbox_id": sandbox_id, "file": file}});
    let m =
        ctl::UploadRequest::from_json(&req).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(m.encode_to_vec())
}

fn upload_data(data: &[u8]) -> Vec<u8> {
    ctl::UploadRequest {
        msg: Some(ctl::upload_request::Msg::Data(
            prost::bytes::Bytes::copy_from_slice(data),
        )),
    }
    .encode_to_vec()
}

/// Request header of an upload carrying the body's CRC-32 (IEEE, as `crc32` or zlib print
/// it: 8 hexadecimal digits), checked end to end by envd.
pub const CRC32_HEADER: &str = "X-Wrenn-Crc32";

/// Exactly 8 hexadecimal digits (either case), as `crc32(1)` prints a CRC-32.
fn parse_crc32(v: &str) -> Option<u32> {
    let v = v.trim();
    if v.len() != 8 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(v, 16).ok()
}

fn upload_crc32(crc: u32) -> Vec<u8> {
    ctl::UploadRequest {
        msg: Some(ctl::upload_request::Msg::Crc32(crc)),
    }
    .encode_to_vec()
}

fn bad_request(msg: &str) -> Response {
    Response::error(400, Code::InvalidArgument.name(), msg)
}

/// Reads a JSON body (≤ JSON_BODY_MAX, 413 beyond).
fn read_json<S: Read + Write>(ctx: &mut Ctx<'_, S>) -> Result<Value, Response> {
    if let Some(ct) = ctx.head.header("content-type") {
        let base = ct.split(';').next().unwrap_or("").trim();
        if !base.eq_ignore_ascii_case("application/json") {
            ctx.keep = false;
            return Err(Response::error(
                415,
                "unsupported_media_type",
                &format!("expected application/json, got {base:?}"),
            ));
        }
    }
    if ctx
        .head
        .content_length
        .is_some_and(|n| n > JSON_BODY_MAX as u64)
    {
        ctx.keep = false;
        return Err(Response::error(
            413,
            "payload_too_large",
            &format!("JSON bodies are limited to {JSON_BODY_MAX} bytes"),
        ));
    }
    if !ctx.head.has_body() {
        return Ok(Value::Object(Map::new()));
    }
    if ctx.continue_100().is_err() {
        return Err(Response::error(499, "cancelled", "client gone"));
    }
    ctx.body = BodyState::Partial;
    let head = ctx.head;
    // The event loop buffered the whole body (within JSON_BODY_MAX): no socket wait here.
    let bytes = match body(ctx.wire, head, JSON_BODY_MAX as u64).read_to_vec() {
        Ok(b) => b,
        Err(super::request::BodyError::TooLarge { .. }) => {
            ctx.keep = false;
            return Err(Response::error(
                413,
                "payload_too_large",
                &format!("JSON bodies are limited to {JSON_BODY_MAX} bytes"),
            ));
        }
        Err(e) => {
            ctx.keep = false;
            return Err(bad_request(&format!("request body: {e}")));
        }
    };
    ctx.body = BodyState::Consumed;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(&bytes).map_err(|e| bad_request(&format!("invalid JSON body: {e}")))
}

/// The component schemas, parsed once.
pub static SCHEMAS: LazyLock<Value> = LazyLock::new(|| {
    let mut v: Value = serde_json::from_str(super::gen_json::SCHEMAS_JSON).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        // The gateway's own shapes (not protobuf messages).
        m.insert(
            STDIN_PARAMS.into(),
            serde_json::json!({"type": "object", "additionalProperties": false,
                "description": "Query parameters of a streamed stdin write: the process (exactly one of pid or tag) and whether to close stdin at the end of the body.",
                "properties": {
                    "pid": {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 4294967295u64, "description": "The process, by pid."},
                    "tag": {"type": "string", "description": "The process, by tag."},
                    "close": {"type": "boolean", "description": "Close the process's stdin after the body."}}}),
        );
    }
    v
});

/// Component name of the streamed-stdin query parameters.
pub const STDIN_PARAMS: &str = "StdinParams";

fn resolve(s: &Value) -> &Value {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or("");
        return SCHEMAS.get(name).unwrap_or(&Value::Null);
    }
    s
}

/// Converts one query or form value to the JSON the message parser expects and sets it.
fn set_typed(obj: &mut Value, schema: &str, key: &str, raw: &str) -> Result<(), Response> {
    let props = SCHEMAS[schema]["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let (field, map_key) = match key.split_once('.') {
        Some((f, k)) => (f, Some(k)),
        None => (key, None),
    };
    let Some(fs) = props.get(field) else {
        return Err(bad_request(&format!("unknown parameter {key:?}")));
    };
    let fs = resolve(fs);
    let o = obj
        .as_object_mut()
        .ok_or_else(|| bad_request("bad parameters"))?;
    match (fs["type"].as_str(), map_key) {
        (Some("object"), Some(k))
            if fs.get("additionalProperties").is_some_and(Value::is_object) =>
        {
            let vs = resolve(&fs["additionalProperties"]);
            let v = scalar(vs, raw).map_err(|m| bad_request(&format!("{key}: {m}")))?;
            let entry = o
                .entry(field.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(m) = entry.as_object_mut() {
                m.insert(k.to_owned(), v);
            }
        }
        (Some("array"), None) => {
            let is = resolve(&fs["items"]);
            let v = scalar(is, raw).map_err(|m| bad_request(&format!("{key}: {m}")))?;
            let entry = o
                .entry(field.to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Some(a) = entry.as_array_mut() {
                a.push(v);
            }
        }
        (_, None) => {
            let v = scalar(fs, raw).map_err(|m| bad_request(&format!("{key}: {m}")))?;
            if o.insert(field.to_owned(), v).is_some() {
                return Err(bad_request(&format!("parameter {key:?} given twice")));
            }
        }
        (_, Some(_)) => return Err(bad_request(&format!("unknown parameter {key:?}"))),
    }
    Ok(())
}

fn scalar(schema: &Value, raw: &str) -> Result<Value, String> {
    // Enums take their name or their number.
    if schema.get("enum").is_some() {
        if let Ok(n) = raw.parse::<i32>() {
            return Ok(Value::from(n));
        }
    }
    match schema["type"].as_str() {
        Some("integer") => raw
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("{raw:?} is not an integer")),
        Some("boolean") => match raw {
            "" | "true" | "1" => Ok(Value::Bool(true)),
            "false" | "0" => Ok(Value::Bool(false)),
            _ => Err(format!("{raw:?} is not a boolean")),
        },
        Some("number") => raw
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("{raw:?} is not a number")),
        Some("object") => Err("objects cannot be given as parameters".into()),
        _ => Ok(Value::String(raw.to_owned())),
    }
}

/// The query string as a JSON object of the schema's fields.
fn query_object(head: &Head, schema: &str) -> Result<Value, Response> {
    let pairs = parse_query(&head.query).ok_or_else(|| bad_request("malformed query string"))?;
    let mut obj = Value::Object(Map::new());
    for (k, v) in pairs {
        set_typed(&mut obj, schema, &k, &v)?;
    }
    Ok(obj)
}

/// Puts path parameters and the input together into the request message's JSON.
fn assemble(
    route: &Route,
    params: &[(&'static str, String)],
    input: Value,
) -> Result<Value, Response> {
    let Value::Object(input) = input else {
        return Err(bad_request("the body must be a JSON object"));
    };
    let mut obj = match route.wrap {
        Some(field) => {
            let mut m = Map::new();
            m.insert(field.to_owned(), Value::Object(input));
            m
        }
        None => input,
    };
    for (name, value) in params {
        let field = route.field_of(name);
        let value = if *name == "team_id" && value == "current" {
            String::new()
        } else {
            value.clone()
        };
        match obj.get(field) {
            Some(Value::String(s)) if *s != value => {
                return Err(bad_request(&format!(
                    "{field} in the body differs from the path"
                )));
            }
            Some(Value::String(_)) | Some(Value::Null) | None => {}
            Some(_) => return Err(bad_request(&format!("{field} must be a string"))),
        }
        obj.insert(field.to_owned(), Value::String(value));
    }
    Ok(Value::Object(obj))
}

/// Operation names of the fixed endpoints, for the router/document test.
pub const FIXED_PATHS: &[&str] = &["/health", "/metrics", "/openapi.yaml", "/docs"];

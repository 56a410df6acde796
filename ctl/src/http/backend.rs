//! What the HTTP gateway needs from the service layer: the same calls the protobuf server
//! makes, by method name (`proto::gen::wrenn::ctl::v1::*_methods`) with protobuf-encoded
//! messages, so both transports reach one dispatch and one set of handlers.
//!
//! Architecture invariant: the gateway never implements API behaviour itself; it converts
//! JSON to the request message, calls the backend, and converts the answer back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use proto::gen::wrenn::ctl::v1 as ctl;
use proto::rpc::forward::{self, Downstream};
use proto::rpc::{Bytes, CallCtx, Peer, Source, Wake};
use proto::Status;

use crate::dispatch::ClientCall;
pub use crate::service::ports::TrafficCreds;
use crate::service::{Api, AuthCtx};
use proto::gen::wrenn::agent::v1 as agent;

/// The service layer as the gateway sees it. Implementations are called on the gateway's
/// worker threads and may block (SQL, agent calls).
pub trait Backend: Send + Sync + 'static {
    /// Checks an API key (the `X-API-Key` header); the value is passed to every call made
    /// with it, like a protobuf connection's peer. UNAUTHENTICATED for a bad key.
    fn authenticate(&self, api_key: &str) -> Result<Peer, Status>;

    /// Whether `api_key` is shaped like a key at all, decided without I/O: the event loop
    /// answers 401 at once to a key that is not, without a worker or a body read.
    fn key_well_formed(&self, _api_key: &str) -> bool {
        true
    }

    /// A unary call: encoded request in, encoded reply out.
    fn unary(&self, peer: &Peer, method: &'static str, request: Vec<u8>)
        -> Result<Vec<u8>, Status>;

    /// A server-streaming call. `emit` is called with each encoded message, in order; when it
    /// fails (the HTTP client went away) the implementation stops and returns that error.
    fn server_stream(
        &self,
        peer: &Peer,
        method: &'static str,
        request: Vec<u8>,
        emit: &mut dyn FnMut(Vec<u8>) -> Result<(), Status>,
    ) -> Result<(), Status>;

    /// A client-streaming call. `next` yields each encoded message, `Ok(None)` once the
    /// client is done; an error from `next` (bad upload body, client gone) aborts the call.
    fn client_stream(
        &self,
        peer: &Peer,
        method: &'static str,
        next: &mut dyn FnMut() -> Result<Option<Vec<u8>>, Status>,
    ) -> Result<Vec<u8>, Status>;

    /// Opens a byte stream to port `port` of `sandbox` for the traffic proxy, after checking
    /// `creds` (see [`Api::proxy_open`] for the codes). The default: no port traffic.
    fn port_open(
        &self,
        _sandbox: proto::id::Uuid,
        _port: u16,
        _creds: TrafficCreds<'_>,
    ) -> Result<PortConn, Status> {
        Err(Status::not_found("this gateway serves no sandbox ports"))
    }

    /// The credential checks of [`Backend::port_open`] alone (the sandbox exists, `creds`
    /// reach it, it runs), opening nothing: before the proxy answers a token in the query
    /// with a redirect that sets the token cookie.
    fn port_authorize(
        &self,
        _sandbox: proto::id::Uuid,
        _creds: TrafficCreds<'_>,
    ) -> Result<(), Status> {
        Err(Status::not_found("this gateway serves no sandbox ports"))
    }

    /// Appends ctl's metrics as Prometheus text (the gateway adds its own).
    fn render_metrics(&self, out: &mut String);

    /// Liveness detail for `/health`: Ok when the service can answer (e.g. its database pool
    /// is connected), Err with the reason otherwise.
    fn health(&self) -> Result<(), String>;
}

/// Bytes towards a sandbox port (blocks under the stream's flow control).
pub trait PortUp: Send {
    fn send(&mut self, data: Bytes) -> Result<(), Status>;
    /// The client sent everything: the sandbox's server reads end of stream.
    fn close_send(&mut self) -> Result<(), Status>;
    /// Ends the stream both ways (the client went away).
    fn cancel(&mut self);
}

/// Bytes from a sandbox port; `Ok(None)` once its server closed.
pub trait PortDown: Send {
    /// The next bytes if they come within `wait`: `Ok(None)` when none did (the stream
    /// stays open), `Ok(Some(None))` at its end.
    fn recv_within(&mut self, wait: Duration) -> Result<Option<Option<Bytes>>, Status>;
    /// Runs `wake` once there is something to receive (bytes, the end, an error), so the
    /// relay can give its thread back meanwhile; `Err(wake)`: there is something now.
    fn park(&mut self, wake: Wake) -> Result<(), Wake>;
}

/// An open port stream and what it holds (its budget place), released when dropped.
pub struct PortConn {
    pub up: Box<dyn PortUp>,
    pub down: Box<dyn PortDown>,
    pub guard: Box<dyn Send>,
}

struct ApiUp(proto::rpc::StreamSender);
struct ApiDown(proto::rpc::StreamReceiver);

impl PortUp for ApiUp {
    fn send(&mut self, data: Bytes) -> Result<(), Status> {
        // The bytes go to the socket from `data` itself (writev): no copy into the frame.
        let empty = agent::PortConnectRequest { kind: None };
        self.0
            .send_payload(&empty, crate::service::ports::PORT_DATA_TAG, data)
    }
    fn close_send(&mut self) -> Result<(), Status> {
        self.0.close_send()
    }
    fn cancel(&mut self) {
        self.0.cancel();
    }
}

impl PortDown for ApiDown {
    /// Messages without bytes are skipped: `opened` (the proxy does not wait for it: it
    /// sends the request right after the open), and empty ones.
    fn recv_within(&mut self, wait: Duration) -> Result<Option<Option<Bytes>>, Status> {
        use agent::port_connect_response::Kind;
        let end = Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let Some(m) = self.0.recv_within::<agent::PortConnectResponse>(left)? else {
                return Ok(None);
            };
            // `None`: the stream's end.
            let Some(m) = m else { return Ok(Some(None)) };
            match m.kind {
                Some(Kind::Data(d)) => return Ok(Some(Some(d))),
                Some(Kind::Opened(false)) => {
                    return Err(Status::internal("the agent did not open the port"))
                }
                Some(Kind::Opened(true)) | None => {}
            }
        }
    }

    fn park(&mut self, wake: Wake) -> Result<(), Wake> {
        self.0.park(wake)
    }
}

/// The gateway's [`Backend`] over ctl's service layer.
pub struct ApiBackend(pub Api);

fn ctx_of(peer: &Peer) -> Result<&AuthCtx, Status> {
    peer.downcast_ref::<AuthCtx>()
        .ok_or_else(|| Status::internal("http peer is not an AuthCtx"))
}

fn req<M: Message + Default>(b: &[u8]) -> Result<M, Status> {
    M::decode(b).map_err(|e| Status::invalid_argument(format!("decode request: {e}")))
}

/// The gateway's side of a forwarded call: `next` yields a client stream's later messages,
/// `emit` takes a server stream's messages (it fails once the HTTP client went away).
struct HttpDown<'a> {
    next: Option<&'a mut dyn FnMut() -> Result<Option<Vec<u8>>, Status>>,
    emit: Option<&'a mut dyn FnMut(Vec<u8>) -> Result<(), Status>>,
}

impl Downstream for HttpDown<'_> {
    fn recv_bytes(&mut self) -> Result<Option<Bytes>, Status> {
        match &mut self.next {
            Some(next) => Ok(next()?.map(Bytes::from)),
            None => Ok(None),
        }
    }

    fn send_bytes(&mut self, msg: Bytes) -> Result<(), Status> {
        match &mut self.emit {
            Some(emit) => emit(msg.to_vec()),
            None => Err(Status::internal("a response message on a unary HTTP call")),
        }
    }

    /// The gateway sends JSON over HTTP chunks: no frame limit.
    fn max_message_len(&self) -> usize {
        usize::MAX
    }

    fn is_cancelled(&self) -> bool {
        false
    }
}

impl Backend for ApiBackend {
    fn authenticate(&self, api_key: &str) -> Result<Peer, Status> {
        let ctx = self.0.authenticate(api_key)?;
        Ok(Arc::new(ctx))
    }

    fn key_well_formed(&self, api_key: &str) -> bool {
        crate::auth::well_formed(api_key, crate::auth::API_KEY_PREFIX)
    }

    fn unary(&self, peer: &Peer, method: &'static str, b: Vec<u8>) -> Result<Vec<u8>, Status> {
        let auth = ctx_of(peer)?;
        if let Some(route) = forward::route(method) {
            // A one-shot SendInput is a client stream of one message.
            let mut down = HttpDown {
                next: None,
                emit: None,
            };
            return self
                .0
                .forward(auth, route, Bytes::from(b), &mut down)
                .map(|r| r.unwrap_or_default().to_vec());
        }
        // The same trait methods as the protobuf port. The backend seam carries no client
        // address (the gateway's per-source budgets ran before), and no handler reads it.
        let call = CallCtx::new(peer.clone(), Source::Local);
        let svc = ClientCall { api: &self.0, auth };
        ctl::call_unary_package(&svc, &call, method, &b)
            .unwrap_or_else(|| Err(Status::unimplemented(format!("no unary method {method}"))))
    }

    fn server_stream(
        &self,
        peer: &Peer,
        method: &'static str,
        b: Vec<u8>,
        emit: &mut dyn FnMut(Vec<u8>) -> Result<(), Status>,
    ) -> Result<(), Status> {
        if method == ctl::templates_methods::ATTACH_BUILD {
            // The HTTP client leaving shows as a failed write of the next line.
            return self.0.attach_build(
                ctx_of(peer)?,
                req(&b)?,
                &mut |e| emit(e.encode_to_vec()),
                &|| false,
            );
        }
        let route = forward::route(method)
            .ok_or_else(|| Status::unimplemented(format!("no server-streaming method {method}")))?;
        let mut down = HttpDown {
            next: None,
            emit: Some(emit),
        };
        self.0
            .forward(ctx_of(peer)?, route, Bytes::from(b), &mut down)
            .map(|_| ())
    }

    fn client_stream(
        &self,
        peer: &Peer,
        method: &'static str,
        next: &mut dyn FnMut() -> Result<Option<Vec<u8>>, Status>,
    ) -> Result<Vec<u8>, Status> {
        let route = forward::route(method)
            .ok_or_else(|| Status::unimplemented(format!("no client-streaming method {method}")))?;
        let first = next()?.ok_or_else(|| Status::invalid_argument("empty request stream"))?;
        let mut down = HttpDown {
            next: Some(next),
            emit: None,
        };
        self.0
            .forward(ctx_of(peer)?, route, Bytes::from(first), &mut down)
            .map(|r| r.unwrap_or_default().to_vec())
    }

    fn port_open(
        &self,
        sandbox: proto::id::Uuid,
        port: u16,
        creds: TrafficCreds<'_>,
    ) -> Result<PortConn, Status> {
        let s = self.0.proxy_open(sandbox, port, creds)?;
        Ok(PortConn {
            up: Box::new(ApiUp(s.up)),
            down: Box::new(ApiDown(s.down)),
            guard: Box::new(s.permit),
        })
    }

    fn port_authorize(
        &self,
        sandbox: proto::id::Uuid,
        creds: TrafficCreds<'_>,
    ) -> Result<(), Status> {
        self.0.proxy_authorize(sandbox, creds).map(|_| ())
    }

    fn render_metrics(&self, out: &mut String) {
        out.push_str(&crate::metrics::render());
    }

    fn health(&self) -> Result<(), String> {
        self.0.health().map_err(|s| s.message)
    }
}

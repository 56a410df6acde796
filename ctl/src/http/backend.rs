//! What the HTTP gateway needs from the service layer: the same calls the protobuf server
//! makes, by method name (`proto::gen::wrenn::ctl::v1::*_methods`) with protobuf-encoded
//! messages, so both transports reach one dispatch and one set of handlers.
//!
//! Architecture invariant: the gateway never implements API behaviour itself; it converts
//! JSON to the request message, calls the backend, and converts the answer back.

use proto::rpc::Peer;
use proto::Status;

/// The service layer as the gateway sees it. Implementations are called on the gateway's
/// worker threads and may block (SQL, agent calls).
pub trait Backend: Send + Sync + 'static {
    /// Checks an API key (the `X-API-Key` header); the value is passed to every call made
    /// with it, like a protobuf connection's peer. UNAUTHENTICATED for a bad key.
    fn authenticate(&self, api_key: &str) -> Result<Peer, Status>;

    /// A unary call: encoded request in, encoded reply out.
    fn unary(&self, peer: &Peer, method: &'static str, request: Vec<u8>) -> Result<Vec<u8>, Status>;

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

    /// Appends ctl's metrics as Prometheus text (the gateway adds its own).
    fn render_metrics(&self, out: &mut String);

    /// Liveness detail for `/health`: Ok when the service can answer (e.g. its database pool
    /// is connected), Err with the reason otherwise.
    fn health(&self) -> Result<(), String>;
}

//! The adaptors between a call and a typed handler, one per streaming shape. The code that
//! `proto-codegen` generates for every service (`<Service>Server` traits and
//! `dispatch_<service>`) calls these, so no server writes its own.
//!
//! Each runs on a worker thread, decodes the request (the first message of the call), runs
//! the handler, sends what it returns and ends the call exactly once. They return the call's
//! final code, for metrics and audit.

use prost::Message;

use super::{CallCtx, ServerStream};
use crate::status::{Code, Status};

fn end(s: ServerStream, r: Result<(), Status>) -> Code {
    let code = match &r {
        Ok(()) => Code::Ok,
        Err(e) => e.code,
    };
    s.finish(r);
    code
}

/// The response as one DATA frame with END_STREAM (PROTOCOL.md §3), or the error.
fn reply<Resp: Message>(s: ServerStream, r: Result<Resp, Status>) -> Code {
    match r {
        Ok(resp) => {
            if s.reply(&resp) {
                Code::Ok
            } else {
                // The send failed (the peer left); `reply` ended the call with that error.
                Code::Unavailable
            }
        }
        Err(e) => end(s, Err(e)),
    }
}

/// One request, one response.
pub fn unary<Req, Resp>(
    s: ServerStream,
    f: impl FnOnce(&CallCtx, Req) -> Result<Resp, Status>,
) -> Code
where
    Req: Message + Default,
    Resp: Message,
{
    let ctx = s.ctx().clone();
    let r = s.first::<Req>().and_then(|req| f(&ctx, req));
    reply(s, r)
}

/// One request; the handler sends any number of responses on the stream; `Ok` ends the call
/// with END. Bidirectional calls have the same shape (the handler also receives).
pub fn streaming<Req>(
    mut s: ServerStream,
    f: impl FnOnce(&CallCtx, Req, &mut ServerStream) -> Result<(), Status>,
) -> Code
where
    Req: Message + Default,
{
    let ctx = s.ctx().clone();
    let r = s.first::<Req>().and_then(|req| f(&ctx, req, &mut s));
    end(s, r)
}

/// Client streaming: the request (the header message) is decoded for the handler, which
/// receives the rest from the stream and returns the one response.
pub fn client_streaming<Req, Resp>(
    mut s: ServerStream,
    f: impl FnOnce(&CallCtx, Req, &mut ServerStream) -> Result<Resp, Status>,
) -> Code
where
    Req: Message + Default,
    Resp: Message,
{
    let ctx = s.ctx().clone();
    let r = s.first::<Req>().and_then(|req| f(&ctx, req, &mut s));
    reply(s, r)
}

/// One request, one response, both encoded: for a transport that has no [`ServerStream`]
/// (ctl's HTTP gateway). A malformed request is `invalid_argument`, as on a stream.
pub fn unary_bytes<Req, Resp>(
    ctx: &CallCtx,
    method: &str,
    req: &[u8],
    f: impl FnOnce(&CallCtx, Req) -> Result<Resp, Status>,
) -> Result<Vec<u8>, Status>
where
    Req: Message + Default,
    Resp: Message,
{
    let req = Req::decode(req)
        .map_err(|e| Status::invalid_argument(format!("{method}: malformed request: {e}")))?;
    f(ctx, req).map(|r| r.encode_to_vec())
}

/// A method no dispatch table knows: `unimplemented`, naming it.
pub fn unknown(s: ServerStream) -> Code {
    let m = format!("unknown method {}", s.method());
    end(s, Err(Status::unimplemented(m)))
}

//! The multiplexed RPC runtime over any byte stream ([`Transport`]: TCP, Unix, vsock);
//! see PROTOCOL.md.
//!
//! - [`Client`]: blocking calls from any thread; no background thread, but while a
//!   stream's receiver is parked ([`StreamReceiver::park`]) and no call reads, one pump
//!   thread per connection does.
//! - [`Server`]: a mio event loop plus a bounded worker pool; [`Service`] answers calls.
//!
//! Flow control bounds what either side buffers (see `conn.rs`).

pub mod admission;
mod client;
mod conn;
#[cfg(feature = "flood")]
pub mod flood;
pub mod forward;
pub mod park;
pub mod serve;
mod server;
mod sys;
pub mod transport;

pub use admission::{CredentialId, Source};
pub use client::{
    CallOpts, Client, ClientConfig, ClientStream, Credential, StreamReceiver, StreamSender,
};
pub use conn::Wake;
pub use server::{
    Call, CallCtx, CallWatch, HelloFrom, Peer, Server, ServerConfig, ServerHandle, ServerSender,
    ServerStream, Service, WrapTransport,
};
pub use transport::{ReadMode, SocketKind, SocketTransport, Transport};

pub use crate::gen::wrenn::wire::v1::{CredentialKind, Hello};
pub use prost::bytes::{Bytes, BytesMut};

/// Reads once from a blocking socket into the spare capacity of `buf` (a fresh allocation
/// of `max` bytes when less than a quarter of one is left), without zero-filling, and
/// splits what was read off as a message payload; `Ok(None)` at end of stream. A payload is
/// at most `max` bytes. The relays of port streams read this way: the payload goes on to the
/// next socket by `writev` ([`ServerSender::send_payload`], [`StreamSender::send_payload`]),
/// never copied in user space.
pub fn recv_payload(
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<Option<Bytes>> {
    buf.clear();
    if buf.capacity() < max / 4 || buf.capacity() > max {
        *buf = BytesMut::with_capacity(max);
    }
    let n = sys::read_into(sock, buf, true)?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(buf.split_to(n).freeze()))
}

/// Encodes `msg` followed by the key and length of a bytes field `tag` holding `payload_len`
/// bytes: the prefix that, with the payload appended, is the encoding of `msg` with that
/// field set. `msg` must leave the field empty. Used to send bulk data without copying it.
pub fn payload_prefix<M: prost::Message>(msg: &M, tag: u32, payload_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.encoded_len() + 10);
    // Encoding into a Vec cannot fail: it grows as needed.
    let _ = msg.encode(&mut out);
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(payload_len as u64, &mut out);
    out
}

/// A method of a service, its streaming shape and its message types (generated for every
/// service from the `.proto` descriptors, so tables that name methods — ctl's HTTP routes,
/// the CLI's commands — are checked against them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodDesc {
    pub name: &'static str,
    pub client_streaming: bool,
    pub server_streaming: bool,
    /// Full protobuf name of the request message (`wrenn.ctl.v1.GetSandboxRequest`).
    pub input: &'static str,
    /// Full protobuf name of the response message.
    pub output: &'static str,
}

/// Parses and checks a HELLO body as the server does: protobuf, known version, credential
/// and name within bounds.
pub fn parse_hello(body: &[u8]) -> Result<Hello, crate::Status> {
    use prost::Message;
    let h = Hello::decode(body).map_err(|e| {
        crate::Status::invalid_argument(format!("protocol error: malformed HELLO: {e}"))
    })?;
    if h.version != crate::PROTOCOL_VERSION {
        return Err(crate::Status::failed_precondition(format!(
            "protocol version {} is not supported (this server speaks {})",
            h.version,
            crate::PROTOCOL_VERSION
        )));
    }
    if h.credential.len() > crate::limits::CREDENTIAL_LEN_MAX
        || h.client.len() > crate::limits::CREDENTIAL_LEN_MAX
    {
        return Err(crate::Status::invalid_argument(
            "protocol error: HELLO field too long",
        ));
    }
    check_announced_limits(h.frame_len_max, h.stream_window, h.conn_window)
        .map_err(|s| crate::Status::invalid_argument(format!("HELLO: {}", s.message)))?;
    Ok(h)
}

/// Checks the receive limits a HELLO or HELLO_ACK announces against the minimums of
/// PROTOCOL.md §6 (0 stands for the default): `frame_len_max` within
/// [`FRAME_LEN_MAX_FLOOR`](crate::limits::FRAME_LEN_MAX_FLOOR) ..=
/// [`FRAME_LEN_MAX_CEILING`](crate::limits::FRAME_LEN_MAX_CEILING), and each window at least
/// [`window_min`](crate::limits::window_min) of that frame limit. The error is
/// `invalid_argument` naming the field.
pub fn check_announced_limits(
    frame_len_max: u32,
    stream_window: u32,
    conn_window: u32,
) -> Result<(), crate::Status> {
    use crate::limits::{
        window_min, CONN_WINDOW_DEFAULT, FRAME_LEN_MAX_CEILING, FRAME_LEN_MAX_DEFAULT,
        FRAME_LEN_MAX_FLOOR, STREAM_WINDOW_DEFAULT,
    };
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    let frame = or(frame_len_max, FRAME_LEN_MAX_DEFAULT);
    if !(FRAME_LEN_MAX_FLOOR..=FRAME_LEN_MAX_CEILING).contains(&frame) {
        return Err(crate::Status::invalid_argument(format!(
            "frame_len_max={frame} is outside {FRAME_LEN_MAX_FLOOR}..={FRAME_LEN_MAX_CEILING}"
        )));
    }
    let min = window_min(frame);
    for (name, v, d) in [
        ("stream_window", stream_window, STREAM_WINDOW_DEFAULT),
        ("conn_window", conn_window, CONN_WINDOW_DEFAULT),
    ] {
        let v = or(v, d);
        if v < min {
            return Err(crate::Status::invalid_argument(format!(
                "{name}={v} is below {min}, 4/3 of frame_len_max={frame}"
            )));
        }
    }
    Ok(())
}

/// Fuzz entry point for the hello exchange: never panics; what parses re-encodes to a
/// message that parses to the same value.
pub fn fuzz_hello(data: &[u8]) {
    use prost::Message;
    if let Ok(h) = parse_hello(data) {
        let again = Hello::decode(&h.encode_to_vec()[..]).expect("re-encoded hello parses");
        assert_eq!(again, h);
    }
    let _ = crate::gen::wrenn::wire::v1::HelloAck::decode(data);
}

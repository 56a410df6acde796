//! The multiplexed RPC runtime over any stream socket (TCP, Unix, vsock); see PROTOCOL.md.
//!
//! - [`Client`]: blocking calls from any thread; no background thread.
//! - [`Server`]: a mio event loop plus a bounded worker pool; [`Service`] answers calls.
//!
//! Flow control bounds what either side buffers (see `conn.rs`).

mod client;
mod conn;
mod pool;
pub mod serve;
mod server;
mod sys;

pub use client::{
    CallOpts, Client, ClientConfig, ClientStream, Credential, StreamReceiver, StreamSender,
};
pub use server::{Call, Peer, Server, ServerConfig, ServerHandle, ServerStream, Service};

pub use crate::gen::wrenn::wire::v1::{CredentialKind, Hello};
pub use prost::bytes::Bytes;

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

/// A method of a service and its streaming shape (generated for every service).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodDesc {
    pub name: &'static str,
    pub client_streaming: bool,
    pub server_streaming: bool,
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
    Ok(h)
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

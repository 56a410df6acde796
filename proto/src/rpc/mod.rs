//! The multiplexed RPC runtime (see PROTOCOL.md).

/// A method of a service and its streaming shape (generated for every service).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodDesc {
    pub name: &'static str,
    pub client_streaming: bool,
    pub server_streaming: bool,
}

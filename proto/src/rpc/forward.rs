//! Forwarding of wrenn.ctl.v1 / wrenn.agent.v1 calls to a sandbox's envd, at the byte level
//! (PROTOCOL.md §9). `proto-codegen` builds the table, [`crate::gen::forward::ROUTES`], from
//! the `(wrenn.forward)` method option of the schemas; ctl and the agent each run every
//! forwarded call through one generic path driven by it, with these helpers:
//!
//! - [`Route::sandbox_id`] and [`Route::envd_request`] read the first message without
//!   decoding envd's request (its bytes are sliced out, not copied, and not parsed);
//! - [`Route::later`] maps a later message of a client stream;
//! - [`split`] cuts a message too large for the receiving peer's `frame_len_max` along its
//!   "next bytes" field;
//! - [`pump_down`] and [`pump_up`] move messages one at a time between a call received
//!   and a call made, so the forwarder holds at most one message per direction.

use prost::bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{decode_varint, encode_key, encode_varint, WireType};

use super::{ClientStream, ServerStream};
use crate::Status;

/// Deadline of a forwarded call made by ctl (the `(wrenn.forward).deadline` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// Unary: ctl's agent call timeout; streams: none.
    Default,
    /// ctl's agent call timeout, also for a stream.
    Call,
}

/// How later messages of a client stream map to envd's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Later {
    /// Not a client stream.
    None,
    /// envd's message is the field at this path of every later message.
    Field(&'static [u32]),
    /// Later messages are envd's as they are; this field (the first message's arm) may not
    /// appear in them.
    Unchanged { header: u32 },
}

/// One forwarded method (generated; see `proto/schema/wrenn/options.proto`).
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// The method, "wrenn.ctl.v1.Files/Stat".
    pub method: &'static str,
    /// The envd method it ends at.
    pub envd: &'static str,
    /// For a ctl.v1 method, the agent.v1 method ctl forwards it to (the request passes on
    /// unchanged: codegen checked the two request messages are the same on the wire); ""
    /// for agent.v1 methods.
    pub agent: &'static str,
    pub client_streaming: bool,
    pub server_streaming: bool,
    /// Field numbers down to the sandbox id (a string) in the first message.
    pub sandbox: &'static [u32],
    /// Field numbers down to envd's request in the first message (empty: envd's request is
    /// empty).
    pub request: &'static [u32],
    /// When not 0, the request field becomes this field of envd's request.
    pub wrap: u32,
    pub later: Later,
    /// Field numbers down to the bytes field a too large message is cut along, in envd's
    /// response (server streams) or in envd's later request messages (client streams).
    pub split: &'static [u32],
    /// A uint64 field beside the split field that holds the position of its first byte
    /// (advanced in each piece), or 0.
    pub split_offset: u32,
    /// A field of envd's request that must be present, and its name for the error.
    pub required: &'static [u32],
    pub required_name: &'static str,
    /// ctl's audit action, or "".
    pub audit: &'static str,
    /// Field numbers of a uint64 millisecond timeout in envd's request (ctl's deadline).
    pub timeout_ms: &'static [u32],
    pub deadline: Deadline,
}

/// The route of `method`, when it is forwarded.
pub fn route(method: &str) -> Option<&'static Route> {
    crate::gen::forward::ROUTES
        .iter()
        .find(|r| r.method == method)
}

fn malformed(what: &str) -> Status {
    Status::invalid_argument(format!("malformed {what}"))
}

/// One field as found in an encoding: number, wire type, the value's bytes (for varint and
/// fixed values, their raw encoding) and the whole field's span.
struct Field {
    number: u32,
    wire: WireType,
    value: std::ops::Range<usize>,
    span: std::ops::Range<usize>,
}

/// The fields of an encoded message in order.
fn fields(msg: &[u8]) -> Result<Vec<Field>, Status> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < msg.len() {
        let start = pos;
        let mut b = &msg[pos..];
        let key = decode_varint(&mut b).map_err(|_| malformed("field key"))?;
        let number = (key >> 3) as u32;
        if number == 0 || key >> 3 > u64::from(u32::MAX >> 3) {
            return Err(malformed("field number"));
        }
        pos = msg.len() - b.len();
        let (wire, len) = match key & 7 {
            0 => {
                decode_varint(&mut b).map_err(|_| malformed("varint"))?;
                (WireType::Varint, msg.len() - b.len() - pos)
            }
            1 => (WireType::SixtyFourBit, 8),
            2 => {
                let n = decode_varint(&mut b).map_err(|_| malformed("length"))?;
                pos = msg.len() - b.len();
                (
                    WireType::LengthDelimited,
                    usize::try_from(n).unwrap_or(usize::MAX),
                )
            }
            5 => (WireType::ThirtyTwoBit, 4),
            _ => return Err(malformed("wire type")),
        };
        if len > msg.len() - pos {
            return Err(malformed("field length"));
        }
        out.push(Field {
            number,
            wire,
            value: pos..pos + len,
            span: start..pos + len,
        });
        pos += len;
    }
    Ok(out)
}

/// The value of the length-delimited field at `path`, or `None` when absent. A message field
/// that occurs more than once is the concatenation of its occurrences (protobuf merges
/// them); a single occurrence is a slice of `msg`, not a copy.
pub fn field_at(msg: &Bytes, path: &[u32]) -> Result<Option<Bytes>, Status> {
    let Some((&n, rest)) = path.split_first() else {
        return Ok(Some(msg.clone()));
    };
    let mut found: Vec<Bytes> = Vec::new();
    for f in fields(msg)? {
        if f.number == n {
            if f.wire != WireType::LengthDelimited {
                return Err(malformed("message: wrong wire type"));
            }
            found.push(msg.slice(f.value));
        }
    }
    let v = match found.len() {
        0 => return Ok(None),
        1 => found.pop().unwrap_or_default(),
        // Strings and bytes: the last one counts; messages: all merged.
        _ if rest.is_empty() => found.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::new();
            for b in &found {
                all.put_slice(b);
            }
            all.freeze()
        }
    };
    field_at(&v, rest)
}

/// The varint at `path` (0 when absent).
fn varint_at(msg: &Bytes, path: &[u32]) -> Result<u64, Status> {
    let Some((&last, parent)) = path.split_last() else {
        return Ok(0);
    };
    let Some(m) = field_at(msg, parent)? else {
        return Ok(0);
    };
    let mut v = 0;
    for f in fields(&m)? {
        if f.number == last && f.wire == WireType::Varint {
            let mut b = &m[f.value];
            v = decode_varint(&mut b).map_err(|_| malformed("varint"))?;
        }
    }
    Ok(v)
}

fn len_field(number: u32, value: &[u8], out: &mut BytesMut) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.put_slice(value);
}

impl Route {
    /// The sandbox id of the first message ("" when absent).
    pub fn sandbox_id(&self, first: &Bytes) -> Result<String, Status> {
        let b = field_at(first, self.sandbox)?.unwrap_or_default();
        String::from_utf8(b.to_vec()).map_err(|_| malformed("sandbox id: not UTF-8"))
    }

    /// envd's request, taken from the first message without decoding it.
    pub fn envd_request(&self, first: &Bytes) -> Result<Bytes, Status> {
        if self.request.is_empty() {
            return Ok(Bytes::new());
        }
        let inner = field_at(first, self.request)?;
        let req = match (inner, self.wrap) {
            (None, _) => Bytes::new(),
            (Some(b), 0) => b,
            (Some(b), n) => {
                let mut out = BytesMut::with_capacity(b.len() + 10);
                len_field(n, &b, &mut out);
                out.freeze()
            }
        };
        if !self.required.is_empty() && field_at(&req, self.required)?.is_none() {
            return Err(Status::invalid_argument(format!(
                "{} is required",
                self.required_name
            )));
        }
        Ok(req)
    }

    /// The millisecond timeout in envd's request (0 = none).
    pub fn timeout_ms(&self, envd_request: &Bytes) -> Result<u64, Status> {
        varint_at(envd_request, self.timeout_ms)
    }

    /// envd's message for a later message of a client stream.
    pub fn later(&self, msg: Bytes) -> Result<Bytes, Status> {
        match self.later {
            Later::None => Err(Status::invalid_argument("this call takes one message")),
            Later::Field(path) => Ok(field_at(&msg, path)?.unwrap_or_default()),
            Later::Unchanged { header } => {
                if fields(&msg)?.iter().any(|f| f.number == header) {
                    return Err(Status::invalid_argument(
                        "only the first message may be the header",
                    ));
                }
                Ok(msg)
            }
        }
    }
}

/// Cuts `msg` into messages of at most `max` bytes along the bytes field at `path`, which
/// holds "the next bytes" of a stream: the first piece is `msg` with the field's first bytes;
/// each later piece carries the next bytes, the varint and fixed-width fields of the message
/// holding the field (with `offset`, when not 0, advanced by the bytes before the piece), and
/// the enclosing messages down to it, nothing else. A message that fits is returned as is.
pub fn split(msg: Bytes, path: &[u32], offset: u32, max: usize) -> Result<Vec<Bytes>, Status> {
    if msg.len() <= max {
        return Ok(vec![msg]);
    }
    let too_large = || {
        Status::resource_exhausted(format!(
            "a message of {} bytes does not fit the peer's frame limit ({max} bytes) and \
             cannot be split",
            msg.len()
        ))
    };
    if path.is_empty() {
        return Err(too_large());
    }
    // Walk down: at each level the one field on the path (exactly one occurrence).
    let mut levels: Vec<(Bytes, Field)> = Vec::new();
    let mut cur = msg.clone();
    for &n in path {
        let fs = fields(&cur)?;
        let mut on_path = fs.into_iter().filter(|f| f.number == n);
        let (Some(f), None) = (on_path.next(), on_path.next()) else {
            return Err(too_large());
        };
        if f.wire != WireType::LengthDelimited {
            return Err(too_large());
        }
        let next = cur.slice(f.value.clone());
        levels.push((cur, f));
        cur = next;
    }
    let data = cur;
    // Every piece is at most the message without its data, plus an offset field later
    // pieces may carry that the original left out (a zero offset) or wrote shorter: a key
    // and a varint, at most 15 bytes.
    let fixed = msg.len() - data.len() + if offset != 0 { 15 } else { 0 };
    if max <= fixed {
        return Err(too_large());
    }
    let chunk = max - fixed;
    let (holder, data_field) = levels.last().ok_or_else(too_large)?;
    let holder_fields = fields(holder)?;
    let base_offset = holder_fields
        .iter()
        .filter(|f| offset != 0 && f.number == offset && f.wire == WireType::Varint)
        .map(|f| {
            let mut b = &holder[f.value.clone()];
            decode_varint(&mut b).unwrap_or(0)
        })
        .next_back();
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < data.len() || at == 0 {
        let end = (at + chunk).min(data.len());
        let part = &data[at..end];
        // The holder: everything (first piece) or its scalars (later pieces), with the part.
        let mut inner = BytesMut::with_capacity(part.len() + 32);
        for f in &holder_fields {
            if f.span == data_field.span {
                len_field(f.number, part, &mut inner);
            } else if at == 0 {
                inner.put_slice(&holder[f.span.clone()]);
            } else if offset != 0 && f.number == offset {
                // Written below (proto3 leaves out a zero offset, so it may be absent).
            } else if f.wire != WireType::LengthDelimited {
                inner.put_slice(&holder[f.span.clone()]);
            }
        }
        if at > 0 && offset != 0 {
            encode_key(offset, WireType::Varint, &mut inner);
            encode_varint(base_offset.unwrap_or(0) + at as u64, &mut inner);
        }
        // Wrap it back up through the enclosing levels.
        let mut piece = inner.freeze();
        for (parent, on_path) in levels[..levels.len() - 1].iter().rev() {
            let mut out = BytesMut::with_capacity(piece.len() + 16);
            for f in fields(parent)? {
                if f.span == on_path.span {
                    len_field(f.number, &piece, &mut out);
                } else if at == 0 {
                    out.put_slice(&parent[f.span.clone()]);
                }
            }
            piece = out.freeze();
        }
        if piece.len() > max {
            return Err(too_large());
        }
        pieces.push(piece);
        at = end;
        if end == data.len() {
            break;
        }
    }
    Ok(pieces)
}

/// The caller's side of a forwarded call: a call this server received (a [`ServerStream`]),
/// or another transport in front of the same path (ctl's HTTP gateway).
pub trait Downstream {
    /// The caller's next message (client streams); `Ok(None)` once it is done.
    fn recv_bytes(&mut self) -> Result<Option<Bytes>, Status>;
    /// Sends one response message (server streams); blocks under flow control.
    fn send_bytes(&mut self, msg: Bytes) -> Result<(), Status>;
    /// Largest message the caller accepts in one piece.
    fn max_message_len(&self) -> usize;
    /// Whether the caller cancelled or went away.
    fn is_cancelled(&self) -> bool;
}

impl Downstream for ServerStream {
    fn recv_bytes(&mut self) -> Result<Option<Bytes>, Status> {
        ServerStream::recv_bytes(self)
    }
    fn send_bytes(&mut self, msg: Bytes) -> Result<(), Status> {
        ServerStream::send_bytes(self, msg)
    }
    fn max_message_len(&self) -> usize {
        ServerStream::max_message_len(self)
    }
    fn is_cancelled(&self) -> bool {
        ServerStream::is_cancelled(self)
    }
}

/// Sends `msg` to the caller, cut to its frame limit along the route's `split` field.
pub fn send_down(down: &mut dyn Downstream, route: &Route, msg: Bytes) -> Result<(), Status> {
    let max = down.max_message_len();
    for piece in split(msg, route.split, route.split_offset, max)? {
        down.send_bytes(piece)?;
    }
    Ok(())
}

/// Sends `msg` on a call made, cut to the server's frame limit.
pub fn send_up(up: &mut ClientStream, route: &Route, msg: Bytes) -> Result<(), Status> {
    let max = up.max_message_len();
    for piece in split(msg, route.split, route.split_offset, max)? {
        up.send_bytes(piece)?;
    }
    Ok(())
}

/// Server streams: every response of `up` is sent to `down` as it arrives, until `up` ends;
/// returns its result. Cancellation of `down` is checked before each wait, and a caller
/// that left fails the next send; dropping `up` then cancels the upstream call.
pub fn pump_down(
    up: &mut ClientStream,
    down: &mut dyn Downstream,
    route: &Route,
) -> Result<(), Status> {
    loop {
        if down.is_cancelled() {
            return Err(Status::cancelled("cancelled by the caller"));
        }
        match up.recv_bytes()? {
            Some(m) => send_down(down, route, m)?,
            None => return Ok(()),
        }
    }
}

/// What a forwarder sends upstream for a later message of a client stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relay {
    /// envd's message ([`Route::later`]): the agent, calling envd.
    Envd,
    /// The message as received, once [`Route::later`] accepted it: ctl, calling the agent
    /// method with the same request.
    AsIs,
}

/// Client streams: every later message of `down` is checked, mapped per `relay` and sent on
/// `up`; then `up` is half-closed and its one response returned.
pub fn pump_up(
    up: &mut ClientStream,
    down: &mut dyn Downstream,
    route: &Route,
    relay: Relay,
) -> Result<Bytes, Status> {
    while let Some(m) = down.recv_bytes()? {
        let envd = route.later(m.clone())?;
        send_up(up, route, if relay == Relay::Envd { envd } else { m })?;
    }
    up.close_send()?;
    up.recv_bytes()?
        .ok_or_else(|| Status::internal(format!("{} sent no response", route.envd)))
}

/// Unary calls: the one response of `up`.
pub fn one(up: &mut ClientStream, route: &Route) -> Result<Bytes, Status> {
    up.recv_bytes()?
        .ok_or_else(|| Status::internal(format!("{} sent no response", route.envd)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::wrenn::envd::v1 as envd;
    use prost::Message;

    #[test]
    fn split_read_response_advances_offset_and_keeps_metadata_first() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let m = envd::ReadResponse {
            entry: Some(envd::EntryInfo {
                path: "/a".into(),
                ..Default::default()
            }),
            data: data.clone().into(),
            offset: 7,
            crc32: None,
        };
        // A first chunk at offset 0 has no offset field on the wire (proto3).
        let at0 = envd::ReadResponse {
            offset: 0,
            ..m.clone()
        };
        for (m, base) in [(m, 7), (at0, 0)] {
            let pieces = split(Bytes::from(m.encode_to_vec()), &[2], 3, 16 * 1024).unwrap();
            assert!(pieces.len() >= 7, "{}", pieces.len());
            let mut got = Vec::new();
            for (i, p) in pieces.iter().enumerate() {
                assert!(p.len() <= 16 * 1024);
                let r = envd::ReadResponse::decode(p.clone()).unwrap();
                assert_eq!(r.entry.is_some(), i == 0);
                assert_eq!(r.offset, base + got.len() as u64);
                got.extend_from_slice(&r.data);
            }
            assert_eq!(got, data);
        }
    }

    #[test]
    fn split_nested_output_repeats_the_stream() {
        let data = vec![b'x'; 40_000];
        let m = envd::ProcessEvent {
            event: Some(envd::process_event::Event::Output(envd::ProcessOutput {
                stream: envd::OutputStream::Stderr as i32,
                data: data.clone().into(),
                offset: 1000,
            })),
        };
        let pieces = split(Bytes::from(m.encode_to_vec()), &[2, 2], 3, 16 * 1024).unwrap();
        assert_eq!(pieces.len(), 3);
        let mut n = 0;
        for p in pieces {
            let Some(envd::process_event::Event::Output(o)) =
                envd::ProcessEvent::decode(p).unwrap().event
            else {
                panic!("not output");
            };
            assert_eq!(o.stream, envd::OutputStream::Stderr as i32);
            assert_eq!(o.offset, 1000 + n as u64);
            n += o.data.len();
        }
        assert_eq!(n, data.len());
    }

    #[test]
    fn a_message_without_a_split_field_is_refused_not_truncated() {
        let m = envd::ListDirResponse {
            entries: (0..2000)
                .map(|i| envd::ListEntry {
                    path: format!("/some/long/path/{i}"),
                    ..Default::default()
                })
                .collect(),
        };
        let e = split(Bytes::from(m.encode_to_vec()), &[], 0, 16 * 1024).unwrap_err();
        assert_eq!(e.code, crate::Code::ResourceExhausted);
    }

    #[test]
    fn field_at_slices_and_merges() {
        let m = envd::WriteRequest {
            msg: Some(envd::write_request::Msg::Header(envd::WriteHeader {
                path: "/p".into(),
                ..Default::default()
            })),
        };
        let b = Bytes::from(m.encode_to_vec());
        let h = field_at(&b, &[1]).unwrap().unwrap();
        assert_eq!(envd::WriteHeader::decode(h).unwrap().path, "/p");
        assert!(field_at(&b, &[2]).unwrap().is_none());
        assert!(field_at(&Bytes::from_static(&[0x0a, 0x05]), &[1]).is_err());
        assert!(field_at(&Bytes::from_static(&[0x80]), &[1]).is_err());
    }

    /// Every route ends at an existing envd method of the same shape, every ctl route at an
    /// agent route for the same envd method, and every forwarded method exists.
    #[test]
    fn the_table_names_existing_methods_of_the_same_shape() {
        use crate::gen::wrenn::{agent::v1 as agent, ctl::v1 as ctl};
        let all = |lists: &[&[crate::rpc::MethodDesc]]| -> Vec<crate::rpc::MethodDesc> {
            lists.iter().flat_map(|l| l.iter().copied()).collect()
        };
        let envd_methods = all(&[
            envd::process_methods::ALL,
            envd::filesystem_methods::ALL,
            envd::metrics_methods::ALL,
        ]);
        let own = all(&[
            agent::sandboxes_methods::ALL,
            agent::processes_methods::ALL,
            agent::files_methods::ALL,
            ctl::processes_methods::ALL,
            ctl::files_methods::ALL,
        ]);
        let routes = crate::gen::forward::ROUTES;
        // 16 agent.v1 methods (all of Files and Processes but Exec, and Sandboxes.Metrics),
        // 14 ctl.v1 methods (Processes but Exec, and Files).
        assert_eq!(routes.len(), 30);
        for r in routes {
            let e = envd_methods
                .iter()
                .find(|m| m.name == r.envd)
                .unwrap_or_else(|| panic!("{}: no envd method {}", r.method, r.envd));
            let m = own
                .iter()
                .find(|m| m.name == r.method)
                .unwrap_or_else(|| panic!("no method {}", r.method));
            assert_eq!(
                (e.client_streaming, e.server_streaming),
                (m.client_streaming, m.server_streaming),
                "{}",
                r.method
            );
            assert_eq!(
                (r.client_streaming, r.server_streaming),
                (m.client_streaming, m.server_streaming)
            );
            assert_eq!(r.client_streaming, r.later != Later::None, "{}", r.method);
            assert!(!r.sandbox.is_empty(), "{}", r.method);
            if r.method.starts_with("wrenn.ctl.") {
                let a = route(r.agent).unwrap_or_else(|| panic!("{}: no agent route", r.method));
                assert_eq!(a.envd, r.envd);
                assert_eq!(
                    (a.sandbox, a.request, a.wrap, a.later),
                    (r.sandbox, r.request, r.wrap, r.later)
                );
            } else {
                assert_eq!(r.agent, "");
                assert_eq!(r.audit, "", "the agent audits nothing");
            }
        }
        assert!(route(agent::processes_methods::EXEC).is_none());
        assert!(route(ctl::processes_methods::EXEC).is_none());
    }

    /// The request paths of the table read the requests that the typed messages write.
    #[test]
    fn routes_extract_what_the_typed_messages_carry() {
        use crate::gen::wrenn::agent::v1 as agent;
        let r = route(agent::processes_methods::EXEC_STREAM).unwrap();
        let p = envd::ProcessConfig {
            cmd: "/bin/true".into(),
            timeout_ms: 1500,
            ..Default::default()
        };
        let first = Bytes::from(
            agent::ExecStreamRequest {
                sandbox_id: "sb-x".into(),
                process: Some(p.clone()),
            }
            .encode_to_vec(),
        );
        assert_eq!(r.sandbox_id(&first).unwrap(), "sb-x");
        let req = r.envd_request(&first).unwrap();
        assert_eq!(
            envd::StartRequest::decode(req.clone()).unwrap().process,
            Some(p)
        );
        let c = route(crate::gen::wrenn::ctl::v1::processes_methods::EXEC_STREAM).unwrap();
        assert_eq!(c.timeout_ms(&req).unwrap(), 1500);
        let none = Bytes::from(
            agent::ExecStreamRequest {
                sandbox_id: "sb-x".into(),
                process: None,
            }
            .encode_to_vec(),
        );
        assert_eq!(
            c.envd_request(&none).unwrap_err().code,
            crate::Code::InvalidArgument
        );

        let w = route(agent::files_methods::WRITE).unwrap();
        let h = envd::WriteHeader {
            path: "/f".into(),
            ..Default::default()
        };
        let first = Bytes::from(
            agent::WriteRequest {
                msg: Some(agent::write_request::Msg::Header(agent::WriteHeader {
                    sandbox_id: "sb-y".into(),
                    file: Some(h.clone()),
                })),
            }
            .encode_to_vec(),
        );
        assert_eq!(w.sandbox_id(&first).unwrap(), "sb-y");
        let req = envd::WriteRequest::decode(w.envd_request(&first).unwrap()).unwrap();
        assert_eq!(req.msg, Some(envd::write_request::Msg::Header(h)));
        let data = Bytes::from(
            agent::WriteRequest {
                msg: Some(agent::write_request::Msg::Data(vec![1, 2].into())),
            }
            .encode_to_vec(),
        );
        assert_eq!(w.later(data.clone()).unwrap(), data);
        assert!(w.later(first).is_err(), "a second header is refused");

        let s = route(agent::processes_methods::SEND_INPUT).unwrap();
        let input = envd::SendInputRequest {
            data: vec![7; 3].into(),
            close: true,
            ..Default::default()
        };
        let m = Bytes::from(
            agent::SendInputRequest {
                sandbox_id: String::new(),
                input: Some(input.clone()),
            }
            .encode_to_vec(),
        );
        assert_eq!(
            envd::SendInputRequest::decode(s.later(m).unwrap()).unwrap(),
            input
        );
    }
}

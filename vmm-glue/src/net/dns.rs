//! The DNS messages a slot's resolver handles: a guest's query in, a rebuilt query to the
//! upstream, the upstream's answer back. Pure functions over bytes, bounded everywhere
//! (`limits::DNS_*`), fuzzed (`fuzz_dns_message`).
//!
//! The guest's bytes are parsed as root, so the parser trusts nothing: every length is
//! checked against the message, compression pointers may only point backwards (no loops)
//! and are followed at most [`DNS_POINTER_JUMPS_MAX`] times, a name is at most
//! [`DNS_NAME_LEN_MAX`] bytes and a response at most [`DNS_ANSWER_RECORDS_MAX`] records.
//!
//! Names are kept as lower-case dotted text without the final dot. A guest's name must be a
//! host name (letters, digits, `-` and `_` in each label): anything else is refused, so the
//! text form is unambiguous and pattern matching works on it safely.
//!
//! It is not a resolver: no cache, no recursion, no DNSSEC. The upstream does that.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

use super::limits::{
    DNS_ANSWER_RECORDS_MAX, DNS_CNAME_CHAIN_MAX, DNS_EDNS_UDP_PAYLOAD_MAX, DNS_LABEL_LEN_MAX,
    DNS_NAME_LEN_MAX, DNS_POINTER_JUMPS_MAX, DNS_QUERY_LEN_MAX, DNS_TTL_MAX, DNS_TTL_MIN,
};

/// Header length.
pub const HEADER_LEN: usize = 12;
/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type CNAME.
pub const TYPE_CNAME: u16 = 5;
/// Record type OPT (EDNS).
pub const TYPE_OPT: u16 = 41;
/// Class IN.
pub const CLASS_IN: u16 = 1;
/// Response codes we write.
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_REFUSED: u8 = 5;
pub const RCODE_FORMERR: u8 = 1;

/// Why a message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// The message ends before a field it announces.
    Truncated,
    /// Longer than the bound for its kind.
    TooLong { len: usize },
    /// A name over [`DNS_NAME_LEN_MAX`], a label over 63 bytes, a pointer loop or a pointer
    /// chain over [`DNS_POINTER_JUMPS_MAX`], or a reserved label type.
    BadName(&'static str),
    /// A byte outside letters, digits, `-`, `_` in a name we must match.
    NotHostName,
    /// Not a plain query: QR set, an opcode other than QUERY, not exactly one question,
    /// answer or authority records.
    NotQuery(&'static str),
    /// A response that is not the answer to our question (ID, QR, question).
    Mismatch(&'static str),
    /// More records than [`DNS_ANSWER_RECORDS_MAX`].
    TooManyRecords { count: usize },
    /// A record whose data does not fit its type (an A record that is not 4 bytes).
    BadRecord(&'static str),
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::Truncated => write!(f, "dns message truncated"),
            DnsError::TooLong { len } => write!(f, "dns message of {len} bytes too long"),
            DnsError::BadName(why) => write!(f, "bad dns name: {why}"),
            DnsError::NotHostName => write!(f, "dns name is not a host name"),
            DnsError::NotQuery(why) => write!(f, "not a dns query: {why}"),
            DnsError::Mismatch(why) => write!(f, "dns response does not match: {why}"),
            DnsError::TooManyRecords { count } => {
                write!(f, "{count} dns records (at most {DNS_ANSWER_RECORDS_MAX})")
            }
            DnsError::BadRecord(why) => write!(f, "bad dns record: {why}"),
        }
    }
}

impl std::error::Error for DnsError {}

/// Reads big-endian integers at an offset, checked.
fn u16_at(msg: &[u8], at: usize) -> Result<u16, DnsError> {
    let b = msg.get(at..at + 2).ok_or(DnsError::Truncated)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn u32_at(msg: &[u8], at: usize) -> Result<u32, DnsError> {
    let b = msg.get(at..at + 4).ok_or(DnsError::Truncated)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// A name read from a message: its labels as they were on the wire (case kept, for the
/// rebuilt query), and where the name ended in the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireName {
    /// Uncompressed wire form, ending in the root label (a zero byte).
    pub wire: Vec<u8>,
    /// Offset just past the name where it started (past the first pointer, if any).
    pub end: usize,
}

impl WireName {
    /// The lower-case dotted text, without the final dot ("" for the root). Fails with
    /// [`DnsError::NotHostName`] on any byte outside letters, digits, `-`, `_`.
    pub fn text(&self) -> Result<String, DnsError> {
        let mut out = String::with_capacity(self.wire.len());
        let mut at = 0;
        while let Some(&len) = self.wire.get(at) {
            if len == 0 {
                break;
            }
            let label = &self.wire[at + 1..at + 1 + usize::from(len)];
            if !out.is_empty() {
                out.push('.');
            }
            for &b in label {
                if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                    return Err(DnsError::NotHostName);
                }
                out.push(char::from(b.to_ascii_lowercase()));
            }
            at += 1 + usize::from(len);
        }
        Ok(out)
    }
}

/// Reads the name at `start`, following compression pointers. A pointer must point before
/// the position it is found at, so no pointer chain loops; at most [`DNS_POINTER_JUMPS_MAX`].
pub fn read_name(msg: &[u8], start: usize) -> Result<WireName, DnsError> {
    let mut wire = Vec::with_capacity(64);
    let mut at = start;
    let mut end = None;
    let mut jumps = 0usize;
    loop {
        let len = *msg.get(at).ok_or(DnsError::Truncated)?;
        match len & 0xc0 {
            0x00 => {
                let len = usize::from(len);
                if wire.len() + 1 + len > DNS_NAME_LEN_MAX {
                    return Err(DnsError::BadName("name over 255 bytes"));
                }
                let label = msg.get(at + 1..at + 1 + len).ok_or(DnsError::Truncated)?;
                wire.push(len as u8);
                wire.extend_from_slice(label);
                at += 1 + len;
                if len == 0 {
                    return Ok(WireName {
                        wire,
                        end: end.unwrap_or(at),
                    });
                }
                debug_assert!(len <= DNS_LABEL_LEN_MAX);
            }
            0xc0 => {
                let low = *msg.get(at + 1).ok_or(DnsError::Truncated)?;
                let target = (usize::from(len & 0x3f) << 8) | usize::from(low);
                if target >= at {
                    return Err(DnsError::BadName("pointer does not point backwards"));
                }
                jumps += 1;
                if jumps > DNS_POINTER_JUMPS_MAX {
                    return Err(DnsError::BadName("too many pointers"));
                }
                end.get_or_insert(at + 2);
                at = target;
            }
            _ => return Err(DnsError::BadName("reserved label type")),
        }
    }
}

/// A guest's query, as much of it as we keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Recursion desired, copied to the upstream query.
    pub rd: bool,
    /// The question's name as the guest wrote it (case kept).
    pub qname_wire: Vec<u8>,
    /// The question's name, lower-case text.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The guest's EDNS UDP payload size, if it sent an OPT record.
    pub edns_udp: Option<u16>,
}

/// Parses a guest's query. Only a standard query with one question and at most one
/// additional record (EDNS OPT) passes; the name must be a host name.
///
/// A query that fails here is answered from the header alone ([`error_reply`]), if its
/// header is readable.
pub fn parse_query(msg: &[u8]) -> Result<Query, DnsError> {
    if msg.len() > DNS_QUERY_LEN_MAX {
        return Err(DnsError::TooLong { len: msg.len() });
    }
    if msg.len() < HEADER_LEN {
        return Err(DnsError::Truncated);
    }
    let id = u16_at(msg, 0)?;
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 != 0 {
        return Err(DnsError::NotQuery("QR set"));
    }
    if (flags >> 11) & 0xf != 0 {
        return Err(DnsError::NotQuery("opcode is not QUERY"));
    }
    let (qd, an, ns, ar) = (
        u16_at(msg, 4)?,
        u16_at(msg, 6)?,
        u16_at(msg, 8)?,
        u16_at(msg, 10)?,
    );
    if qd != 1 {
        return Err(DnsError::NotQuery("not exactly one question"));
    }
    if an != 0 || ns != 0 || ar > 1 {
        return Err(DnsError::NotQuery("records besides the question"));
    }
    let q = read_name(msg, HEADER_LEN)?;
    let name = q.text()?;
    let qtype = u16_at(msg, q.end)?;
    let qclass = u16_at(msg, q.end + 2)?;
    let mut at = q.end + 4;
    let mut edns_udp = None;
    if ar == 1 {
        let owner = read_name(msg, at)?;
        at = owner.end;
        if u16_at(msg, at)? == TYPE_OPT && owner.wire == [0] {
            edns_udp = Some(u16_at(msg, at + 2)?);
        }
        let rdlen = usize::from(u16_at(msg, at + 8)?);
        at += 10;
        msg.get(at..at + rdlen).ok_or(DnsError::Truncated)?;
    }
    Ok(Query {
        id,
        rd: flags & 0x0100 != 0,
        qname_wire: q.wire,
        name,
        qtype,
        qclass,
        edns_udp,
    })
}

/// The query sent upstream for `q`, with our `id`: the guest's question and, if the guest
/// sent EDNS, an OPT record with its payload size clamped to [512, DNS_EDNS_UDP_PAYLOAD_MAX]
/// and no options. Nothing else of the guest's message leaves the host.
pub fn build_query(id: u16, q: &Query) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + q.qname_wire.len() + 4 + 11);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(if q.rd { 0x0100u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&u16::from(q.edns_udp.is_some()).to_be_bytes());
    out.extend_from_slice(&q.qname_wire);
    out.extend_from_slice(&q.qtype.to_be_bytes());
    out.extend_from_slice(&q.qclass.to_be_bytes());
    if let Some(size) = q.edns_udp {
        let size = size.clamp(512, DNS_EDNS_UDP_PAYLOAD_MAX);
        out.push(0); // root owner
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]); // extended rcode, version, flags
        out.extend_from_slice(&[0, 0]); // no options
    }
    out
}

/// An answer without records, with `rcode`, for the query in `msg`: the guest's header and
/// question echoed. `None` when not even a header and question can be read (the message is
/// dropped then).
pub fn error_reply(msg: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let id = u16_at(msg, 0).ok()?;
    let flags = u16_at(msg, 2).ok()?;
    if flags & 0x8000 != 0 {
        return None; // never answer an answer
    }
    let question = (u16_at(msg, 4).ok()? == 1)
        .then(|| {
            let q = read_name(msg, HEADER_LEN).ok()?;
            msg.get(HEADER_LEN..q.end + 4)
        })
        .flatten();
    let mut out = Vec::with_capacity(HEADER_LEN + question.map_or(0, <[u8]>::len));
    out.extend_from_slice(&id.to_be_bytes());
    // QR, the guest's opcode and RD, RA, the rcode.
    let reply_flags = 0x8000 | (flags & 0x7900) | 0x0080 | u16::from(rcode & 0xf);
    out.extend_from_slice(&reply_flags.to_be_bytes());
    out.extend_from_slice(&u16::from(question.is_some()).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    if let Some(q) = question {
        out.extend_from_slice(q);
    }
    Some(out)
}

/// One record of a response's answer section that we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    A {
        owner: String,
        addr: Ipv4Addr,
        ttl: u32,
    },
    Cname {
        owner: String,
        target: String,
        ttl: u32,
    },
}

/// What we take from an upstream response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub rcode: u8,
    /// A and CNAME records of the answer section, class IN, whose names are host names;
    /// others are skipped.
    pub records: Vec<Record>,
}

/// Parses the upstream's response to the query `sent` (as built by [`build_query`]):
/// same ID, QR set, the same question. Only the answer section is read.
pub fn parse_response(msg: &[u8], sent: &[u8]) -> Result<Response, DnsError> {
    if msg.len() < HEADER_LEN || sent.len() < HEADER_LEN {
        return Err(DnsError::Truncated);
    }
    if msg[0..2] != sent[0..2] {
        return Err(DnsError::Mismatch("id"));
    }
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::Mismatch("QR not set"));
    }
    if u16_at(msg, 4)? != 1 {
        return Err(DnsError::Mismatch("not one question"));
    }
    let q = read_name(msg, HEADER_LEN)?;
    let sq = read_name(sent, HEADER_LEN)?;
    let same_name = q.wire.eq_ignore_ascii_case(&sq.wire);
    let same_type = msg.get(q.end..q.end + 4) == sent.get(sq.end..sq.end + 4);
    if !same_name || !same_type {
        return Err(DnsError::Mismatch("question"));
    }
    let count = usize::from(u16_at(msg, 6)?);
    if count > DNS_ANSWER_RECORDS_MAX {
        return Err(DnsError::TooManyRecords { count });
    }
    let mut records = Vec::with_capacity(count);
    let mut at = q.end + 4;
    for _ in 0..count {
        let owner = read_name(msg, at)?;
        at = owner.end;
        let ty = u16_at(msg, at)?;
        let class = u16_at(msg, at + 2)?;
        let ttl = u32_at(msg, at + 4)?;
        let rdlen = usize::from(u16_at(msg, at + 8)?);
        at += 10;
        let rdata = msg.get(at..at + rdlen).ok_or(DnsError::Truncated)?;
        let rdata_at = at;
        at += rdlen;
        if class != CLASS_IN {
            continue;
        }
        let Ok(owner) = owner.text() else { continue };
        match ty {
            TYPE_A => {
                let b: [u8; 4] = rdata
                    .try_into()
                    .map_err(|_| DnsError::BadRecord("A record not 4 bytes"))?;
                records.push(Record::A {
                    owner,
                    addr: Ipv4Addr::from(b),
                    ttl,
                });
            }
            TYPE_CNAME => {
                let target = read_name(msg, rdata_at)?;
                if target.end > rdata_at + rdlen {
                    return Err(DnsError::BadRecord("CNAME target past its record"));
                }
                let Ok(target) = target.text() else { continue };
                records.push(Record::Cname { owner, target, ttl });
            }
            _ => {}
        }
    }
    Ok(Response {
        rcode: (flags & 0xf) as u8,
        records,
    })
}

/// Clamps a record's TTL to [DNS_TTL_MIN, DNS_TTL_MAX].
pub fn clamp_ttl(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl)).clamp(DNS_TTL_MIN, DNS_TTL_MAX)
}

/// The addresses `name` resolves to in `records`: its A records, or those at the end of its
/// CNAME chain (at most [`DNS_CNAME_CHAIN_MAX`] links), each with the smallest TTL along
/// the way. Records of other names (not on the chain) are ignored.
pub fn chain_addresses(name: &str, records: &[Record]) -> Vec<(Ipv4Addr, u32)> {
    let mut current = name.to_owned();
    let mut ttl_cap = u32::MAX;
    for _ in 0..=DNS_CNAME_CHAIN_MAX {
        let addrs: Vec<(Ipv4Addr, u32)> = records
            .iter()
            .filter_map(|r| match r {
                Record::A { owner, addr, ttl } if *owner == current => {
                    Some((*addr, (*ttl).min(ttl_cap)))
                }
                _ => None,
            })
            .collect();
        if !addrs.is_empty() {
            return addrs;
        }
        let next = records.iter().find_map(|r| match r {
            Record::Cname { owner, target, ttl } if *owner == current => Some((target, *ttl)),
            _ => None,
        });
        match next {
            Some((target, ttl)) => {
                current = target.clone();
                ttl_cap = ttl_cap.min(ttl);
            }
            None => return Vec::new(),
        }
    }
    Vec::new()
}

// ---- TCP framing (RFC 1035 4.2.2, RFC 7766) ----

/// The length a TCP frame's 2-byte prefix announces, if it is a message we take: 1 to `max`
/// bytes (a guest's query: [`DNS_QUERY_LEN_MAX`]; an upstream answer:
/// `limits::DNS_TCP_ANSWER_LEN_MAX`). Otherwise [`DnsError::TooLong`] or
/// [`DnsError::Truncated`] (an empty message).
pub fn frame_len(prefix: [u8; 2], max: usize) -> Result<usize, DnsError> {
    let len = usize::from(u16::from_be_bytes(prefix));
    if len > max {
        return Err(DnsError::TooLong { len });
    }
    if len == 0 {
        return Err(DnsError::Truncated);
    }
    Ok(len)
}

/// The first whole frame of a TCP byte stream: its message and the bytes it took (prefix
/// included); `Ok(None)` while it is incomplete.
pub fn split_frame(stream: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, DnsError> {
    let Some(prefix) = stream.get(..2) else {
        return Ok(None);
    };
    let len = frame_len([prefix[0], prefix[1]], max)?;
    Ok(stream.get(2..2 + len).map(|m| (m, 2 + len)))
}

/// Replaces the ID of a message (the upstream's answer goes back with the guest's ID).
pub fn set_id(msg: &mut [u8], id: u16) {
    if let Some(b) = msg.get_mut(0..2) {
        b.copy_from_slice(&id.to_be_bytes());
    }
}

// ---- name patterns ----

/// Allow-list names: one syntax for ctl and the agent, in `proto::network`.
pub use proto::network::DomainPattern;

/// Fuzz entry: every parser on arbitrary bytes. Never panics, never loops.
pub fn fuzz_dns_message(data: &[u8]) {
    if let Ok(q) = parse_query(data) {
        let built = build_query(0x1234, &q);
        let again = parse_query(&built).expect("a built query parses");
        assert_eq!(again.name, q.name);
        let _ = parse_response(data, &built);
    }
    let _ = error_reply(data, RCODE_REFUSED);
    // The same bytes as an answer to a query for whatever name they start with.
    if data.len() >= HEADER_LEN {
        let mut sent = data[..HEADER_LEN].to_vec();
        if let Ok(q) = read_name(data, HEADER_LEN) {
            sent.extend_from_slice(&q.wire);
            sent.extend_from_slice(data.get(q.end..q.end + 4).unwrap_or(&[0, 1, 0, 1]));
        }
        if let Ok(r) = parse_response(data, &sent) {
            assert!(r.records.len() <= DNS_ANSWER_RECORDS_MAX);
            if let Some(Record::A { owner, .. } | Record::Cname { owner, .. }) = r.records.first() {
                let _ = chain_addresses(owner, &r.records);
            }
        }
    }
    // The same bytes as a guest's TCP stream: frames, each a query.
    let mut rest = data;
    while let Ok(Some((msg, used))) = split_frame(rest, DNS_QUERY_LEN_MAX) {
        assert!(msg.len() <= DNS_QUERY_LEN_MAX && used == msg.len() + 2);
        let _ = parse_query(msg);
        let _ = error_reply(msg, RCODE_REFUSED);
        rest = &rest[used..];
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(p) = DomainPattern::parse(text) {
            let _ = p.matches(text);
            assert_eq!(DomainPattern::parse(&p.to_string()).ok(), Some(p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` (dotted) of type A, with an optional EDNS size.
    fn query(id: u16, name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&[0, 1, 0, 1]);
        if let Some(size) = edns {
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0, 0, 0, 4, 0, 10, 0, 0]); // one (cookie) option
        }
        m
    }

    /// A response to `sent` with `records` (owner offset 12 = the question name via a
    /// pointer when `owner` is None).
    fn response(sent: &[u8], answers: &[(&str, u16, u32, Vec<u8>)]) -> Vec<u8> {
        let q = read_name(sent, HEADER_LEN).unwrap();
        let mut m = sent[..q.end + 4].to_vec();
        m[2] |= 0x80;
        m[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        m[10..12].copy_from_slice(&[0, 0]);
        for (owner, ty, ttl, rdata) in answers {
            if owner.is_empty() {
                m.extend_from_slice(&[0xc0, 12]);
            } else {
                for label in owner.split('.') {
                    m.push(label.len() as u8);
                    m.extend_from_slice(label.as_bytes());
                }
                m.push(0);
            }
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&CLASS_IN.to_be_bytes());
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        m
    }

    fn name_wire(name: &str) -> Vec<u8> {
        let mut w = Vec::new();
        for label in name.split('.') {
            w.push(label.len() as u8);
            w.extend_from_slice(label.as_bytes());
        }
        w.push(0);
        w
    }

    #[test]
    fn query_round_trip_drops_guest_extras() {
        let m = query(7, "WWW.Example.com", Some(4096));
        let q = parse_query(&m).unwrap();
        assert_eq!(q.id, 7);
        assert!(q.rd);
        assert_eq!(q.name, "www.example.com");
        assert_eq!(q.qtype, TYPE_A);
        assert_eq!(q.edns_udp, Some(4096));
        let up = build_query(99, &q);
        let q2 = parse_query(&up).unwrap();
        assert_eq!(q2.id, 99);
        assert_eq!(q2.qname_wire, q.qname_wire); // case kept for the upstream
        assert_eq!(q2.edns_udp, Some(DNS_EDNS_UDP_PAYLOAD_MAX)); // clamped
        assert!(
            up.len() < m.len(),
            "the guest's EDNS option is not forwarded"
        );
        let plain = parse_query(&query(1, "a.b", None)).unwrap();
        assert_eq!(build_query(1, &plain).len(), HEADER_LEN + 5 + 4);
    }

    #[test]
    fn bad_queries_are_typed_errors() {
        let good = query(1, "example.com", None);
        let mut answer = good.clone();
        answer[2] |= 0x80;
        assert_eq!(parse_query(&answer), Err(DnsError::NotQuery("QR set")));
        let mut two = good.clone();
        two[5] = 2;
        assert!(matches!(parse_query(&two), Err(DnsError::NotQuery(_))));
        let mut notify = good.clone();
        notify[2] = 0x20;
        assert!(matches!(parse_query(&notify), Err(DnsError::NotQuery(_))));
        assert_eq!(parse_query(&good[..15]), Err(DnsError::Truncated));
        assert_eq!(parse_query(&good[..5]), Err(DnsError::Truncated));
        assert!(matches!(
            parse_query(&query(1, "a b.com", None)),
            Err(DnsError::NotHostName)
        ));
        assert!(matches!(
            parse_query(&query(1, "a.b.com", None).repeat(50)),
            Err(DnsError::TooLong { .. })
        ));
        // A label over 63 bytes is a reserved label type (0x40 set).
        let mut long = good[..HEADER_LEN].to_vec();
        long.push(64);
        long.extend_from_slice(&[b'a'; 64]);
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(matches!(parse_query(&long), Err(DnsError::BadName(_))));
        // A name over 255 bytes.
        let big = ["a".repeat(63).as_str(); 5].join(".");
        assert!(matches!(
            parse_query(&query(1, &big, None)),
            Err(DnsError::BadName(_))
        ));
    }

    #[test]
    fn pointers_only_backwards_and_bounded() {
        // A pointer to itself.
        let mut m = query(1, "x", None)[..HEADER_LEN].to_vec();
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(read_name(&m, 12), Err(DnsError::BadName(_))));
        // A forward pointer.
        let mut m = vec![0u8; HEADER_LEN];
        m.extend_from_slice(&[0xc0, 20, 0, 0, 0, 0, 0, 0, 1, b'a', 0]);
        assert!(matches!(read_name(&m, 12), Err(DnsError::BadName(_))));
        // A chain of backward pointers longer than the bound.
        let mut m = vec![0u8; HEADER_LEN];
        m.push(0); // offset 12: root
        for i in 0..(DNS_POINTER_JUMPS_MAX + 1) {
            let target = if i == 0 { 12 } else { 13 + 2 * (i - 1) };
            m.extend_from_slice(&[0xc0 | (target >> 8) as u8, target as u8]);
        }
        let last = m.len() - 2;
        assert!(matches!(read_name(&m, last), Err(DnsError::BadName(_))));
        assert!(read_name(&m, last - 2).is_ok());
    }

    #[test]
    fn responses_and_cname_chains() {
        let q = parse_query(&query(5, "www.example.com", None)).unwrap();
        let sent = build_query(0xbeef, &q);
        let r = response(
            &sent,
            &[
                ("", TYPE_CNAME, 300, name_wire("edge.cdn.net")),
                ("edge.cdn.net", TYPE_CNAME, 60, name_wire("e1.cdn.net")),
                ("e1.cdn.net", TYPE_A, 600, vec![203, 0, 113, 7]),
                ("e1.cdn.net", TYPE_A, 20, vec![203, 0, 113, 8]),
                ("other.net", TYPE_A, 600, vec![198, 51, 100, 1]),
            ],
        );
        let parsed = parse_response(&r, &sent).unwrap();
        assert_eq!(parsed.rcode, 0);
        assert_eq!(parsed.records.len(), 5);
        let addrs = chain_addresses("www.example.com", &parsed.records);
        assert_eq!(
            addrs,
            vec![
                (Ipv4Addr::new(203, 0, 113, 7), 60),
                (Ipv4Addr::new(203, 0, 113, 8), 20)
            ]
        );
        // A record for a name off the chain is never taken.
        assert!(chain_addresses("x.example.com", &parsed.records).is_empty());

        // Wrong id, not a response, another question.
        let mut wrong = r.clone();
        wrong[1] ^= 1;
        assert_eq!(parse_response(&wrong, &sent), Err(DnsError::Mismatch("id")));
        let mut q_only = r.clone();
        q_only[2] &= 0x7f;
        assert!(matches!(
            parse_response(&q_only, &sent),
            Err(DnsError::Mismatch(_))
        ));
        let other = build_query(0xbeef, &parse_query(&query(5, "evil.com", None)).unwrap());
        assert!(matches!(
            parse_response(&r, &other),
            Err(DnsError::Mismatch(_))
        ));
        // An A record of 5 bytes, and a record running past the message.
        let bad = response(&sent, &[("", TYPE_A, 1, vec![1, 2, 3, 4, 5])]);
        assert!(matches!(
            parse_response(&bad, &sent),
            Err(DnsError::BadRecord(_))
        ));
        assert_eq!(
            parse_response(&r[..r.len() - 1], &sent),
            Err(DnsError::Truncated)
        );
    }

    #[test]
    fn cname_loops_end() {
        let q = parse_query(&query(5, "a.example.com", None)).unwrap();
        let sent = build_query(1, &q);
        let r = response(
            &sent,
            &[
                ("", TYPE_CNAME, 300, name_wire("b.example.com")),
                ("b.example.com", TYPE_CNAME, 300, name_wire("a.example.com")),
            ],
        );
        let parsed = parse_response(&r, &sent).unwrap();
        assert!(chain_addresses("a.example.com", &parsed.records).is_empty());
    }

    #[test]
    fn too_many_records() {
        let q = parse_query(&query(5, "a.example.com", None)).unwrap();
        let sent = build_query(1, &q);
        let many: Vec<(&str, u16, u32, Vec<u8>)> = (0..=DNS_ANSWER_RECORDS_MAX)
            .map(|i| ("", TYPE_A, 60, vec![192, 0, 2, i as u8]))
            .collect();
        let r = response(&sent, &many);
        assert!(matches!(
            parse_response(&r, &sent),
            Err(DnsError::TooManyRecords { .. })
        ));
    }

    #[test]
    fn error_replies_echo_the_question() {
        let m = query(0x4242, "blocked.example", Some(1232));
        let r = error_reply(&m, RCODE_REFUSED).unwrap();
        assert_eq!(&r[0..2], &[0x42, 0x42]);
        assert_eq!(r[3] & 0xf, RCODE_REFUSED);
        assert_ne!(r[2] & 0x80, 0);
        assert_eq!(&r[4..6], &[0, 1]);
        assert_eq!(&r[HEADER_LEN..], &m[HEADER_LEN..HEADER_LEN + 17 + 4]);
        let mut answer = m.clone();
        answer[2] |= 0x80;
        assert_eq!(error_reply(&answer, RCODE_REFUSED), None);
        assert_eq!(error_reply(&m[..3], RCODE_REFUSED), None);
    }

    #[test]
    fn tcp_frames() {
        let q = query(3, "a.example.com", None);
        let mut stream = (q.len() as u16).to_be_bytes().to_vec();
        stream.extend_from_slice(&q);
        stream.extend_from_slice(&[0, 40, 1]);
        let (msg, used) = split_frame(&stream, DNS_QUERY_LEN_MAX).unwrap().unwrap();
        assert_eq!((msg, used), (&q[..], q.len() + 2));
        assert_eq!(split_frame(&stream[used..], DNS_QUERY_LEN_MAX), Ok(None));
        assert_eq!(split_frame(&stream[..1], DNS_QUERY_LEN_MAX), Ok(None));
        assert_eq!(
            split_frame(&[0x02, 0x01], DNS_QUERY_LEN_MAX),
            Err(DnsError::TooLong { len: 513 })
        );
        assert_eq!(frame_len([0, 0], 512), Err(DnsError::Truncated));
        assert_eq!(frame_len([0xff, 0xff], usize::from(u16::MAX)), Ok(65535));
    }

    #[test]
    fn ttl_bounds() {
        assert_eq!(clamp_ttl(0), DNS_TTL_MIN);
        assert_eq!(clamp_ttl(u32::MAX), DNS_TTL_MAX);
        assert_eq!(clamp_ttl(300), Duration::from_secs(300));
    }

    /// A seeded generator of mutated messages: the parsers never panic on them.
    #[test]
    fn mutated_messages_never_panic() {
        let seed: u64 = std::env::var("WRENN_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_d115);
        println!("seed {seed} (WRENN_SEED replays)");
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let q = parse_query(&query(5, "www.example.com", Some(1232))).unwrap();
        let sent = build_query(1, &q);
        let base = response(
            &sent,
            &[
                ("", TYPE_CNAME, 300, vec![0xc0, 12]),
                ("", TYPE_A, 60, vec![1, 2, 3, 4]),
            ],
        );
        for _ in 0..20_000 {
            let mut m = if next() % 2 == 0 {
                base.clone()
            } else {
                sent.clone()
            };
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % m.len();
                m[at] = next() as u8;
            }
            if next() % 5 == 0 {
                let cut = (next() as usize) % m.len();
                m.truncate(cut);
            }
            fuzz_dns_message(&m);
        }
    }
}

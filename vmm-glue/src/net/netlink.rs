//! A small netlink client: links, IPv4 addresses and routes over a NETLINK_ROUTE socket,
//! and elements of nftables sets over a NETLINK_NETFILTER socket (the DNS resolver adds the
//! addresses it lets a guest reach without spawning `nft` per answer).
//!
//! Only what network slots need. Every request carries a fresh sequence number and asks for
//! an acknowledgement, so each call ends with the kernel's verdict for that request:
//! `NLMSG_ERROR` with error 0 (done) or a negative errno (a typed [`Error::Kernel`], with
//! the kernel's extended-ack text when it sent one). Replies with another sequence number
//! (left over from an earlier, failed call) are skipped. Receives are bounded in size,
//! count and time.
//!
//! The socket lives in the network namespace of the thread that opened it, so code that
//! works inside a slot's namespace opens its own [`Netlink`] on a thread that entered it
//! (see `netns::run_in`).
//!
//! Messages are encoded and decoded field by field with native-endian integers (netlink is
//! host-endian); the `repr(C)` structs document the kernel's layout and their sizes are
//! asserted at compile time against the encoded lengths.

use std::fmt;
use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::limits::{
    IFNAME_LEN_MAX, NETLINK_DATAGRAMS_MAX, NETLINK_DUMP_RETRIES_MAX, NETLINK_RECV_BUFFER_LEN,
    NETLINK_RECV_TIMEOUT, NETLINK_REQUEST_LEN_MAX,
};

// ---- protocol constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h) ----

const NETLINK_ROUTE: i32 = 0;
const NETLINK_NETFILTER: i32 = 12;
const SOL_NETLINK: i32 = 270;
const NETLINK_EXT_ACK: i32 = 11;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
/// On an ack: the echoed request was cut to its header.
const NLM_F_CAPPED: u16 = 0x100;
/// On an ack: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
/// IFLA_EXT_MASK value: leave the (large) statistics out of link replies.
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

// linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFPROTO_IPV4: u8 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
/// Set on a nested attribute's type (nf_tables checks it).
const NLA_F_NESTED: u16 = 0x8000;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;

/// Netlink aligns every message and attribute to 4 bytes.
const ALIGN: usize = 4;
const fn align(len: usize) -> usize {
    (len + ALIGN - 1) & !(ALIGN - 1)
}

// ---- kernel structures ----

/// `struct nlmsghdr`.
#[repr(C)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}
const NLMSGHDR_LEN: usize = 16;
const _: () = assert!(size_of::<NlMsgHdr>() == NLMSGHDR_LEN);

/// `struct nlmsgerr`: the errno (negative, or 0 for an ack) and the request's header.
#[repr(C)]
struct NlMsgErr {
    error: i32,
    msg: NlMsgHdr,
}
const NLMSGERR_LEN: usize = 20;
const _: () = assert!(size_of::<NlMsgErr>() == NLMSGERR_LEN);

/// `struct ifinfomsg`.
#[repr(C)]
struct IfInfoMsg {
    family: u8,
    pad: u8,
    ty: u16,
    index: i32,
    flags: u32,
    change: u32,
}
const IFINFOMSG_LEN: usize = 16;
const _: () = assert!(size_of::<IfInfoMsg>() == IFINFOMSG_LEN);

/// `struct ifaddrmsg`.
#[repr(C)]
struct IfAddrMsg {
    family: u8,
    prefix_len: u8,
    flags: u8,
    scope: u8,
    index: u32,
}
const IFADDRMSG_LEN: usize = 8;
const _: () = assert!(size_of::<IfAddrMsg>() == IFADDRMSG_LEN);

/// `struct rtmsg`.
#[repr(C)]
struct RtMsg {
    family: u8,
    dst_len: u8,
    src_len: u8,
    tos: u8,
    table: u8,
    protocol: u8,
    scope: u8,
    ty: u8,
    flags: u32,
}
const RTMSG_LEN: usize = 12;
const _: () = assert!(size_of::<RtMsg>() == RTMSG_LEN);

/// `struct rtattr` (same layout as `struct nlattr`).
#[repr(C)]
struct RtAttr {
    len: u16,
    ty: u16,
}
const RTATTR_LEN: usize = 4;
const _: () = assert!(size_of::<RtAttr>() == RTATTR_LEN);

impl IfInfoMsg {
    fn zeroed() -> Self {
        IfInfoMsg {
            family: AF_UNSPEC,
            pad: 0,
            ty: 0,
            index: 0,
            flags: 0,
            change: 0,
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.family);
        out.push(self.pad);
        out.extend_from_slice(&self.ty.to_ne_bytes());
        out.extend_from_slice(&self.index.to_ne_bytes());
        out.extend_from_slice(&self.flags.to_ne_bytes());
        out.extend_from_slice(&self.change.to_ne_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..IFINFOMSG_LEN)?;
        Some(IfInfoMsg {
            family: b[0],
            pad: b[1],
            ty: u16::from_ne_bytes([b[2], b[3]]),
            index: i32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            change: u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
        })
    }
}

impl IfAddrMsg {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.family, self.prefix_len, self.flags, self.scope]);
        out.extend_from_slice(&self.index.to_ne_bytes());
    }
}

impl RtMsg {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[
            self.family,
            self.dst_len,
            self.src_len,
            self.tos,
            self.table,
            self.protocol,
            self.scope,
            self.ty,
        ]);
        out.extend_from_slice(&self.flags.to_ne_bytes());
    }
}

impl NlMsgHdr {
    fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..NLMSGHDR_LEN)?;
        Some(NlMsgHdr {
            len: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            ty: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            pid: u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
        })
    }
}

// ---- errors ----

/// What went wrong talking to the kernel.
#[derive(Debug)]
pub enum Error {
    /// Creating, configuring or binding the socket failed.
    Socket(io::Error),
    /// `send` failed or sent less than the whole request.
    Send(io::Error),
    /// `recv` failed.
    Recv(io::Error),
    /// No answer within [`NETLINK_RECV_TIMEOUT`].
    Timeout,
    /// The kernel refused the request.
    Kernel {
        /// Positive errno (`libc::EEXIST`, `libc::ENODEV`, ...).
        errno: i32,
        /// The kernel's extended-ack explanation, when it gave one.
        message: Option<String>,
    },
    /// A datagram larger than the receive buffer.
    Truncated { len: usize },
    /// Bytes that do not parse as netlink.
    Malformed(&'static str),
    /// More datagrams than [`NETLINK_DATAGRAMS_MAX`] for one request, or a dump that kept
    /// being interrupted.
    TooManyReplies,
    /// An interface name Linux would refuse (empty, over 15 bytes, `/`, whitespace, NUL).
    InvalidName(String),
}

impl Error {
    /// The kernel's errno, if the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Socket(_) => write!(f, "open netlink socket"),
            Error::Send(_) => write!(f, "send netlink request"),
            Error::Recv(_) => write!(f, "receive netlink reply"),
            Error::Timeout => write!(f, "no netlink reply within {NETLINK_RECV_TIMEOUT:?}"),
            Error::Kernel { errno, message } => {
                let text = io::Error::from_raw_os_error(*errno);
                match message {
                    Some(m) => write!(f, "kernel refused request: {text} ({m})"),
                    None => write!(f, "kernel refused request: {text}"),
                }
            }
            Error::Truncated { len } => write!(f, "netlink datagram of {len} bytes truncated"),
            Error::Malformed(why) => write!(f, "malformed netlink reply: {why}"),
            Error::TooManyReplies => write!(f, "too many netlink replies for one request"),
            Error::InvalidName(n) => write!(f, "invalid interface name {n:?}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Socket(e) | Error::Send(e) | Error::Recv(e) => Some(e),
            _ => None,
        }
    }
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
pub fn check_ifname(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_LEN_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_owned()))
    }
}

// ---- request building ----

/// One request under construction: header, fixed struct, attributes.
struct Request {
    buf: Vec<u8>,
}

impl Request {
    fn new(ty: u16, flags: u16) -> Self {
        let mut buf = Vec::with_capacity(256);
        // Length and sequence number are filled in by `finish`.
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        debug_assert_eq!(buf.len(), NLMSGHDR_LEN);
        Request { buf }
    }

    fn pad(&mut self) {
        self.buf.resize(align(self.buf.len()), 0);
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) {
        let len = RTATTR_LEN + payload.len();
        assert!(len <= usize::from(u16::MAX), "attribute too long");
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    /// A NUL-terminated string attribute (IFLA_IFNAME, IFLA_INFO_KIND).
    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v);
    }

    /// Opens a nested attribute; returns where its header is, for `nest_end`.
    fn nest_start(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        at
    }

    /// `struct nfgenmsg`: family, version 0, resource id (big-endian).
    fn nfgen(&mut self, family: u8, res_id: u16) {
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    fn nest_end(&mut self, at: usize) {
        let len = self.buf.len() - at;
        assert!(len <= usize::from(u16::MAX), "nested attribute too long");
        self.buf[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    }

    /// Fills in the length and the sequence number.
    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len();
        assert!(
            len <= NETLINK_REQUEST_LEN_MAX,
            "netlink request of {len} bytes"
        );
        self.buf[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

// ---- reply parsing (pure, so tests can feed it any bytes) ----

/// One message of a datagram: its header fields and the bytes after the header.
#[derive(Debug)]
struct Message<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a datagram into messages; fails on any length that does not add up.
fn parse_messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, Error> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let hdr = NlMsgHdr::decode(buf).ok_or(Error::Malformed("short message header"))?;
        let len = hdr.len as usize;
        if len < NLMSGHDR_LEN || len > buf.len() {
            return Err(Error::Malformed("message length out of bounds"));
        }
        out.push(Message {
            ty: hdr.ty,
            flags: hdr.flags,
            seq: hdr.seq,
            payload: &buf[NLMSGHDR_LEN..len],
        });
        // The last message may lack its alignment padding.
        buf = &buf[align(len).min(buf.len())..];
    }
    Ok(out)
}

/// Iterates over the attributes in `buf`; stops with an error on a bad length.
fn parse_attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, Error> {
    let mut out = Vec::new();
    while buf.len() >= RTATTR_LEN {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        // The top bits of the type are the NESTED / BYTEORDER flags.
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < RTATTR_LEN || len > buf.len() {
            return Err(Error::Malformed("attribute length out of bounds"));
        }
        out.push((ty, &buf[RTATTR_LEN..len]));
        buf = &buf[align(len).min(buf.len())..];
    }
    Ok(out)
}

/// A string attribute without its NUL terminator.
fn attr_string(payload: &[u8]) -> Result<String, Error> {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    String::from_utf8(payload[..end].to_vec())
        .map_err(|_| Error::Malformed("string attribute not UTF-8"))
}

/// Decodes an `NLMSG_ERROR` payload: `Ok(())` for an ack, the typed error otherwise.
fn parse_error(flags: u16, payload: &[u8]) -> Result<(), Error> {
    let b = payload
        .get(..4)
        .ok_or(Error::Malformed("short error message"))?;
    let error = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    if error == 0 {
        return Ok(());
    }
    if error > 0 || error == i32::MIN {
        return Err(Error::Malformed("error code not a negative errno"));
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // After the errno comes our request: its header only when capped, else all of it.
        let echoed = if flags & NLM_F_CAPPED != 0 {
            NLMSGHDR_LEN
        } else {
            let hdr = payload.get(4..).and_then(NlMsgHdr::decode);
            hdr.map_or(NLMSGHDR_LEN, |h| (h.len as usize).max(NLMSGHDR_LEN))
        };
        let tlvs = payload.get(4 + align(echoed)..).unwrap_or(&[]);
        for (ty, value) in parse_attrs(tlvs).unwrap_or_default() {
            if ty == NLMSGERR_ATTR_MSG {
                message = attr_string(value).ok();
            }
        }
    }
    Err(Error::Kernel {
        errno: -error,
        message,
    })
}

/// A network interface as a link dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` ("veth", "tun", ...), absent for physical devices and loopback.
    pub kind: Option<String>,
    pub up: bool,
}

fn parse_link(payload: &[u8]) -> Result<Link, Error> {
    let info = IfInfoMsg::decode(payload).ok_or(Error::Malformed("short ifinfomsg"))?;
    let index = u32::try_from(info.index).map_err(|_| Error::Malformed("negative ifindex"))?;
    let mut name = None;
    let mut kind = None;
    for (ty, value) in parse_attrs(&payload[IFINFOMSG_LEN..])? {
        match ty {
            IFLA_IFNAME => name = Some(attr_string(value)?),
            IFLA_LINKINFO => {
                for (ty, value) in parse_attrs(value)? {
                    if ty == IFLA_INFO_KIND {
                        kind = Some(attr_string(value)?);
                    }
                }
            }
            _ => {}
        }
    }
    let name = name.ok_or(Error::Malformed("link without a name"))?;
    Ok(Link {
        index,
        name,
        kind,
        up: info.flags & IFF_UP != 0,
    })
}

// ---- the socket ----

/// An rtnetlink socket in the network namespace of the thread that opened it.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Box<[u8]>,
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink")
            .field("fd", &self.fd)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Netlink {
    /// Opens and binds a NETLINK_ROUTE socket with a receive timeout and extended acks.
    pub fn open() -> Result<Self, Error> {
        Self::open_protocol(NETLINK_ROUTE)
    }

    /// Opens a NETLINK_NETFILTER socket, for [`Netlink::add_set_elements_v4`].
    pub fn open_netfilter() -> Result<Self, Error> {
        Self::open_protocol(NETLINK_NETFILTER)
    }

    fn open_protocol(protocol: i32) -> Result<Self, Error> {
        // SAFETY: plain syscall with constant arguments; the result is checked below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if raw < 0 {
            return Err(Error::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // Extended acks give a readable reason with an errno; old kernels lack them, which
        // only costs the text, so a failure here is ignored.
        let one: libc::c_int = 1;
        // SAFETY: `one` outlives the call and its size is passed with it.
        let _ = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_EXT_ACK,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };

        let tv = libc::timeval {
            tv_sec: NETLINK_RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(NETLINK_RECV_TIMEOUT.subsec_micros() as i32),
        };
        // SAFETY: `tv` outlives the call and its size is passed with it.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Error::Socket(io::Error::last_os_error()));
        }

        // SAFETY: sockaddr_nl is plain data; all zeros is a valid value (pid 0 = let the
        // kernel pick our port id, no multicast groups).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and its size is passed with it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Error::Socket(io::Error::last_os_error()));
        }
        Ok(Netlink {
            fd,
            seq: 0,
            buf: vec![0u8; NETLINK_RECV_BUFFER_LEN].into_boxed_slice(),
        })
    }

    fn send(&mut self, req: Request) -> Result<u32, Error> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = req.finish(seq);
        self.send_bytes(&bytes)?;
        Ok(seq)
    }

    /// Sends `reqs` as one datagram (an nfnetlink batch); returns the sequence number of
    /// each.
    fn send_batch(&mut self, reqs: Vec<Request>) -> Result<Vec<u32>, Error> {
        let mut bytes = Vec::new();
        let mut seqs = Vec::with_capacity(reqs.len());
        for req in reqs {
            self.seq = self.seq.wrapping_add(1);
            seqs.push(self.seq);
            bytes.extend_from_slice(&req.finish(self.seq));
        }
        if bytes.len() > NETLINK_REQUEST_LEN_MAX {
            return Err(Error::Malformed("batch over the request bound"));
        }
        self.send_bytes(&bytes)?;
        Ok(seqs)
    }

    fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        // SAFETY: sockaddr_nl is plain data; all zeros with the family set addresses the
        // kernel (pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `bytes` and `kernel` outlive the call; their lengths are passed with them.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(Error::Send(io::Error::last_os_error()));
        }
        if n as usize != bytes.len() {
            return Err(Error::Send(io::Error::new(
                io::ErrorKind::WriteZero,
                "short netlink send",
            )));
        }
        Ok(())
    }

    /// Receives one datagram from the kernel into `self.buf`; returns its length.
    fn recv(&mut self) -> Result<usize, Error> {
        loop {
            // SAFETY: sockaddr_nl is plain data; all zeros is a valid value.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut from_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: `self.buf` is valid for its length; `from`/`from_len` are valid
            // out-parameters. MSG_TRUNC makes the call return the datagram's real length.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => Err(Error::Timeout),
                    _ => Err(Error::Recv(e)),
                };
            }
            let n = n as usize;
            if n > self.buf.len() {
                return Err(Error::Truncated { len: n });
            }
            // Only the kernel (port 0) answers rtnetlink requests; anything else is noise.
            if from.nl_pid != 0 {
                continue;
            }
            return Ok(n);
        }
    }

    /// Sends `req` with NLM_F_ACK and waits for the kernel's verdict on it. Replies other
    /// than the ack (an echo) are handed to `on_reply`.
    fn transact(
        &mut self,
        req: Request,
        mut on_reply: impl FnMut(u16, &[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let seq = self.send(req)?;
        self.wait_ack(seq, &mut on_reply)
    }

    /// Waits for the kernel's verdict on request `seq`.
    fn wait_ack(
        &mut self,
        seq: u32,
        on_reply: &mut impl FnMut(u16, &[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        for _ in 0..NETLINK_DATAGRAMS_MAX {
            let n = self.recv()?;
            for m in parse_messages(&self.buf[..n])? {
                if m.seq != seq {
                    continue; // left over from an earlier request that timed out
                }
                match m.ty {
                    NLMSG_ERROR => return parse_error(m.flags, m.payload),
                    NLMSG_OVERRUN => return Err(Error::Malformed("receive buffer overrun")),
                    ty => on_reply(ty, m.payload)?,
                }
            }
        }
        Err(Error::TooManyReplies)
    }

    /// Sends a request that must only be acknowledged.
    fn ack(&mut self, req: Request) -> Result<(), Error> {
        self.transact(req, |_, _| Ok(()))
    }

    /// Runs a dump request built by `build` and hands each reply of type `ty` to `each`.
    /// An interrupted dump (the table changed meanwhile) is restarted from scratch.
    fn dump(
        &mut self,
        build: impl Fn() -> Request,
        ty: u16,
        mut each: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        for _ in 0..=NETLINK_DUMP_RETRIES_MAX {
            let mut items: Vec<Vec<u8>> = Vec::new();
            let mut interrupted = false;
            let seq = self.send(build())?;
            let mut done = false;
            for _ in 0..NETLINK_DATAGRAMS_MAX {
                let n = self.recv()?;
                for m in parse_messages(&self.buf[..n])? {
                    if m.seq != seq {
                        continue;
                    }
                    if m.flags & NLM_F_DUMP_INTR != 0 {
                        interrupted = true;
                    }
                    match m.ty {
                        NLMSG_DONE => done = true,
                        NLMSG_ERROR => parse_error(m.flags, m.payload)?,
                        NLMSG_OVERRUN => return Err(Error::Malformed("receive buffer overrun")),
                        t if t == ty && m.flags & NLM_F_MULTI != 0 => {
                            items.push(m.payload.to_vec())
                        }
                        _ => {}
                    }
                }
                if done {
                    break;
                }
            }
            if !done {
                return Err(Error::TooManyReplies);
            }
            if !interrupted {
                for item in &items {
                    each(item)?;
                }
                return Ok(());
            }
        }
        Err(Error::TooManyReplies)
    }

    // ---- links ----

    /// Every link in this namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, Error> {
        let mut out = Vec::new();
        let build = || {
            let mut req = Request::new(RTM_GETLINK, NLM_F_DUMP);
            IfInfoMsg::zeroed().encode(&mut req.buf);
            req.attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
            req
        };
        self.dump(build, RTM_NEWLINK, |payload| {
            out.push(parse_link(payload)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The link called `name`, or `None` if there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, Error> {
        check_ifname(name)?;
        let mut req = Request::new(RTM_GETLINK, NLM_F_ACK);
        IfInfoMsg::zeroed().encode(&mut req.buf);
        req.attr_str(IFLA_IFNAME, name);
        req.attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
        let mut found = None;
        let result = self.transact(req, |ty, payload| {
            if ty == RTM_NEWLINK {
                found = Some(parse_link(payload)?);
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(found),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The index of the link called `name`; ENODEV as a kernel error if there is none.
    pub fn link_index(&mut self, name: &str) -> Result<u32, Error> {
        match self.link_by_name(name)? {
            Some(link) => Ok(link.index),
            None => Err(Error::Kernel {
                errno: libc::ENODEV,
                message: Some(format!("no link {name}")),
            }),
        }
    }

    /// Creates a veth pair `name` <-> `peer`. With `peer_netns` the peer is created
    /// directly in that namespace, so its name never collides with a host link.
    /// Fails with EEXIST if `name` exists.
    pub fn create_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_netns: Option<BorrowedFd<'_>>,
    ) -> Result<(), Error> {
        check_ifname(name)?;
        check_ifname(peer)?;
        let mut req = Request::new(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        IfInfoMsg::zeroed().encode(&mut req.buf);
        req.attr_str(IFLA_IFNAME, name);
        let info = req.nest_start(IFLA_LINKINFO);
        req.attr_str(IFLA_INFO_KIND, "veth");
        let data = req.nest_start(IFLA_INFO_DATA);
        let peer_at = req.nest_start(VETH_INFO_PEER);
        // VETH_INFO_PEER holds a whole ifinfomsg followed by the peer's own attributes.
        IfInfoMsg::zeroed().encode(&mut req.buf);
        req.attr_str(IFLA_IFNAME, peer);
        if let Some(ns) = peer_netns {
            req.attr_u32(IFLA_NET_NS_FD, ns.as_raw_fd() as u32);
        }
        req.nest_end(peer_at);
        req.nest_end(data);
        req.nest_end(info);
        self.ack(req)
    }

    /// Deletes the link called `name` (with a veth, its peer goes too). Returns false if
    /// there was no such link, so deleting twice is not an error.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, Error> {
        check_ifname(name)?;
        let mut req = Request::new(RTM_DELLINK, NLM_F_ACK);
        IfInfoMsg::zeroed().encode(&mut req.buf);
        req.attr_str(IFLA_IFNAME, name);
        match self.ack(req) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets the link administratively up or down.
    pub fn set_up(&mut self, index: u32, up: bool) -> Result<(), Error> {
        let mut req = Request::new(RTM_NEWLINK, NLM_F_ACK);
        let mut info = IfInfoMsg::zeroed();
        info.index = index_i32(index)?;
        info.flags = if up { IFF_UP } else { 0 };
        info.change = IFF_UP;
        info.encode(&mut req.buf);
        self.ack(req)
    }

    /// Moves the link into the namespace `netns` (an open `/run/netns/NAME` or
    /// `/proc/PID/ns/net`). Its index there may differ.
    pub fn move_to_netns(&mut self, index: u32, netns: BorrowedFd<'_>) -> Result<(), Error> {
        let mut req = Request::new(RTM_NEWLINK, NLM_F_ACK);
        let mut info = IfInfoMsg::zeroed();
        info.index = index_i32(index)?;
        info.encode(&mut req.buf);
        req.attr_u32(IFLA_NET_NS_FD, netns.as_raw_fd() as u32);
        self.ack(req)
    }

    // ---- addresses and routes ----

    /// Adds `addr/prefix_len` to the link; adding the same address again is not an error.
    pub fn add_address_v4(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), Error> {
        assert!(prefix_len <= 32, "IPv4 prefix length {prefix_len}");
        let mut req = Request::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE);
        IfAddrMsg {
            family: AF_INET,
            prefix_len,
            flags: 0,
            scope: RT_SCOPE_UNIVERSE,
            index,
        }
        .encode(&mut req.buf);
        req.attr(IFA_LOCAL, &addr.octets());
        req.attr(IFA_ADDRESS, &addr.octets());
        self.ack(req)
    }

    /// Adds (or replaces) a route in the main table: to `dst` (None = default route)
    /// through `gateway` (None = directly on the link) out of link `oif`.
    pub fn add_route_v4(
        &mut self,
        dst: Option<(Ipv4Addr, u8)>,
        gateway: Option<Ipv4Addr>,
        oif: u32,
    ) -> Result<(), Error> {
        let dst_len = dst.map_or(0, |(_, len)| len);
        assert!(dst_len <= 32, "IPv4 prefix length {dst_len}");
        let mut req = Request::new(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE);
        RtMsg {
            family: AF_INET,
            dst_len,
            src_len: 0,
            tos: 0,
            table: RT_TABLE_MAIN,
            protocol: RTPROT_STATIC,
            // A route without a gateway reaches hosts on the link itself.
            scope: if gateway.is_some() {
                RT_SCOPE_UNIVERSE
            } else {
                RT_SCOPE_LINK
            },
            ty: RTN_UNICAST,
            flags: 0,
        }
        .encode(&mut req.buf);
        if let Some((addr, len)) = dst {
            if len > 0 {
                req.attr(RTA_DST, &addr.octets());
            }
        }
        if let Some(gw) = gateway {
            req.attr(RTA_GATEWAY, &gw.octets());
        }
        req.attr_u32(RTA_OIF, oif);
        self.ack(req)
    }
}

impl Netlink {
    // ---- nftables sets (NETLINK_NETFILTER sockets only) ----

    /// Adds `elems` (address, timeout) to the IPv4 set `set` of table `ip table`, in one
    /// transaction: all or none. An element already there gets the new timeout. A full set
    /// is the kernel's ENFILE.
    pub fn add_set_elements_v4(
        &mut self,
        table: &str,
        set: &str,
        elems: &[(Ipv4Addr, std::time::Duration)],
    ) -> Result<(), Error> {
        if elems.is_empty() {
            return Ok(());
        }
        let mut begin = Request::new(NFNL_MSG_BATCH_BEGIN, 0);
        begin.nfgen(AF_UNSPEC, NFNL_SUBSYS_NFTABLES);
        let mut add = Request::new(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
            NLM_F_ACK | NLM_F_CREATE,
        );
        add.nfgen(NFPROTO_IPV4, 0);
        add.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
        add.attr_str(NFTA_SET_ELEM_LIST_SET, set);
        let list = add.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED);
        for (addr, timeout) in elems {
            let elem = add.nest_start(NFTA_LIST_ELEM | NLA_F_NESTED);
            let key = add.nest_start(NFTA_SET_ELEM_KEY | NLA_F_NESTED);
            add.attr(NFTA_DATA_VALUE, &addr.octets());
            add.nest_end(key);
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            add.attr(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
            add.nest_end(elem);
        }
        add.nest_end(list);
        let mut end = Request::new(NFNL_MSG_BATCH_END, 0);
        end.nfgen(AF_UNSPEC, NFNL_SUBSYS_NFTABLES);
        let seqs = self.send_batch(vec![begin, add, end])?;
        self.wait_ack(seqs[1], &mut |_, _| Ok(()))
    }
}

fn index_i32(index: u32) -> Result<i32, Error> {
    i32::try_from(index).map_err(|_| Error::Malformed("interface index over i32::MAX"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_request_bytes() {
        // The exact bytes of `ip link add a type veth peer name b` without the namespace.
        let mut req = Request::new(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        IfInfoMsg::zeroed().encode(&mut req.buf);
        req.attr_str(IFLA_IFNAME, "a");
        let info = req.nest_start(IFLA_LINKINFO);
        req.attr_str(IFLA_INFO_KIND, "veth");
        let data = req.nest_start(IFLA_INFO_DATA);
        let peer = req.nest_start(VETH_INFO_PEER);
        IfInfoMsg::zeroed().encode(&mut req.buf);
        req.attr_str(IFLA_IFNAME, "b");
        req.nest_end(peer);
        req.nest_end(data);
        req.nest_end(info);
        let b = req.finish(7);
        // header 16 + ifinfomsg 16 + ifname 8 + linkinfo(4 + kind 12 + data(4 + peer(4 + 16 + 8)))
        assert_eq!(b.len(), 16 + 16 + 8 + 4 + 12 + 4 + 4 + 16 + 8);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), RTM_NEWLINK);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), 0x605);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        // IFLA_IFNAME "a\0" padded to 8.
        assert_eq!(&b[32..40], &[6, 0, 3, 0, b'a', 0, 0, 0]);
        // LINKINFO nest length covers everything to the end.
        assert_eq!(
            usize::from(u16::from_ne_bytes([b[40], b[41]])),
            b.len() - 40
        );
        assert_eq!(
            &b[44..56],
            &[9, 0, 1, 0, b'v', b'e', b't', b'h', 0, 0, 0, 0]
        );
        assert_eq!(
            usize::from(u16::from_ne_bytes([b[56], b[57]])),
            b.len() - 56
        );
        assert_eq!(
            usize::from(u16::from_ne_bytes([b[60], b[61]])),
            b.len() - 60
        );
        assert_eq!(&b[b.len() - 8..], &[6, 0, 3, 0, b'b', 0, 0, 0]);
    }

    fn error_msg(seq: u32, errno: i32, flags: u16, tail: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        let len = NLMSGHDR_LEN + 4 + NLMSGHDR_LEN + tail.len();
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&(-errno).to_ne_bytes());
        // The echoed request header (capped).
        v.extend_from_slice(&(NLMSGHDR_LEN as u32).to_ne_bytes());
        v.extend_from_slice(&[0u8; 12]);
        v.extend_from_slice(tail);
        v
    }

    #[test]
    fn ack_and_errors() {
        let ack = error_msg(1, 0, 0, &[]);
        let msgs = parse_messages(&ack).unwrap();
        assert_eq!(msgs.len(), 1);
        assert!(parse_error(msgs[0].flags, msgs[0].payload).is_ok());

        let err = error_msg(2, libc::EEXIST, 0, &[]);
        let msgs = parse_messages(&err).unwrap();
        let e = parse_error(msgs[0].flags, msgs[0].payload).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EEXIST));

        // Extended ack with a message.
        let mut tlv = vec![13, 0, 1, 0];
        tlv.extend_from_slice(b"bad thing\0");
        tlv.resize(16, 0);
        let err = error_msg(3, libc::EINVAL, NLM_F_CAPPED | NLM_F_ACK_TLVS, &tlv);
        let msgs = parse_messages(&err).unwrap();
        match parse_error(msgs[0].flags, msgs[0].payload).unwrap_err() {
            Error::Kernel { errno, message } => {
                assert_eq!(errno, libc::EINVAL);
                assert_eq!(message.as_deref(), Some("bad thing"));
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn malformed_lengths_are_errors() {
        assert!(matches!(
            parse_messages(&[1, 2, 3]),
            Err(Error::Malformed(_))
        ));
        let mut m = error_msg(1, 0, 0, &[]);
        m[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(parse_messages(&m), Err(Error::Malformed(_))));
        m[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(matches!(parse_messages(&m), Err(Error::Malformed(_))));
        assert!(matches!(
            parse_attrs(&[2, 0, 1, 0]),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            parse_attrs(&[9, 0, 1, 0, 0]),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(parse_error(0, &[0, 0]), Err(Error::Malformed(_))));
        assert!(matches!(
            parse_error(0, &5i32.to_ne_bytes()),
            Err(Error::Malformed(_))
        ));
        assert!(parse_link(&[0u8; 8]).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        // A fixed-seed xorshift, so a failure reproduces exactly.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for round in 0..2000 {
            let len = (next() % 128) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Make the first length plausible half of the time so parsing goes deeper.
            if len >= 4 && round % 2 == 0 {
                buf[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
            }
            if let Ok(msgs) = parse_messages(&buf) {
                for m in msgs {
                    let _ = parse_error(m.flags, m.payload);
                    let _ = parse_link(m.payload);
                }
            }
            let _ = parse_attrs(&buf);
        }
    }

    #[test]
    fn link_parse() {
        let mut p = Vec::new();
        let mut info = IfInfoMsg::zeroed();
        info.index = 5;
        info.flags = IFF_UP;
        info.encode(&mut p);
        let mut req = Request { buf: p };
        req.attr_str(IFLA_IFNAME, "wrenn-v3");
        let li = req.nest_start(IFLA_LINKINFO);
        req.attr_str(IFLA_INFO_KIND, "veth");
        req.nest_end(li);
        let link = parse_link(&req.buf).unwrap();
        assert_eq!(
            link,
            Link {
                index: 5,
                name: "wrenn-v3".into(),
                kind: Some("veth".into()),
                up: true
            }
        );
    }

    #[test]
    fn ifnames() {
        assert!(check_ifname("wrenn-v4095").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("0123456789abcdef").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("a b").is_err());
        assert!(check_ifname("..").is_err());
    }
}

//! The slots' DNS resolver: one thread, one mio loop, one UDP socket per slot listening on the
//! slot's gateway address ([`GATEWAY_ADDR`]`:53`) inside the slot's namespace.
//!
//! For each guest query: the name must be one the slot's policy lets it resolve
//! ([`Egress::may_resolve`]: an allowed domain, or any name while the policy is not closed),
//! else the answer is REFUSED at once and nothing leaves the host. An allowed query is
//! rebuilt (question and EDNS size only, with a random ID) and sent to the host's upstream
//! resolver from a socket in the host's namespace. Its answer is checked against the question;
//! if the name matches an allowed domain, the addresses at the end of its CNAME chain —
//! minus those inside `never_out` — go into the slot's nftables set [`DNS_SET`] with their
//! TTL (clamped to [`DNS_TTL_MIN`], [`DNS_TTL_MAX`]) *before* the guest gets the answer, so
//! the connection that follows finds its address allowed. Set elements are added over a
//! NETLINK_NETFILTER socket opened in the slot's namespace (no `nft` process per answer).
//!
//! Bounds: queries per second per slot (token bucket), queries waiting upstream per slot,
//! addresses per answer, addresses per slot (the set's size), and an upstream timeout after
//! which the guest gets SERVFAIL.
//!
//! DNS over TCP (RFC 7766: messages framed by a 2-byte length) is served on the same address,
//! on the same loop, for guests whose UDP answer came back truncated (TC set: the upstream's
//! UDP answer is relayed as it is, TC included). The same policy applies to each query
//! (REFUSED locally, the same rebuild, the same answer filtering, the set filled before the
//! answer goes back) and the same per-slot query rate. A query that arrives over TCP always
//! goes upstream over TCP (a fresh connection per query): the guest uses TCP because the
//! answer did not fit UDP, so asking over UDP first would only be truncated again. Bounds:
//! [`DNS_TCP_CONNS_PER_SLOT_MAX`] connections per slot (more are closed at once),
//! [`DNS_QUERY_LEN_MAX`] per query, [`DNS_TCP_ANSWER_LEN_MAX`] per answer,
//! [`DNS_TCP_IDLE_TIMEOUT`] to send a whole query or read a whole answer, and
//! [`DNS_TCP_QUERIES_PER_CONN_MAX`] queries per connection. One query per connection is
//! handled at a time (pipelined queries wait in the kernel's buffer), so a connection holds
//! at most one query and one answer in memory.
//!
//! It is not a cache and not a recursive resolver: each allowed query goes to the upstream.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Registry, Token, Waker};

use super::dns::DomainPattern;
use super::dns::{self, RCODE_FORMERR, RCODE_REFUSED, RCODE_SERVFAIL};
use super::limits::{
    DNS_ADDRESSES_PER_NAME_MAX, DNS_COMMANDS_MAX, DNS_MESSAGE_LEN_MAX, DNS_PENDING_PER_SLOT_MAX,
    DNS_QUERIES_PER_SEC, DNS_QUERY_BURST, DNS_QUERY_LEN_MAX, DNS_READS_PER_TURN, DNS_SET_LEN_MAX,
    DNS_SLOTS_MAX, DNS_TCP_ANSWER_LEN_MAX, DNS_TCP_CONNS_PER_SLOT_MAX, DNS_TCP_IDLE_TIMEOUT,
    DNS_TCP_QUERIES_PER_CONN_MAX, DNS_UPSTREAM_TIMEOUT,
};
use super::netlink::Netlink;
use super::slot::{Egress, Ipv4Cidr, DNS_SET, GATEWAY_ADDR, GUEST_ADDR};
use super::{netns, Error};

#[cfg(doc)]
use super::limits::{DNS_TTL_MAX, DNS_TTL_MIN};

/// Counters of every slot's resolver together (the agent renders them on /metrics; no
/// per-slot labels).
pub mod stats {
    use proto::metrics::Counter;
    /// Guest queries received (within the rate).
    pub static QUERIES: Counter = Counter::new();
    /// Queries dropped over a slot's rate.
    pub static RATE_DROPPED: Counter = Counter::new();
    /// Queries answered REFUSED (name not allowed) or FORMERR.
    pub static REFUSED: Counter = Counter::new();
    /// Queries sent upstream.
    pub static FORWARDED: Counter = Counter::new();
    /// Answers SERVFAIL (upstream timeout or bad answer, set full, too many pending).
    pub static SERVFAIL: Counter = Counter::new();
    /// Addresses put into slots' DNS sets.
    pub static ADDRESSES_ADDED: Counter = Counter::new();
    /// Answer addresses inside never_out, kept out of the set.
    pub static NEVER_OUT_DROPPED: Counter = Counter::new();
    /// TCP connections accepted from guests.
    pub static TCP_ACCEPTED: Counter = Counter::new();
    /// TCP connections closed at once: the slot had its maximum open.
    pub static TCP_OVER_LIMIT: Counter = Counter::new();
    /// TCP connections closed at their idle deadline (no whole query, or an answer not read).
    pub static TCP_IDLE_CLOSED: Counter = Counter::new();
}

const WAKER: Token = Token(usize::MAX);
/// Longest poll wait: pending queries are checked for their timeout at least this often.
const TICK: Duration = Duration::from_millis(250);
/// Events taken per poll.
const EVENTS_CAPACITY: usize = 256;

/// An address the resolver put into a slot's set, and why.
#[derive(Debug, Clone)]
struct LiveAddr {
    ip: Ipv4Addr,
    expires: Instant,
    /// The allowed name whose answer gave it.
    name: String,
}

/// A slot's policy and DNS set as the resolver sees them; shared with [`Network`] so that a
/// policy update and the resolver's additions never interleave (see [`SlotDns::lock`]).
///
/// [`Network`]: super::Network
pub(crate) struct SlotDns {
    egress: Egress,
    never_out: Vec<Ipv4Cidr>,
    live: Vec<LiveAddr>,
    /// Entries found in the slot's set when the resolver took the slot over after an agent
    /// restart: their names died with the old process. Each was let in for a name that the
    /// policy in force then allowed, [`SlotDns::unnamed_under`].
    unnamed: Vec<(Ipv4Addr, Instant)>,
    /// The allowed domains of the policy the slot was adopted with.
    unnamed_under: Vec<DomainPattern>,
    /// NETLINK_NETFILTER socket in the slot's namespace.
    nft: Netlink,
    table: String,
}

impl SlotDns {
    /// The live entries that `egress` still allows, with their time left: what a policy
    /// update carries into the new table. Drops the others from the record.
    ///
    /// An entry the resolver learned itself is kept if `egress` allows its name. An entry
    /// found in the set after an agent restart ([`SlotDns::unnamed`]) is kept if every
    /// domain pattern of the policy it was learned under is still allowed by `egress` (then
    /// its name, whichever it was, still is); if one was removed, all of them go, since
    /// which came from the removed pattern is not known. The guest's next lookup of a name
    /// still allowed brings its address back.
    pub(crate) fn retain_for(&mut self, egress: &Egress) -> Vec<(Ipv4Addr, Duration)> {
        let now = Instant::now();
        self.live
            .retain(|a| a.expires > now && egress.domain_allowed(&a.name));
        if self.unnamed_under.iter().all(|p| still_allowed(p, egress)) {
            self.unnamed.retain(|(_, expires)| *expires > now);
        } else {
            self.unnamed.clear();
        }
        let mut out: Vec<(Ipv4Addr, Duration)> =
            self.live.iter().map(|a| (a.ip, a.expires - now)).collect();
        for (ip, expires) in &self.unnamed {
            if !out.iter().any(|(a, _)| a == ip) {
                out.push((*ip, *expires - now));
            }
        }
        out
    }

    pub(crate) fn set_egress(&mut self, egress: Egress) {
        self.egress = egress;
    }

    pub(crate) fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Adds the addresses `name` resolved to; returns how many went in. Fails when the set
    /// is full or the kernel refuses.
    fn admit(
        &mut self,
        name: &str,
        addrs: &[(Ipv4Addr, u32)],
    ) -> Result<usize, super::netlink::Error> {
        let now = Instant::now();
        let mut add: Vec<(Ipv4Addr, Duration)> = Vec::new();
        for &(ip, ttl) in addrs {
            if self.never_out.iter().any(|c| c.contains(ip)) {
                stats::NEVER_OUT_DROPPED.inc();
                log::info!("dns answer inside never_out dropped name={name} addr={ip}");
                continue;
            }
            if add.iter().any(|(a, _)| *a == ip) {
                continue;
            }
            add.push((ip, dns::clamp_ttl(ttl)));
            if add.len() == DNS_ADDRESSES_PER_NAME_MAX {
                break;
            }
        }
        self.live.retain(|a| a.expires > now);
        self.unnamed.retain(|(_, expires)| *expires > now);
        let new = add
            .iter()
            .filter(|(ip, _)| {
                !self.live.iter().any(|a| a.ip == *ip) && !self.unnamed.iter().any(|u| u.0 == *ip)
            })
            .count();
        if self.live.len() + self.unnamed.len() + new > DNS_SET_LEN_MAX {
            return Err(super::netlink::Error::Kernel {
                errno: libc::ENFILE,
                message: Some("slot dns set full".to_owned()),
            });
        }
        self.nft.add_set_elements_v4(&self.table, DNS_SET, &add)?;
        stats::ADDRESSES_ADDED.add(add.len() as u64);
        for (ip, ttl) in &add {
            let mut expires = now + *ttl;
            // Named now: the kernel keeps the later of the two timeouts.
            if let Some(k) = self.unnamed.iter().position(|u| u.0 == *ip) {
                expires = expires.max(self.unnamed.swap_remove(k).1);
            }
            match self.live.iter_mut().find(|a| a.ip == *ip) {
                Some(a) => {
                    a.expires = a.expires.max(expires);
                    a.name = name.to_owned();
                }
                None => self.live.push(LiveAddr {
                    ip: *ip,
                    expires,
                    name: name.to_owned(),
                }),
            }
        }
        Ok(add.len())
    }
}

/// Whether every name `p` matches is still allowed by `egress`.
fn still_allowed(p: &DomainPattern, egress: &Egress) -> bool {
    let text = p.to_string();
    match text.strip_prefix("*.") {
        // `*.x` is covered by `*.x` itself or by a wildcard over a parent of x.
        Some(base) => egress
            .allow_domains
            .iter()
            .any(|q| q == p || (q.to_string().starts_with("*.") && q.matches(base))),
        None => egress.domain_allowed(&text),
    }
}

/// Locks a slot's state; a panic while it was held leaves data that is still consistent
/// (every update is a single assignment or a retain), so poisoning is ignored.
fn lock(m: &Mutex<SlotDns>) -> MutexGuard<'_, SlotDns> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SlotDns {
    pub(crate) fn lock(m: &Mutex<SlotDns>) -> MutexGuard<'_, SlotDns> {
        lock(m)
    }
}

enum Command {
    Add {
        index: u32,
        guest: UdpSocket,
        listener: std::net::TcpListener,
        upstream: UdpSocket,
        state: Arc<Mutex<SlotDns>>,
    },
    Remove {
        index: u32,
    },
}

/// The resolver thread and its handle.
pub struct Resolver {
    upstream: SocketAddr,
    commands: Arc<Mutex<VecDeque<Command>>>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    slots: Mutex<HashMap<u32, Arc<Mutex<SlotDns>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("upstream", &self.upstream)
            .finish()
    }
}

fn dns_err(action: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Dns { action, source }
}

impl Resolver {
    /// Starts the resolver thread; queries go to `upstream` (the host's resolver).
    pub fn start(upstream: SocketAddr) -> Result<Resolver, Error> {
        let poll = Poll::new().map_err(dns_err("create resolver poll"))?;
        let waker =
            Arc::new(Waker::new(poll.registry(), WAKER).map_err(dns_err("create resolver waker"))?);
        let commands = Arc::new(Mutex::new(VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut lp = Loop {
            poll,
            upstream,
            commands: commands.clone(),
            stop: stop.clone(),
            slots: HashMap::new(),
            buf: vec![0u8; DNS_MESSAGE_LEN_MAX + 1].into_boxed_slice(),
            again: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("wrenn-dns".to_owned())
            .spawn(move || lp.run())
            .map_err(dns_err("start resolver thread"))?;
        Ok(Resolver {
            upstream,
            commands,
            waker,
            stop,
            slots: Mutex::new(HashMap::new()),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn send(&self, cmd: Command) -> Result<(), Error> {
        {
            let mut q = self.commands.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= DNS_COMMANDS_MAX {
                return Err(Error::Dns {
                    action: "queue resolver command",
                    source: io::Error::new(io::ErrorKind::WouldBlock, "command queue full"),
                });
            }
            q.push_back(cmd);
        }
        self.waker.wake().map_err(dns_err("wake resolver"))
    }

    /// The shared state of slot `index`, if the resolver serves it.
    pub(crate) fn slot(&self, index: u32) -> Option<Arc<Mutex<SlotDns>>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&index)
            .cloned()
    }

    /// Serves slot `index` (namespace `netns`, nftables table `table`) with policy `egress`.
    /// Serving it already only updates the policy. `found` are the entries already in the
    /// slot's set (an adopted slot's), with their time left, learned under `egress`.
    pub(crate) fn add_slot(
        &self,
        index: u32,
        netns_name: &str,
        table: &str,
        egress: &Egress,
        never_out: Vec<Ipv4Cidr>,
        found: &[(Ipv4Addr, Duration)],
    ) -> Result<(), Error> {
        if let Some(state) = self.slot(index) {
            lock(&state).set_egress(egress.clone());
            return Ok(());
        }
        if self.slots.lock().unwrap_or_else(|e| e.into_inner()).len() >= DNS_SLOTS_MAX {
            return Err(Error::SlotOutOfRange { index });
        }
        let (guest, listener, nft) = netns::run_in(netns_name, || -> Result<_, Error> {
            let guest = UdpSocket::bind(SocketAddrV4::new(GATEWAY_ADDR, 53))
                .map_err(dns_err("bind the slot's resolver socket"))?;
            let listener = std::net::TcpListener::bind(SocketAddrV4::new(GATEWAY_ADDR, 53))
                .map_err(dns_err("bind the slot's resolver TCP socket"))?;
            let nft = Netlink::open_netfilter().map_err(Error::netlink("open nftables socket"))?;
            Ok((guest, listener, nft))
        })??;
        let unspecified: SocketAddr = match self.upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let upstream = UdpSocket::bind(unspecified).map_err(dns_err("bind the upstream socket"))?;
        upstream
            .connect(self.upstream)
            .map_err(dns_err("connect the upstream socket"))?;
        for s in [&guest, &upstream] {
            s.set_nonblocking(true)
                .map_err(dns_err("make resolver socket non-blocking"))?;
        }
        listener
            .set_nonblocking(true)
            .map_err(dns_err("make resolver socket non-blocking"))?;
        let state = Arc::new(Mutex::new(SlotDns {
            egress: egress.clone(),
            never_out,
            live: Vec::new(),
            unnamed: found
                .iter()
                .take(DNS_SET_LEN_MAX)
                .map(|(ip, left)| (*ip, Instant::now() + *left))
                .collect(),
            unnamed_under: egress.allow_domains.clone(),
            nft,
            table: table.to_owned(),
        }));
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(index, state.clone());
        self.send(Command::Add {
            index,
            guest,
            listener,
            upstream,
            state,
        })
    }

    /// Stops serving slot `index` (its sockets close on the resolver thread).
    pub(crate) fn remove_slot(&self, index: u32) -> Result<(), Error> {
        let removed = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&index);
        if removed.is_some() {
            self.send(Command::Remove { index })?;
        }
        Ok(())
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// A query waiting for the upstream.
struct Pending {
    guest_id: u16,
    guest_addr: SocketAddr,
    name: String,
    sent: Vec<u8>,
    deadline: Instant,
}

/// Queries a slot may send: a token bucket.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new() -> Self {
        Bucket {
            tokens: f64::from(DNS_QUERY_BURST),
            at: Instant::now(),
        }
    }
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * f64::from(DNS_QUERIES_PER_SEC);
        self.tokens = (self.tokens + refill).min(f64::from(DNS_QUERY_BURST));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct LoopSlot {
    guest: mio::net::UdpSocket,
    upstream: mio::net::UdpSocket,
    listener: mio::net::TcpListener,
    state: Arc<Mutex<SlotDns>>,
    pending: HashMap<u16, Pending>,
    bucket: Bucket,
    /// The guest's TCP connections, by place (a place's tokens are fixed: [`conn_token`]).
    conns: Vec<Option<TcpConn>>,
}

/// A query of a TCP connection, sent upstream over its own TCP connection.
struct TcpUpstream {
    stream: mio::net::TcpStream,
    name: String,
    guest_id: u16,
    /// The rebuilt query, to match the answer against.
    sent: Vec<u8>,
    /// The framed query and how much of it is written.
    out: Vec<u8>,
    out_at: usize,
    /// The framed answer read so far (`have` bytes of it).
    buf: Vec<u8>,
    have: usize,
}

/// A guest's TCP connection: at most one query in hand (being read, upstream, or its answer
/// being written) at a time.
struct TcpConn {
    stream: mio::net::TcpStream,
    /// The framed query read so far (2-byte length, then at most [`DNS_QUERY_LEN_MAX`]).
    inbuf: Vec<u8>,
    /// The framed answer and how much of it is written.
    out: Vec<u8>,
    out_at: usize,
    upstream: Option<TcpUpstream>,
    answered: u32,
    /// After its last answer: our side is shut down, the guest's input is read and dropped
    /// until it closes (closing with unread input would reset the connection and lose the
    /// answers still in the kernel's send buffer).
    closing: bool,
    /// When the connection is closed (reading or writing) or its upstream query gets
    /// SERVFAIL (upstream pending).
    deadline: Instant,
}

impl TcpConn {
    fn reply(&mut self, msg: &[u8]) {
        self.out.clear();
        self.out
            .extend_from_slice(&(msg.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        self.out.extend_from_slice(msg);
        self.out_at = 0;
        self.deadline = Instant::now() + DNS_TCP_IDLE_TIMEOUT;
    }
}

struct Loop {
    poll: Poll,
    /// The host's resolver (TCP queries connect to it).
    upstream: SocketAddr,
    commands: Arc<Mutex<VecDeque<Command>>>,
    stop: Arc<AtomicBool>,
    slots: HashMap<u32, LoopSlot>,
    buf: Box<[u8]>,
    /// Sockets that may hold more than one turn read (a slot's UDP socket, its listener):
    /// epoll is edge-triggered, so they are read again without a new event.
    again: Vec<Token>,
}

/// Tokens per slot: UDP guest, UDP upstream, TCP listener, then two per TCP connection
/// place (the guest's side, the upstream side).
const TOKENS_PER_SLOT: usize = 3 + 2 * DNS_TCP_CONNS_PER_SLOT_MAX;
const KIND_GUEST: usize = 0;
const KIND_UPSTREAM: usize = 1;
const KIND_LISTENER: usize = 2;

fn token(index: u32, kind: usize) -> Token {
    Token(index as usize * TOKENS_PER_SLOT + kind)
}
/// Token of TCP connection place `i` (`upstream`: its upstream connection).
fn conn_token(index: u32, i: usize, upstream: bool) -> Token {
    token(index, 3 + 2 * i + usize::from(upstream))
}

/// What becomes of a TCP connection after a step.
enum Step {
    Wait,
    Close,
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        while !self.stop.load(Ordering::Acquire) {
            let timeout = if self.again.is_empty() {
                self.next_deadline().map_or(TICK, |d| {
                    d.saturating_duration_since(Instant::now()).min(TICK)
                })
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("resolver poll failed error={e}");
                    std::thread::sleep(TICK);
                }
                continue;
            }
            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER {
                    self.commands();
                    continue;
                }
                self.dispatch(t);
            }
            for t in std::mem::take(&mut self.again) {
                self.dispatch(t);
            }
            self.expire();
        }
    }

    fn dispatch(&mut self, t: Token) {
        let index = (t.0 / TOKENS_PER_SLOT) as u32;
        match t.0 % TOKENS_PER_SLOT {
            KIND_GUEST => self.guest_readable(index),
            KIND_UPSTREAM => self.upstream_readable(index),
            KIND_LISTENER => self.accept(index),
            k => self.drive_conn(index, (k - 3) / 2),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .values()
            .flat_map(|s| {
                s.pending
                    .values()
                    .map(|p| p.deadline)
                    .chain(s.conns.iter().flatten().map(|c| c.deadline))
            })
            .min()
    }

    fn commands(&mut self) {
        let cmds: Vec<Command> = self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for cmd in cmds {
            match cmd {
                Command::Add {
                    index,
                    guest,
                    listener,
                    upstream,
                    state,
                } => {
                    if let Some(old) = self.slots.remove(&index) {
                        self.deregister(old);
                    }
                    let mut guest = mio::net::UdpSocket::from_std(guest);
                    let mut upstream = mio::net::UdpSocket::from_std(upstream);
                    let mut listener = mio::net::TcpListener::from_std(listener);
                    let reg = self.poll.registry();
                    let r = reg
                        .register(&mut guest, token(index, KIND_GUEST), Interest::READABLE)
                        .and_then(|()| {
                            reg.register(
                                &mut upstream,
                                token(index, KIND_UPSTREAM),
                                Interest::READABLE,
                            )
                        })
                        .and_then(|()| {
                            reg.register(
                                &mut listener,
                                token(index, KIND_LISTENER),
                                Interest::READABLE,
                            )
                        });
                    if let Err(e) = r {
                        log::error!("resolver register failed slot={index} error={e}");
                        continue;
                    }
                    self.slots.insert(
                        index,
                        LoopSlot {
                            guest,
                            upstream,
                            listener,
                            state,
                            pending: HashMap::new(),
                            bucket: Bucket::new(),
                            conns: (0..DNS_TCP_CONNS_PER_SLOT_MAX).map(|_| None).collect(),
                        },
                    );
                    // Queries and connections that arrived before registration.
                    self.guest_readable(index);
                    self.accept(index);
                }
                Command::Remove { index } => {
                    if let Some(old) = self.slots.remove(&index) {
                        self.deregister(old);
                    }
                }
            }
        }
    }

    fn deregister(&mut self, mut s: LoopSlot) {
        let reg = self.poll.registry();
        let _ = reg.deregister(&mut s.guest);
        let _ = reg.deregister(&mut s.upstream);
        let _ = reg.deregister(&mut s.listener);
        for c in s.conns.iter_mut().map(Option::take) {
            close_conn(reg, c);
        }
    }

    /// Reads the slot's guest socket until it is empty or for [`DNS_READS_PER_TURN`]
    /// datagrams (then the slot is read again on the next turn).
    fn guest_readable(&mut self, index: u32) {
        for read in 0.. {
            if read == DNS_READS_PER_TURN {
                let t = token(index, KIND_GUEST);
                if !self.again.contains(&t) {
                    self.again.push(t);
                }
                return;
            }
            let Some(slot) = self.slots.get_mut(&index) else {
                return;
            };
            let (n, from) = match slot.guest.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("resolver receive failed slot={index} error={e}");
                    return;
                }
            };
            if from.ip() != IpAddr::V4(GUEST_ADDR) {
                continue; // the slot's rules let only its guest in; never answer others
            }
            if !slot.bucket.take(Instant::now()) {
                stats::RATE_DROPPED.inc();
                continue; // over the rate: dropped, the guest retries
            }
            stats::QUERIES.inc();
            let msg = &self.buf[..n];
            let reply = handle_query(slot, msg, from);
            if let Some(reply) = reply {
                let _ = slot.guest.send_to(&reply, from);
            }
        }
    }

    fn upstream_readable(&mut self, index: u32) {
        loop {
            let Some(slot) = self.slots.get_mut(&index) else {
                return;
            };
            let n = match slot.upstream.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors (upstream unreachable) surface here; pending queries time out.
                    log::warn!("resolver upstream receive failed slot={index} error={e}");
                    continue;
                }
            };
            if n < 2 {
                continue;
            }
            let id = u16::from_be_bytes([self.buf[0], self.buf[1]]);
            let Some(p) = slot.pending.remove(&id) else {
                continue; // late or forged
            };
            let msg = &mut self.buf[..n];
            let reply = handle_answer(
                &slot.state,
                msg,
                n > DNS_MESSAGE_LEN_MAX,
                &p.name,
                &p.sent,
                p.guest_id,
            );
            let _ = slot.guest.send_to(&reply, p.guest_addr);
        }
    }

    /// Accepts the guest's TCP connections: up to [`DNS_READS_PER_TURN`] per turn, each into
    /// a free place or, with none free, closed at once.
    fn accept(&mut self, index: u32) {
        for n in 0.. {
            if n == DNS_READS_PER_TURN {
                let t = token(index, KIND_LISTENER);
                if !self.again.contains(&t) {
                    self.again.push(t);
                }
                return;
            }
            let Some(slot) = self.slots.get_mut(&index) else {
                return;
            };
            let (mut stream, peer) = match slot.listener.accept() {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNABORTED and the like: that connection is gone, others may wait.
                    log::warn!("resolver accept failed slot={index} error={e}");
                    continue;
                }
            };
            if peer.ip() != IpAddr::V4(GUEST_ADDR) {
                continue; // dropped: closed
            }
            let Some(i) = slot.conns.iter().position(Option::is_none) else {
                stats::TCP_OVER_LIMIT.inc();
                continue; // dropped: closed at once
            };
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                conn_token(index, i, false),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("resolver register failed slot={index} error={e}");
                continue;
            }
            stats::TCP_ACCEPTED.inc();
            slot.conns[i] = Some(TcpConn {
                stream,
                inbuf: Vec::with_capacity(2 + DNS_QUERY_LEN_MAX),
                out: Vec::new(),
                out_at: 0,
                upstream: None,
                answered: 0,
                closing: false,
                deadline: Instant::now() + DNS_TCP_IDLE_TIMEOUT,
            });
            self.drive_conn(index, i);
        }
    }

    /// Moves TCP connection place `i` of slot `index` as far as its sockets let it.
    fn drive_conn(&mut self, index: u32, i: usize) {
        let reg = self.poll.registry();
        let upstream = self.upstream;
        let Some(slot) = self.slots.get_mut(&index) else {
            return;
        };
        let Some(conn) = slot.conns.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let step = conn_step(
            reg,
            upstream,
            &slot.state,
            &mut slot.bucket,
            conn_token(index, i, true),
            conn,
        );
        if let Step::Close = step {
            close_conn(reg, slot.conns[i].take());
        }
    }

    /// Answers SERVFAIL to queries whose upstream did not answer in time; closes TCP
    /// connections past their idle deadline.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut drive = Vec::new();
        for (&index, slot) in self.slots.iter_mut() {
            let late: Vec<u16> = slot
                .pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in late {
                if let Some(p) = slot.pending.remove(&id) {
                    stats::SERVFAIL.inc();
                    if let Some(mut r) = dns::error_reply(&p.sent, RCODE_SERVFAIL) {
                        dns::set_id(&mut r, p.guest_id);
                        let _ = slot.guest.send_to(&r, p.guest_addr);
                    }
                }
            }
            for (i, place) in slot.conns.iter_mut().enumerate() {
                let Some(conn) = place else { continue };
                if conn.deadline > now {
                    continue;
                }
                match conn.upstream.take() {
                    Some(mut up) => {
                        let _ = self.poll.registry().deregister(&mut up.stream);
                        stats::SERVFAIL.inc();
                        conn.reply(&servfail(&up.sent, up.guest_id));
                        drive.push((index, i));
                    }
                    None => {
                        stats::TCP_IDLE_CLOSED.inc();
                        close_conn(self.poll.registry(), place.take());
                    }
                }
            }
        }
        for (index, i) in drive {
            self.drive_conn(index, i);
        }
    }
}

fn close_conn(reg: &Registry, conn: Option<TcpConn>) {
    if let Some(mut c) = conn {
        let _ = reg.deregister(&mut c.stream);
        if let Some(mut up) = c.upstream {
            let _ = reg.deregister(&mut up.stream);
        }
    }
}

/// SERVFAIL for the rebuilt query `sent`, with the guest's ID.
fn servfail(sent: &[u8], guest_id: u16) -> Vec<u8> {
    let mut r = dns::error_reply(sent, RCODE_SERVFAIL).unwrap_or_default();
    dns::set_id(&mut r, guest_id);
    r
}

/// One TCP connection's work: write the answer in hand, else move its upstream query on,
/// else read the next query; until a socket would block or the connection is done.
fn conn_step(
    reg: &Registry,
    upstream_addr: SocketAddr,
    state: &Mutex<SlotDns>,
    bucket: &mut Bucket,
    upstream_token: Token,
    conn: &mut TcpConn,
) -> Step {
    loop {
        if conn.closing {
            let mut sink = [0u8; 512];
            match conn.stream.read(&mut sink) {
                Ok(0) => return Step::Close,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Step::Close,
            }
        }
        if conn.out_at < conn.out.len() {
            match conn.stream.write(&conn.out[conn.out_at..]) {
                Ok(0) => return Step::Close,
                Ok(n) => conn.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
            continue;
        }
        if !conn.out.is_empty() {
            conn.out = Vec::new();
            conn.out_at = 0;
            conn.answered += 1;
            conn.deadline = Instant::now() + DNS_TCP_IDLE_TIMEOUT;
            if conn.answered >= DNS_TCP_QUERIES_PER_CONN_MAX {
                if conn.stream.shutdown(std::net::Shutdown::Write).is_err() {
                    return Step::Close;
                }
                conn.closing = true;
            }
        }
        if let Some(up) = conn.upstream.as_mut() {
            match upstream_step(up) {
                Ok(false) => return Step::Wait,
                Ok(true) => {
                    let mut up = conn.upstream.take().expect("upstream in hand");
                    let _ = reg.deregister(&mut up.stream);
                    let reply = handle_answer(
                        state,
                        &mut up.buf[2..],
                        false,
                        &up.name,
                        &up.sent,
                        up.guest_id,
                    );
                    conn.reply(&reply);
                }
                Err(e) => {
                    let mut up = conn.upstream.take().expect("upstream in hand");
                    let _ = reg.deregister(&mut up.stream);
                    log::warn!("dns tcp upstream failed name={} error={e}", up.name);
                    stats::SERVFAIL.inc();
                    conn.reply(&servfail(&up.sent, up.guest_id));
                }
            }
            continue;
        }
        // The next query: its 2-byte length, then exactly that many bytes (what follows stays
        // in the kernel's buffer until this query is answered).
        let need = match conn.inbuf.get(..2) {
            Some(len) => 2 + usize::from(u16::from_be_bytes([len[0], len[1]])),
            None => 2,
        };
        let have = conn.inbuf.len();
        if have < need {
            conn.inbuf.resize(need, 0);
            let r = conn.stream.read(&mut conn.inbuf[have..need]);
            conn.inbuf.truncate(have + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(0) => return Step::Close,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
            if conn.inbuf.len() == 2
                && dns::frame_len([conn.inbuf[0], conn.inbuf[1]], DNS_QUERY_LEN_MAX).is_err()
            {
                stats::REFUSED.inc();
                return Step::Close; // no query is that long (or empty)
            }
            continue;
        }
        if !bucket.take(Instant::now()) {
            stats::RATE_DROPPED.inc();
            return Step::Close; // over the rate: the guest retries
        }
        stats::QUERIES.inc();
        let msg = std::mem::take(&mut conn.inbuf);
        match judge(state, &msg[2..]) {
            Verdict::Reply(Some(r)) => conn.reply(&r),
            Verdict::Reply(None) => return Step::Close,
            Verdict::Forward(q) => {
                let id = match random_id() {
                    Some(id) => id,
                    None => {
                        stats::SERVFAIL.inc();
                        let r = dns::error_reply(&msg[2..], RCODE_SERVFAIL);
                        conn.reply(&r.unwrap_or_default());
                        continue;
                    }
                };
                let sent = dns::build_query(id, &q);
                match open_upstream(reg, upstream_addr, upstream_token) {
                    Ok(stream) => {
                        stats::FORWARDED.inc();
                        let mut out = (sent.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&sent);
                        conn.upstream = Some(TcpUpstream {
                            stream,
                            name: q.name,
                            guest_id: q.id,
                            sent,
                            out,
                            out_at: 0,
                            buf: vec![0; 2],
                            have: 0,
                        });
                        conn.deadline = Instant::now() + DNS_UPSTREAM_TIMEOUT;
                    }
                    Err(e) => {
                        log::warn!("dns tcp upstream connect failed error={e}");
                        stats::SERVFAIL.inc();
                        conn.reply(&servfail(&sent, q.id));
                    }
                }
            }
        }
        conn.inbuf = msg;
        conn.inbuf.clear();
    }
}

fn open_upstream(
    reg: &Registry,
    addr: SocketAddr,
    token: Token,
) -> io::Result<mio::net::TcpStream> {
    let mut s = mio::net::TcpStream::connect(addr)?;
    reg.register(&mut s, token, Interest::READABLE | Interest::WRITABLE)?;
    Ok(s)
}

/// Writes the framed query and reads the framed answer; `Ok(true)` once the answer is
/// whole, `Ok(false)` when a socket would block.
fn upstream_step(up: &mut TcpUpstream) -> io::Result<bool> {
    loop {
        if up.out_at < up.out.len() {
            match up.stream.write(&up.out[up.out_at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => up.out_at += n,
                // Still connecting (EAGAIN, or ENOTCONN before the handshake ends).
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::NotConnected =>
                {
                    return Ok(false)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        if up.have == up.buf.len() {
            if up.have > 2 {
                return Ok(true);
            }
            let len = dns::frame_len([up.buf[0], up.buf[1]], DNS_TCP_ANSWER_LEN_MAX)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            up.buf.resize(2 + len, 0);
        }
        match up.stream.read(&mut up.buf[up.have..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => up.have += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A random query ID (`None` if the system's generator fails).
fn random_id() -> Option<u16> {
    let mut b = [0u8; 2];
    proto::random::fill(&mut b).ok()?;
    Some(u16::from_ne_bytes(b))
}

/// What becomes of a guest's query.
enum Verdict {
    /// Answered here (REFUSED, FORMERR), or dropped (`None`: not even a header to answer).
    Reply(Option<Vec<u8>>),
    /// Allowed: goes upstream.
    Forward(dns::Query),
}

/// The slot's policy on the query `msg` (UDP and TCP alike).
fn judge(state: &Mutex<SlotDns>, msg: &[u8]) -> Verdict {
    if msg.len() > DNS_QUERY_LEN_MAX {
        stats::REFUSED.inc();
        return Verdict::Reply(dns::error_reply(msg, RCODE_FORMERR));
    }
    let q = match dns::parse_query(msg) {
        Ok(q) => q,
        Err(e) => {
            stats::REFUSED.inc();
            let rcode = if e == dns::DnsError::NotHostName {
                RCODE_REFUSED
            } else {
                RCODE_FORMERR
            };
            return Verdict::Reply(dns::error_reply(msg, rcode));
        }
    };
    if !lock(state).egress.may_resolve(&q.name) {
        stats::REFUSED.inc();
        log::debug!("dns query refused name={}", q.name);
        return Verdict::Reply(dns::error_reply(msg, RCODE_REFUSED));
    }
    Verdict::Forward(q)
}

/// A guest's UDP query: the immediate reply (REFUSED, FORMERR, SERVFAIL), or `None` once it
/// is sent upstream (or dropped).
fn handle_query(slot: &mut LoopSlot, msg: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let q = match judge(&slot.state, msg) {
        Verdict::Reply(r) => return r,
        Verdict::Forward(q) => q,
    };
    if slot.pending.len() >= DNS_PENDING_PER_SLOT_MAX {
        stats::SERVFAIL.inc();
        return dns::error_reply(msg, RCODE_SERVFAIL);
    }
    let id = loop {
        let Some(id) = random_id() else {
            return dns::error_reply(msg, RCODE_SERVFAIL);
        };
        if !slot.pending.contains_key(&id) {
            break id;
        }
    };
    let sent = dns::build_query(id, &q);
    if let Err(e) = slot.upstream.send(&sent) {
        stats::SERVFAIL.inc();
        log::warn!("resolver upstream send failed error={e}");
        return dns::error_reply(msg, RCODE_SERVFAIL);
    }
    stats::FORWARDED.inc();
    slot.pending.insert(
        id,
        Pending {
            guest_id: q.id,
            guest_addr: from,
            name: q.name,
            sent,
            deadline: Instant::now() + DNS_UPSTREAM_TIMEOUT,
        },
    );
    None
}

/// The upstream's answer `msg` to the rebuilt query `sent` for `name`: what goes back to the
/// guest (with its ID). Addresses of an allowed name are in the set before this returns.
fn handle_answer(
    state: &Mutex<SlotDns>,
    msg: &mut [u8],
    truncated: bool,
    name: &str,
    sent: &[u8],
    guest_id: u16,
) -> Vec<u8> {
    let fail = || {
        stats::SERVFAIL.inc();
        servfail(sent, guest_id)
    };
    if truncated {
        return fail();
    }
    let resp = match dns::parse_response(msg, sent) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("dns answer rejected name={name} error={e}");
            return fail();
        }
    };
    let mut state = lock(state);
    if state.egress.domain_allowed(name) {
        let addrs = dns::chain_addresses(name, &resp.records);
        if let Err(e) = state.admit(name, &addrs) {
            log::warn!("dns set update failed name={name} error={e}");
            return fail();
        }
    }
    drop(state);
    dns::set_id(msg, guest_id);
    msg.to_vec()
}

/// The first IPv4 `nameserver` of a resolv.conf text, port 53: the host's upstream.
pub fn upstream_from_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("nameserver"), Some(ip)) => ip
                .parse::<Ipv4Addr>()
                .ok()
                .map(|ip| SocketAddr::V4(SocketAddrV4::new(ip, 53))),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch example.com\nnameserver fe80::1\nnameserver 10.255.255.53\nnameserver 1.1.1.1\n";
        assert_eq!(
            upstream_from_resolv_conf(text),
            Some("10.255.255.53:53".parse().unwrap())
        );
        assert_eq!(upstream_from_resolv_conf("search x\n"), None);
    }

    #[test]
    fn adopted_entries_follow_their_patterns() {
        let p = |s: &str| DomainPattern::parse(s).unwrap();
        let with = |v: &[&str]| Egress {
            allow_domains: v.iter().map(|s| p(s)).collect(),
            ..Egress::none()
        };
        assert!(still_allowed(
            &p("a.example.com"),
            &with(&["a.example.com"])
        ));
        assert!(still_allowed(
            &p("a.example.com"),
            &with(&["*.example.com"])
        ));
        assert!(!still_allowed(
            &p("a.example.com"),
            &with(&["b.example.com"])
        ));
        assert!(still_allowed(
            &p("*.a.example.com"),
            &with(&["*.a.example.com"])
        ));
        assert!(still_allowed(
            &p("*.a.example.com"),
            &with(&["*.example.com"])
        ));
        assert!(!still_allowed(
            &p("*.a.example.com"),
            &with(&["a.example.com"])
        ));
        assert!(!still_allowed(
            &p("*.example.com"),
            &with(&["*.a.example.com"])
        ));
    }

    #[test]
    fn bucket_limits_rate() {
        let mut b = Bucket::new();
        let now = Instant::now();
        let mut ok = 0;
        for _ in 0..(DNS_QUERY_BURST * 2) {
            if b.take(now) {
                ok += 1;
            }
        }
        assert_eq!(ok, DNS_QUERY_BURST);
        assert!(b.take(now + Duration::from_secs(1)));
    }
}

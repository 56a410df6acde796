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
//! which the guest gets SERVFAIL. It speaks UDP only; TCP port 53 is reset by the slot's rules.
//!
//! It is not a cache and not a recursive resolver: each allowed query goes to the upstream.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};

use super::dns::{self, RCODE_FORMERR, RCODE_REFUSED, RCODE_SERVFAIL};
use super::limits::{
    DNS_ADDRESSES_PER_NAME_MAX, DNS_COMMANDS_MAX, DNS_MESSAGE_LEN_MAX, DNS_PENDING_PER_SLOT_MAX,
    DNS_QUERIES_PER_SEC, DNS_QUERY_BURST, DNS_QUERY_LEN_MAX, DNS_READS_PER_TURN, DNS_SET_LEN_MAX,
    DNS_SLOTS_MAX, DNS_UPSTREAM_TIMEOUT,
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
    /// NETLINK_NETFILTER socket in the slot's namespace.
    nft: Netlink,
    table: String,
}

impl SlotDns {
    /// The live entries that `egress` still allows, with their time left: what a policy
    /// update carries into the new table. Drops the others from the record.
    pub(crate) fn retain_for(&mut self, egress: &Egress) -> Vec<(Ipv4Addr, Duration)> {
        let now = Instant::now();
        self.live
            .retain(|a| a.expires > now && egress.domain_allowed(&a.name));
        self.live.iter().map(|a| (a.ip, a.expires - now)).collect()
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
        let new = add
            .iter()
            .filter(|(ip, _)| !self.live.iter().any(|a| a.ip == *ip))
            .count();
        if self.live.len() + new > DNS_SET_LEN_MAX {
            return Err(super::netlink::Error::Kernel {
                errno: libc::ENFILE,
                message: Some("slot dns set full".to_owned()),
            });
        }
        self.nft.add_set_elements_v4(&self.table, DNS_SET, &add)?;
        stats::ADDRESSES_ADDED.add(add.len() as u64);
        for (ip, ttl) in &add {
            let expires = now + *ttl;
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
    /// Serving it already only updates the policy.
    pub(crate) fn add_slot(
        &self,
        index: u32,
        netns_name: &str,
        table: &str,
        egress: &Egress,
        never_out: Vec<Ipv4Cidr>,
    ) -> Result<(), Error> {
        if let Some(state) = self.slot(index) {
            lock(&state).set_egress(egress.clone());
            return Ok(());
        }
        if self.slots.lock().unwrap_or_else(|e| e.into_inner()).len() >= DNS_SLOTS_MAX {
            return Err(Error::SlotOutOfRange { index });
        }
        let (guest, nft) = netns::run_in(netns_name, || -> Result<_, Error> {
            let guest = UdpSocket::bind(SocketAddrV4::new(GATEWAY_ADDR, 53))
                .map_err(dns_err("bind the slot's resolver socket"))?;
            let nft = Netlink::open_netfilter().map_err(Error::netlink("open nftables socket"))?;
            Ok((guest, nft))
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
        let state = Arc::new(Mutex::new(SlotDns {
            egress: egress.clone(),
            never_out,
            live: Vec::new(),
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
    state: Arc<Mutex<SlotDns>>,
    pending: HashMap<u16, Pending>,
    bucket: Bucket,
}

struct Loop {
    poll: Poll,
    commands: Arc<Mutex<VecDeque<Command>>>,
    stop: Arc<AtomicBool>,
    slots: HashMap<u32, LoopSlot>,
    buf: Box<[u8]>,
    /// Slots whose guest socket may hold more datagrams than one turn read (epoll is
    /// edge-triggered: they are read again without a new event).
    again: Vec<u32>,
}

fn guest_token(index: u32) -> Token {
    Token(2 * index as usize)
}
fn upstream_token(index: u32) -> Token {
    Token(2 * index as usize + 1)
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
                let index = (t.0 / 2) as u32;
                if t.0 % 2 == 0 {
                    self.guest_readable(index);
                } else {
                    self.upstream_readable(index);
                }
            }
            for index in std::mem::take(&mut self.again) {
                self.guest_readable(index);
            }
            self.expire();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .values()
            .flat_map(|s| s.pending.values().map(|p| p.deadline))
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
                    upstream,
                    state,
                } => {
                    if let Some(old) = self.slots.remove(&index) {
                        self.deregister(old);
                    }
                    let mut guest = mio::net::UdpSocket::from_std(guest);
                    let mut upstream = mio::net::UdpSocket::from_std(upstream);
                    let r = self
                        .poll
                        .registry()
                        .register(&mut guest, guest_token(index), Interest::READABLE)
                        .and_then(|()| {
                            self.poll.registry().register(
                                &mut upstream,
                                upstream_token(index),
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
                            state,
                            pending: HashMap::new(),
                            bucket: Bucket::new(),
                        },
                    );
                    // Queries that arrived before registration (edge-triggered).
                    self.guest_readable(index);
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
        let _ = self.poll.registry().deregister(&mut s.guest);
        let _ = self.poll.registry().deregister(&mut s.upstream);
    }

    /// Reads the slot's guest socket until it is empty or for [`DNS_READS_PER_TURN`]
    /// datagrams (then the slot is read again on the next turn).
    fn guest_readable(&mut self, index: u32) {
        for read in 0.. {
            if read == DNS_READS_PER_TURN {
                if !self.again.contains(&index) {
                    self.again.push(index);
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
            let reply = handle_answer(slot, msg, n > DNS_MESSAGE_LEN_MAX, &p);
            let _ = slot.guest.send_to(&reply, p.guest_addr);
        }
    }

    /// Answers SERVFAIL to queries whose upstream did not answer in time.
    fn expire(&mut self) {
        let now = Instant::now();
        for slot in self.slots.values_mut() {
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
        }
    }
}

/// A guest's query: the immediate reply (REFUSED, FORMERR, SERVFAIL), or `None` once it is
/// sent upstream (or dropped).
fn handle_query(slot: &mut LoopSlot, msg: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    if msg.len() > DNS_QUERY_LEN_MAX {
        stats::REFUSED.inc();
        return dns::error_reply(msg, RCODE_FORMERR);
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
            return dns::error_reply(msg, rcode);
        }
    };
    if !lock(&slot.state).egress.may_resolve(&q.name) {
        stats::REFUSED.inc();
        log::debug!("dns query refused name={}", q.name);
        return dns::error_reply(msg, RCODE_REFUSED);
    }
    if slot.pending.len() >= DNS_PENDING_PER_SLOT_MAX {
        stats::SERVFAIL.inc();
        return dns::error_reply(msg, RCODE_SERVFAIL);
    }
    let id = loop {
        let mut b = [0u8; 2];
        if proto::random::fill(&mut b).is_err() {
            return dns::error_reply(msg, RCODE_SERVFAIL);
        }
        let id = u16::from_ne_bytes(b);
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

/// The upstream's answer `msg` to query `p`: what goes back to the guest. Addresses of an
/// allowed name are in the set before this returns.
fn handle_answer(slot: &mut LoopSlot, msg: &mut [u8], truncated: bool, p: &Pending) -> Vec<u8> {
    let servfail = || {
        stats::SERVFAIL.inc();
        let mut r = dns::error_reply(&p.sent, RCODE_SERVFAIL).unwrap_or_default();
        dns::set_id(&mut r, p.guest_id);
        r
    };
    if truncated {
        return servfail();
    }
    let resp = match dns::parse_response(msg, &p.sent) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("dns answer rejected name={} error={e}", p.name);
            return servfail();
        }
    };
    let mut state = lock(&slot.state);
    if state.egress.domain_allowed(&p.name) {
        let addrs = dns::chain_addresses(&p.name, &resp.records);
        if let Err(e) = state.admit(&p.name, &addrs) {
            log::warn!("dns set update failed name={} error={e}", p.name);
            return servfail();
        }
    }
    drop(state);
    dns::set_id(msg, p.guest_id);
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

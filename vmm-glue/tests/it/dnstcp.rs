//! The slots' resolver over TCP, for real (needs root and nft): an allowed name answered over
//! TCP with its address in the set, a refused name that never reaches the upstream, a
//! truncated UDP answer followed by the guest's TCP retry, connections that stall closed at
//! their deadline while others are served, the per-slot connection and per-connection query
//! bounds; and learned set entries kept across an agent restart and a policy update.
//!
//! Own names and addresses (prefix `wrnd`, subnet 10.204.0.0/16, the pretend internet at
//! 198.19.12.0/30, big answers in 198.19.13.0/24), so it runs alongside the other network
//! tests. Traffic stays inside namespaces this test creates.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_glue::net::dns::{self, DomainPattern};
use vmm_glue::net::limits::{
    DNS_ADDRESSES_PER_NAME_MAX, DNS_TCP_CONNS_PER_SLOT_MAX, DNS_TCP_IDLE_TIMEOUT,
    DNS_TCP_QUERIES_PER_CONN_MAX,
};
use vmm_glue::net::netlink::Netlink;
use vmm_glue::net::slot::{GATEWAY_ADDR, GUEST_ADDR};
use vmm_glue::net::{netns, Egress, NetConfig, Network};

const PREFIX: &str = "wrnd";
const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 204, 0, 0);
const INET_NS: &str = "wrnd-inet";
const INET_HOST_LINK: &str = "wrndi-h";
/// The pretend internet's DNS server (the resolver's upstream), UDP and TCP.
const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 19, 12, 1);
const INET_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 12, 2);
/// Records in the answer for `big.example.com`: 40 A records do not fit 512 bytes of UDP.
const BIG_RECORDS: u8 = 40;
const TIMEOUT: Duration = Duration::from_secs(5);
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

fn guest_ns(index: u32) -> String {
    format!("wrnd-g{index}")
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

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&name_wire(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    m
}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut f = (msg.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(msg);
    f
}

/// The A records our upstream knows.
fn zone(name: &str) -> Vec<Ipv4Addr> {
    match name {
        "a.example.com" | "evil.example.org" => vec![PUBLIC],
        "big.example.com" => (1..=BIG_RECORDS)
            .map(|i| Ipv4Addr::new(198, 19, 13, i))
            .collect(),
        _ => vec![],
    }
}

/// The answer to `msg`; over UDP, an answer over 512 bytes is cut to none, with TC set.
fn dns_answer(msg: &[u8], udp: bool) -> Option<Vec<u8>> {
    let q = dns::parse_query(msg).ok()?;
    let qend = 12 + q.qname_wire.len() + 4;
    let mut m = msg[..qend].to_vec();
    m[2] |= 0x80;
    m[3] = 0x80;
    m[10..12].copy_from_slice(&[0, 0]);
    let addrs = zone(&q.name);
    if udp && qend + addrs.len() * 16 > 512 {
        m[2] |= 0x02; // TC
        return Some(m);
    }
    m[6..8].copy_from_slice(&(addrs.len() as u16).to_be_bytes());
    for a in addrs {
        m.extend_from_slice(&[0xc0, 12]);
        m.extend_from_slice(&dns::TYPE_A.to_be_bytes());
        m.extend_from_slice(&dns::CLASS_IN.to_be_bytes());
        m.extend_from_slice(&300u32.to_be_bytes());
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(&a.octets());
    }
    Some(m)
}

/// The upstream: UDP and TCP on PUBLIC:53; records `udp:<name>` / `tcp:<name>` for every
/// query. `slow.example.com` is never answered over TCP.
struct DnsServer {
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    fn start() -> DnsServer {
        let (udp, tcp) = netns::run_in(INET_NS, || {
            (
                UdpSocket::bind(crate::netkit::sock(PUBLIC, 53)).unwrap(),
                TcpListener::bind(crate::netkit::sock(PUBLIC, 53)).unwrap(),
            )
        })
        .unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (asked.clone(), stop.clone());
        let udp_thread = std::thread::spawn(move || {
            let end = Instant::now() + SERVER_LIFETIME;
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                let Ok((n, from)) = udp.recv_from(&mut buf) else {
                    continue;
                };
                if let Ok(q) = dns::parse_query(&buf[..n]) {
                    a.lock().unwrap().push(format!("udp:{}", q.name));
                }
                if let Some(r) = dns_answer(&buf[..n], true) {
                    let _ = udp.send_to(&r, from);
                }
            }
        });
        let (a, s) = (asked.clone(), stop.clone());
        let tcp_thread = std::thread::spawn(move || {
            let end = Instant::now() + SERVER_LIFETIME;
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                let conn = match tcp.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let a = a.clone();
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(TIMEOUT * 2));
                    let mut len = [0u8; 2];
                    while conn.read_exact(&mut len).is_ok() {
                        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if conn.read_exact(&mut msg).is_err() {
                            return;
                        }
                        let Ok(q) = dns::parse_query(&msg) else {
                            return;
                        };
                        a.lock().unwrap().push(format!("tcp:{}", q.name));
                        if q.name == "slow.example.com" {
                            std::thread::sleep(TIMEOUT);
                            return;
                        }
                        let r = dns_answer(&msg, false).unwrap();
                        if conn.write_all(&framed(&r)).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        DnsServer {
            asked,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An answer as the guest sees it.
#[derive(Debug, PartialEq)]
struct Answer {
    rcode: u8,
    tc: bool,
    addrs: Vec<Ipv4Addr>,
}

fn parse(r: &[u8], q: &[u8], id: u16) -> io::Result<Answer> {
    assert_eq!(
        &r[0..2],
        &id.to_be_bytes(),
        "the answer carries the guest's id"
    );
    let sent = dns::build_query(id, &dns::parse_query(q).unwrap());
    let parsed = dns::parse_response(r, &sent)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(Answer {
        rcode: parsed.rcode,
        tc: r[2] & 0x02 != 0,
        addrs: parsed
            .records
            .iter()
            .filter_map(|rec| match rec {
                dns::Record::A { addr, .. } => Some(*addr),
                _ => None,
            })
            .collect(),
    })
}

fn udp_resolve(ns: &str, name: &str) -> io::Result<Answer> {
    netns::run_in(ns, || {
        let s = UdpSocket::bind(crate::netkit::sock(GUEST_ADDR, 0))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let q = query(0x5151, name);
        s.send_to(&q, crate::netkit::sock(GATEWAY_ADDR, 53))?;
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf)?;
        parse(&buf[..n], &q, 0x5151)
    })
    .unwrap()
}

/// From the guest's namespace: a TCP connection to the slot's resolver.
fn connect(ns: &str) -> io::Result<TcpStream> {
    netns::run_in(ns, || {
        let c = TcpStream::connect_timeout(&crate::netkit::sock(GATEWAY_ADDR, 53), TIMEOUT)?;
        c.set_read_timeout(Some(TIMEOUT * 2))?;
        Ok(c)
    })
    .unwrap()
}

/// One query on an open TCP connection.
fn tcp_ask(conn: &mut TcpStream, id: u16, name: &str) -> io::Result<Answer> {
    let q = query(id, name);
    conn.write_all(&framed(&q))?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)?;
    let mut r = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut r)?;
    parse(&r, &q, id)
}

fn tcp_resolve(ns: &str, name: &str) -> io::Result<Answer> {
    tcp_ask(&mut connect(ns)?, 0x7171, name)
}

/// Waits until the resolver closes `conn` (a read gives end of file or a reset); returns
/// how long that took, or an error if it stays open past `limit`.
fn closed_within(conn: &mut TcpStream, limit: Duration) -> io::Result<Duration> {
    let t = Instant::now();
    conn.set_read_timeout(Some(limit))?;
    let mut b = [0u8; 64];
    match conn.read(&mut b) {
        Ok(0) => Ok(t.elapsed()),
        Ok(n) => Err(io::Error::other(format!("{n} bytes instead of a close"))),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(t.elapsed()),
        Err(e) => Err(e),
    }
}

// ---- namespaces ----

fn create_internet() {
    crate::netkit::Internet {
        ns: INET_NS,
        host_link: INET_HOST_LINK,
        host_addr: INET_HOST_ADDR,
        addr: PUBLIC,
        loopback: &[],
        default_route: true,
    }
    .create();
}

fn remove_all(net: &Network) {
    let _ = net.cleanup_leftovers(&[]);
    for i in 0..4 {
        let _ = netns::delete(&guest_ns(i));
    }
    if let Ok(mut nl) = Netlink::open() {
        let _ = nl.delete_link(INET_HOST_LINK);
    }
    let _ = netns::delete(INET_NS);
    let _ = net.teardown_host();
}

/// Removes everything at the end (its own `Network`: the test drops its own to play an
/// agent restart).
struct Cleanup(Network);
impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_all(&self.0);
    }
}

fn pattern(s: &str) -> DomainPattern {
    DomainPattern::parse(s).unwrap()
}

#[test]
fn egress_dns_over_tcp() {
    if crate::netkit::skip_unless_root_with_nft("vmm-glue dns over tcp test") {
        return;
    }
    let cfg = NetConfig::new(PREFIX, SUBNET).unwrap();
    let net = Network::new(cfg.clone());
    remove_all(&net);
    let _cleanup = Cleanup(Network::new(cfg.clone()));
    net.setup_host().unwrap();
    create_internet();
    net.start_resolver(crate::netkit::sock(PUBLIC, 53)).unwrap();
    let upstream = DnsServer::start();
    let policy = Egress {
        allow_domains: vec![
            pattern("a.example.com"),
            pattern("big.example.com"),
            pattern("slow.example.com"),
        ],
        ..Egress::none()
    };
    let s1 = net.create_slot(1, &policy).unwrap();
    let s2 = net.create_slot(2, &policy).unwrap();
    crate::netkit::attach_stand_in_guest(&s1, &guest_ns(s1.index));
    crate::netkit::attach_stand_in_guest(&s2, &guest_ns(s2.index));
    let (g1, g2) = (guest_ns(1), guest_ns(2));

    // An allowed name over TCP: answered, asked upstream over TCP, its address in the set.
    let t = Instant::now();
    let a = tcp_resolve(&g1, "a.example.com").unwrap();
    println!(
        "allowed lookup over tcp took {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(a.rcode, 0);
    assert_eq!(a.addrs, vec![PUBLIC]);
    assert_eq!(upstream.asked(), vec!["tcp:a.example.com"]);
    let set = crate::netkit::dns_set(&s1, "wrnd_slot");
    assert!(set.contains("198.19.12.1 timeout 5m"), "{set}");

    // A name not allowed: REFUSED over TCP, and the upstream never hears of it.
    let r = tcp_resolve(&g1, "evil.example.org").unwrap();
    assert_eq!((r.rcode, r.addrs.len()), (dns::RCODE_REFUSED, 0));
    assert_eq!(upstream.asked().len(), 1, "a refused name left the host");

    // Truncated over UDP (TC passed on to the guest), then the guest's retry over TCP gets
    // every record, and the set the addresses (up to the per-name bound).
    let u = udp_resolve(&g1, "big.example.com").unwrap();
    assert!(u.tc && u.addrs.is_empty(), "{u:?}");
    let big = tcp_resolve(&g1, "big.example.com").unwrap();
    assert_eq!(big.rcode, 0);
    assert_eq!(big.addrs.len(), usize::from(BIG_RECORDS));
    let set = crate::netkit::dns_set(&s1, "wrnd_slot");
    let in_set = (1..=BIG_RECORDS)
        .filter(|i| set.contains(&format!("198.19.13.{i} ")))
        .count();
    assert_eq!(in_set, DNS_ADDRESSES_PER_NAME_MAX, "{set}");
    assert_eq!(
        upstream.asked()[1..],
        ["udp:big.example.com", "tcp:big.example.com"]
    );

    // Stalls: one connection sends nothing, another a length prefix and part of a query. While
    // they hang, slot 1 keeps answering over TCP and UDP, and slot 2 too; at the idle
    // deadline both are closed.
    let t0 = Instant::now();
    let mut silent = connect(&g1).unwrap();
    let mut half = connect(&g1).unwrap();
    half.write_all(&framed(&query(9, "a.example.com"))[..7])
        .unwrap();
    // ...and then trickles a byte every 700 ms: that does not move its deadline.
    let mut trickle = half.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        for b in framed(&query(9, "a.example.com"))[7..17].iter() {
            std::thread::sleep(Duration::from_millis(700));
            if trickle.write_all(&[*b]).is_err() {
                return;
            }
        }
    });
    let t = Instant::now();
    let mut c = connect(&g1).unwrap();
    assert_eq!(tcp_ask(&mut c, 1, "a.example.com").unwrap().addrs, [PUBLIC]);
    drop(c);
    assert_eq!(udp_resolve(&g1, "a.example.com").unwrap().addrs, [PUBLIC]);
    assert_eq!(tcp_resolve(&g2, "a.example.com").unwrap().addrs, [PUBLIC]);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    for conn in [&mut silent, &mut half] {
        closed_within(conn, DNS_TCP_IDLE_TIMEOUT * 2).unwrap();
        let after = t0.elapsed();
        assert!(
            after >= DNS_TCP_IDLE_TIMEOUT - Duration::from_millis(300)
                && after < DNS_TCP_IDLE_TIMEOUT + Duration::from_secs(1),
            "closed after {after:?}"
        );
    }
    println!("stalled connections closed after {:?}", t0.elapsed());
    trickler.join().unwrap();

    // An upstream that does not answer over TCP: SERVFAIL at the upstream timeout.
    let slow = tcp_resolve(&g1, "slow.example.com").unwrap();
    assert_eq!(slow.rcode, dns::RCODE_SERVFAIL);

    // Connections per slot: beyond the bound, closed at once; the slot still answers UDP.
    let mut held: Vec<TcpStream> = (0..DNS_TCP_CONNS_PER_SLOT_MAX)
        .map(|_| connect(&g1).unwrap())
        .collect();
    let mut extra = connect(&g1).unwrap();
    let closed = closed_within(&mut extra, Duration::from_secs(1)).unwrap();
    assert!(closed < Duration::from_secs(1));
    assert_eq!(udp_resolve(&g1, "a.example.com").unwrap().addrs, [PUBLIC]);
    // A held connection is served.
    assert_eq!(
        tcp_ask(&mut held[0], 2, "a.example.com").unwrap().addrs,
        [PUBLIC]
    );
    drop(held);

    // Queries per connection: pipelined queries, the bound answered, then the close.
    let mut c = connect(&g1).unwrap();
    let many: Vec<u8> = (0..DNS_TCP_QUERIES_PER_CONN_MAX + 4)
        .flat_map(|i| framed(&query(i as u16, "evil.example.org")))
        .collect();
    c.write_all(&many).unwrap();
    let mut answered = 0;
    let mut len = [0u8; 2];
    while c.read_exact(&mut len).is_ok() {
        let mut r = vec![0u8; usize::from(u16::from_be_bytes(len))];
        c.read_exact(&mut r).unwrap();
        assert_eq!(r[3] & 0xf, dns::RCODE_REFUSED);
        answered += 1;
    }
    assert_eq!(answered, DNS_TCP_QUERIES_PER_CONN_MAX);

    // A length prefix over the query bound closes the connection.
    let mut c = connect(&g1).unwrap();
    c.write_all(&[0xff, 0xff, 0, 0]).unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(1)).unwrap() < Duration::from_secs(1));

    use vmm_glue::net::resolver::stats;
    assert!(stats::TCP_ACCEPTED.get() >= 10);
    assert!(stats::TCP_OVER_LIMIT.get() >= 1);
    assert!(stats::TCP_IDLE_CLOSED.get() >= 2);

    // An agent restart: the resolver (and its memory of which name gave which address)
    // goes, the slot and its set stay. The new one adopts the slot with the stored policy.
    drop(net);
    let net = Network::new(cfg.clone());
    net.start_resolver(crate::netkit::sock(PUBLIC, 53)).unwrap();
    net.adopt_slot(1, &policy).unwrap();
    // A policy update that keeps every allowed name keeps the learned entries.
    let mut wider = policy.clone();
    wider.allow_domains.push(pattern("*.other.example"));
    net.set_egress(1, &wider).unwrap();
    let set = crate::netkit::dns_set(&s1, "wrnd_slot");
    assert!(
        set.contains("198.19.12.1 "),
        "kept across the restart: {set}"
    );
    assert!(
        set.contains("198.19.13.1 "),
        "kept across the restart: {set}"
    );
    // The guest looks a.example.com up again (its name is known again); an update that
    // drops big.example.com keeps a.example.com's address and drops the others (which name
    // they came from died with the old process).
    assert_eq!(udp_resolve(&g1, "a.example.com").unwrap().addrs, [PUBLIC]);
    let narrower = Egress {
        allow_domains: vec![pattern("a.example.com"), pattern("*.other.example")],
        ..Egress::none()
    };
    net.set_egress(1, &narrower).unwrap();
    let set = crate::netkit::dns_set(&s1, "wrnd_slot");
    assert!(set.contains("198.19.12.1 "), "still allowed: {set}");
    assert!(!set.contains("198.19.13."), "no longer allowed: {set}");

    drop(upstream);
    net.destroy_slot(1).unwrap();
    net.destroy_slot(2).unwrap();
}

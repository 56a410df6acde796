//! Egress policy for real (needs root and nft): allowed and denied networks, "only these"
//! with a domain allowed through the slot's resolver (and a local DNS server the test runs
//! as the upstream), `never_out` beating every allow, a runtime update that cuts an open
//! connection, and the host and another slot unreachable under every policy.
//!
//! Own names and addresses (prefix `wrne`, subnet 10.203.0.0/16, the pretend internet at
//! 198.19.10.0/30 with 203.0.113.10 and 10.99.0.5 routed behind it), so it runs alongside the
//! other network tests. Traffic stays inside namespaces this test creates.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_glue::net::dns::{self, DomainPattern};
use vmm_glue::net::netlink::Netlink;
use vmm_glue::net::slot::{GATEWAY_ADDR, GUEST_ADDR};
use vmm_glue::net::{netns, Egress, Ipv4Cidr, NetConfig, Network};

const PREFIX: &str = "wrne";
const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 0);
const INET_NS: &str = "wrne-inet";
const INET_HOST_LINK: &str = "wrnei-h";
/// The pretend internet's own address (also its DNS server, the resolver's upstream).
const PUBLIC_A: Ipv4Addr = Ipv4Addr::new(198, 19, 10, 1);
const INET_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 10, 2);
/// A second public address, behind the first.
const PUBLIC_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A private address (inside the default never_out), also behind the pretend internet.
const PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 5);
const REACH_TIMEOUT: Duration = Duration::from_secs(5);
const BLOCKED_TIMEOUT: Duration = Duration::from_millis(800);
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

fn guest_ns(index: u32) -> String {
    format!("wrne-g{index}")
}

/// A TCP server that echoes every line back as `<tag>:<line>`, one thread per connection,
/// until the peer closes; stops accepting after SERVER_LIFETIME or when dropped.
struct LineEcho {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LineEcho {
    fn start(listener: TcpListener, tag: &'static str) -> LineEcho {
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + SERVER_LIFETIME;
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                match listener.accept() {
                    Ok((conn, _)) => {
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(SERVER_LIFETIME));
                            let mut r = BufReader::new(conn.try_clone().unwrap().take(1 << 16));
                            let mut line = String::new();
                            while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                                let out = format!("{tag}:{}\n", line.trim_end());
                                if (&conn).write_all(out.as_bytes()).is_err() {
                                    return;
                                }
                                line.clear();
                            }
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            }
        });
        LineEcho {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LineEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `line` on `conn` and reads the answer line.
fn say(conn: &TcpStream, line: &str) -> io::Result<String> {
    (&*conn).write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    let mut r = BufReader::new(conn.take(256));
    r.read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
    }
    Ok(answer.trim_end().to_owned())
}

/// From the guest's namespace: connect to `addr`, say hello, return the answer.
fn hello_from(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    netns::run_in(ns, || {
        let conn = TcpStream::connect_timeout(&addr, timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        say(&conn, "hello")
    })
    .unwrap()
}

// ---- a tiny DNS server for the pretend internet ----

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

/// The records our DNS server knows: name -> (type, ttl, rdata).
fn zone(name: &str) -> Vec<(u16, u32, Vec<u8>)> {
    match name {
        "www.example.com" => vec![(dns::TYPE_CNAME, 300, name_wire("edge.cdn.test"))],
        "private.example.com" => vec![(dns::TYPE_A, 300, PRIVATE.octets().to_vec())],
        // Never answered: the resolver's upstream timeout.
        "slow.example.com" => vec![],
        "a.example.com" => vec![(dns::TYPE_A, 1, PUBLIC_A.octets().to_vec())],
        "blocked.example.org" => vec![(dns::TYPE_A, 300, PUBLIC_B.octets().to_vec())],
        _ => vec![],
    }
}

/// Answers from [`zone`], following the CNAME to `edge.cdn.test` (= PUBLIC_B) as a recursive
/// resolver would; records every name it was asked.
fn dns_answer(msg: &[u8]) -> Option<Vec<u8>> {
    let q = dns::parse_query(msg).ok()?;
    let mut answers = Vec::new();
    let mut owner = q.qname_wire.clone();
    for (ty, ttl, rdata) in zone(&q.name) {
        answers.push((owner.clone(), ty, ttl, rdata.clone()));
        if ty == dns::TYPE_CNAME {
            owner = rdata;
            answers.push((owner.clone(), dns::TYPE_A, 120, PUBLIC_B.octets().to_vec()));
        }
    }
    let qend = 12 + q.qname_wire.len() + 4;
    let mut m = msg[..qend].to_vec();
    m[2] |= 0x80;
    m[3] = 0x80;
    m[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
    m[10..12].copy_from_slice(&[0, 0]);
    for (owner, ty, ttl, rdata) in answers {
        m.extend_from_slice(&owner);
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&dns::CLASS_IN.to_be_bytes());
        m.extend_from_slice(&ttl.to_be_bytes());
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(&rdata);
    }
    Some(m)
}

struct DnsServer {
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    fn start(sock: UdpSocket) -> DnsServer {
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (asked.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + SERVER_LIFETIME;
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Ok(q) = dns::parse_query(&buf[..n]) {
                    a.lock().unwrap().push(q.name);
                }
                let slow = dns::parse_query(&buf[..n]).is_ok_and(|q| q.name == "slow.example.com");
                if slow {
                    continue;
                }
                if let Some(r) = dns_answer(&buf[..n]) {
                    let _ = sock.send_to(&r, from);
                }
            }
        });
        DnsServer {
            asked,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// From the guest's namespace: asks the slot's resolver for `name`; returns the rcode and
/// the A addresses of the answer.
fn resolve(ns: &str, name: &str) -> io::Result<(u8, Vec<Ipv4Addr>)> {
    netns::run_in(ns, || {
        let s = UdpSocket::bind(crate::netkit::sock(GUEST_ADDR, 0))?;
        s.set_read_timeout(Some(REACH_TIMEOUT))?;
        let q = query(0x5151, name);
        s.send_to(&q, crate::netkit::sock(GATEWAY_ADDR, 53))?;
        let mut buf = [0u8; 1500];
        let (n, _) = s.recv_from(&mut buf)?;
        let r = &buf[..n];
        assert_eq!(&r[0..2], &[0x51, 0x51], "the answer carries the guest's id");
        let sent = dns::build_query(0x5151, &dns::parse_query(&q).unwrap());
        let parsed = dns::parse_response(r, &sent)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let addrs = parsed
            .records
            .iter()
            .filter_map(|rec| match rec {
                dns::Record::A { addr, .. } => Some(*addr),
                _ => None,
            })
            .collect();
        Ok((parsed.rcode, addrs))
    })
    .unwrap()
}

// ---- namespaces ----

/// The pretend internet: PUBLIC_A on its link, PUBLIC_B and PRIVATE on its loopback, the
/// host routing both through it.
fn create_internet() {
    let i = crate::netkit::Internet {
        ns: INET_NS,
        host_link: INET_HOST_LINK,
        host_addr: INET_HOST_ADDR,
        addr: PUBLIC_A,
        loopback: &[PUBLIC_B, PRIVATE],
        default_route: true,
    }
    .create();
    let mut nl = Netlink::open().unwrap();
    nl.add_route_v4(Some((PUBLIC_B, 32)), Some(PUBLIC_A), i)
        .unwrap();
    nl.add_route_v4(Some((PRIVATE, 32)), Some(PUBLIC_A), i)
        .unwrap();
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

struct Cleanup<'a>(&'a Network);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        remove_all(self.0);
    }
}

fn pattern(s: &str) -> DomainPattern {
    DomainPattern::parse(s).unwrap()
}

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().unwrap()
}

#[test]
fn egress_policies_dns_and_updates() {
    if crate::netkit::skip_unless_root_with_nft("vmm-glue egress test") {
        return;
    }
    let cfg = NetConfig::new(PREFIX, SUBNET).unwrap();
    let net = Network::new(cfg.clone());
    remove_all(&net);
    let _cleanup = Cleanup(&net);
    net.setup_host().unwrap();
    create_internet();
    net.start_resolver(crate::netkit::sock(PUBLIC_A, 53))
        .unwrap();

    // Servers: on the pretend internet (A, B, the private address), the DNS upstream, a host
    // service on slot 1's link, and slot 2's guest.
    let inet_bind = |ip: Ipv4Addr| {
        netns::run_in(INET_NS, move || {
            TcpListener::bind(crate::netkit::sock(ip, 0))
        })
        .unwrap()
        .unwrap()
    };
    let a = LineEcho::start(inet_bind(PUBLIC_A), "a");
    let b = LineEcho::start(inet_bind(PUBLIC_B), "b");
    let private = LineEcho::start(inet_bind(PRIVATE), "private");
    let upstream = DnsServer::start(
        netns::run_in(INET_NS, || {
            UdpSocket::bind(crate::netkit::sock(PUBLIC_A, 53))
        })
        .unwrap()
        .unwrap(),
    );
    let (addr_a, addr_b, addr_private) = (
        crate::netkit::sock(PUBLIC_A, a.port),
        crate::netkit::sock(PUBLIC_B, b.port),
        crate::netkit::sock(PRIVATE, private.port),
    );

    let s1 = net.create_slot(1, &Egress::default()).unwrap();
    let s2 = net.create_slot(2, &Egress::default()).unwrap();
    crate::netkit::attach_stand_in_guest(&s1, &guest_ns(s1.index));
    crate::netkit::attach_stand_in_guest(&s2, &guest_ns(s2.index));
    let g2 = LineEcho::start(
        netns::run_in(&guest_ns(2), || {
            TcpListener::bind(crate::netkit::sock(GUEST_ADDR, 0))
        })
        .unwrap()
        .unwrap(),
        "g2",
    );
    let host_svc = LineEcho::start(
        TcpListener::bind(crate::netkit::sock(s1.host_addr, 0)).unwrap(),
        "host",
    );
    let g1 = guest_ns(1);
    let reach = |addr: SocketAddr| hello_from(&g1, addr, REACH_TIMEOUT);
    let blocked = |addr: SocketAddr| hello_from(&g1, addr, BLOCKED_TIMEOUT).is_err();

    // Open policy: both public servers; never the private one (default never_out).
    assert_eq!(reach(addr_a).unwrap(), "a:hello");
    assert_eq!(reach(addr_b).unwrap(), "b:hello");
    assert!(blocked(addr_private), "reached a never_out address");
    // Any name resolves while the policy is open; nothing enters the DNS set for it.
    let (rcode, addrs) = resolve(&g1, "blocked.example.org").unwrap();
    assert_eq!((rcode, addrs), (0, vec![PUBLIC_B]));

    // A denied CIDR; the rest stays open.
    let t = Instant::now();
    net.set_egress(
        1,
        &Egress {
            deny: vec![cidr("198.19.10.0/24")],
            ..Egress::default()
        },
    )
    .unwrap();
    println!(
        "egress update took {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(blocked(addr_a), "reached a denied network");
    assert_eq!(reach(addr_b).unwrap(), "b:hello");

    // "Only these": deny everything, allow A's address: allow wins over deny.
    net.set_egress(
        1,
        &Egress {
            allow: vec![cidr("198.19.10.1")],
            ..Egress::none()
        },
    )
    .unwrap();
    assert_eq!(reach(addr_a).unwrap(), "a:hello");
    assert!(blocked(addr_b), "reached an address outside the allow list");

    // never_out beats an explicit allow...
    net.set_egress(
        1,
        &Egress {
            allow: vec![cidr("10.99.0.5"), Ipv4Cidr::ALL],
            ..Egress::default()
        },
    )
    .unwrap();
    assert!(blocked(addr_private), "an allow beat never_out");
    // ...and it is never_out that stops it: a host whose never_out leaves 10/8 out reaches
    // it with the same policy (proof the check above can fail).
    let lax = Network::new(cfg.clone().with_never_out(vec![]).unwrap());
    lax.set_egress(
        1,
        &Egress {
            allow: vec![cidr("10.99.0.5")],
            ..Egress::default()
        },
    )
    .unwrap();
    assert_eq!(reach(addr_private).unwrap(), "private:hello");
    // Under an allow-everything policy the host, the other slot and link-local services stay
    // out of reach (the host's table and the slot subnet in never_out).
    net.set_egress(
        1,
        &Egress {
            allow: vec![Ipv4Cidr::ALL],
            ..Egress::default()
        },
    )
    .unwrap();
    assert!(
        blocked(crate::netkit::sock(s1.host_addr, host_svc.port)),
        "reached the host"
    );
    assert!(
        blocked(crate::netkit::sock(s2.guest_alias, g2.port)),
        "reached slot 2"
    );
    assert!(blocked(crate::netkit::sock(
        Ipv4Addr::new(169, 254, 169, 254),
        80
    )));
    assert_eq!(
        hello_from(
            &guest_ns(2),
            crate::netkit::sock(GUEST_ADDR, g2.port),
            REACH_TIMEOUT
        )
        .unwrap(),
        "g2:hello",
        "slot 2's guest serves (so the refusal above is the firewall's)"
    );

    // Under a policy that denies everything, the host still reaches the guest's servers
    // (port exposure): the guest's answers are replies, not connections it opens.
    net.set_egress(1, &Egress::none()).unwrap();
    let g1_server = LineEcho::start(
        netns::run_in(&g1, || {
            TcpListener::bind(crate::netkit::sock(GUEST_ADDR, 0))
        })
        .unwrap()
        .unwrap(),
        "g1",
    );
    let conn = TcpStream::connect_timeout(
        &crate::netkit::sock(s1.guest_alias, g1_server.port),
        REACH_TIMEOUT,
    )
    .unwrap();
    conn.set_read_timeout(Some(REACH_TIMEOUT)).unwrap();
    assert_eq!(say(&conn, "from the host").unwrap(), "g1:from the host");
    drop((conn, g1_server));

    // Deny everything, allow *.example.com by name.
    let only_example = Egress {
        allow_domains: vec![pattern("*.example.com")],
        ..Egress::none()
    };
    net.set_egress(1, &only_example).unwrap();
    assert!(blocked(addr_b), "reached B before resolving its name");
    let asked_before = upstream.asked.lock().unwrap().len();
    let (rcode, _) = resolve(&g1, "blocked.example.org").unwrap();
    assert_eq!(rcode, dns::RCODE_REFUSED);
    let (rcode, _) = resolve(&g1, "example.com").unwrap();
    assert_eq!(
        rcode,
        dns::RCODE_REFUSED,
        "*.example.com is not example.com"
    );
    assert_eq!(
        upstream.asked.lock().unwrap().len(),
        asked_before,
        "a refused name left the host"
    );
    // www.example.com is a CNAME to edge.cdn.test = B: B becomes reachable.
    let t = Instant::now();
    let (rcode, addrs) = resolve(&g1, "www.example.com").unwrap();
    println!(
        "allowed lookup through the slot resolver took {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!((rcode, addrs), (0, vec![PUBLIC_B]));
    let set = crate::netkit::dns_set(&s1, "wrne_slot");
    assert!(set.contains("203.0.113.10 timeout 2m"), "{set}");
    assert_eq!(reach(addr_b).unwrap(), "b:hello");
    assert!(blocked(addr_a), "A is not allowed yet");
    // A TTL of 1 s enters the set with the minimum of 30 s; an answer inside never_out is
    // passed to the guest but never enters the set.
    let (_, addrs) = resolve(&g1, "a.example.com").unwrap();
    assert_eq!(addrs, vec![PUBLIC_A]);
    let (_, addrs) = resolve(&g1, "private.example.com").unwrap();
    assert_eq!(addrs, vec![PRIVATE]);
    let set = crate::netkit::dns_set(&s1, "wrne_slot");
    assert!(set.contains("198.19.10.1 timeout 30s"), "{set}");
    assert!(!set.contains("10.99.0.5"), "{set}");
    assert_eq!(reach(addr_a).unwrap(), "a:hello");
    assert!(blocked(addr_private));

    // Bad and excessive input: a message that is not a query gets FORMERR (or nothing, if it
    // claims to be an answer), a flood beyond the rate gets no answers, an upstream that does
    // not answer gives SERVFAIL; the resolver keeps serving.
    let replies = netns::run_in(&g1, || -> io::Result<(Option<u8>, usize, usize)> {
        let s = UdpSocket::bind(crate::netkit::sock(GUEST_ADDR, 0))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        let gw = crate::netkit::sock(GATEWAY_ADDR, 53);
        let mut buf = [0u8; 1500];
        let mut two_questions = query(7, "www.example.com");
        two_questions[5] = 2;
        s.send_to(&two_questions, gw)?;
        let formerr = s.recv_from(&mut buf).ok().map(|_| buf[3] & 0xf);
        s.send_to(&[0xff; 40], gw)?;
        let after_garbage = s.recv_from(&mut buf).is_ok() as usize;
        let sent = 300;
        for i in 0..sent {
            s.send_to(&query(i as u16, "blocked.example.org"), gw)?;
        }
        let mut answered = 0;
        while s.recv_from(&mut buf).is_ok() {
            answered += 1;
        }
        Ok((formerr, after_garbage, answered))
    })
    .unwrap()
    .unwrap();
    assert_eq!(replies.0, Some(dns::RCODE_FORMERR));
    assert_eq!(
        replies.1, 0,
        "an answer to a message claiming to be an answer"
    );
    println!("flood of 300 queries: {} answered", replies.2);
    assert!(
        replies.2 <= 120 && replies.2 >= 50,
        "rate limit: {} of 300 answered",
        replies.2
    );
    std::thread::sleep(Duration::from_secs(1)); // the bucket refills
    let t = Instant::now();
    let (rcode, _) = resolve(&g1, "slow.example.com").unwrap();
    assert_eq!(rcode, dns::RCODE_SERVFAIL);
    assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());
    let (rcode, addrs) = resolve(&g1, "a.example.com").unwrap();
    assert_eq!((rcode, addrs), (0, vec![PUBLIC_A]));

    // A runtime update cuts an open connection to what it now refuses, keeps the set's
    // entries for names still allowed, and takes effect without a restart.
    let conn = netns::run_in(&g1, || TcpStream::connect_timeout(&addr_b, REACH_TIMEOUT))
        .unwrap()
        .unwrap();
    conn.set_read_timeout(Some(REACH_TIMEOUT)).unwrap();
    assert_eq!(say(&conn, "one").unwrap(), "b:one");
    net.set_egress(
        1,
        &Egress {
            allow_domains: vec![pattern("a.example.com")],
            ..Egress::none()
        },
    )
    .unwrap();
    let t = Instant::now();
    let cut = say(&conn, "two");
    assert!(cut.is_err(), "the open connection survived: {cut:?}");
    assert!(
        t.elapsed() < REACH_TIMEOUT,
        "the connection was not cut at once"
    );
    let set = crate::netkit::dns_set(&s1, "wrne_slot");
    assert!(set.contains("198.19.10.1"), "kept: {set}");
    assert!(!set.contains("203.0.113.10"), "dropped: {set}");
    assert_eq!(reach(addr_a).unwrap(), "a:hello");
    assert!(blocked(addr_b));
    net.set_egress(1, &Egress::default()).unwrap();
    assert_eq!(reach(addr_b).unwrap(), "b:hello");

    // The resolver's counters (the agent's /metrics) saw all of it.
    use vmm_glue::net::resolver::stats;
    assert!(
        stats::REFUSED.get() >= 3,
        "refused {}",
        stats::REFUSED.get()
    );
    assert!(stats::RATE_DROPPED.get() >= 150);
    assert!(stats::ADDRESSES_ADDED.get() >= 2);
    assert!(stats::NEVER_OUT_DROPPED.get() >= 1);
    assert!(stats::SERVFAIL.get() >= 1);
    assert!(stats::FORWARDED.get() >= 5);

    // Bad input is a typed error.
    assert!(matches!(
        net.set_egress(5, &Egress::default()),
        Err(vmm_glue::net::Error::NoSlot { index: 5 })
    ));

    drop((a, b, private, upstream, g2, host_svc));
    net.destroy_slot(1).unwrap();
    net.destroy_slot(2).unwrap();
}

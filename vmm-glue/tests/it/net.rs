//! Network slots for real (needs root and nft): two slots with stand-in guests, reachability
//! and isolation, NAT to a pretend internet, leftover clean-up, and nothing left afterwards.
//!
//! Traffic goes only to addresses inside namespaces this test creates (and loopback). Names
//! use the prefix `wrnt` and the subnet 10.201.0.0/16 so the test never touches the slots of
//! an agent running on the same host.
//!
//! The stand-in guest: Firecracker's guest sits behind `tap0` in the slot's namespace. Here
//! the test replaces the tap with a veth pair of the same name and address whose other end
//! (`eth0`, 169.254.0.21/30, default route via 169.254.0.22) is in a namespace of its own, so
//! the guest has its own network stack, as a VM has, and every packet crosses the slot's
//! `tap0` and its rules exactly as a real guest's would.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_glue::net::netlink::Netlink;
use vmm_glue::net::slot::{GUEST_ADDR, TAP_NAME};
use vmm_glue::net::{firewall, netns, Egress, NetConfig, Network};

const PREFIX: &str = "wrnt";
const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 0);
const INET_NS: &str = "wrnt-inet";
const INET_HOST_LINK: &str = "wrnti-h";
const INET_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const INET_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A connection that should work gets this long.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection the firewall drops fails after this long.
const BLOCKED_TIMEOUT: Duration = Duration::from_millis(800);
/// Echo servers stop on their own after this, whatever happens to the test.
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

fn guest_ns(index: u32) -> String {
    format!("wrnt-g{index}")
}

/// Why this test cannot run here, if it cannot.
fn missing() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root");
    }
    if firewall::nft_path().is_none() {
        return Some("nft not installed (apt-get install nftables)");
    }
    None
}

/// Prints `skipped: <reason>` and returns true, or panics under WRENN_REQUIRE_E2E=1.
fn skip() -> bool {
    let Some(reason) = missing() else {
        return false;
    };
    proto::skip::skip("vmm-glue network test", reason);
    true
}

/// A TCP echo server that answers each line with `<tag>:<line>` and records peers.
struct EchoServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(listener: TcpListener, tag: &'static str) -> EchoServer {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peers.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + SERVER_LIFETIME;
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        p.lock().unwrap().push(peer);
                        let _ = answer(conn, tag);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            }
        });
        EchoServer {
            addr,
            peers,
            stop,
            thread: Some(thread),
        }
    }
}

fn answer(conn: TcpStream, tag: &str) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(REACH_TIMEOUT))?;
    let line = read_line(&conn)?;
    (&conn).write_all(format!("{tag}:{line}\n").as_bytes())
}

/// One line (at most 256 bytes), without its newline.
fn read_line(conn: &TcpStream) -> io::Result<String> {
    let mut line = String::new();
    BufReader::new(conn.take(256)).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects, sends "hello\n", returns the answer line.
fn echo(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    (&conn).write_all(b"hello\n")?;
    read_line(&conn)
}

/// `echo` from inside namespace `ns`.
fn echo_from(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    netns::run_in(ns, || echo(addr, timeout)).unwrap()
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The pretend internet: a namespace with 198.18.0.1/30, its peer 198.18.0.2 on the host.
fn create_internet() {
    crate::netkit::Internet {
        ns: INET_NS,
        host_link: INET_HOST_LINK,
        host_addr: INET_HOST_ADDR,
        addr: INET_SERVER,
        loopback: &[],
        default_route: false,
    }
    .create();
}

/// Removes everything the test may have made, also after a failed run. Best effort.
fn remove_all(net: &Network) {
    let _ = net.cleanup_leftovers(&[]);
    for i in 0..8 {
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

/// Everything of ours still on the host: links, namespaces, nft tables.
fn leftovers() -> Vec<String> {
    let mut out = Vec::new();
    let mut nl = Netlink::open().unwrap();
    for l in nl.links().unwrap() {
        if l.name.starts_with(PREFIX) {
            out.push(format!("link {}", l.name));
        }
    }
    for n in netns::list().unwrap() {
        if n.starts_with(PREFIX) {
            out.push(format!("netns {n}"));
        }
    }
    for (family, name) in firewall::list_tables().unwrap() {
        if name.starts_with(PREFIX) {
            out.push(format!("table {family} {name}"));
        }
    }
    out
}

#[test]
fn slots_isolate_nat_and_clean_up() {
    if skip() {
        return;
    }
    let net = Network::new(NetConfig::new(PREFIX, SUBNET).unwrap());
    remove_all(&net); // a previous run that died
    let _cleanup = Cleanup(&net);

    assert!(matches!(
        net.create_slot(1, &Egress::default()),
        Err(vmm_glue::net::Error::HostNotReady)
    ));
    net.setup_host().unwrap();
    net.setup_host().unwrap(); // idempotent
    create_internet();
    // sysctls written on a thread inside a namespace are that namespace's (the slot code
    // relies on it): turning forwarding off in the internet namespace leaves the host's on.
    let ip_forward = "/proc/sys/net/ipv4/ip_forward";
    netns::run_in(INET_NS, || std::fs::write(ip_forward, "0"))
        .unwrap()
        .unwrap();
    let inside = netns::run_in(INET_NS, || std::fs::read_to_string(ip_forward));
    assert_eq!(inside.unwrap().unwrap().trim(), "0");
    assert_eq!(std::fs::read_to_string(ip_forward).unwrap().trim(), "1");

    let t = Instant::now();
    let s1 = net.create_slot(1, &Egress::default()).unwrap();
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    let deny_internet = Egress {
        deny: vec!["198.18.0.0/15".parse().unwrap()],
        ..Egress::default()
    };
    let s2 = net.create_slot(2, &deny_internet).unwrap();
    println!("slot create took {create_ms:.1} ms");

    // Inside the slot: forwarding on, IPv6 off.
    let sysctl = |path: &'static str| {
        netns::run_in(&s1.netns, || std::fs::read_to_string(path))
            .unwrap()
            .unwrap()
    };
    assert_eq!(sysctl(ip_forward).trim(), "1");
    assert_eq!(
        sysctl("/proc/sys/net/ipv6/conf/all/disable_ipv6").trim(),
        "1"
    );
    // The slot's own table is inside its namespace, not on the host.
    let tables = netns::run_in(&s1.netns, firewall::list_tables)
        .unwrap()
        .unwrap();
    assert!(
        tables.contains(&("ip".into(), "wrnt_slot".into())),
        "{tables:?}"
    );

    crate::netkit::attach_stand_in_guest(&s1, &guest_ns(s1.index));
    crate::netkit::attach_stand_in_guest(&s2, &guest_ns(s2.index));

    // Creating an existing, live slot again changes nothing that matters.
    let t = Instant::now();
    assert_eq!(net.create_slot(1, &Egress::default()).unwrap(), s1);
    println!(
        "slot re-create (idempotent) took {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    // Stand-in guests listen on the fixed guest address, each in its own namespace.
    let bind_guest = || TcpListener::bind(sock(GUEST_ADDR, 0));
    let g1 = EchoServer::start(
        netns::run_in(&guest_ns(1), bind_guest).unwrap().unwrap(),
        "g1",
    );
    let g2 = EchoServer::start(
        netns::run_in(&guest_ns(2), bind_guest).unwrap().unwrap(),
        "g2",
    );
    // Host services: on slot 1's host-side address, on the host end of the internet link,
    // and on loopback.
    let h_veth = EchoServer::start(TcpListener::bind(sock(s1.host_addr, 0)).unwrap(), "host");
    let h_inet = EchoServer::start(TcpListener::bind(sock(INET_HOST_ADDR, 0)).unwrap(), "host");
    let h_lo = EchoServer::start(
        TcpListener::bind(sock(Ipv4Addr::LOCALHOST, 0)).unwrap(),
        "host",
    );
    let inet = EchoServer::start(
        netns::run_in(INET_NS, || TcpListener::bind(sock(INET_SERVER, 0)))
            .unwrap()
            .unwrap(),
        "inet",
    );

    // Host -> each guest through its per-slot alias.
    let t = Instant::now();
    assert_eq!(
        echo(sock(s1.guest_alias, g1.addr.port()), REACH_TIMEOUT).unwrap(),
        "g1:hello"
    );
    println!(
        "host -> guest echo through the alias took {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        echo(sock(s2.guest_alias, g2.addr.port()), REACH_TIMEOUT).unwrap(),
        "g2:hello"
    );
    // The guests saw the host's end of their slot's link, not some other address.
    assert_eq!(g1.peers.lock().unwrap()[0].ip(), IpAddr::V4(s1.host_addr));
    // The host's own services answer the host (so the refusals below are the firewall's).
    assert_eq!(
        echo(sock(s1.host_addr, h_veth.addr.port()), REACH_TIMEOUT).unwrap(),
        "host:hello"
    );
    assert_eq!(
        echo(sock(INET_HOST_ADDR, h_inet.addr.port()), REACH_TIMEOUT).unwrap(),
        "host:hello"
    );

    // Guest 1 cannot reach guest 2, nor any host service.
    let g1ns = guest_ns(1);
    for (what, addr) in [
        ("slot 2's guest", sock(s2.guest_alias, g2.addr.port())),
        (
            "host service on the slot link",
            sock(s1.host_addr, h_veth.addr.port()),
        ),
        (
            "host service on another host address",
            sock(INET_HOST_ADDR, h_inet.addr.port()),
        ),
    ] {
        let r = echo_from(&g1ns, addr, BLOCKED_TIMEOUT);
        assert!(r.is_err(), "guest 1 reached {what} at {addr}: {r:?}");
    }
    // Nor can the slot's namespace itself.
    for (what, addr) in [
        ("slot 2's guest", sock(s2.guest_alias, g2.addr.port())),
        (
            "host service on the slot link",
            sock(s1.host_addr, h_veth.addr.port()),
        ),
        (
            "host loopback service",
            sock(Ipv4Addr::LOCALHOST, h_lo.addr.port()),
        ),
    ] {
        let r = echo_from(&s1.netns, addr, BLOCKED_TIMEOUT);
        assert!(
            r.is_err(),
            "slot 1's namespace reached {what} at {addr}: {r:?}"
        );
    }
    // The host services accepted nothing but the host's own control connections.
    assert_eq!(h_veth.peers.lock().unwrap().len(), 1);
    assert_eq!(h_inet.peers.lock().unwrap().len(), 1);
    assert_eq!(h_lo.peers.lock().unwrap().len(), 0);
    assert_eq!(g2.peers.lock().unwrap().len(), 1);

    // Egress through the NAT: guest 1 reaches the internet server, which sees the host's
    // masqueraded address; guest 2's policy denies that network.
    let r = echo_from(&g1ns, sock(INET_SERVER, inet.addr.port()), REACH_TIMEOUT);
    assert_eq!(r.unwrap(), "inet:hello");
    assert_eq!(
        inet.peers.lock().unwrap()[0].ip(),
        IpAddr::V4(INET_HOST_ADDR)
    );
    let r = echo_from(
        &guest_ns(2),
        sock(INET_SERVER, inet.addr.port()),
        BLOCKED_TIMEOUT,
    );
    assert!(
        r.is_err(),
        "guest 2 reached the internet despite its egress policy: {r:?}"
    );
    assert_eq!(inet.peers.lock().unwrap().len(), 1);

    // Changing a live slot's policy by creating it again: "only these" with an allow list
    // that covers the server lets guest 2 out (allow wins over deny); one that does not,
    // blocks it again.
    let inet_addr = sock(INET_SERVER, inet.addr.port());
    let allow = |cidr: &str| Egress {
        allow: vec![cidr.parse().unwrap()],
        ..Egress::none()
    };
    net.create_slot(2, &allow("198.18.0.1/32")).unwrap();
    let r = echo_from(&guest_ns(2), inet_addr, REACH_TIMEOUT);
    assert_eq!(r.unwrap(), "inet:hello");
    net.create_slot(2, &allow("198.19.0.0/16")).unwrap();
    let r = echo_from(&guest_ns(2), inet_addr, BLOCKED_TIMEOUT);
    assert!(r.is_err(), "guest 2 got past its allow list: {r:?}");
    assert_eq!(inet.peers.lock().unwrap().len(), 2);

    // A crash left slot 3 and a bare namespace for slot 7; start-up clean-up keeps the
    // re-adopted slots 1 and 2 and removes the rest.
    net.create_slot(3, &Egress::none()).unwrap();
    netns::create("wrnt-7").unwrap();
    assert_eq!(net.cleanup_leftovers(&[1, 2]).unwrap(), vec![3, 7]);
    assert!(!netns::exists("wrnt-3").unwrap());
    assert_eq!(
        echo(sock(s1.guest_alias, g1.addr.port()), REACH_TIMEOUT).unwrap(),
        "g1:hello"
    );

    drop((g1, g2, h_veth, h_inet, h_lo, inet));
    net.destroy_slot(1).unwrap();
    net.destroy_slot(2).unwrap();
    net.destroy_slot(2).unwrap(); // idempotent
    for i in [1, 2] {
        assert!(netns::delete(&guest_ns(i)).unwrap());
    }
    let mut nl = Netlink::open().unwrap();
    assert!(nl.delete_link(INET_HOST_LINK).unwrap());
    assert!(netns::delete(INET_NS).unwrap());
    net.teardown_host().unwrap();

    let left = leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn netlink_errors_are_typed() {
    if skip() {
        return;
    }
    let mut nl = Netlink::open().unwrap();
    assert_eq!(nl.link_by_name("wrnt-absent").unwrap(), None);
    assert!(!nl.delete_link("wrnt-absent").unwrap());
    let e = nl.set_up(0x7fff_fff0, true).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENODEV), "{e}");
    // Creating a link that exists: EEXIST, and the socket still works afterwards.
    let e = nl.create_veth("lo", "wrnt-peer", None).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EEXIST), "{e}");
    assert!(nl.link_by_name("lo").unwrap().is_some());
    assert!(nl.link_by_name("wrnt-peer").unwrap().is_none());
}

/// The Firecracker this test may start, if any (WRENN_FIRECRACKER).
fn firecracker() -> Option<std::path::PathBuf> {
    let path = std::path::PathBuf::from(std::env::var_os("WRENN_FIRECRACKER")?);
    path.is_file().then_some(path)
}

/// One HTTP request on Firecracker's API socket; returns the status line.
fn fc_put(sock: &std::path::Path, path: &str, body: &str) -> io::Result<String> {
    let conn = std::os::unix::net::UnixStream::connect(sock)?;
    conn.set_read_timeout(Some(REACH_TIMEOUT))?;
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    (&conn).write_all(req.as_bytes())?;
    let mut line = String::new();
    BufReader::new((&conn).take(1024)).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// Firecracker, started inside a slot's namespace, attaches its network interface to the
/// slot's tap (it opens the tap when the interface is configured, before boot), and
/// re-creating the slot while it holds the tap leaves the tap alone.
#[test]
fn firecracker_attaches_to_slot_tap() {
    if skip() {
        return;
    }
    let Some(fc) = firecracker() else {
        proto::skip::skip(
            "vmm-glue network test",
            "WRENN_FIRECRACKER is not set to a file",
        );
        return;
    };
    // Own prefix and subnet, so this runs alongside the other test.
    let net = Network::new(NetConfig::new("wrnf", Ipv4Addr::new(10, 202, 0, 0)).unwrap());
    let _ = net.cleanup_leftovers(&[]);
    net.setup_host().unwrap();
    struct Done<'a>(&'a Network);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            let _ = self.0.cleanup_leftovers(&[]);
            let _ = self.0.teardown_host();
        }
    }
    let _done = Done(&net);
    let slot = net.create_slot(0, &Egress::default()).unwrap();

    let dir = std::env::temp_dir().join(format!("wrnf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let api = dir.join("fc.sock");
    let _ = std::fs::remove_file(&api);
    // A child starts in the namespace of the thread that spawns it.
    let mut child = netns::run_in(&slot.netns, || {
        std::process::Command::new(&fc)
            .arg("--api-sock")
            .arg(&api)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    })
    .unwrap()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let body = format!(r#"{{"iface_id":"eth0","host_dev_name":"{TAP_NAME}"}}"#);
    let status = fc_put(&api, "/network-interfaces/eth0", &body);
    // While Firecracker holds the tap, creating the slot again must not disturb it.
    let again = net.create_slot(0, &Egress::default());
    // A second interface on the same tap fails: proof the first one really holds it.
    let body = format!(r#"{{"iface_id":"eth1","host_dev_name":"{TAP_NAME}"}}"#);
    let second = fc_put(&api, "/network-interfaces/eth1", &body);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let status = status.unwrap();
    assert!(status.starts_with("HTTP/1.1 204"), "{status}");
    assert_eq!(again.unwrap(), slot);
    let second = second.unwrap();
    assert!(second.starts_with("HTTP/1.1 400"), "{second}");

    net.destroy_slot(0).unwrap();
    net.teardown_host().unwrap();
    let mut nl = Netlink::open().unwrap();
    assert!(nl
        .links()
        .unwrap()
        .iter()
        .all(|l| !l.name.starts_with("wrnf")));
    assert!(netns::list()
        .unwrap()
        .iter()
        .all(|n| !n.starts_with("wrnf")));
    let tables = firewall::list_tables().unwrap();
    assert!(
        tables.iter().all(|(_, n)| !n.starts_with("wrnf")),
        "{tables:?}"
    );
}

/// Links move between namespaces and go up and down; nothing is left afterwards.
#[test]
fn netlink_moves_links_and_sets_state() {
    if skip() {
        return;
    }
    let (ns, a, b) = ("wrnt-move", "wrnt-m0", "wrnt-m1");
    let mut nl = Netlink::open().unwrap();
    let _ = nl.delete_link(a);
    let _ = netns::delete(ns);
    assert!(netns::create(ns).unwrap());
    assert!(!netns::create(ns).unwrap()); // idempotent
    let fd = netns::open(ns).unwrap();

    nl.create_veth(a, b, None).unwrap();
    let e = nl.create_veth(a, b, None).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EEXIST), "{e}");
    let link_b = nl.link_by_name(b).unwrap().unwrap();
    assert_eq!(link_b.kind.as_deref(), Some("veth"));
    nl.set_up(link_b.index, true).unwrap();
    assert!(nl.link_by_name(b).unwrap().unwrap().up);
    nl.set_up(link_b.index, false).unwrap();
    assert!(!nl.link_by_name(b).unwrap().unwrap().up);

    nl.move_to_netns(link_b.index, fd.as_fd()).unwrap();
    assert_eq!(nl.link_by_name(b).unwrap(), None);
    let inside = netns::run_in(ns, || {
        let mut nl = Netlink::open().unwrap();
        nl.links()
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect::<Vec<_>>()
    })
    .unwrap();
    assert!(inside.contains(&b.to_owned()), "{inside:?}");
    assert!(inside.contains(&"lo".to_owned()), "{inside:?}");

    // Deleting one end of a veth pair removes the other, in whatever namespace it is.
    assert!(nl.delete_link(a).unwrap());
    let left = netns::run_in(ns, || Netlink::open().unwrap().link_by_name(b).unwrap()).unwrap();
    assert_eq!(left, None);
    assert!(netns::delete(ns).unwrap());
    assert!(!netns::delete(ns).unwrap()); // idempotent
    assert!(!netns::exists(ns).unwrap());
}

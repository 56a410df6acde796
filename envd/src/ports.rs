//! Makes services that listen only on loopback inside the guest reachable on the guest's
//! network address: scans /proc/net/tcp{,6} every [`PORT_SCAN_INTERVAL`], opens a listener
//! on `<guest address>:<port>` for each loopback-only listener, forwards accepted
//! connections to `127.0.0.1:<port>` (or `[::1]`), and closes the listener once the
//! service is gone. Ports with a wildcard listener (0.0.0.0 or ::) are reachable already.
//!
//! Bounded: at most [`FORWARDED_PORTS_MAX`] ports and [`FORWARDED_CONNECTIONS_MAX`]
//! connections; each connection is one thread with two fixed buffers, polling both sockets.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, info, warn};

use crate::limits::{
    FORWARDED_CONNECTIONS_MAX, FORWARDED_PORTS_MAX, FORWARD_BUFFER_LEN, PORT_SCAN_INTERVAL,
};

/// A listening socket found in /proc/net/tcp{,6}.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: IpAddr,
    pub port: u16,
}

const TCP_LISTEN: &str = "0A";

/// Parses /proc/net/tcp (IPv4) or /proc/net/tcp6 text, keeping LISTEN sockets. Lines that
/// do not parse are skipped. Addresses are hex words in host byte order.
pub fn parse_proc_net_tcp(text: &str) -> Vec<Listener> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut f = line.split_whitespace();
        let (Some(_sl), Some(local), Some(_rem), Some(state)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if state != TCP_LISTEN {
            continue;
        }
        let Some((a, p)) = local.split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(p, 16) else {
            continue;
        };
        let addr = match a.len() {
            8 => match u32::from_str_radix(a, 16) {
                Ok(w) => IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes())),
                Err(_) => continue,
            },
            32 => {
                let mut bytes = [0u8; 16];
                let mut ok = true;
                for i in 0..4 {
                    match u32::from_str_radix(&a[i * 8..i * 8 + 8], 16) {
                        Ok(w) => bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes()),
                        Err(_) => ok = false,
                    }
                }
                if !ok {
                    continue;
                }
                IpAddr::V6(Ipv6Addr::from(bytes))
            }
            _ => continue,
        };
        out.push(Listener { addr, port });
    }
    out
}

/// Ports that have a loopback listener and no wildcard listener, with the loopback address
/// to forward to (127.0.0.1 preferred over ::1).
pub fn loopback_only(listeners: &[Listener]) -> HashMap<u16, IpAddr> {
    let mut out: HashMap<u16, IpAddr> = HashMap::new();
    for l in listeners {
        let is_v4_loop = l.addr == IpAddr::V4(Ipv4Addr::LOCALHOST);
        let is_v6_loop = l.addr == IpAddr::V6(Ipv6Addr::LOCALHOST);
        if is_v4_loop || (is_v6_loop && !out.contains_key(&l.port)) {
            out.insert(l.port, l.addr);
        }
    }
    for l in listeners {
        if l.addr.is_unspecified() {
            out.remove(&l.port);
        }
    }
    out
}

/// The guest's first non-loopback IPv4 address.
pub fn guest_address() -> Option<IpAddr> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `ifap`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family field is always readable.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            if family == libc::AF_INET {
                // SAFETY: for AF_INET the address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() {
                    found = Some(IpAddr::V4(ip));
                    break;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: frees the list getifaddrs allocated; no reference into it survives.
    unsafe { libc::freeifaddrs(ifap) };
    found
}

fn scan() -> Vec<Listener> {
    let mut all = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(t) = std::fs::read_to_string(f) {
            all.extend(parse_proc_net_tcp(&t));
        }
    }
    all
}

struct Forward {
    listener: TcpListener,
    target: SocketAddr,
}

/// The forwarder's state; [`Forwarder::run`] loops forever.
pub struct Forwarder {
    guest: IpAddr,
    /// Only these ports (tests); None = all.
    only: Option<Vec<u16>>,
    forwards: HashMap<u16, Forward>,
    /// Ports whose bind failed (someone else holds guest:port); retried on later scans.
    failed: HashMap<u16, Instant>,
    connections: Arc<AtomicUsize>,
}

impl Forwarder {
    pub fn new(guest: IpAddr, only: Option<Vec<u16>>) -> Forwarder {
        Forwarder {
            guest,
            only,
            forwards: HashMap::new(),
            failed: HashMap::new(),
            connections: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Number of ports forwarded now.
    pub fn ports(&self) -> usize {
        self.forwards.len()
    }

    /// Reconciles the forwarded ports with the current loopback listeners.
    pub fn rescan(&mut self) {
        let wanted = loopback_only(&scan());
        let wanted: HashMap<u16, IpAddr> = wanted
            .into_iter()
            .filter(|(p, _)| self.only.as_ref().is_none_or(|o| o.contains(p)))
            .collect();
        self.forwards.retain(|port, _| {
            let keep = wanted.contains_key(port);
            if !keep {
                info!("port forward stopped port={port}");
            }
            keep
        });
        self.failed.retain(|p, _| wanted.contains_key(p));
        for (&port, &addr) in &wanted {
            if self.forwards.contains_key(&port) || self.failed.contains_key(&port) {
                continue;
            }
            if self.forwards.len() >= FORWARDED_PORTS_MAX {
                warn!("port forward limit reached port={port} max={FORWARDED_PORTS_MAX}");
                break;
            }
            match TcpListener::bind(SocketAddr::new(self.guest, port)) {
                Ok(l) => {
                    if l.set_nonblocking(true).is_err() {
                        continue;
                    }
                    info!("port forward started port={port} guest={}", self.guest);
                    self.forwards.insert(
                        port,
                        Forward {
                            listener: l,
                            target: SocketAddr::new(addr, port),
                        },
                    );
                }
                Err(e) => {
                    debug!("port forward bind failed port={port} error={e}");
                    self.failed.insert(port, Instant::now());
                }
            }
        }
    }

    /// Waits up to one scan interval for connections and starts forwarding them.
    pub fn accept_round(&mut self) {
        let ports: Vec<u16> = self.forwards.keys().copied().collect();
        let mut pfds: Vec<libc::pollfd> = ports
            .iter()
            .map(|p| libc::pollfd {
                fd: self.forwards[p].listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = PORT_SCAN_INTERVAL.as_millis() as libc::c_int;
        // SAFETY: the pointer and length describe `pfds`.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            if pfds.is_empty() {
                std::thread::sleep(PORT_SCAN_INTERVAL);
            }
            return;
        }
        for (i, p) in pfds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            let f = &self.forwards[&ports[i]];
            while let Ok((client, _)) = f.listener.accept() {
                if self.connections.load(Ordering::SeqCst) >= FORWARDED_CONNECTIONS_MAX {
                    warn!("forwarded connection limit reached max={FORWARDED_CONNECTIONS_MAX}");
                    continue; // dropping `client` refuses it
                }
                let target = f.target;
                let count = self.connections.clone();
                count.fetch_add(1, Ordering::SeqCst);
                let spawned = std::thread::Builder::new()
                    .name("forward".into())
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        if let Err(e) = forward_connection(client, target) {
                            debug!("forwarded connection ended error={e}");
                        }
                        count.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    self.connections.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    pub fn run(mut self) {
        loop {
            self.rescan();
            let until = Instant::now() + PORT_SCAN_INTERVAL;
            while Instant::now() < until {
                self.accept_round();
            }
        }
    }
}

/// Copies both directions between `a` and a new connection to `target` until both are done.
fn forward_connection(a: TcpStream, target: SocketAddr) -> io::Result<()> {
    let b = TcpStream::connect(target)?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    let mut bufs = [Pipe::default(), Pipe::default()];
    let socks = [&a, &b];
    loop {
        // Pipe 0: a -> b, pipe 1: b -> a.
        let mut pfds = [
            libc::pollfd {
                fd: a.as_raw_fd(),
                events: 0,
                revents: 0,
            },
            libc::pollfd {
                fd: b.as_raw_fd(),
                events: 0,
                revents: 0,
            },
        ];
        for (i, p) in bufs.iter().enumerate() {
            let (src, dst) = (i, 1 - i);
            if !p.eof && p.len < FORWARD_BUFFER_LEN {
                pfds[src].events |= libc::POLLIN;
            }
            if p.len > 0 {
                pfds[dst].events |= libc::POLLOUT;
            }
        }
        if bufs.iter().all(|p| p.eof && p.len == 0) {
            return Ok(());
        }
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, 60_000) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for i in 0..2 {
            let (src, dst) = (socks[i], socks[1 - i]);
            let p = &mut bufs[i];
            if pfds[i].revents != 0 && !p.eof && p.len < FORWARD_BUFFER_LEN {
                match (&*src).read(&mut p.buf[p.len..]) {
                    Ok(0) => p.eof = true,
                    Ok(k) => p.len += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if p.len > 0 {
                match (&*dst).write(&p.buf[..p.len]) {
                    Ok(k) => {
                        p.buf.copy_within(k..p.len, 0);
                        p.len -= k;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if p.eof && p.len == 0 && !p.shut {
                let _ = dst.shutdown(std::net::Shutdown::Write);
                p.shut = true;
            }
        }
    }
}

struct Pipe {
    buf: Box<[u8; FORWARD_BUFFER_LEN]>,
    len: usize,
    eof: bool,
    shut: bool,
}

impl Default for Pipe {
    fn default() -> Self {
        Pipe {
            buf: Box::new([0u8; FORWARD_BUFFER_LEN]),
            len: 0,
            eof: false,
            shut: false,
        }
    }
}

/// Starts the forwarder thread for the guest's address (no-op without one).
pub fn start() {
    let Some(guest) = guest_address() else {
        info!("no guest network address: port forwarding off");
        return;
    };
    let f = Forwarder::new(guest, None);
    if let Err(e) = std::thread::Builder::new()
        .name("ports".into())
        .spawn(move || f.run())
    {
        warn!("port forwarder thread failed error={e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n\
   2: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0\n\
   3: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0\n\
   garbage line\n";
    const TCP6: &str = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0\n";

    #[test]
    fn parses_listeners() {
        let l = parse_proc_net_tcp(TCP);
        assert_eq!(l.len(), 3);
        assert_eq!(
            l[0],
            Listener {
                addr: "127.0.0.1".parse().unwrap(),
                port: 8080
            }
        );
        assert_eq!(l[1].addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let l6 = parse_proc_net_tcp(TCP6);
        assert_eq!(
            l6,
            vec![Listener {
                addr: "::1".parse().unwrap(),
                port: 3000
            }]
        );
        let mut all = l;
        all.extend(l6);
        let only = loopback_only(&all);
        // 22 has a wildcard listener too; 8080 (v4) and 3000 (v6) are loopback-only.
        assert_eq!(only.len(), 2);
        assert_eq!(only[&8080], IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(only[&3000], IpAddr::V6(Ipv6Addr::LOCALHOST));
    }

    #[test]
    fn forwards_a_loopback_service_and_stops_when_it_goes() {
        // 127.77.0.2 stands in for the guest address (all of 127/8 is local). Not 127.0.0.2:
        // the flood tests connect from 127.0.0.2+ without SO_REUSEADDR, and their TIME_WAIT
        // sockets on 127.0.0.2:P made the forwarder's bind fail when P matched (CI, once).
        let guest: IpAddr = "127.77.0.2".parse().unwrap();
        // A port free on both addresses (something else may still hold guest:P).
        let (svc, port) = (0..16)
            .find_map(|_| {
                let svc = TcpListener::bind("127.0.0.1:0").unwrap();
                let port = svc.local_addr().unwrap().port();
                TcpListener::bind((guest, port)).ok().map(|_| (svc, port))
            })
            .expect("no port free on both loopback addresses in 16 tries");
        std::thread::spawn(move || {
            for s in svc.incoming().take(1) {
                let mut s = s.unwrap();
                let mut b = [0u8; 5];
                s.read_exact(&mut b).unwrap();
                s.write_all(&b).unwrap();
            }
        });
        let mut f = Forwarder::new(guest, Some(vec![port]));
        f.rescan();
        assert_eq!(f.ports(), 1);
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect((guest, port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"hello").unwrap();
            let mut b = [0u8; 5];
            c.read_exact(&mut b).unwrap();
            b
        });
        let start = Instant::now();
        while !client.is_finished() {
            assert!(start.elapsed() < Duration::from_secs(10));
            f.accept_round();
        }
        assert_eq!(&client.join().unwrap(), b"hello");
        // The service thread exits after one connection, closing its listener.
        let start = Instant::now();
        while f.ports() > 0 {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(50));
            f.rescan();
        }
    }
}

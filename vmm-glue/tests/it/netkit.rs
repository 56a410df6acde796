//! Namespaces the network tests share: a stand-in guest behind a slot's tap and a pretend
//! internet. Each test file passes its own names and addresses (never another file's), so
//! the files can run at once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;

use vmm_glue::net::netlink::Netlink;
use vmm_glue::net::slot::{GATEWAY_ADDR, GUEST_ADDR, GUEST_PREFIX_LEN, TAP_NAME};
use vmm_glue::net::{firewall, netns, Slot};

/// Replaces the slot's tap (a tun device, checked) with a veth whose far end, `eth0` in the
/// new namespace `gns`, has the guest's address and routes through the gateway: a guest
/// without a VM.
pub fn attach_stand_in_guest(slot: &Slot, gns: &str) {
    netns::create(gns).unwrap();
    let gfd = netns::open(gns).unwrap();
    netns::run_in(&slot.netns, || {
        let mut nl = Netlink::open().unwrap();
        let tap = nl.link_by_name(TAP_NAME).unwrap().expect("slot has a tap");
        assert_eq!(tap.kind.as_deref(), Some("tun"), "tap0 is a tun/tap device");
        assert!(nl.delete_link(TAP_NAME).unwrap());
        nl.create_veth(TAP_NAME, "eth0", Some(gfd.as_fd())).unwrap();
        let i = nl.link_index(TAP_NAME).unwrap();
        nl.set_up(i, true).unwrap();
        nl.add_address_v4(i, GATEWAY_ADDR, GUEST_PREFIX_LEN)
            .unwrap();
    })
    .unwrap();
    netns::run_in(gns, || {
        let mut nl = Netlink::open().unwrap();
        let lo = nl.link_index("lo").unwrap();
        nl.set_up(lo, true).unwrap();
        let eth = nl.link_index("eth0").unwrap();
        nl.set_up(eth, true).unwrap();
        nl.add_address_v4(eth, GUEST_ADDR, GUEST_PREFIX_LEN)
            .unwrap();
        nl.add_route_v4(None, Some(GATEWAY_ADDR), eth).unwrap();
    })
    .unwrap();
}

/// The pretend internet.
pub struct Internet<'a> {
    /// Its namespace.
    pub ns: &'a str,
    /// The host's end of the veth, with `host_addr`/30.
    pub host_link: &'a str,
    pub host_addr: Ipv4Addr,
    /// The namespace's end (`eth0`), `addr`/30.
    pub addr: Ipv4Addr,
    /// More addresses on its loopback (/32).
    pub loopback: &'a [Ipv4Addr],
    /// Whether it routes everything back through the host.
    pub default_route: bool,
}

impl Internet<'_> {
    /// Creates it; returns the index of the host's link (for routes to `loopback`).
    pub fn create(&self) -> u32 {
        netns::create(self.ns).unwrap();
        let fd = netns::open(self.ns).unwrap();
        let mut nl = Netlink::open().unwrap();
        nl.create_veth(self.host_link, "eth0", Some(fd.as_fd()))
            .unwrap();
        let i = nl.link_index(self.host_link).unwrap();
        nl.set_up(i, true).unwrap();
        nl.add_address_v4(i, self.host_addr, 30).unwrap();
        netns::run_in(self.ns, || {
            let mut nl = Netlink::open().unwrap();
            let lo = nl.link_index("lo").unwrap();
            nl.set_up(lo, true).unwrap();
            for a in self.loopback {
                nl.add_address_v4(lo, *a, 32).unwrap();
            }
            let eth = nl.link_index("eth0").unwrap();
            nl.set_up(eth, true).unwrap();
            nl.add_address_v4(eth, self.addr, 30).unwrap();
            if self.default_route {
                nl.add_route_v4(None, Some(self.host_addr), eth).unwrap();
            }
        })
        .unwrap();
        i
    }
}

/// The slot's DNS set (in nftables table `table`) as `nft` lists it.
pub fn dns_set(slot: &Slot, table: &str) -> String {
    let out = netns::run_in(&slot.netns, || {
        Command::new(firewall::nft_path().unwrap())
            .args(["list", "set", "ip", table, "allow_dns"])
            .output()
    })
    .unwrap()
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Prints `skipped:` and returns true unless the test runs as root with `nft` installed.
pub fn skip_unless_root_with_nft(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let reason = if unsafe { libc::geteuid() } != 0 {
        "not root"
    } else if firewall::nft_path().is_none() {
        "nft not installed (apt-get install nftables)"
    } else {
        return false;
    };
    proto::skip::skip(what, reason);
    true
}

pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

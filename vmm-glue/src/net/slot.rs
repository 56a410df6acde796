//! Network slots: the network every sandbox gets.
//!
//! Slot N is:
//! - a network namespace `<prefix>-N` (`wrenn-N`), where Firecracker runs;
//! - a veth pair: `<prefix>-vN` on the host, `veth0` in the namespace, a /30 from the lower
//!   half of the slot subnet (10.200.0.0/16 by default): host side `.1`, namespace side `.2`;
//! - a persistent tap `tap0` in the namespace for Firecracker, holding the guest's gateway
//!   address 169.254.0.22/30. The guest is always 169.254.0.21 (from the kernel `ip=`
//!   argument, [`GUEST_IP_BOOT_ARG`]), in every slot, so a snapshot taken in one slot restores
//!   into any other;
//! - a per-slot *guest alias* from the upper half of the subnet, routed on the host to the
//!   namespace. NAT in the namespace maps it to the fixed guest address (DNAT inbound) and
//!   the guest's egress to it (SNAT outbound), so on the host every guest has a unique
//!   address and every reply finds its way back.
//!
//! Firewall, in two places:
//! - in each namespace, table `ip <prefix>_slot`: the NAT above; the namespace itself accepts
//!   nothing new (input policy drop); forwarding allows host -> guest, guest -> out (subject
//!   to the slot's egress policy, and only from the guest's own address, so a guest cannot
//!   spoof another), and replies. It lives and dies with the namespace, so a slot's rules are
//!   never left behind and creating a slot never touches the host's tables;
//! - on the host, one shared table `ip <prefix>` (applied once by [`Network::setup_host`]):
//!   nothing arriving from a slot link may open a connection to the host itself (input), no
//!   slot may reach another slot and nothing but the host may open connections into a slot
//!   (forward), nothing from a slot goes to a link-local address (a cloud's metadata
//!   service), and egress from the slot subnet is masqueraded. Interfaces are matched by the
//!   name pattern `<prefix>-v*`, so the table does not change as slots come and go.
//!
//! Creation is idempotent and repairs partial state (every step checks or replaces); so is
//! destruction. [`Network::cleanup_leftovers`] removes slots that a crashed agent left
//! behind, except those it re-adopted. [`Network::set_egress`] (or creating a live slot
//! again) replaces its policy atomically; since every packet of a connection the guest
//! opened meets the policy, connections to destinations it now refuses are cut (the guest
//! gets a TCP reset), not only new ones.
//!
//! Egress policy, in the slot's table (chain `egress`, evaluated in this order):
//! 1. `never_out` (the host's list plus the slot subnet): refused, whatever else says;
//! 2. `allow_out` (the sandbox's allowed addresses and networks): accepted;
//! 3. `allow_dns` (addresses the slot's resolver answered for allowed domain names, each
//!    with its TTL): accepted;
//! 4. `deny_out`: refused (TCP reset, ICMP admin-prohibited otherwise);
//! 5. anything else: accepted.
//!
//! Use: at start-up `Network::setup_host`, then `cleanup_leftovers(&adopted)` and
//! `SlotAllocator::mark_used` for each adopted slot. Per sandbox: `create_slot`, start
//! Firecracker inside `slot.netns` (a child spawned from `netns::run_in` starts there), give
//! its network interface `host_dev_name` [`TAP_NAME`] and the guest [`GUEST_IP_BOOT_ARG`];
//! the tap has the same name in every slot, so a snapshot restores into any slot unchanged.
//! After Firecracker has exited, `destroy_slot` and free the index.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use std::time::Duration;

use super::dns::DomainPattern;
use super::limits::{
    DNS_SET_LEN_MAX, EGRESS_DOMAINS_MAX, EGRESS_RULES_MAX, NAME_PREFIX_LEN_MAX, NEVER_OUT_MAX,
    SLOT_ALIAS_BLOCK_LEN, SLOT_COUNT_MAX, SLOT_LINK_BLOCK_LEN, SUBNET_HALF_LEN,
};
use super::netlink::Netlink;
use super::resolver::{Resolver, SlotDns};
use super::{firewall, netns, tap, Error};

/// The guest's address in every slot.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The guest's gateway: the tap's address in the slot's namespace.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// Prefix length of the guest <-> tap link.
pub const GUEST_PREFIX_LEN: u8 = 30;
/// The kernel argument that configures the guest's eth0 with [`GUEST_ADDR`], gateway
/// [`GATEWAY_ADDR`] and a /30 netmask, before init runs
/// (`ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>`).
pub const GUEST_IP_BOOT_ARG: &str = "ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off";
/// The tap device in each slot's namespace, which Firecracker's network interface uses.
pub const TAP_NAME: &str = "tap0";
/// The namespace end of the slot's veth pair.
pub const NS_VETH_NAME: &str = "veth0";
/// Prefix length of the host <-> namespace veth link.
pub const LINK_PREFIX_LEN: u8 = 30;

/// Where the host's ip_forward switch lives (per namespace: the path is resolved in the
/// namespace of the thread that opens it).
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// IPv6 switches of a slot's namespace. The slot's rules are IPv4 only, so IPv6 is turned
/// off there: no IPv6 path may exist around them.
const IPV6_DISABLE: [&str; 2] = [
    "/proc/sys/net/ipv6/conf/all/disable_ipv6",
    "/proc/sys/net/ipv6/conf/default/disable_ipv6",
];

// ---- addresses ----

/// An IPv4 network `addr/prefix_len`, normalized (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    /// Every IPv4 address, 0.0.0.0/0.
    pub const ALL: Ipv4Cidr = Ipv4Cidr {
        addr: Ipv4Addr::UNSPECIFIED,
        prefix_len: 0,
    };

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix_len)
        };
        u32::from(ip) & mask == u32::from(self.addr)
    }

    /// The network containing `addr`, with `prefix_len` bits (at most 32).
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, Error> {
        if prefix_len > 32 {
            return Err(Error::InvalidCidr(format!("{addr}/{prefix_len}")));
        }
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - prefix_len)
        };
        Ok(Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len,
        })
    }
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
}

impl FromStr for Ipv4Cidr {
    type Err = Error;
    /// `a.b.c.d/n`, or a bare address meaning /32.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidCidr(s.to_owned());
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().map_err(|_| bad())?),
            None => (s, 32),
        };
        Ipv4Cidr::new(addr.parse().map_err(|_| bad())?, len).map_err(|_| bad())
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Which destinations a slot's guest may open connections to, in e2b's terms and with its
/// precedence: `allow` (addresses and domain names) wins over `deny`; whatever neither list
/// names is allowed. "Only these" is `deny: [0.0.0.0/0]` with an allow list ([`Egress::none`]
/// plus allows). Above both stands the host's `never_out` list ([`NetConfig::never_out`]):
/// nothing in it is reachable, whatever is allowed.
///
/// Domain names are enforced through the slot's resolver: the addresses it answers for an
/// allowed name are added, with their TTL, to the slot's DNS set, which is checked like
/// `allow`. A closed policy (deny covers every address) also makes the resolver refuse every
/// name not allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    /// Addresses and networks always allowed (except `never_out`).
    pub allow: Vec<Ipv4Cidr>,
    /// Domain names (`example.com`, `*.example.com`) whose addresses are allowed.
    pub allow_domains: Vec<DomainPattern>,
    /// Addresses and networks denied unless allowed.
    pub deny: Vec<Ipv4Cidr>,
}

impl Egress {
    /// Egress to nowhere: the guest can only answer connections from the host.
    pub fn none() -> Self {
        Egress {
            deny: vec![Ipv4Cidr::ALL],
            ..Egress::default()
        }
    }

    /// The policy from e2b's fields: `allow_internet_access` (false is the same as
    /// `deny_out: ["0.0.0.0/0"]`), `deny_out` (IPv4 addresses and CIDRs) and `allow_out`
    /// (addresses, CIDRs and domain names, `*.example.com` included). Anything else — IPv6,
    /// a bad CIDR, a name that is not a host name — is refused with the item named.
    pub fn from_lists(
        allow_internet_access: bool,
        deny_out: &[String],
        allow_out: &[String],
    ) -> Result<Egress, Error> {
        let mut e = Egress::default();
        for item in deny_out {
            let (addr, len) =
                proto::network::parse_cidr(item.trim()).map_err(Error::InvalidCidr)?;
            e.deny.push(Ipv4Cidr::new(addr, len)?);
        }
        if !allow_internet_access && !e.deny.contains(&Ipv4Cidr::ALL) {
            e.deny.push(Ipv4Cidr::ALL);
        }
        for item in allow_out {
            match proto::network::parse_allow(item) {
                Ok(proto::network::AllowItem::Cidr(addr, len)) => {
                    e.allow.push(Ipv4Cidr::new(addr, len)?)
                }
                Ok(proto::network::AllowItem::Domain(d)) => e.allow_domains.push(d),
                Err(why) => return Err(Error::InvalidDomain(why)),
            }
        }
        e.check()?;
        Ok(e)
    }

    /// Back to e2b's fields: (`allow_internet_access`, `deny_out`, `allow_out`). A deny list
    /// of exactly 0.0.0.0/0 reads as `allow_internet_access: false` with no deny entries.
    pub fn to_lists(&self) -> (bool, Vec<String>, Vec<String>) {
        let closed = self.deny == [Ipv4Cidr::ALL];
        let deny = if closed {
            Vec::new()
        } else {
            self.deny.iter().map(|c| c.to_string()).collect()
        };
        let allow = self
            .allow
            .iter()
            .map(|c| c.to_string())
            .chain(self.allow_domains.iter().map(|d| d.to_string()))
            .collect();
        (!closed, deny, allow)
    }

    /// The checks every list must pass: each within its bound.
    pub fn check(&self) -> Result<(), Error> {
        for len in [self.allow.len(), self.deny.len()] {
            if len > EGRESS_RULES_MAX {
                return Err(Error::TooManyEgressRules { len });
            }
        }
        if self.allow_domains.len() > EGRESS_DOMAINS_MAX {
            return Err(Error::TooManyEgressRules {
                len: self.allow_domains.len(),
            });
        }
        Ok(())
    }

    /// True if `deny` covers every IPv4 address: only what is allowed gets out, and the
    /// resolver answers only allowed names.
    pub fn is_closed(&self) -> bool {
        covers_everything(&self.deny)
    }

    /// Whether a name may be resolved: it is allowed, or the policy is not closed (then
    /// the guest may reach any address not denied anyway).
    pub fn may_resolve(&self, name: &str) -> bool {
        !self.is_closed() || self.domain_allowed(name)
    }

    /// Whether `name` matches one of the allowed domain names.
    pub fn domain_allowed(&self, name: &str) -> bool {
        self.allow_domains.iter().any(|p| p.matches(name))
    }
}

/// Whether the union of `list` is all of IPv4.
fn covers_everything(list: &[Ipv4Cidr]) -> bool {
    let mut ranges: Vec<(u64, u64)> = list
        .iter()
        .map(|c| {
            let start = u64::from(u32::from(c.addr));
            (start, start + (1u64 << (32 - u32::from(c.prefix_len))))
        })
        .collect();
    ranges.sort_unstable();
    let mut reached = 0u64;
    for (start, end) in ranges {
        if start > reached {
            return false;
        }
        reached = reached.max(end);
    }
    reached >= 1 << 32
}

/// The `never_out` ranges of a host that sets none: private networks (RFC 1918), shared
/// address space (RFC 6598, carrier-grade NAT: 100.64.0.0/10), link-local (a cloud's
/// metadata service), loopback and "this network" (0.0.0.0/8). The control network (ctl,
/// agents, PostgreSQL) is usually inside these; if it is not, the operator adds it.
pub const NEVER_OUT_DEFAULT: [&str; 7] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
];

/// Host-wide settings: how slots are named and numbered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    prefix: String,
    subnet: Ipv4Addr,
    never_out: Vec<Ipv4Cidr>,
}

/// [`NEVER_OUT_DEFAULT`], parsed.
pub fn never_out_default() -> Vec<Ipv4Cidr> {
    NEVER_OUT_DEFAULT
        .iter()
        // The constants above are valid CIDRs (the `never_out_defaults_parse` test).
        .filter_map(|s| s.parse().ok())
        .collect()
}

impl Default for NetConfig {
    /// Names `wrenn-N` / `wrenn-vN`, addresses from 10.200.0.0/16, `never_out` the
    /// defaults.
    fn default() -> Self {
        NetConfig {
            prefix: "wrenn".to_owned(),
            subnet: Ipv4Addr::new(10, 200, 0, 0),
            never_out: never_out_default(),
        }
    }
}

impl NetConfig {
    /// `prefix`: 1 to 8 lower-case letters or digits, starting with a letter (it names
    /// namespaces, links and an nftables table). `subnet`: the base of a /16 that nothing
    /// else on the host uses.
    pub fn new(prefix: &str, subnet: Ipv4Addr) -> Result<Self, Error> {
        let ok = !prefix.is_empty()
            && prefix.len() <= NAME_PREFIX_LEN_MAX
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok {
            return Err(Error::InvalidConfig(format!("name prefix {prefix:?}")));
        }
        if u32::from(subnet) & 0xffff != 0 {
            return Err(Error::InvalidConfig(format!(
                "subnet {subnet} is not the base of a /16"
            )));
        }
        Ok(NetConfig {
            prefix: prefix.to_owned(),
            subnet,
            never_out: never_out_default(),
        })
    }

    /// Replaces the host's `never_out` list (destinations no sandbox reaches, whatever its
    /// policy allows). The slot subnet is always added to it.
    pub fn with_never_out(mut self, list: Vec<Ipv4Cidr>) -> Result<Self, Error> {
        if list.len() > NEVER_OUT_MAX {
            return Err(Error::InvalidConfig(format!(
                "{} never_out entries (at most {NEVER_OUT_MAX})",
                list.len()
            )));
        }
        self.never_out = list;
        Ok(self)
    }

    /// Destinations no sandbox reaches: the operator's list plus the slot subnet.
    pub fn never_out(&self) -> Vec<Ipv4Cidr> {
        let mut v = self.never_out.clone();
        v.push(self.subnet());
        v
    }

    /// Whether `ip` is inside [`NetConfig::never_out`].
    pub fn is_never_out(&self, ip: Ipv4Addr) -> bool {
        self.subnet().contains(ip) || self.never_out.iter().any(|c| c.contains(ip))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The whole slot subnet.
    pub fn subnet(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: self.subnet,
            prefix_len: 16,
        }
    }

    /// The names and addresses of slot `index`.
    pub fn slot(&self, index: u32) -> Result<Slot, Error> {
        if index >= SLOT_COUNT_MAX {
            return Err(Error::SlotOutOfRange { index });
        }
        let base = u32::from(self.subnet);
        let link = base + index * SLOT_LINK_BLOCK_LEN;
        let alias = base + SUBNET_HALF_LEN + index * SLOT_ALIAS_BLOCK_LEN + 1;
        Ok(Slot {
            index,
            netns: format!("{}-{index}", self.prefix),
            host_veth: format!("{}-v{index}", self.prefix),
            host_addr: Ipv4Addr::from(link + 1),
            ns_addr: Ipv4Addr::from(link + 2),
            guest_alias: Ipv4Addr::from(alias),
        })
    }

    /// The slot index in a namespace name `<prefix>-N`, if it is one of ours.
    fn index_of_netns(&self, name: &str) -> Option<u32> {
        parse_index(name.strip_prefix(&self.prefix)?.strip_prefix('-')?)
    }

    /// The slot index in a host link name `<prefix>-vN`, if it is one of ours.
    fn index_of_link(&self, name: &str) -> Option<u32> {
        parse_index(name.strip_prefix(&self.prefix)?.strip_prefix("-v")?)
    }

    /// The host table's name.
    fn host_table(&self) -> String {
        self.prefix.clone()
    }

    /// The slot table's name (inside each slot's namespace).
    pub fn slot_table(&self) -> String {
        format!("{}_slot", self.prefix)
    }
}

/// A canonical decimal slot index below SLOT_COUNT_MAX ("7", not "07" or "+7").
fn parse_index(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse::<u32>().ok().filter(|&i| i < SLOT_COUNT_MAX)
}

/// The names and addresses of one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    /// Namespace name (`/run/netns/<netns>`).
    pub netns: String,
    /// Host end of the veth pair.
    pub host_veth: String,
    /// Host end's address (/30).
    pub host_addr: Ipv4Addr,
    /// Namespace end's address (/30), the host's next hop to the guest alias.
    pub ns_addr: Ipv4Addr,
    /// Where the host reaches this slot's guest.
    pub guest_alias: Ipv4Addr,
}

// ---- rulesets ----

fn set_of(list: &[Ipv4Cidr]) -> String {
    let items: Vec<String> = list.iter().map(|c| c.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The host's shared table.
pub fn host_ruleset(cfg: &NetConfig) -> String {
    let t = cfg.host_table();
    let links = format!("\"{}-v*\"", cfg.prefix);
    let subnet = cfg.subnet();
    let mut r = firewall::replace_table_preamble("ip", &t);
    let _ = write!(
        r,
        "table ip {t} {{
  chain input {{
    type filter hook input priority filter; policy accept;
    # Slots may answer the host, never open connections to it (any of its addresses).
    iifname {links} ct state established,related accept
    iifname {links} drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    # No slot reaches another.
    iifname {links} oifname {links} drop
    # Only the host itself opens connections into a slot.
    oifname {links} ct state established,related accept
    oifname {links} drop
    # Egress only from slot addresses (the namespace SNATs its guest to its alias).
    iifname {links} ip saddr != {subnet} drop
    # Link-local addresses are never routed (RFC 3927), least of all to a cloud's
    # metadata service at 169.254.169.254.
    iifname {links} ip daddr 169.254.0.0/16 drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} oifname != {links} masquerade
  }}
}}
"
    );
    r
}

/// The name of the DNS set in a slot's table.
pub const DNS_SET: &str = "allow_dns";

/// An nftables interval set of IPv4 networks (overlaps merged).
fn interval_set(name: &str, list: &[Ipv4Cidr]) -> String {
    let mut r = format!("  set {name} {{\n    type ipv4_addr; flags interval; auto-merge;\n");
    if !list.is_empty() {
        let _ = writeln!(r, "    elements = {}", set_of(list));
    }
    r.push_str("  }\n");
    r
}

/// The table inside slot `slot`'s namespace. `dns_live` are the DNS set's entries to keep
/// (address, time left), carried over when a policy update replaces the table.
pub fn slot_ruleset(
    cfg: &NetConfig,
    slot: &Slot,
    egress: &Egress,
    dns_live: &[(Ipv4Addr, Duration)],
) -> String {
    let t = cfg.slot_table();
    let (veth, tap, guest, gw, alias) = (
        NS_VETH_NAME,
        TAP_NAME,
        GUEST_ADDR,
        GATEWAY_ADDR,
        slot.guest_alias,
    );
    let mut sets = interval_set("never_out", &cfg.never_out());
    sets.push_str(&interval_set("allow_out", &egress.allow));
    sets.push_str(&interval_set("deny_out", &egress.deny));
    let _ = write!(
        sets,
        "  set {DNS_SET} {{\n    type ipv4_addr; size {DNS_SET_LEN_MAX}; flags timeout;\n"
    );
    if !dns_live.is_empty() {
        let items: Vec<String> = dns_live
            .iter()
            .take(DNS_SET_LEN_MAX)
            .map(|(ip, left)| format!("{ip} timeout {}s", left.as_secs().max(1)))
            .collect();
        let _ = writeln!(sets, "    elements = {{ {} }}", items.join(", "));
    }
    sets.push_str("  }\n");
    let mut r = firewall::replace_table_preamble("ip", &t);
    let _ = write!(
        r,
        "table ip {t} {{
{sets}  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{veth}\" ip daddr {alias} dnat to {guest}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{veth}\" ip saddr {guest} snat to {alias}
  }}
  chain input {{
    # The namespace itself serves nothing but the slot's resolver, to its guest.
    type filter hook input priority filter; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
    iifname \"{tap}\" ip saddr {guest} ip daddr {gw} udp dport 53 accept
    iifname \"{tap}\" ip saddr {guest} ip daddr {gw} tcp dport 53 accept
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    iifname \"{veth}\" oifname \"{tap}\" ct state established,related accept
    iifname \"{veth}\" oifname \"{tap}\" ip daddr {guest} accept
    # The guest's side of connections the host opened.
    iifname \"{tap}\" oifname \"{veth}\" ip saddr {guest} ct direction reply accept
    # Every packet of a connection the guest opened meets the policy, not only the first:
    # a policy update cuts established connections to what it now refuses.
    iifname \"{tap}\" oifname \"{veth}\" ip saddr {guest} jump egress
  }}
  chain egress {{
    ip daddr @never_out goto refuse
    ip daddr @allow_out accept
    ip daddr @{DNS_SET} accept
    ip daddr @deny_out goto refuse
    accept
  }}
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject with icmp type admin-prohibited
  }}
}}
"
    );
    r
}

/// The elements of a timeout set as `nft list set` prints them (`a.b.c.d timeout 5m
/// expires 4m58s620ms, ...`), with their time left; elements without `expires` and
/// anything that does not parse are skipped. At most [`DNS_SET_LEN_MAX`].
pub fn parse_set_expiry(text: &str) -> Vec<(Ipv4Addr, Duration)> {
    let Some(start) = text.find("elements = {") else {
        return Vec::new();
    };
    let body = &text[start + "elements = {".len()..];
    let body = &body[..body.find('}').unwrap_or(body.len())];
    body.split(',')
        .filter_map(|item| {
            let mut words = item.split_whitespace();
            let ip: Ipv4Addr = words.next()?.parse().ok()?;
            let mut left = None;
            while let Some(w) = words.next() {
                if w == "expires" {
                    left = parse_nft_duration(words.next()?);
                }
            }
            Some((ip, left?))
        })
        .take(DNS_SET_LEN_MAX)
        .collect()
}

/// An nft duration: `1d2h3m4s500ms`, any of the parts (at most a few years).
fn parse_nft_duration(s: &str) -> Option<Duration> {
    let mut ms: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else {
            match rest.bytes().next()? {
                b'd' => (86_400_000, 1),
                b'h' => (3_600_000, 1),
                b'm' => (60_000, 1),
                b's' => (1000, 1),
                _ => return None,
            }
        };
        ms = ms.checked_add(n.checked_mul(unit)?)?;
        rest = &rest[len..];
    }
    Some(Duration::from_millis(ms))
}

// ---- the host's slots ----

fn write_sysctl(path: &'static str, value: &str) -> Result<(), Error> {
    fs::write(path, value).map_err(|source| Error::Sysctl { path, source })
}

/// Creates, destroys and cleans up slots on this host.
#[derive(Debug)]
pub struct Network {
    cfg: NetConfig,
    host_ready: AtomicBool,
    resolver: OnceLock<Resolver>,
}

impl Network {
    pub fn new(cfg: NetConfig) -> Self {
        Network {
            cfg,
            host_ready: AtomicBool::new(false),
            resolver: OnceLock::new(),
        }
    }

    /// Starts the slots' DNS resolver, forwarding allowed queries to `upstream` (the host's
    /// resolver). Slots created afterwards get a resolver on their gateway address; without
    /// it, domain names in an allow list resolve to nothing. Starting it twice is an error.
    pub fn start_resolver(&self, upstream: SocketAddr) -> Result<(), Error> {
        let r = Resolver::start(upstream)?;
        self.resolver
            .set(r)
            .map_err(|_| Error::InvalidConfig("the slots' resolver is already running".to_owned()))
    }

    /// Serves slot `index`, which survived an agent restart with its table in place, with
    /// the slot resolver again (policy `egress`). Nothing happens without a resolver.
    pub fn adopt_slot(&self, index: u32, egress: &Egress) -> Result<(), Error> {
        let Some(r) = self.resolver.get() else {
            return Ok(());
        };
        let slot = self.cfg.slot(index)?;
        if !netns::exists(&slot.netns)? {
            return Err(Error::NoSlot { index });
        }
        // What the old process let into the set survives it in the kernel; read it back
        // so that a policy update does not drop it (see `SlotDns::retain_for`).
        let table = self.cfg.slot_table();
        let found = match netns::run_in(&slot.netns, || firewall::list_set("ip", &table, DNS_SET)) {
            Ok(Ok(text)) => parse_set_expiry(&text),
            Ok(Err(e)) => {
                log::warn!("reading the adopted slot's dns set failed index={index} error={e}");
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        log::info!(
            "slot adopted by the resolver index={index} dns_entries={}",
            found.len()
        );
        r.add_slot(
            index,
            &slot.netns,
            &table,
            egress,
            self.cfg.never_out(),
            &found,
        )
    }

    /// Replaces the egress policy of live slot `index`, atomically (one nftables
    /// transaction). Addresses the resolver added for names the new policy still allows are
    /// kept with their time left; established connections to what the new policy refuses
    /// are cut (every packet of a guest's connection meets the policy).
    pub fn set_egress(&self, index: u32, egress: &Egress) -> Result<(), Error> {
        egress.check()?;
        let slot = self.cfg.slot(index)?;
        if !netns::exists(&slot.netns)? {
            return Err(Error::NoSlot { index });
        }
        let cfg = &self.cfg;
        match self.resolver.get().and_then(|r| r.slot(index)) {
            Some(state) => {
                // Held across the apply: the resolver adds nothing to this slot's set
                // meanwhile, so nothing it adds is lost with the old table.
                let mut st = SlotDns::lock(&state);
                let old = st.egress().clone();
                let live = st.retain_for(egress);
                let ruleset = slot_ruleset(cfg, &slot, egress, &live);
                netns::run_in(&slot.netns, || firewall::apply(&ruleset))??;
                st.set_egress(egress.clone());
                log::info!(
                    "slot egress updated index={index} kept_dns={} was_closed={}",
                    live.len(),
                    old.is_closed()
                );
            }
            None => {
                let ruleset = slot_ruleset(cfg, &slot, egress, &[]);
                netns::run_in(&slot.netns, || firewall::apply(&ruleset))??;
            }
        }
        Ok(())
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// Installs (or replaces) the host table and turns on IPv4 forwarding. Run once at
    /// start-up, before any slot is created. Rules go in first, so the host never forwards
    /// slot traffic without them.
    pub fn setup_host(&self) -> Result<(), Error> {
        firewall::apply(&host_ruleset(&self.cfg))?;
        write_sysctl(IP_FORWARD, "1")?;
        self.host_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes the host table (when the host stops serving sandboxes). IPv4 forwarding is
    /// left on: other software may rely on it, and without our table nothing of ours uses it.
    pub fn teardown_host(&self) -> Result<(), Error> {
        self.host_ready.store(false, Ordering::Release);
        firewall::delete_table("ip", &self.cfg.host_table()).map(|_| ())
    }

    /// Creates slot `index` with the given egress policy, or completes and refreshes it if
    /// it exists (idempotent). Firecracker then runs in namespace `slot.netns` with its
    /// network interface on [`TAP_NAME`] and the guest booted with [`GUEST_IP_BOOT_ARG`].
    pub fn create_slot(&self, index: u32, egress: &Egress) -> Result<Slot, Error> {
        if !self.host_ready.load(Ordering::Acquire) {
            return Err(Error::HostNotReady);
        }
        egress.check()?;
        let slot = self.cfg.slot(index)?;
        netns::create(&slot.netns)?;
        let ns_fd = netns::open(&slot.netns)?;

        // The veth pair: reuse it only if both ends are where they belong.
        let mut nl = Netlink::open().map_err(Error::netlink("open netlink socket"))?;
        let host_end = nl
            .link_by_name(&slot.host_veth)
            .map_err(Error::netlink(format!("look up {}", slot.host_veth)))?;
        let ns_end = netns::run_in(&slot.netns, || -> Result<bool, Error> {
            let mut nl = Netlink::open().map_err(Error::netlink("open netlink socket in slot"))?;
            Ok(nl
                .link_by_name(NS_VETH_NAME)
                .map_err(Error::netlink("look up veth0"))?
                .is_some())
        })??;
        if host_end.is_none() || !ns_end {
            if host_end.is_some() {
                nl.delete_link(&slot.host_veth)
                    .map_err(Error::netlink(format!("delete stale {}", slot.host_veth)))?;
            }
            if ns_end {
                netns::run_in(&slot.netns, || -> Result<(), Error> {
                    let mut nl =
                        Netlink::open().map_err(Error::netlink("open netlink socket in slot"))?;
                    nl.delete_link(NS_VETH_NAME)
                        .map_err(Error::netlink("delete stale veth0"))?;
                    Ok(())
                })??;
            }
            nl.create_veth(&slot.host_veth, NS_VETH_NAME, Some(ns_fd.as_fd()))
                .map_err(Error::netlink(format!(
                    "create veth pair {}",
                    slot.host_veth
                )))?;
        }

        // Inside the namespace first: rules before forwarding, forwarding before the host
        // routes traffic here.
        let cfg = &self.cfg;
        let dns_state = self.resolver.get().and_then(|r| r.slot(index));
        match &dns_state {
            // A live slot (re-created): its policy changes under the resolver's lock.
            Some(state) => {
                let mut st = SlotDns::lock(state);
                let live = st.retain_for(egress);
                netns::run_in(&slot.netns, || setup_inside(cfg, &slot, egress, &live))??;
                st.set_egress(egress.clone());
            }
            None => netns::run_in(&slot.netns, || setup_inside(cfg, &slot, egress, &[]))??,
        }
        if let (Some(r), None) = (self.resolver.get(), dns_state) {
            r.add_slot(
                index,
                &slot.netns,
                &cfg.slot_table(),
                egress,
                cfg.never_out(),
                &[],
            )?;
        }

        // Host end: up, address, route to the guest alias through the namespace.
        let idx = nl
            .link_index(&slot.host_veth)
            .map_err(Error::netlink(format!("look up {}", slot.host_veth)))?;
        nl.set_up(idx, true)
            .map_err(Error::netlink(format!("set {} up", slot.host_veth)))?;
        nl.add_address_v4(idx, slot.host_addr, LINK_PREFIX_LEN)
            .map_err(Error::netlink(format!("add address to {}", slot.host_veth)))?;
        nl.add_route_v4(Some((slot.guest_alias, 32)), Some(slot.ns_addr), idx)
            .map_err(Error::netlink(format!(
                "add route to guest alias {}",
                slot.guest_alias
            )))?;
        log::info!(
            "slot created index={index} netns={} alias={}",
            slot.netns,
            slot.guest_alias
        );
        Ok(slot)
    }

    /// Destroys slot `index`: its veth pair (and with it the host route) and its namespace
    /// (and with it the tap and the slot's table). Destroying a slot that is not there is not
    /// an error. Firecracker must have exited: a process inside keeps the namespace alive.
    pub fn destroy_slot(&self, index: u32) -> Result<(), Error> {
        let slot = self.cfg.slot(index)?;
        if let Some(r) = self.resolver.get() {
            r.remove_slot(index)?;
        }
        // Deleting the host end removes both ends now; namespace teardown in the kernel is
        // asynchronous, and a later create of the same slot must not find the old link.
        let mut nl = Netlink::open().map_err(Error::netlink("open netlink socket"))?;
        nl.delete_link(&slot.host_veth)
            .map_err(Error::netlink(format!("delete {}", slot.host_veth)))?;
        netns::delete(&slot.netns)?;
        log::info!("slot destroyed index={index}");
        Ok(())
    }

    /// Slot indices that have a namespace or a host link on this host.
    pub fn existing_slots(&self) -> Result<BTreeSet<u32>, Error> {
        let mut found: BTreeSet<u32> = netns::list()?
            .iter()
            .filter_map(|n| self.cfg.index_of_netns(n))
            .collect();
        let mut nl = Netlink::open().map_err(Error::netlink("open netlink socket"))?;
        let links = nl.links().map_err(Error::netlink("list links"))?;
        found.extend(links.iter().filter_map(|l| self.cfg.index_of_link(&l.name)));
        Ok(found)
    }

    /// Removes every slot on this host except `keep` (the slots of sandboxes the agent
    /// re-adopted after a restart). Returns the indices removed. One slot that cannot be
    /// removed does not stop the others from being tried; the first error is returned.
    pub fn cleanup_leftovers(&self, keep: &[u32]) -> Result<Vec<u32>, Error> {
        let mut removed = Vec::new();
        let mut first_err = None;
        for index in self.existing_slots()? {
            if keep.contains(&index) {
                continue;
            }
            match self.destroy_slot(index) {
                Ok(()) => removed.push(index),
                Err(e) => {
                    log::error!("remove leftover slot failed index={index} error={e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        if !removed.is_empty() {
            log::warn!(
                "removed leftover slots count={} indices={removed:?}",
                removed.len()
            );
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }
}

/// Everything done inside a slot's namespace (runs on a thread that entered it).
fn setup_inside(
    cfg: &NetConfig,
    slot: &Slot,
    egress: &Egress,
    dns_live: &[(Ipv4Addr, Duration)],
) -> Result<(), Error> {
    let mut nl = Netlink::open().map_err(Error::netlink("open netlink socket in slot"))?;
    let lo = nl.link_index("lo").map_err(Error::netlink("look up lo"))?;
    nl.set_up(lo, true).map_err(Error::netlink("set lo up"))?;

    let veth = nl
        .link_index(NS_VETH_NAME)
        .map_err(Error::netlink("look up veth0"))?;
    nl.set_up(veth, true)
        .map_err(Error::netlink("set veth0 up"))?;
    nl.add_address_v4(veth, slot.ns_addr, LINK_PREFIX_LEN)
        .map_err(Error::netlink("add address to veth0"))?;
    nl.add_route_v4(None, Some(slot.host_addr), veth)
        .map_err(Error::netlink("add default route"))?;

    // An existing tap may be attached to a running Firecracker: leave it alone.
    if nl
        .link_by_name(TAP_NAME)
        .map_err(Error::netlink("look up tap0"))?
        .is_none()
    {
        tap::create_persistent(TAP_NAME)?;
    }
    let tap_idx = nl
        .link_index(TAP_NAME)
        .map_err(Error::netlink("look up tap0"))?;
    nl.set_up(tap_idx, true)
        .map_err(Error::netlink("set tap0 up"))?;
    nl.add_address_v4(tap_idx, GATEWAY_ADDR, GUEST_PREFIX_LEN)
        .map_err(Error::netlink("add address to tap0"))?;

    for path in IPV6_DISABLE {
        // Absent when the kernel has no IPv6, which is as good as off.
        if std::path::Path::new(path).exists() {
            write_sysctl(path, "1")?;
        }
    }
    firewall::apply(&slot_ruleset(cfg, slot, egress, dns_live))?;
    // A new namespace inherits the host's ip_forward; set it, after the rules are in.
    write_sysctl(IP_FORWARD, "1")
}

// ---- allocation ----

/// Which slot indices are taken. Allocation goes round-robin from the last index handed
/// out, so a freed index (and the guest alias that conntrack may still remember for it) is
/// reused as late as possible.
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    words: Vec<u64>,
    capacity: u32,
    used: u32,
    next: u32,
}

impl SlotAllocator {
    /// An allocator for indices `0..capacity` (at most [`SLOT_COUNT_MAX`]).
    pub fn new(capacity: u32) -> Result<Self, Error> {
        if capacity == 0 || capacity > SLOT_COUNT_MAX {
            return Err(Error::InvalidConfig(format!(
                "slot capacity {capacity} (1..={SLOT_COUNT_MAX})"
            )));
        }
        Ok(SlotAllocator {
            words: vec![0; capacity.div_ceil(64) as usize],
            capacity,
            used: 0,
            next: 0,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn used(&self) -> u32 {
        self.used
    }

    pub fn is_used(&self, index: u32) -> bool {
        index < self.capacity && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Takes a free index, or `None` when all are taken.
    pub fn allocate(&mut self) -> Option<u32> {
        if self.used == self.capacity {
            return None;
        }
        for step in 0..self.capacity {
            let index = (self.next + step) % self.capacity;
            if !self.is_used(index) {
                self.set(index, true);
                self.next = (index + 1) % self.capacity;
                return Some(index);
            }
        }
        unreachable!("used < capacity but no free bit");
    }

    /// Marks `index` taken (a slot re-adopted after a restart). Returns false if it already was.
    pub fn mark_used(&mut self, index: u32) -> Result<bool, Error> {
        if index >= self.capacity {
            return Err(Error::SlotOutOfRange { index });
        }
        if self.is_used(index) {
            return Ok(false);
        }
        self.set(index, true);
        Ok(true)
    }

    /// Returns `index` to the pool. Returns false if it was not taken.
    pub fn free(&mut self, index: u32) -> Result<bool, Error> {
        if index >= self.capacity {
            return Err(Error::SlotOutOfRange { index });
        }
        if !self.is_used(index) {
            return Ok(false);
        }
        self.set(index, false);
        Ok(true)
    }

    fn set(&mut self, index: u32, on: bool) {
        let (w, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if on {
            self.words[w] |= bit;
            self.used += 1;
        } else {
            self.words[w] &= !bit;
            self.used -= 1;
        }
        debug_assert!(self.used <= self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_arg_matches_constants() {
        let mask = Ipv4Addr::from(u32::MAX << (32 - GUEST_PREFIX_LEN));
        assert_eq!(
            GUEST_IP_BOOT_ARG,
            format!("ip={GUEST_ADDR}::{GATEWAY_ADDR}:{mask}::eth0:off")
        );
        // Guest and gateway share the /30 and are its two usable addresses.
        let net = Ipv4Cidr::new(GUEST_ADDR, GUEST_PREFIX_LEN).unwrap();
        assert_eq!(net, Ipv4Cidr::new(GATEWAY_ADDR, GUEST_PREFIX_LEN).unwrap());
        assert_eq!(u32::from(GUEST_ADDR) - u32::from(net.addr()), 1);
        assert_eq!(u32::from(GATEWAY_ADDR) - u32::from(net.addr()), 2);
    }

    #[test]
    fn slot_layout() {
        let cfg = NetConfig::default();
        let s0 = cfg.slot(0).unwrap();
        assert_eq!(s0.netns, "wrenn-0");
        assert_eq!(s0.host_veth, "wrenn-v0");
        assert_eq!(s0.host_addr, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(s0.ns_addr, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(s0.guest_alias, Ipv4Addr::new(10, 200, 128, 1));
        let s = cfg.slot(100).unwrap();
        assert_eq!(s.host_addr, Ipv4Addr::new(10, 200, 1, 145));
        assert_eq!(s.guest_alias, Ipv4Addr::new(10, 200, 129, 145));
        let last = cfg.slot(SLOT_COUNT_MAX - 1).unwrap();
        assert_eq!(last.host_veth, "wrenn-v4095");
        assert!(cfg.subnet().addr() <= last.host_addr);
        assert_eq!(last.guest_alias, Ipv4Addr::new(10, 200, 191, 253));
        assert!(matches!(
            cfg.slot(SLOT_COUNT_MAX),
            Err(Error::SlotOutOfRange { .. })
        ));

        // Every address of every slot is distinct and inside the subnet.
        let mut seen = std::collections::HashSet::new();
        for i in 0..SLOT_COUNT_MAX {
            let s = cfg.slot(i).unwrap();
            for a in [s.host_addr, s.ns_addr, s.guest_alias] {
                assert_eq!(u32::from(a) >> 16, u32::from(cfg.subnet().addr()) >> 16);
                assert!(seen.insert(a), "{a} twice");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        let cfg = NetConfig::new("wrnt", Ipv4Addr::new(10, 201, 0, 0)).unwrap();
        let s = cfg.slot(42).unwrap();
        assert_eq!(cfg.index_of_netns(&s.netns), Some(42));
        assert_eq!(cfg.index_of_link(&s.host_veth), Some(42));
        for bad in [
            "wrnt-",
            "wrnt-07",
            "wrnt-x",
            "wrnt-4096",
            "wrnt-v1",
            "wrnt-inet",
            "wrnt-+1",
            "other-1",
        ] {
            assert_eq!(cfg.index_of_netns(bad), None, "{bad}");
        }
        assert_eq!(cfg.index_of_link("wrnt-v"), None);
        assert_eq!(cfg.index_of_link("wrnt-1"), None);
    }

    #[test]
    fn config_validation() {
        assert!(NetConfig::new("", Ipv4Addr::new(10, 200, 0, 0)).is_err());
        assert!(NetConfig::new("Wrenn", Ipv4Addr::new(10, 200, 0, 0)).is_err());
        assert!(NetConfig::new("1wrenn", Ipv4Addr::new(10, 200, 0, 0)).is_err());
        assert!(NetConfig::new("toolongpx", Ipv4Addr::new(10, 200, 0, 0)).is_err());
        assert!(NetConfig::new("wrenn", Ipv4Addr::new(10, 200, 1, 0)).is_err());
        assert!(NetConfig::new("wrenn", Ipv4Addr::new(10, 200, 0, 0)).is_ok());
    }

    #[test]
    fn cidrs() {
        let c: Ipv4Cidr = "198.18.3.4/15".parse().unwrap();
        assert_eq!(c.to_string(), "198.18.0.0/15");
        assert_eq!(
            "1.2.3.4".parse::<Ipv4Cidr>().unwrap().to_string(),
            "1.2.3.4/32"
        );
        for bad in [
            "1.2.3.4/33",
            "1.2.3/8",
            "x/8",
            "1.2.3.4/",
            "/8",
            "1.2.3.4/-1",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rulesets() {
        let cfg = NetConfig::default();
        let slot = cfg.slot(3).unwrap();
        let open = slot_ruleset(&cfg, &slot, &Egress::default(), &[]);
        assert!(open.starts_with("table ip wrenn_slot {}\ndelete table ip wrenn_slot\n"));
        assert!(open.contains("ip daddr 10.200.128.13 dnat to 169.254.0.21"));
        assert!(open.contains("ip saddr 169.254.0.21 snat to 10.200.128.13"));
        // Order: never_out, allow, dns, deny, accept.
        assert!(open.contains(
            "  chain egress {\n    ip daddr @never_out goto refuse\n    ip daddr @allow_out accept\n    \
             ip daddr @allow_dns accept\n    ip daddr @deny_out goto refuse\n    accept\n  }"
        ));
        // The defaults and the slot subnet are in never_out.
        assert!(open.contains(
            "elements = { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, \
             172.16.0.0/12, 192.168.0.0/16, 10.200.0.0/16 }"
        ));
        assert!(open.contains("udp dport 53 accept"));
        assert!(open.contains("ip daddr 169.254.0.22 tcp dport 53 accept"));
        assert!(open.contains("ct direction reply accept"));
        let restricted = Egress {
            allow: vec!["1.1.1.0/24".parse().unwrap()],
            allow_domains: vec![DomainPattern::parse("*.example.com").unwrap()],
            deny: vec![Ipv4Cidr::ALL],
        };
        let live = [(Ipv4Addr::new(203, 0, 113, 9), Duration::from_millis(59_500))];
        let r = slot_ruleset(&cfg, &slot, &restricted, &live);
        assert!(r.contains("  set allow_out {\n    type ipv4_addr; flags interval; auto-merge;\n    elements = { 1.1.1.0/24 }\n  }"));
        assert!(r.contains("  set deny_out {\n    type ipv4_addr; flags interval; auto-merge;\n    elements = { 0.0.0.0/0 }\n  }"));
        assert!(r.contains("elements = { 203.0.113.9 timeout 59s }"), "{r}");
        assert!(r.contains(&format!("size {DNS_SET_LEN_MAX}; flags timeout;")));

        let host = host_ruleset(&cfg);
        assert!(host.starts_with("table ip wrenn {}\ndelete table ip wrenn\n"));
        assert!(host.contains("iifname \"wrenn-v*\" oifname \"wrenn-v*\" drop"));
        assert!(host.contains("ip saddr 10.200.0.0/16 oifname != \"wrenn-v*\" masquerade"));
        assert!(host.contains("iifname \"wrenn-v*\" ip daddr 169.254.0.0/16 drop"));
    }

    #[test]
    fn set_listing() {
        let text = "table ip t {\n\tset allow_dns {\n\t\ttype ipv4_addr\n\t\tsize 1024\n\t\tflags timeout\n\t\telements = { 1.2.3.4 timeout 59s expires 57s780ms, 5.6.7.8 timeout 1h expires 59m58s780ms,\n\t\t\t     9.9.9.9 timeout 1d1h1m1s expires 1d1h59s780ms, 7.7.7.7, bad timeout 1s expires 1s }\n\t}\n}\n";
        assert_eq!(
            parse_set_expiry(text),
            vec![
                (Ipv4Addr::new(1, 2, 3, 4), Duration::from_millis(57_780)),
                (Ipv4Addr::new(5, 6, 7, 8), Duration::from_millis(3_598_780)),
                (Ipv4Addr::new(9, 9, 9, 9), Duration::from_millis(90_059_780)),
            ]
        );
        assert!(parse_set_expiry("table ip t {\n\tset allow_dns {\n\t}\n}\n").is_empty());
        for bad in ["", "5", "5x", "m", "99999999999999d"] {
            assert_eq!(parse_nft_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn never_out_defaults_parse() {
        assert_eq!(never_out_default().len(), NEVER_OUT_DEFAULT.len());
        let cfg = NetConfig::default();
        for ip in [
            "10.1.2.3",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "127.0.0.1",
            "10.200.5.5",
        ] {
            assert!(cfg.is_never_out(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "198.18.0.1"] {
            assert!(!cfg.is_never_out(ip.parse().unwrap()), "{ip}");
        }
        // An operator list replaces the defaults; the slot subnet stays in.
        let own = NetConfig::new("wrnt", Ipv4Addr::new(10, 201, 0, 0))
            .unwrap()
            .with_never_out(vec!["203.0.113.0/24".parse().unwrap()])
            .unwrap();
        assert!(own.is_never_out("203.0.113.7".parse().unwrap()));
        assert!(own.is_never_out("10.201.0.1".parse().unwrap()));
        assert!(!own.is_never_out("10.1.0.1".parse().unwrap()));
        assert!(NetConfig::default()
            .with_never_out(vec![Ipv4Cidr::ALL; NEVER_OUT_MAX + 1])
            .is_err());
    }

    #[test]
    fn closed_policies() {
        assert!(!Egress::default().is_closed());
        assert!(Egress::none().is_closed());
        let halves = Egress {
            deny: vec!["128.0.0.0/1".parse().unwrap(), "0.0.0.0/1".parse().unwrap()],
            ..Egress::default()
        };
        assert!(halves.is_closed());
        let gap = Egress {
            deny: vec!["128.0.0.0/1".parse().unwrap(), "0.0.0.0/2".parse().unwrap()],
            ..Egress::default()
        };
        assert!(!gap.is_closed());
        let only = Egress {
            allow_domains: vec![DomainPattern::parse("api.example.com").unwrap()],
            ..Egress::none()
        };
        assert!(only.may_resolve("api.example.com"));
        assert!(!only.may_resolve("evil.example.com"));
        assert!(Egress::default().may_resolve("anything.net"));
        assert!(!Egress::default().domain_allowed("anything.net"));
        let c: Ipv4Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(10, 255, 0, 1)));
        assert!(!c.contains(Ipv4Addr::new(11, 0, 0, 0)));
        assert!(Ipv4Cidr::ALL.contains(Ipv4Addr::BROADCAST));
    }

    #[test]
    fn e2b_fields() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let e = Egress::from_lists(true, &[], &[]).unwrap();
        assert_eq!(e, Egress::default());
        let e = Egress::from_lists(false, &[], &s(&["1.2.3.4", "*.example.com"])).unwrap();
        assert!(e.is_closed());
        assert_eq!(e.allow, vec!["1.2.3.4/32".parse().unwrap()]);
        assert_eq!(
            e.to_lists(),
            (false, vec![], s(&["1.2.3.4/32", "*.example.com"]))
        );
        let e = Egress::from_lists(true, &s(&["0.0.0.0/0"]), &s(&["api.example.com"])).unwrap();
        assert!(e.may_resolve("api.example.com") && !e.may_resolve("x.example.com"));
        assert_eq!(
            Egress::from_lists(false, &s(&["0.0.0.0/0"]), &[])
                .unwrap()
                .deny
                .len(),
            1
        );
        let e = Egress::from_lists(true, &s(&["10.0.0.0/8", " 8.8.8.8 "]), &[]).unwrap();
        assert_eq!(e.to_lists().1, s(&["10.0.0.0/8", "8.8.8.8/32"]));
        for (deny, allow) in [
            (&["1.2.3.4/33"][..], &[][..]),
            (&["example.com"], &[]),
            (&[], &["::1"]),
            (&[], &["1.2.3.999"]),
            (&[], &["bad name.com"]),
            (&[], &["*.com"]),
        ] {
            assert!(
                Egress::from_lists(true, &s(deny), &s(allow)).is_err(),
                "{deny:?} {allow:?}"
            );
        }
        let many = vec!["a.example.com".to_string(); EGRESS_DOMAINS_MAX + 1];
        assert!(Egress::from_lists(true, &[], &many).is_err());
    }

    #[test]
    fn egress_bounds() {
        let many = Egress {
            allow: vec!["1.2.3.4/32".parse().unwrap(); EGRESS_RULES_MAX + 1],
            ..Egress::default()
        };
        assert!(matches!(
            many.check(),
            Err(Error::TooManyEgressRules { .. })
        ));
        let names = Egress {
            allow_domains: vec![DomainPattern::parse("a.b").unwrap(); EGRESS_DOMAINS_MAX + 1],
            ..Egress::default()
        };
        assert!(names.check().is_err());
        assert!(Egress::default().check().is_ok());
    }

    #[test]
    fn allocator() {
        assert!(SlotAllocator::new(0).is_err());
        assert!(SlotAllocator::new(SLOT_COUNT_MAX + 1).is_err());
        let mut a = SlotAllocator::new(130).unwrap();
        assert!(a.mark_used(5).unwrap());
        assert!(!a.mark_used(5).unwrap());
        let got: Vec<u32> = (0..129).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(a.allocate(), None);
        assert_eq!(a.used(), 130);
        assert!(!got.contains(&5));
        let distinct: BTreeSet<u32> = got.iter().copied().collect();
        assert_eq!(distinct.len(), 129);
        // Round-robin: after freeing 3 and 100, the next allocation continues past the last.
        assert!(a.free(3).unwrap());
        assert!(a.free(100).unwrap());
        assert!(!a.free(100).unwrap());
        assert_eq!(a.allocate(), Some(3));
        assert_eq!(a.allocate(), Some(100));
        assert!(a.free(130).is_err());
        assert!(a.mark_used(130).is_err());
        assert!(!a.is_used(1000));
    }
}

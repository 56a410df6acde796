//! Network slots: one network namespace per sandbox, wired to the host.
//!
//! - [`slot`]: the slot layout (names, addresses, the guest's fixed address and its kernel
//!   `ip=` argument), create/destroy/clean-up, and the slot allocator;
//! - [`netlink`]: a small rtnetlink client (links, addresses, routes) over a netlink socket;
//! - [`netns`]: named network namespaces compatible with `ip netns`, and running code in one;
//! - [`tap`]: persistent tap devices for Firecracker (TUNSETIFF/TUNSETPERSIST);
//! - [`firewall`]: nftables rulesets applied atomically through `nft -f -`;
//! - [`dns`]: the bounded DNS message parser and the allow-list name patterns;
//! - [`resolver`]: the per-slot DNS resolver (one mio thread) that fills each slot's
//!   DNS set from the answers for allowed names;
//! - [`limits`]: every bound, with its reason.
//!
//! It is not a DHCP server or a traffic shaper: the guest's address comes from its kernel
//! command line. Its resolver is a filter in front of the host's, not a cache.

pub mod dns;
pub mod firewall;
pub mod limits;
pub mod netlink;
pub mod netns;
pub mod resolver;
pub mod slot;
pub mod tap;

use std::fmt;
use std::io;

pub use dns::DomainPattern;
pub use slot::{Egress, Ipv4Cidr, NetConfig, Network, Slot, SlotAllocator};

/// What went wrong while setting up or tearing down host networking.
#[derive(Debug)]
pub enum Error {
    /// A netlink request failed; `action` says which.
    Netlink {
        action: String,
        source: netlink::Error,
    },
    /// A namespace operation (create, open, enter, delete, list) failed.
    Netns {
        action: &'static str,
        name: String,
        source: io::Error,
    },
    /// A namespace name that cannot be a file name under /run/netns.
    InvalidNetnsName(String),
    /// Creating the tap device failed.
    Tap { name: String, source: io::Error },
    /// Writing a sysctl (ip_forward) failed.
    Sysctl {
        path: &'static str,
        source: io::Error,
    },
    /// No `nft` binary (install the `nftables` package).
    NftMissing,
    /// `nft` could not be started or fed.
    NftSpawn(io::Error),
    /// `nft` rejected the ruleset.
    NftFailed { status: String, stderr: String },
    /// `nft` did not finish in time and was killed.
    NftTimeout,
    /// Bad configuration (prefix, subnet).
    InvalidConfig(String),
    /// A slot index at or over [`limits::SLOT_COUNT_MAX`] or the allocator's capacity.
    SlotOutOfRange { index: u32 },
    /// A CIDR that does not parse.
    InvalidCidr(String),
    /// A domain name in an allow list that is not a host name or `*.` pattern.
    InvalidDomain(String),
    /// An egress list over [`limits::EGRESS_RULES_MAX`].
    TooManyEgressRules { len: usize },
    /// `create_slot` before `setup_host`: the host's isolation rules are not in place.
    HostNotReady,
    /// The helper thread that entered a namespace panicked.
    ThreadPanicked,
    /// The slot's resolver could not be set up.
    Dns {
        action: &'static str,
        source: io::Error,
    },
    /// A slot that does not exist (a policy update before `create_slot`).
    NoSlot { index: u32 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Netlink { action, .. } => write!(f, "{action}"),
            Error::Netns { action, name, .. } => write!(f, "{action} network namespace {name}"),
            Error::InvalidNetnsName(n) => write!(f, "invalid network namespace name {n:?}"),
            Error::Tap { name, .. } => write!(f, "create tap device {name}"),
            Error::Sysctl { path, .. } => write!(f, "write {path}"),
            Error::NftMissing => write!(f, "nft not found (install the nftables package)"),
            Error::NftSpawn(_) => write!(f, "run nft"),
            Error::NftFailed { status, stderr } => write!(f, "nft failed ({status}): {stderr}"),
            Error::NftTimeout => write!(f, "nft did not finish in {:?}", limits::NFT_TIMEOUT),
            Error::InvalidConfig(why) => write!(f, "invalid network configuration: {why}"),
            Error::SlotOutOfRange { index } => write!(f, "slot index {index} out of range"),
            Error::InvalidCidr(s) => write!(f, "invalid IPv4 CIDR {s:?}"),
            Error::InvalidDomain(s) => write!(f, "invalid egress item: {s}"),
            Error::TooManyEgressRules { len } => {
                write!(
                    f,
                    "{len} egress rules (at most {})",
                    limits::EGRESS_RULES_MAX
                )
            }
            Error::HostNotReady => write!(f, "host networking not set up (call setup_host first)"),
            Error::ThreadPanicked => write!(f, "namespace helper thread panicked"),
            Error::Dns { action, .. } => write!(f, "{action}"),
            Error::NoSlot { index } => write!(f, "no network slot {index}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Netlink { source, .. } => Some(source),
            Error::Netns { source, .. }
            | Error::Tap { source, .. }
            | Error::Sysctl { source, .. }
            | Error::Dns { source, .. }
            | Error::NftSpawn(source) => Some(source),
            _ => None,
        }
    }
}

impl Error {
    /// Wraps a netlink error with the action that failed.
    pub(crate) fn netlink(action: impl Into<String>) -> impl FnOnce(netlink::Error) -> Error {
        let action = action.into();
        move |source| Error::Netlink { action, source }
    }
}

//! Who may hold a connection: the server's connection budgets (PROTOCOL.md §6), kept apart
//! from the event loop so the rules can be read and tested on their own.
//!
//! A connection is *pre-hello* from accept until its whole HELLO has arrived (a TLS handshake
//! would be part of it too, since the phase starts at accept). Pre-hello connections cost a
//! slot and a small buffer and prove nothing, so they have their own small budget:
//!
//! - accepts per source address are rate-limited by a token bucket (IPv4 address, IPv6 /64;
//!   Unix and vsock peers are one local source); over the rate, the connection is refused;
//! - a source holds at most `pre_hello_per_source_max` pre-hello connections: its next one
//!   evicts its own oldest (a single-address flood competes only with itself);
//! - at most `pre_hello_max` pre-hello connections in all: a new one evicts the oldest, so a
//!   flood can delay a newcomer by its hello round trip at most, never lock it out.
//!
//! While the service checks the hello (on a worker), the connection is in neither budget:
//! it has proved it speaks the protocol, it holds a worker (bounded by `workers_max`), and
//! the hello deadline still runs. Once the service accepted the hello, the connection counts against its credential
//! (`per_credential_max` of its kind) and against `connections_max`, of which
//! `reserved_connections` are usable only by `reserved_kind` (the agent keeps them for
//! ctl's AGENT_TOKEN). Over a budget, the connection gets ERROR `resource_exhausted` naming
//! the budget, and is closed.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Instant;

use crate::gen::wrenn::wire::v1::CredentialKind;
use crate::metrics::Counter;

/// Where a connection comes from, for per-source budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IPv4 address, or the /64 prefix of an IPv6 address (one host's usual allocation,
    /// so an attacker cannot mint sources from one prefix).
    Ip(IpAddr),
    /// A Unix-socket or vsock peer: every one counts as the same source.
    Local,
}

impl Source {
    pub fn from_ip(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(_) => Source::Ip(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::Ip(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    Source::Ip(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

/// The budget an authenticated connection counts against: its credential's class (kind)
/// and identity (e.g. a keyed hash of the secret, or a key id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CredentialId {
    pub kind: CredentialKind,
    pub identity: u64,
}

impl CredentialId {
    /// The default identity: the HELLO's credential kind and a keyed hash of its secret
    /// (the key is random per process, so identities cannot be forced to collide).
    pub fn from_hello(hello: &crate::gen::wrenn::wire::v1::Hello) -> CredentialId {
        use std::hash::BuildHasher;
        static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let key = KEY.get_or_init(std::collections::hash_map::RandomState::new);
        CredentialId {
            kind: CredentialKind::try_from(hello.credential_kind)
                .unwrap_or(CredentialKind::Unspecified),
            identity: key.hash_one(hello.credential.as_str()),
        }
    }
}

/// Number of credential kinds (`CredentialKind` values 0..=5).
pub const CREDENTIAL_KINDS: usize = 6;

/// The connection budgets of one server (see [`ServerConfig`](super::ServerConfig)).
#[derive(Clone, Debug)]
pub struct Budgets {
    pub pre_hello_max: usize,
    pub pre_hello_per_source_max: usize,
    pub accept_rate_per_source: u32,
    pub accept_burst_per_source: u32,
    pub connections_max: usize,
    pub per_credential_max: [usize; CREDENTIAL_KINDS],
    pub reserved_kind: Option<CredentialKind>,
    pub reserved_connections: usize,
}

/// Why a connection was refused or closed early; each has a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    AcceptRate,
    TooManySources,
    PreHelloEvicted,
    HelloTimeout,
    PerCredential,
    ConnectionsMax,
}

impl Refusal {
    /// The budget's name as in ServerConfig and PROTOCOL.md §6, for messages and metrics.
    pub fn budget(self) -> &'static str {
        match self {
            Refusal::AcceptRate => "accept_rate_per_source",
            Refusal::TooManySources => "sources_tracked_max",
            Refusal::PreHelloEvicted => "pre_hello_max",
            Refusal::HelloTimeout => "hello_timeout",
            Refusal::PerCredential => "per_credential_max",
            Refusal::ConnectionsMax => "connections_max",
        }
    }

    fn counter(self) -> &'static Counter {
        &REFUSED[self as usize]
    }

    pub fn count(self) {
        self.counter().inc();
    }
}

const REFUSALS: [Refusal; 6] = [
    Refusal::AcceptRate,
    Refusal::TooManySources,
    Refusal::PreHelloEvicted,
    Refusal::HelloTimeout,
    Refusal::PerCredential,
    Refusal::ConnectionsMax,
];

static REFUSED: [Counter; 6] = [
    Counter::new(),
    Counter::new(),
    Counter::new(),
    Counter::new(),
    Counter::new(),
    Counter::new(),
];

/// Connections refused or closed by a budget, by the budget's name, for every server in this
/// process.
pub fn refusals() -> Vec<(&'static str, u64)> {
    REFUSALS
        .iter()
        .map(|r| (r.budget(), r.counter().get()))
        .collect()
}

/// Prometheus text of `wrenn_rpc_connections_refused_total{budget=...}`.
pub fn render_metrics(out: &mut String) {
    let name = "wrenn_rpc_connections_refused_total";
    crate::metrics::family(
        out,
        name,
        "counter",
        "Connections refused or closed by an RPC server budget.",
    );
    for (budget, n) in refusals() {
        crate::metrics::sample(out, name, &format!("budget=\"{budget}\""), n);
    }
}

/// `API_KEY` for `CredentialKind::ApiKey`: the name PROTOCOL.md uses.
fn kind_name(k: CredentialKind) -> &'static str {
    k.as_str_name().trim_start_matches("CREDENTIAL_KIND_")
}

struct Bucket {
    /// Tokens, in thousandths (integer arithmetic, no drift).
    milli: u64,
    last: Instant,
}

/// The accounting; the server calls it at accept, at hello, and at close.
pub(crate) struct Admission {
    b: Budgets,
    buckets: HashMap<Source, Bucket>,
    pre_by_source: HashMap<Source, usize>,
    /// Pre-hello connections in accept order: (slot, serial, source). Stale entries (the
    /// connection closed or finished its hello) are skipped lazily.
    pre_order: VecDeque<(usize, u64, Source)>,
    pre_total: usize,
    by_credential: HashMap<CredentialId, usize>,
    auth_total: usize,
}

/// What to do with a new connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AcceptVerdict {
    Admit,
    /// Admit after closing this pre-hello connection (slot, serial).
    AdmitEvicting(usize, u64),
    Refuse(Refusal),
}

impl Admission {
    pub fn new(b: Budgets) -> Admission {
        assert!(b.pre_hello_max > 0 && b.pre_hello_per_source_max > 0);
        assert!(b.reserved_connections <= b.connections_max);
        Admission {
            b,
            buckets: HashMap::new(),
            pre_by_source: HashMap::new(),
            pre_order: VecDeque::new(),
            pre_total: 0,
            by_credential: HashMap::new(),
            auth_total: 0,
        }
    }

    /// Takes one accept token of `src`; false when the source is over its rate.
    fn take_token(&mut self, src: Source, now: Instant) -> Result<(), Refusal> {
        let burst = self.b.accept_burst_per_source as u64 * 1000;
        let rate = self.b.accept_rate_per_source as u64;
        if !self.buckets.contains_key(&src)
            && self.buckets.len() >= crate::limits::SOURCES_TRACKED_MAX
        {
            // Forget sources whose bucket refilled and that hold nothing pre-hello.
            let pre = &self.pre_by_source;
            self.buckets.retain(|s, bk| {
                let ms = now.saturating_duration_since(bk.last).as_millis() as u64;
                bk.milli.saturating_add(ms.saturating_mul(rate)) < burst || pre.contains_key(s)
            });
            if self.buckets.len() >= crate::limits::SOURCES_TRACKED_MAX {
                return Err(Refusal::TooManySources);
            }
        }
        let bk = self.buckets.entry(src).or_insert(Bucket {
            milli: burst,
            last: now,
        });
        let ms = now.saturating_duration_since(bk.last).as_millis() as u64;
        if ms > 0 {
            bk.milli = bk.milli.saturating_add(ms.saturating_mul(rate)).min(burst);
            bk.last = now;
        }
        if bk.milli < 1000 {
            return Err(Refusal::AcceptRate);
        }
        bk.milli -= 1000;
        Ok(())
    }

    /// Decides on a connection just accepted from `src`. With a verdict to admit, the caller
    /// must call [`Admission::admitted`] once it has a slot (after closing the evicted one).
    pub fn on_accept(
        &mut self,
        src: Source,
        now: Instant,
        live: impl Fn(usize, u64) -> bool,
    ) -> AcceptVerdict {
        if let Err(r) = self.take_token(src, now) {
            return AcceptVerdict::Refuse(r);
        }
        self.pre_order
            .retain(|&(slot, serial, _)| live(slot, serial));
        let mine = self.pre_by_source.get(&src).copied().unwrap_or(0);
        if mine >= self.b.pre_hello_per_source_max {
            if let Some(&(slot, serial, _)) = self.pre_order.iter().find(|e| e.2 == src) {
                return AcceptVerdict::AdmitEvicting(slot, serial);
            }
        }
        if self.pre_total >= self.b.pre_hello_max {
            if let Some(&(slot, serial, _)) = self.pre_order.front() {
                return AcceptVerdict::AdmitEvicting(slot, serial);
            }
        }
        AcceptVerdict::Admit
    }

    /// Records an admitted pre-hello connection.
    pub fn admitted(&mut self, slot: usize, serial: u64, src: Source) {
        self.pre_total += 1;
        *self.pre_by_source.entry(src).or_insert(0) += 1;
        self.pre_order.push_back((slot, serial, src));
    }

    /// Forgets a pre-hello connection (closed, or its hello finished).
    pub fn pre_done(&mut self, src: Source) {
        self.pre_total -= 1;
        match self.pre_by_source.get_mut(&src) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                self.pre_by_source.remove(&src);
            }
        }
    }

    /// Decides on a connection whose hello the service accepted; on `Ok` it counts until
    /// [`Admission::auth_done`].
    pub fn on_authenticated(&mut self, cred: CredentialId) -> Result<(), Refusal> {
        let per = self.b.per_credential_max[(cred.kind as usize).min(CREDENTIAL_KINDS - 1)];
        let mine = self.by_credential.get(&cred).copied().unwrap_or(0);
        if mine >= per {
            return Err(Refusal::PerCredential);
        }
        let total = if Some(cred.kind) == self.b.reserved_kind {
            self.b.connections_max
        } else {
            self.b.connections_max - self.b.reserved_connections
        };
        if self.auth_total >= total {
            return Err(Refusal::ConnectionsMax);
        }
        self.auth_total += 1;
        *self.by_credential.entry(cred).or_insert(0) += 1;
        Ok(())
    }

    /// Forgets an authenticated connection.
    pub fn auth_done(&mut self, cred: CredentialId) {
        self.auth_total -= 1;
        match self.by_credential.get_mut(&cred) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                self.by_credential.remove(&cred);
            }
        }
    }

    /// The refusal message for a budget, naming it and its value.
    pub fn message(&self, r: Refusal, kind: Option<CredentialKind>) -> String {
        match r {
            Refusal::AcceptRate => format!(
                "too many new connections from this address (budget accept_rate_per_source: \
                 {}/s, burst {})",
                self.b.accept_rate_per_source, self.b.accept_burst_per_source
            ),
            Refusal::TooManySources => format!(
                "too many client addresses at once (budget sources_tracked_max: {})",
                crate::limits::SOURCES_TRACKED_MAX
            ),
            Refusal::PreHelloEvicted => format!(
                "evicted before finishing the hello: newer connections arrived (budget \
                 pre_hello_max: {}, pre_hello_per_source_max: {})",
                self.b.pre_hello_max, self.b.pre_hello_per_source_max
            ),
            Refusal::HelloTimeout => "no hello in time (budget hello_timeout)".into(),
            Refusal::PerCredential => {
                let k = kind.unwrap_or(CredentialKind::Unspecified);
                format!(
                    "too many connections for this credential (budget per_credential_max \
                     for {}: {})",
                    kind_name(k),
                    self.b.per_credential_max[(k as usize).min(CREDENTIAL_KINDS - 1)]
                )
            }
            Refusal::ConnectionsMax => match self.b.reserved_kind {
                Some(rk) if Some(rk) != kind => format!(
                    "too many connections (budget connections_max: {}, of which {} are \
                     reserved for {})",
                    self.b.connections_max,
                    self.b.reserved_connections,
                    kind_name(rk)
                ),
                _ => format!(
                    "too many connections (budget connections_max: {})",
                    self.b.connections_max
                ),
            },
        }
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        (self.pre_total, self.auth_total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn budgets() -> Budgets {
        Budgets {
            pre_hello_max: 4,
            pre_hello_per_source_max: 2,
            accept_rate_per_source: 10,
            accept_burst_per_source: 5,
            connections_max: 10,
            per_credential_max: [3; CREDENTIAL_KINDS],
            reserved_kind: Some(CredentialKind::AgentToken),
            reserved_connections: 4,
        }
    }

    fn ip(n: u8) -> Source {
        Source::Ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
    }

    #[test]
    fn token_bucket_refuses_over_the_burst_and_refills_at_the_rate() {
        let mut a = Admission::new(budgets());
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(
                a.on_accept(ip(1), t0, |_, _| false),
                AcceptVerdict::Admit,
                "{i}"
            );
        }
        assert_eq!(
            a.on_accept(ip(1), t0, |_, _| false),
            AcceptVerdict::Refuse(Refusal::AcceptRate)
        );
        // Another source has its own bucket.
        assert_eq!(a.on_accept(ip(2), t0, |_, _| false), AcceptVerdict::Admit);
        // 10/s: one token back after 100 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(a.on_accept(ip(1), t1, |_, _| false), AcceptVerdict::Admit);
        assert_eq!(
            a.on_accept(ip(1), t1, |_, _| false),
            AcceptVerdict::Refuse(Refusal::AcceptRate)
        );
    }

    #[test]
    fn a_source_over_its_cap_evicts_its_own_oldest_then_the_global_oldest_goes() {
        let mut a = Admission::new(budgets());
        let t = Instant::now();
        let live = |_: usize, _: u64| true;
        a.admitted(0, 1, ip(1));
        a.admitted(1, 2, ip(2));
        a.admitted(2, 3, ip(1));
        // ip(1) holds 2 (its cap): its next evicts its oldest, not ip(2)'s.
        assert_eq!(
            a.on_accept(ip(1), t, live),
            AcceptVerdict::AdmitEvicting(0, 1)
        );
        a.pre_done(ip(1));
        a.admitted(3, 4, ip(1));
        a.admitted(4, 5, ip(3));
        assert_eq!(a.counts().0, 4);
        // The budget (4) is full: a new source evicts the oldest of all (slot 0 is gone).
        let live = |slot: usize, _: u64| slot != 0;
        assert_eq!(
            a.on_accept(ip(4), t, live),
            AcceptVerdict::AdmitEvicting(1, 2)
        );
        // Connections that finished their hello are not eviction candidates.
        let only_5 = |slot: usize, _: u64| slot == 4;
        assert_eq!(
            a.on_accept(ip(5), t, only_5),
            AcceptVerdict::AdmitEvicting(4, 5)
        );
    }

    #[test]
    fn credentials_have_budgets_and_the_reserved_kind_keeps_its_room() {
        let mut a = Admission::new(budgets());
        let key = |identity| CredentialId {
            kind: CredentialKind::ApiKey,
            identity,
        };
        for _ in 0..3 {
            a.on_authenticated(key(1)).unwrap();
        }
        assert_eq!(a.on_authenticated(key(1)), Err(Refusal::PerCredential));
        for _ in 0..3 {
            a.on_authenticated(key(2)).unwrap();
        }
        // 6 = connections_max 10 - 4 reserved: other kinds are full.
        assert_eq!(a.on_authenticated(key(3)), Err(Refusal::ConnectionsMax));
        assert!(a
            .message(Refusal::ConnectionsMax, Some(CredentialKind::ApiKey))
            .contains("reserved for AGENT_TOKEN"));
        let agent = CredentialId {
            kind: CredentialKind::AgentToken,
            identity: 9,
        };
        for _ in 0..3 {
            a.on_authenticated(agent).unwrap();
        }
        a.on_authenticated(CredentialId {
            identity: 10,
            ..agent
        })
        .unwrap();
        assert_eq!(
            a.on_authenticated(CredentialId {
                identity: 11,
                ..agent
            }),
            Err(Refusal::ConnectionsMax)
        );
        assert_eq!(a.counts().1, 10);
        a.auth_done(key(1));
        assert_eq!(a.on_authenticated(key(1)), Err(Refusal::ConnectionsMax));
        a.auth_done(agent);
        a.on_authenticated(agent).unwrap();
    }

    #[test]
    fn ipv6_sources_are_grouped_by_prefix() {
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let c: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(Source::from_ip(a), Source::from_ip(b));
        assert_ne!(Source::from_ip(a), Source::from_ip(c));
        let m: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(Source::from_ip(m), ip(1));
    }
}

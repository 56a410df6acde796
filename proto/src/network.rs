//! The syntax of a sandbox's network policy items (e2b's `allow_out`/`deny_out`), in one
//! place for ctl (which refuses a bad policy before anything else happens) and the agent
//! (which turns it into nftables sets and the slot resolver's allow list).
//!
//! An item is an IPv4 address (`1.2.3.4`, meaning /32), an IPv4 network (`10.0.0.0/8`; host
//! bits are cleared), or in `allow_out` only a domain name: `example.com` (that name) or
//! `*.example.com` (every name below it, not `example.com` itself). IPv6 is refused: sandboxes
//! have no IPv6.

use std::fmt;
use std::net::Ipv4Addr;

use crate::sandbox_limits::{EGRESS_DOMAINS_MAX, EGRESS_RULES_MAX};

/// Longest domain name in text (RFC 1035: 255 bytes on the wire).
pub const DOMAIN_LEN_MAX: usize = 253;
/// Longest label (RFC 1035).
pub const LABEL_LEN_MAX: usize = 63;

/// A domain name in an allow list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainPattern {
    /// Lower-case, no final dot, no `*.`.
    base: String,
    wildcard: bool,
}

impl DomainPattern {
    /// Parses `name` or `*.name`: labels of letters, digits, `-`, `_` (1 to 63 bytes), at
    /// most 253 characters, a final dot ignored; a wildcard needs two labels (`*.com` would
    /// allow a whole top-level domain).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.strip_suffix('.').unwrap_or(s);
        let (wildcard, base) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if base.is_empty() || base.len() > DOMAIN_LEN_MAX {
            return Err(format!("{s:?}: empty or over {DOMAIN_LEN_MAX} characters"));
        }
        let mut labels = 0;
        for label in base.split('.') {
            labels += 1;
            if label.is_empty() || label.len() > LABEL_LEN_MAX {
                return Err(format!(
                    "{s:?}: empty label or label over {LABEL_LEN_MAX} bytes"
                ));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!("{s:?}: not a host name"));
            }
        }
        if wildcard && labels < 2 {
            return Err(format!("{s:?}: wildcard over a top-level domain"));
        }
        Ok(DomainPattern {
            base: base.to_ascii_lowercase(),
            wildcard,
        })
    }

    /// Whether `name` (lower-case dotted text, no final dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        if self.wildcard {
            name.len() > self.base.len()
                && name.ends_with(self.base.as_str())
                && name.as_bytes()[name.len() - self.base.len() - 1] == b'.'
        } else {
            name == self.base
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.base)
        } else {
            f.write_str(&self.base)
        }
    }
}

/// `a.b.c.d` or `a.b.c.d/n` (n ≤ 32), host bits cleared.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("{s:?}: not an IPv4 address or network");
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().map_err(|_| bad())?),
        None => (s, 32),
    };
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    if len > 32 {
        return Err(bad());
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok((Ipv4Addr::from(u32::from(addr) & mask), len))
}

/// One `allow_out` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowItem {
    Cidr(Ipv4Addr, u8),
    Domain(DomainPattern),
}

/// Parses an `allow_out` item: an address or network when it is made of digits, dots and a
/// slash, else a domain name.
pub fn parse_allow(s: &str) -> Result<AllowItem, String> {
    let s = s.trim();
    if s.contains(':') {
        return Err(format!("{s:?}: IPv6 is not supported"));
    }
    if s.bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
    {
        let (a, l) = parse_cidr(s)?;
        return Ok(AllowItem::Cidr(a, l));
    }
    DomainPattern::parse(s).map(AllowItem::Domain)
}

/// Checks a whole policy: every item and the bounds. The error names the item.
pub fn check_lists(deny_out: &[String], allow_out: &[String]) -> Result<(), String> {
    if deny_out.len() > EGRESS_RULES_MAX {
        return Err(format!(
            "deny_out: {} items (at most {EGRESS_RULES_MAX})",
            deny_out.len()
        ));
    }
    for d in deny_out {
        parse_cidr(d.trim()).map_err(|e| format!("deny_out: {e}"))?;
    }
    let (mut cidrs, mut domains) = (0, 0);
    for a in allow_out {
        match parse_allow(a).map_err(|e| format!("allow_out: {e}"))? {
            AllowItem::Cidr(..) => cidrs += 1,
            AllowItem::Domain(_) => domains += 1,
        }
    }
    if cidrs > EGRESS_RULES_MAX || domains > EGRESS_DOMAINS_MAX {
        return Err(format!(
            "allow_out: {cidrs} addresses and {domains} names (at most {EGRESS_RULES_MAX} and \
             {EGRESS_DOMAINS_MAX})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let exact = DomainPattern::parse("Example.COM.").unwrap();
        assert!(exact.matches("example.com"));
        assert!(!exact.matches("www.example.com"));
        let wild = DomainPattern::parse("*.example.com").unwrap();
        assert!(wild.matches("www.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
        assert!(!wild.matches("example.com.evil.net"));
        assert_eq!(wild.to_string(), "*.example.com");
        for bad in [
            "", "*.", "*.com", "a..b", "a b.com", "*.*.x.y", "x/y", "-*.a.b", "a.*.b",
        ] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(DomainPattern::parse(&"a".repeat(64)).is_err());
    }

    #[test]
    fn items_and_lists() {
        assert_eq!(
            parse_cidr("198.18.3.4/15").unwrap(),
            (Ipv4Addr::new(198, 18, 0, 0), 15)
        );
        assert_eq!(parse_cidr("1.2.3.4").unwrap().1, 32);
        for bad in [
            "1.2.3.4/33",
            "1.2.3/8",
            "x/8",
            "1.2.3.4/",
            "/8",
            "1.2.3.4/-1",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert!(matches!(parse_allow("10.0.0.0/8"), Ok(AllowItem::Cidr(..))));
        assert!(matches!(
            parse_allow(" api.example.com "),
            Ok(AllowItem::Domain(_))
        ));
        assert!(parse_allow("::1").is_err());
        assert!(parse_allow("1.2.3.999").is_err());
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(check_lists(&s(&["0.0.0.0/0"]), &s(&["1.2.3.4", "*.example.com"])).is_ok());
        assert!(check_lists(&s(&["example.com"]), &[]).is_err());
        let e = check_lists(&[], &s(&["ok.example", "bad name"])).unwrap_err();
        assert!(e.contains("bad name"), "{e}");
        let many = vec!["a.example.com".to_string(); EGRESS_DOMAINS_MAX + 1];
        assert!(check_lists(&[], &many).is_err());
    }
}
